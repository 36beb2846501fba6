"""Unit tier: the command-line parser and the CLI's error contract."""

from __future__ import annotations

import pytest

from uspawn import cli
from uspawn.base.cmdline import Command, HelpRequested, Opt, parse
from uspawn.base.errors import UsageError

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
