"""The one sanitiser for container-supplied text (src/uspawn/base/textsafe.py): pure logic."""

from __future__ import annotations

import pytest

from uspawn.base import textsafe
from uspawn.base.errors import UspawnError
from uspawn.base.errors import printable as error_printable
from uspawn.base.textsafe import clip, field, printable


def test_plain_text_is_unchanged() -> None:
    for s in ("", "machine web is ready", "Startup finished in 1.2s.", "Grüße, 日本語",
              "/var/lib/machines/web"):
        assert printable(s) == s


@pytest.mark.parametrize(("raw", "shown"), [
    ("\x1b[2J\x1b]0;pwned\x07", "\\x1b[2J\\x1b]0;pwned\\x07"),   # clear screen, set title
    ("a\rb\nc\td", "a\\x0db\\x0ac\\x09d"),                        # forged lines
    ("del\x7f", "del\\x7f"),
    ("\x9b31m", "\\x9b31m"),                                     # C1 CSI (one code point)
    ("\x00nul", "\\x00nul"),
    ("evil\u202etxt.exe", "evil\\u{202e}txt.exe"),                # bidi override
    ("\u2066iso\u2069", "\\u{2066}iso\\u{2069}"),                 # bidi isolates
    ("\u200fmark", "\\u{200f}mark"),
    ("\udcff", "\\u{dcff}"),                                      # lone surrogate
    ("line\u2028sep", "line\\u{2028}sep"),
])
def test_controls_are_escaped(raw: str, shown: str) -> None:
    out = printable(raw)
    assert out == shown
    assert out.isprintable() and "\x1b" not in out
    out.encode()  # never a lone surrogate left: always encodable


def test_every_code_point_below_0x3000_is_safe() -> None:
    text = "".join(chr(i) for i in range(0x3000))
    out = printable(text, limit=10**6)
    assert out.isprintable()
    assert not any(c in out for c in "\x1b\x9b\u202e\u2066")


def test_length_is_capped_without_cutting_an_escape() -> None:
    out = printable("x" * 10_000, limit=100)
    assert len(out) == 100 and out.endswith("...")
    for n in range(8, 40):
        out = printable("ab\x1b" * 50, limit=n)
        assert len(out) <= n and out.endswith("...")
        body = out[:-3]
        assert "\\" not in body.replace("\\x1b", "")  # whole escapes only
    assert printable("abc", limit=4) == "abc"
    assert printable("abcd", limit=4) == "abcd"
    assert printable("abcde", limit=4) == "a..."


def test_huge_input_costs_only_the_limit() -> None:
    out = printable("\x1b" * 10_000_000, limit=64)
    assert len(out) <= 64


def test_limit_must_leave_room() -> None:
    with pytest.raises(ValueError):
        printable("x", limit=3)


def test_status_limit_default() -> None:
    assert textsafe.STATUS_LIMIT <= 512


def test_clip_for_json() -> None:
    assert clip("a" * 10, 20) == "a" * 10
    assert clip("a" * 30, 20) == "a" * 17 + "..."
    assert clip("\x1b" * 5, 20) == "\x1b" * 5  # JSON escapes it; clip only caps


def test_field() -> None:
    assert field(None) == "-" and field("") == "-"
    assert field(12) == "12"
    assert field("a\x1bb") == "a\\x1bb"


def test_error_lines_use_the_same_sanitiser() -> None:
    assert error_printable("bad \x1b]0;x\x07 name") == printable("bad \x1b]0;x\x07 name")
    line = UspawnError("rootfs /x\n/\u202e: nope", "hint\x1b").one_line()
    assert line.isprintable() and "\\x0a" in line and "\\u{202e}" in line
    assert len(error_printable("y" * 100_000)) <= 3 * 4096
