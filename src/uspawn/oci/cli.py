"""`uspawn-runc`: the runc-compatible command line over uspawn's OCI face.

A separate command (not `uspawn run ...`) because runc's verbs collide with
uspawn's own (`run`, `exec`, `kill`, `list`). Point podman at it with
`--runtime /usr/local/bin/uspawn-runc`, containerd with BinaryName=...

Errors: with `--log FILE`, a record in FILE (text, or JSON with msg/level/time
under `--log-format json`, as podman asks of runtimes listed in
runtime_supports_json), written first; then one line on stderr, best effort
(containerd's shim hands a read-only /dev/null as stderr and reads only the log).
Exit code 1 for runtime errors, as runc; 2 for usage errors; `run` without
--detach exits with the container's status.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from uspawn.base import timing
from uspawn.base.cmdline import Command, HelpRequested, Opt, parse
from uspawn.base.errors import UsageError, UspawnError, printable
from uspawn.oci import lifecycle as oci

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Sequence

VERSION = "0.1.0"


class PODS:
    """Started as `uspawn-runc-pods` (a second script, or a link to uspawn-runc of that
    name): every pod in a user namespace of its own (oci/pods.py). A binary name, not an
    option or an annotation: containerd's runc shim passes nothing per handler but
    BinaryName, and the mode is the cluster admin's (RuntimeClass), not a pod's."""

    on = False

GLOBAL = [
    Opt("--root", default=oci.DEFAULT_ROOT, metavar="DIR", help="state directory"),
    Opt("--log", default="", metavar="FILE", help="write errors to FILE (before stderr)"),
    Opt("--log-format", default="text", choices=("text", "json")),
    Opt("--log-level", default="error", metavar="LEVEL"),
    Opt("--debug", kind="flag"),
    Opt("--systemd-cgroup", kind="flag", help="accepted; cgroupfs is used (no systemd here)"),
    Opt("--rootless", default="auto", metavar="auto|true|false", help="accepted"),
    Opt("--criu", default="", metavar="PATH", help="accepted; checkpointing is not supported"),
    Opt("-v", "--version", kind="flag"),
]
_CREATE = [
    Opt("-b", "--bundle", default=".", metavar="DIR"),
    Opt("--pid-file", default="", metavar="FILE"),
    Opt("--console-socket", default="", metavar="SOCKET"),
    Opt("--no-pivot", kind="flag", help="accepted; pivot_root is always used"),
    Opt("--no-new-keyring", kind="flag"),
    Opt("--preserve-fds", default="0", metavar="N"),
    Opt("--no-subreaper", kind="flag"),
]
COMMANDS = [
    Command("spec", "write a default config.json",
            [Opt("--rootless", dest="spec_rootless", kind="flag"),
             Opt("-b", "--bundle", default=".")]),
    Command("create", "create a container", _CREATE, positionals=["id"]),
    Command("start", "start a created container", positionals=["id"]),
    Command("run", "create and start a container",
            [*_CREATE, Opt("-d", "--detach", kind="flag"), Opt("--keep", kind="flag")],
            positionals=["id"]),
    Command("state", "print a container's state JSON", positionals=["id"]),
    Command("kill", "send a signal to a container (0: check that it runs)",
            [Opt("-a", "--all", kind="flag")],
            positionals=["id", "signal"], optional_positionals=1),
    Command("delete", "delete a container", [Opt("-f", "--force", kind="flag")],
            positionals=["id"]),
    Command("list", "list containers",
            [Opt("-f", "--format", default="table", choices=("table", "json")),
             Opt("-q", "--quiet", kind="flag")]),
    Command("ps", "list a container's processes (ps ID -- PS-OPTIONS)",
            [Opt("-f", "--format", default="table", choices=("table", "json"))],
            positionals=["id"], rest="ps_args"),
    Command("pause", "freeze a container", positionals=["id"]),
    Command("resume", "thaw a container", positionals=["id"]),
    Command("features", "print the runtime's features JSON"),
    Command("update", "change a running container's resource limits", [
        Opt("-r", "--resources", default="", metavar="FILE",
            help="linux.resources JSON (- = stdin); flags override its fields"),
        Opt("--memory", default="", metavar="SIZE", help="memory limit (-1: unlimited)"),
        Opt("--memory-reservation", default="", metavar="SIZE", help="memory soft limit"),
        Opt("--memory-swap", default="", metavar="SIZE", help="memory+swap limit"),
        Opt("--cpu-share", default="", metavar="N", help="CPU shares (relative weight)"),
        Opt("--cpu-quota", default="", metavar="USEC", help="CPU time per period (-1: none)"),
        Opt("--cpu-period", default="", metavar="USEC", help="CFS period (1000..1000000)"),
        Opt("--cpuset-cpus", default="", metavar="LIST", help="CPUs allowed (0-3,5)"),
        Opt("--cpuset-mems", default="", metavar="LIST", help="memory nodes allowed"),
        Opt("--pids-limit", default="", metavar="N", help="max tasks (-1: unlimited)"),
        *(Opt(f"--{name}", default="", help="refused: not supported")
          for name in ("blkio-weight", "cpu-rt-period", "cpu-rt-runtime", "kernel-memory",
                       "kernel-memory-tcp", "l3-cache-schema", "mem-bw-schema")),
    ], positionals=["id"]),
    Command("events", "print a container's resource usage and OOM events", [
        Opt("--stats", kind="flag", help="print one stats record and exit"),
        Opt("--interval", default="5s", metavar="DURATION",
            help="time between stats records (5s, 500ms)"),
    ], positionals=["id"]),
    Command("exec", "run a process in a running or created container", [
        Opt("-p", "--process", default="", metavar="FILE"),
        Opt("-t", "--tty", kind="flag"), Opt("-d", "--detach", kind="flag"),
        Opt("--pid-file", default=""), Opt("--console-socket", default=""),
        Opt("--cwd", default=""), Opt("-e", "--env", kind="append"),
        Opt("-u", "--user", default=""), Opt("-c", "--cap", kind="append"),
        Opt("--no-new-privs", kind="flag"),
        Opt("--preserve-fds", default="0", metavar="N", help="pass fds 3..3+N-1 on"),
        Opt("--apparmor", default=""), Opt("--process-label", default=""),
        Opt("-g", "--additional-gids", kind="append"), Opt("--ignore-paused", kind="flag"),
        Opt("--cgroup", default=""),
    ], positionals=["id"], rest="args"),
]


class Logger:
    def __init__(self, path: str, fmt: str) -> None:
        self.path = path
        self.fmt = fmt

    def __call__(self, msg: str, level: str = "warning") -> None:
        msg = printable(msg)
        # The log first: containerd's shim hands us a read-only /dev/null as
        # stderr, and the log is all it reads back (issue 14).
        self.record(msg, level)
        to_stderr(f"uspawn-runc: {msg}\n")

    def record(self, msg: str, level: str = "error") -> None:
        if not self.path:
            return
        t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if self.fmt == "json":
            from uspawn.state.store import dumps

            line = dumps({"level": level, "msg": msg, "time": t})
        else:
            line = f'time="{t}" level={level} msg="{msg}"'
        try:
            with open(self.path, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


def to_stderr(text: str) -> None:
    """Best effort: stderr may be closed or read-only (a shim's /dev/null)."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):  # ValueError: a closed file object
        pass


def _signal(value: str | None) -> int:
    from uspawn.kernel.sig import parse_signal

    if value is not None and value.upper().removeprefix("SIG") == "0":
        return 0  # runc: signal 0 checks that the container exists and runs
    return parse_signal(value or "SIGTERM")


def _int(value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{field}: {value!r} is not a number") from None


def dispatch(cmd: str, ns: types.SimpleNamespace, log: Logger) -> int:
    from uspawn.state.store import usable_dir

    root = ns.root = usable_dir(ns.root, "--root")  # not a file, /proc/1/root... (issue 15)
    if cmd == "spec":
        from uspawn.oci.defaults import default_config

        path = os.path.join(ns.bundle, "config.json")
        if os.path.exists(path):
            raise oci.OciError(f"{path} already exists", "remove it first")
        if ns.spec_rootless and os.geteuid() == 0:
            # runc writes it too; uspawn-runc create refuses host ID 0 in a mapping.
            log("warning: --rootless maps container root to the caller, host root here: "
                "create will refuse it; run `spec` without --rootless as root")
        import json

        try:
            with open(path, "w") as f:
                json.dump(default_config(rootless=ns.spec_rootless), f, indent="\t")
                f.write("\n")
        except OSError as exc:
            raise oci.OciError(f"{path}: {exc.strerror}") from None
        return 0
    if cmd == "create":
        oci.create(root, ns.id, ns.bundle, ns.pid_file or None, ns.console_socket or None,
                   log, _int(ns.preserve_fds, "--preserve-fds"), not ns.no_new_keyring,
                   pods=PODS.on)
        return 0
    if cmd == "start":
        oci.start(root, ns.id, log)
        return 0
    if cmd == "run":
        return _run(ns, log)
    if cmd == "state":
        from uspawn.state.store import dumps

        print(dumps(oci.state(root, ns.id)))
        return 0
    if cmd == "kill":
        oci.kill(root, ns.id, _signal(ns.signal), ns.all)
        return 0
    if cmd == "delete":
        oci.delete(root, ns.id, ns.force, log)
        return 0
    if cmd == "list":
        return _list(root, ns)
    if cmd == "ps":
        return _ps(root, ns)
    if cmd in ("pause", "resume"):
        oci.pause(root, ns.id, cmd == "pause")
        return 0
    if cmd == "features":
        import json

        from uspawn.oci.defaults import features

        print(json.dumps(features(), indent=2))
        return 0
    if cmd == "update":
        from uspawn.oci.update import update_command

        return update_command(root, ns)
    if cmd == "events":
        from uspawn.oci.events import events_command

        return events_command(root, ns)
    if cmd == "exec":
        from uspawn.oci.exec import exec_command

        return exec_command(root, ns, log)
    raise UsageError(f"unknown command {cmd!r}")


def _run(ns: types.SimpleNamespace, log: Logger) -> int:
    if ns.detach:
        oci.create(ns.root, ns.id, ns.bundle, ns.pid_file or None, ns.console_socket or None,
                   log, _int(ns.preserve_fds, "--preserve-fds"), not ns.no_new_keyring,
                   pods=PODS.on)
        oci.start(ns.root, ns.id, log)
        return 0
    from uspawn.engine.console import ConsoleIO, forward_and_wait, forward_signals

    c = oci.create(ns.root, ns.id, ns.bundle, ns.pid_file or None, ns.console_socket or None,
                   log, _int(ns.preserve_fds, "--preserve-fds"), not ns.no_new_keyring,
                   foreground=True, pods=PODS.on)
    try:
        with forward_signals(c):
            c.start()
            if not gc.isenabled():  # entry() turned it off
                gc.freeze()  # what set-up allocated lives to the exit: never scan it
                gc.enable()  # a long foreground container must not accumulate cycles
            return forward_and_wait(c, ConsoleIO(interactive=True))
    finally:
        c.destroy()
        if not ns.keep:
            oci.delete(ns.root, ns.id, True, log)


def _list(root: str, ns: types.SimpleNamespace) -> int:
    recs = oci.list_ids(root)
    if ns.quiet:
        for r in recs:
            print(r.id)
        return 0
    states = [r.oci_state() for r in recs]
    if ns.format == "json":
        from uspawn.state.store import dumps

        print(dumps(states))
        return 0
    rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
    rows += [(str(s["id"]), str(s["pid"]), str(s["status"]), str(s["bundle"]),
              str(s["created"]), "root") for s in states]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _ps(root: str, ns: types.SimpleNamespace) -> int:
    pids = oci.pids(root, ns.id)
    if ns.format == "json":
        from uspawn.state.store import dumps

        print(dumps(pids))
        return 0
    import subprocess

    # runc: `ps ID -- OPTIONS` hands OPTIONS to the host's ps(1) and keeps the
    # header plus the rows whose PID column is one of the container's processes.
    try:
        out = subprocess.run(["ps", *(ns.ps_args or ["-ef"])], capture_output=True,
                             text=True, errors="replace")
    except OSError as exc:
        raise oci.OciError(f"ps: cannot run ps(1): {exc.strerror}",
                           "install procps, or use `ps --format json` for the pids") from None
    lines = out.stdout.splitlines()
    if out.returncode != 0 or not lines:
        err = out.stderr.strip().splitlines()
        raise oci.OciError(f"ps {' '.join(ns.ps_args)}: exit {out.returncode}: "
                           f"{err[0] if err else 'no output'}")
    header = lines[0].split()
    col = header.index("PID") if "PID" in header else 1
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > col and fields[col].isdigit() and int(fields[col]) in pids:
            print(line)
    return 0


def _wants_version(args: list[str]) -> bool:
    """--version/-v among the global options (before the command word)."""
    takes_value = {n for o in GLOBAL if o.kind == "value" for n in o.names}
    i = 0
    while i < len(args):
        tok = args[i]
        if tok in ("--version", "-v"):
            return True
        if not tok.startswith("-"):
            return False
        i += 2 if tok in takes_value else 1
    return False


def _early_log(args: list[str]) -> Logger:
    """--log/--log-format picked from argv by hand, for errors parse() raised."""
    path, fmt = "", "text"
    for i, tok in enumerate(args[:-1]):
        if tok == "--log":
            path = args[i + 1]
        elif tok == "--log-format" and args[i + 1] in ("text", "json"):
            fmt = args[i + 1]
    for tok in args:
        if tok.startswith("--log="):
            path = tok.split("=", 1)[1]
        elif tok.startswith("--log-format="):
            fmt = tok.split("=", 1)[1]
    return Logger(path, "json" if fmt == "json" else "text")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    timing.mark("imports (cli)")
    log = Logger("", "text")
    try:
        if _wants_version(args):
            from uspawn.engine.spec import OCI_VERSION

            name = "uspawn-runc-pods" if PODS.on else "uspawn-runc"
            print(f"{name} version {VERSION}\nspec: {OCI_VERSION}")
            return 0
        try:
            cmd, ns = parse(GLOBAL, COMMANDS, args, prog="uspawn-runc")
        except HelpRequested as h:
            print(h.text)
            return 0
        log = Logger(ns.log, ns.log_format)
        timing.mark("argv parse")
        if cmd not in _SHORT_COMMANDS:
            gc.enable()  # entry() turned it off for the short calls only
        return dispatch(cmd, ns, log)
    except UspawnError as exc:
        if not log.path:
            log = _early_log(args)  # a usage error: parse() never returned the options
        log.record(exc.one_line())  # first: stderr may be unwritable (issue 14)
        to_stderr(f"uspawn-runc: {exc.one_line()}\n")
        return 1 if exc.exit_code not in (2,) else 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A bug, not bad input: the traceback still goes to stderr, but the shim
        # that hid stderr must find a line in --log too.
        (log if log.path else _early_log(args)).record(f"internal error: {exc!r}")
        raise


# Commands that end as soon as their work is done (`run` turns GC back on once
# the payload runs): no cyclic GC for them, see entry().
_SHORT_COMMANDS = frozenset({"create", "start", "state", "kill", "delete", "run"})


def entry(pods: bool | None = None) -> None:
    from uspawn.base.errors import run_guarded

    # pods: bin/uspawn-runc-pods says so; else the name we were started under (a
    # symlink named uspawn-runc-pods to bin/uspawn-runc).
    PODS.on = pods if pods is not None else (
        os.path.basename(sys.argv[0]) == "uspawn-runc-pods")

    # Cyclic GC costs the short calls (create, start, delete...) collections that
    # free nothing before the exit; main() turns it back on for the other commands.
    gc.disable()
    # Closed stdio, EPIPE, a full disk, and any bug: one line and an exit code (issue 15).
    code = run_guarded("uspawn-runc", main)
    timing.mark("exit")
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass  # an unwritable stdio must not turn the exit code into a traceback
    os._exit(code)
