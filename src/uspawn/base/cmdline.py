"""A small declarative command-line parser.

Why not argparse: it costs ~6 ms to import (re, gettext) on every container
start, a quarter of runc's whole `run` here (mkosi-sandbox avoids it for the
same reason). This parser covers what uspawn's commands need: global options,
subcommands, long/short options with `=`/attached/separate values, flags,
repeatable options, choices, positionals, and a trailing command line
(`-- CMD ARGS...`, or everything from the first non-option word on).
After `--`, a command without a trailing command line takes the remaining
words as positionals (`kill web -- KILL`).

The number parsers (`duration`, `size`, `uint`) are the one place command-line
numbers are read: ASCII digits only (`"²".isdigit()` is true but int() refuses
it), finite, non-negative and bounded, so NaN, inf or 1e999 never reach
select() or a sleep.
"""

from __future__ import annotations

import types

from uspawn.base.errors import UsageError


class Opt:
    def __init__(self, *names: str, dest: str | None = None, kind: str = "value",
                 default: object = None, choices: tuple[str, ...] | None = None,
                 metavar: str = "VALUE", help: str = "") -> None:
        assert kind in ("value", "flag", "append")
        self.names = names
        self.dest = dest or names[-1].lstrip("-").replace("-", "_")
        self.kind = kind
        self.default = [] if kind == "append" else (False if kind == "flag" else default)
        self.choices = choices
        self.metavar = metavar
        self.help = help


class Command:
    def __init__(self, name: str, help: str, opts: list[Opt] | None = None,
                 positionals: list[str] | None = None, optional_positionals: int = 0,
                 rest: str | None = None, aliases: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.opts = opts or []
        self.positionals = positionals or []
        self.optional_positionals = optional_positionals
        self.rest = rest  # dest for a trailing command line
        self.aliases = aliases


class HelpRequested(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def _lookup(opts: list[Opt], token: str) -> Opt | None:
    for o in opts:
        if token in o.names:
            return o
    return None


def _store(ns: dict[str, object], opt: Opt, value: str | None, where: str) -> None:
    if opt.kind == "flag":
        if value is not None:
            raise UsageError(f"{where}{opt.names[-1]}: takes no value")
        ns[opt.dest] = True
        return
    assert value is not None
    if opt.choices and value not in opt.choices:
        raise UsageError(f"{where}{opt.names[-1]}: invalid value {value!r}",
                         f"choose from {', '.join(opt.choices)}")
    if opt.kind == "append":
        lst = ns[opt.dest]
        assert isinstance(lst, list)
        lst.append(value)
    else:
        ns[opt.dest] = value


def _parse_opts(opts: list[Opt], argv: list[str], i: int, ns: dict[str, object],
                where: str, stop_at_word: bool) -> tuple[int, list[str]]:
    """Consume options from argv[i:]; return (index, positional words seen)."""
    words: list[str] = []
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            if stop_at_word:
                return i, words
            # A command without a trailing command line: everything after `--`
            # is a positional word (`kill web -- KILL`), never silently dropped.
            words += argv[i + 1 :]
            return len(argv), words
        if tok in ("-h", "--help"):
            raise HelpRequested("")
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            opt = _lookup(opts, name)
            if opt is None:
                raise UsageError(f"{where}unknown option {name}")
            if opt.kind != "flag" and not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"{where}{name}: needs a value")
                value = argv[i]
            _store(ns, opt, value if (eq or opt.kind != "flag") else None, where)
        elif tok.startswith("-") and len(tok) > 1:
            j = 1
            while j < len(tok):
                opt = _lookup(opts, "-" + tok[j])
                if opt is None:
                    raise UsageError(f"{where}unknown option -{tok[j]}")
                if opt.kind == "flag":
                    _store(ns, opt, None, where)
                    j += 1
                    continue
                value = tok[j + 1 :]
                if not value:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"{where}-{tok[j]}: needs a value")
                    value = argv[i]
                _store(ns, opt, value, where)
                break
        else:
            if stop_at_word:
                return i, words
            words.append(tok)
        i += 1
    return i, words


def parse(global_opts: list[Opt], commands: list[Command], argv: list[str],
          prog: str = "uspawn") -> tuple[str, types.SimpleNamespace]:
    ns: dict[str, object] = {o.dest: o.default for o in global_opts}
    try:
        i, _ = _parse_opts(global_opts, argv, 0, ns, "", stop_at_word=True)
    except HelpRequested:
        raise HelpRequested(usage(global_opts, commands, prog)) from None
    if i >= len(argv) or argv[i] == "--":
        raise UsageError("no command given", f"see `{prog} --help`")
    name = argv[i]
    cmd = next((c for c in commands if name == c.name or name in c.aliases), None)
    if cmd is None:
        raise UsageError(f"unknown command {name!r}", f"see `{prog} --help`")
    for o in cmd.opts:
        ns.setdefault(o.dest, [] if o.kind == "append" else o.default)
        if o.kind == "append":
            ns[o.dest] = []
    where = f"{cmd.name}: "
    rest: list[str] = []
    try:
        if cmd.rest is not None:
            # Options first; the first other word (or `--`) starts the command line.
            j, _ = _parse_opts(cmd.opts, argv, i + 1, ns, where, stop_at_word=True)
            k = j
            words: list[str] = []
            while len(words) < len(cmd.positionals) and k < len(argv) and argv[k] != "--":
                words.append(argv[k])
                k, _ = _parse_opts(cmd.opts, argv, k + 1, ns, where, stop_at_word=True)
            if k < len(argv) and argv[k] == "--":
                k += 1
            rest = argv[k:]
        else:
            _, words = _parse_opts(cmd.opts, argv, i + 1, ns, where, stop_at_word=False)
    except HelpRequested:
        raise HelpRequested(command_usage(cmd, prog)) from None
    need = len(cmd.positionals) - cmd.optional_positionals
    if len(words) < need:
        missing = cmd.positionals[len(words)]
        raise UsageError(f"{where}missing {missing.upper()}", f"see `{prog} {cmd.name} --help`")
    if len(words) > len(cmd.positionals):
        raise UsageError(f"{where}unexpected argument {words[len(cmd.positionals)]!r}")
    for k, pos in enumerate(cmd.positionals):
        ns[pos] = words[k] if k < len(words) else None
    if cmd.rest is not None:
        ns[cmd.rest] = rest
    return cmd.name, types.SimpleNamespace(**ns)


def _opt_line(o: Opt) -> str:
    names = ", ".join(o.names)
    if o.kind != "flag":
        names += f" {'|'.join(o.choices) if o.choices else o.metavar}"
    return f"  {names:<38} {o.help}"


def usage(global_opts: list[Opt], commands: list[Command], prog: str) -> str:
    lines = [f"usage: {prog} [OPTIONS] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {c.name:<14} {c.help}" for c in commands]
    lines += ["", "options:"] + [_opt_line(o) for o in global_opts]
    return "\n".join(lines)


def command_usage(cmd: Command, prog: str) -> str:
    pos = " ".join(p.upper() for p in cmd.positionals)
    tail = " [--] CMD [ARGS...]" if cmd.rest else ""
    lines = [f"usage: {prog} {cmd.name} [OPTIONS] {pos}{tail}".replace("  ", " "), "",
             cmd.help, "", "options:"]
    lines += [_opt_line(o) for o in cmd.opts]
    return "\n".join(lines)


# --- numbers ------------------------------------------------------------------------------------

MAX_DURATION = 366 * 86400.0  # a year: longer waits are typos, and select() overflows
MAX_SIZE = 1 << 50  # bytes
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def is_uint(text: str) -> bool:
    """ASCII decimal digits only ("²" and "٣" are str.isdigit() but not numbers here)."""
    return text.isascii() and text.isdigit()


def _int(digits: str) -> int:
    # int() refuses strings over 4300 digits (ValueError); anything past 30 is out of range.
    return int(digits) if len(digits) <= 30 else 10**30


def uint(value: str, field: str, maximum: int = 2**32 - 1, minimum: int = 0) -> int:
    """A non-negative decimal integer in [minimum, maximum]."""
    if not is_uint(value):
        raise UsageError(f"{field}: {value!r} is not a number", "use decimal digits 0-9")
    n = _int(value)
    if not minimum <= n <= maximum:
        raise UsageError(f"{field}: {value!r} out of range", f"between {minimum} and {maximum}")
    return n


def duration(value: str, field: str, positive: bool = False,
             maximum: float = MAX_DURATION) -> float:
    """Seconds: DIGITS[.DIGITS] (no sign, exponent, nan or inf), at most `maximum`."""
    whole, dot, frac = value.partition(".")
    if not ((is_uint(whole) or (dot and not whole)) and (not dot or is_uint(frac))):
        raise UsageError(f"{field}: {value!r} is not a number of seconds",
                         "use digits, such as 10 or 0.5")
    n = float(value)
    if positive and n <= 0:
        raise UsageError(f"{field}: must be > 0")
    if n > maximum:
        raise UsageError(f"{field}: {value!r} out of range", f"at most {maximum:.0f} seconds")
    return n


def size(value: str, field: str, minimum: int = 0, maximum: int = MAX_SIZE) -> int:
    """BYTES or N[K|M|G|T][iB|B] (powers of 1024), in [minimum, maximum]."""
    v = value.upper().removesuffix("IB").removesuffix("B")
    unit = v[-1:] if v[-1:] in _SIZE_UNITS and v[-1:] else ""
    digits = v[: len(v) - len(unit)]
    if not is_uint(digits):
        raise UsageError(f"{field}: {value!r} is not a size", "use BYTES or N with K, M or G")
    n = _int(digits) * _SIZE_UNITS[unit]
    if not minimum <= n <= maximum:
        raise UsageError(f"{field}: {value!r} out of range",
                         f"between {minimum} and {maximum} bytes")
    return n
