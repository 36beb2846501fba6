"""Unit tier: the command-line parser and the CLI's error contract."""

from __future__ import annotations

import pytest

from uspawn import cli
from uspawn.base.cmdline import (
    MAX_DURATION,
    Command,
    HelpRequested,
    Opt,
    duration,
    is_uint,
    parse,
    size,
    uint,
)
from uspawn.base.errors import UsageError
from uspawn.state.store import JSONError, loads

OPTS = [
    Opt("-D", "--directory"),
    Opt("-t", "--tty", kind="flag"),
    Opt("-v", "--verbose", kind="flag"),
    Opt("-E", "--setenv", kind="append"),
    Opt("--network", default="private", choices=("private", "host")),
]
CMDS = [Command("run", "run", OPTS, rest="cmd"),
        Command("mk", "make", positionals=["kind", "dir"])]
GLOBAL = [Opt("--root")]


def test_run_forms() -> None:
    name, ns = parse(GLOBAL, CMDS, ["--root", "/s", "run", "-D", "/r", "-tv", "-E", "A=1",
                                    "--setenv=B=2", "--network=host", "--", "sh", "-c", "x"])
    assert name == "run"
    assert (ns.root, ns.directory, ns.tty, ns.verbose) == ("/s", "/r", True, True)
    assert ns.setenv == ["A=1", "B=2"] and ns.network == "host"
    assert ns.cmd == ["sh", "-c", "x"]


def test_command_starts_at_first_word_and_keeps_its_options() -> None:
    _, ns = parse(GLOBAL, CMDS, ["run", "-D/r", "ls", "-la", "--tty"])
    assert ns.directory == "/r" and ns.tty is False
    assert ns.cmd == ["ls", "-la", "--tty"]


def test_positionals() -> None:
    _, ns = parse(GLOBAL, CMDS, ["mk", "busybox", "/d"])
    assert (ns.kind, ns.dir) == ("busybox", "/d")
    with pytest.raises(UsageError, match="missing DIR"):
        parse(GLOBAL, CMDS, ["mk", "busybox"])
    with pytest.raises(UsageError, match="unexpected argument"):
        parse(GLOBAL, CMDS, ["mk", "a", "b", "c"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--bogus"], "unknown option --bogus"),
        (["run", "-x"], "unknown option -x"),
        (["run", "-D"], "needs a value"),
        (["run", "--network=mars"], "invalid value 'mars'"),
        (["run", "--tty=1"], "takes no value"),
        (["nope"], "unknown command"),
        ([], "no command"),
    ],
)
def test_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse(GLOBAL, CMDS, argv)


def test_help() -> None:
    with pytest.raises(HelpRequested) as h:
        parse(GLOBAL, CMDS, ["run", "--help"])
    assert "--directory" in h.value.text
    with pytest.raises(HelpRequested) as h2:
        parse(GLOBAL, CMDS, ["--help"])
    assert "run" in h2.value.text


def test_cli_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--frob"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("uspawn: run: unknown option --frob")
    assert cli.main(["run", "--", "true"]) == 2
    assert "-D/--directory is required" in capsys.readouterr().err


# --- issue 15: `--`, numbers, JSON -----------------------------------------------------------

CMDS15 = [Command("kill", "kill", positionals=["name", "signal"], optional_positionals=1),
          Command("stop", "stop", [Opt("--timeout", default="30")], positionals=["name"]),
          Command("run", "run", OPTS, rest="cmd")]


def test_dashdash_words_are_positionals_not_dropped() -> None:
    _, ns = parse(GLOBAL, CMDS15, ["kill", "web", "--", "KILL"])
    assert (ns.name, ns.signal) == ("web", "KILL")
    _, ns = parse(GLOBAL, CMDS15, ["kill", "--", "-web"])
    assert ns.name == "-web"
    # After `--` an option is a word: never silently ignored.
    with pytest.raises(UsageError, match="unexpected argument '--timeout'"):
        parse(GLOBAL, CMDS15, ["stop", "web", "--", "--timeout", "5"])
    _, ns = parse(GLOBAL, CMDS15, ["run", "-D", "/r", "--", "--", "x"])
    assert ns.cmd == ["--", "x"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e9", "-1", "-0",
                                   "+5", " 5", "5 ", "5.", ".", "", "0x10", "²", "٣", "1_0",
                                   "1.2.3", "9" * 5000])
def test_duration_refuses(value: str) -> None:
    with pytest.raises(UsageError, match="--t"):
        duration(value, "--t")


def test_duration_accepts_and_bounds() -> None:
    assert duration("10", "--t") == 10.0
    assert duration("0.5", "--t") == 0.5 and duration(".5", "--t") == 0.5
    assert duration("0", "--t") == 0.0
    with pytest.raises(UsageError, match="must be > 0"):
        duration("0", "--t", positive=True)
    with pytest.raises(UsageError, match="out of range"):
        duration(str(MAX_DURATION * 2), "--t")


def test_size_and_uint() -> None:
    assert size("8M", "--s") == 8 << 20 and size("8MiB", "--s") == 8 << 20
    assert size("4096", "--s") == 4096 and size("1k", "--s") == 1024
    for bad in ("", "k", "²M", "-1", "1.5M", "9" * 5000, "1P"):
        with pytest.raises(UsageError):
            size(bad, "--s")
    with pytest.raises(UsageError, match="out of range"):
        size("1", "--s", minimum=4096)
    assert uint("42", "--n") == 42
    for bad in ("²", "٣", "-1", "+1", " 1", "", "1" * 5000, "4294967296"):
        with pytest.raises(UsageError):
            uint(bad, "--n")
    assert is_uint("123") and not is_uint("²") and not is_uint("")


@pytest.mark.parametrize(("text", "line", "col"), [
    ("", 1, 1), ("{", 1, 2), ('{"a": 1,\n  "b" 2}', 2, 7), ("[1] x", 1, 5),
    ("\n\n  nul", 3, 3), ('"a\x01"', 1, 3), ("[" * 100_000, 1, 1), (b'{"a":"\xc3\xa9\xff"}', 1, 8),
    (b"\xff", 1, 1),
])
def test_json_errors_name_line_and_column(text: str | bytes, line: int, col: int) -> None:
    with pytest.raises(JSONError) as e:
        loads(text)
    assert (e.value.lineno, e.value.colno) == (line, col)
    assert f"line {line} column {col}" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_json_accepts_what_json_does() -> None:
    assert loads(' {"a": [1, 2.5, null, true], "b": "\\u00e9"} \n') == {
        "a": [1, 2.5, None, True], "b": "é"}
    assert loads(b"NaN") != loads(b"NaN")  # NaN, as json.loads (records only)
