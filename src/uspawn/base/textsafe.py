"""One sanitiser for text that came from a container before a human sees it.

A container controls its notify STATUS=, its hostname, its tree's file names
and os-release, and (through them) parts of error messages and of the state
directory. Printed raw, such text can move the admin's cursor, retitle or
reprogram the terminal (ESC sequences, C1 controls such as U+009B CSI), forge
extra output lines (CR, LF) or reorder what is shown (bidi overrides, "Trojan
Source"). Every such string goes through `printable` before it is printed;
JSON output keeps its own escaping and only takes the length caps (`clip`).
"""

from __future__ import annotations

# Longest text shown for one value: a path (PATH_MAX) fits, a flood does not.
DEFAULT_LIMIT = 4096
# sd_notify STATUS= is a one-line progress message (systemctl shows one line).
STATUS_LIMIT = 256
ELLIPSIS = "..."

# Explicit, so the result does not depend on the Unicode database of the
# interpreter: bidi embeddings/overrides/isolates and marks (all category Cf).
_BIDI = frozenset("\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e"
                  "\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    n = ord(ch)
    if n < 0x100:  # C0, DEL, C1 (and NBSP, soft hyphen)
        return f"\\x{n:02x}"
    return f"\\u{{{n:x}}}"


def _safe(ch: str) -> bool:
    return ch.isprintable() and ch not in _BIDI


def printable(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """text as one line of printable characters, at most `limit` long.

    Control characters (C0 incl. CR/LF/TAB, ESC, DEL, C1), bidi controls, lone
    surrogates and every other non-printable character become `\\xNN` (below
    U+0100) or `\\u{HEX}`; an over-long result ends in '...'.
    """
    if limit < len(ELLIPSIS) + 1:
        raise ValueError("printable: limit too small")
    if len(text) <= limit and text.isprintable() and not _BIDI.intersection(text):
        return text
    pieces: list[str] = []
    used = 0
    for ch in text:  # stops once past the limit: bounded work for any input
        piece = ch if _safe(ch) else _escape(ch)
        pieces.append(piece)
        used += len(piece)
        if used > limit:
            break
    if used <= limit:
        return "".join(pieces)
    budget = limit - len(ELLIPSIS)
    kept: list[str] = []
    used = 0
    for piece in pieces:  # whole escapes only: never cut one in half
        if used + len(piece) > budget:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + ELLIPSIS


def clip(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """text cut to `limit` characters ('...' at the end when cut), for output
    that escapes on its own (JSON)."""
    if len(text) <= limit:
        return text
    return text[: limit - len(ELLIPSIS)] + ELLIPSIS


def field(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """A state-file value shown in a table: None as '-', anything else printable."""
    if value is None or value == "":
        return "-"
    return printable(str(value), limit)


def terminal_text(text: str) -> str:
    """A console stream for a terminal: lines, tabs and colour (SGR) sequences
    stay; every other control character or escape sequence is shown escaped, so
    a recorded payload cannot move the cursor, retitle or reprogram the terminal
    of whoever reads the log. No length cap: this is a stream."""
    import re

    out: list[str] = []
    pos = 0
    for m in re.finditer(r"\x1b\[[0-9;]{0,32}m", text):
        out.append(_stream_piece(text[pos:m.start()]))
        out.append(m.group())
        pos = m.end()
    out.append(_stream_piece(text[pos:]))
    return "".join(out)


def _stream_piece(text: str) -> str:
    if text.isprintable() and not _BIDI.intersection(text):
        return text
    return "".join(ch if ch in "\n\t" or _safe(ch) else _escape(ch) for ch in text)
