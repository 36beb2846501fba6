"""Command line: argv -> commands. The only place that prints for humans.

Exit codes are documented in errors.py and README.md. Library code raises
UspawnError; this module prints it as one line (`uspawn: ...`) and returns
its exit code. A traceback means a bug in uspawn, never bad input.
"""

from __future__ import annotations

import gc
import os
import sys

from uspawn.base import timing
from uspawn.base.cmdline import Command, HelpRequested, Opt, duration, parse
from uspawn.base.errors import (
    EXIT_SETUP,
    UsageError,
    UspawnError,
    guard_stdio,
    printable,
    run_guarded,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

VERSION = "0.1.0"


def _log(msg: str) -> None:
    sys.stderr.write(f"uspawn: {printable(msg)}\n")


GLOBAL_OPTS = [
    Opt("--root", metavar="DIR", help="state directory (default /run/uspawn)"),
    Opt("--version", kind="flag", help="print the version"),
]

RUN_OPTS = [
    Opt("-D", "--directory", metavar="DIR", help="root directory of the container"),
    Opt("-M", "--machine", "--name", dest="name", metavar="NAME", help="container name"),
    Opt("--hostname", metavar="NAME", help="hostname (default: the container name)"),
    # No defaults here for the options a settings file may set: settings.apply tells
    # "given" from "not given" (the command line wins), then fills in the default.
    Opt("-U", "--private-users", metavar="pick|no|BASE[:SIZE]",
        help="user namespace ID range (default pick)"),
    Opt("--private-users-ownership", choices=("auto", "map", "chown", "off"),
        help="make rootfs ownership match the range (default auto)"),
    Opt("-u", "--user", metavar="NAME|UID[:GID]", help="user inside the container"),
    Opt("--chdir", metavar="DIR", help="working directory inside (default /)"),
    Opt("-E", "--setenv", kind="append", metavar="KEY=VALUE", help="set an environment variable"),
    Opt("--capability", kind="append", metavar="CAP[,CAP...]", help="add capabilities"),
    Opt("--drop-capability", kind="append", metavar="CAP[,CAP...]", help="drop capabilities"),
    Opt("--no-new-privileges", kind="flag", help="set no_new_privs"),
    Opt("--bind", kind="append", metavar="SRC[:DST[:OPTS]]",
        help="bind mount (OPTS: ro, norbind, idmap)"),
    Opt("--bind-ro", kind="append", metavar="SRC[:DST[:OPTS]]", help="read-only bind mount"),
    Opt("--network", metavar="private|host|veth|bridge:BR|netns:PATH",
        help="network: own namespace (lo only, the default), the host's, a veth, a bridge"),
    Opt("-p", "--port", kind="append", metavar="[tcp|udp:]HOST:CONT",
        help="publish a port (with veth or bridge)"),
    Opt("--tmpfs", kind="append", metavar="PATH[:OPTS]",
        help="a tmpfs at PATH (replaces the default /tmp or /run)"),
    Opt("--read-only", kind="flag", help="mount the rootfs read-only"),
    Opt("-t", "--tty", kind="flag", help="allocate a pseudo-terminal"),
    Opt("--stop-timeout", default="10", metavar="SECONDS",
        help="SIGKILL this long after SIGTERM/SIGINT or `uspawn stop` (default 10)"),
    Opt("--kill-signal", metavar="SIG",
        help="signal sent first on SIGTERM/SIGINT or `uspawn stop` (default: the one received)"),
    Opt("--memory", metavar="SIZE", help="memory limit (MemoryMax=; 256M, 2G, infinity)"),
    Opt("--cpus", metavar="N", help="CPU time limit in CPUs (CPUQuota=N*100%; 0.5, 2)"),
    Opt("--pids", metavar="N", help="task limit (TasksMax=)"),
    Opt("--property", kind="append", metavar="KEY=VALUE",
        help="a systemd resource-control limit: MemoryMax, MemoryHigh, MemorySwapMax, "
             "CPUQuota, CPUWeight, AllowedCPUs, TasksMax, IOWeight (docs/LIMITS.md)"),
    Opt("--lxcfs", choices=("yes", "no"), metavar="yes|no",
        help="lxcfs /proc views that match the limits (default: yes for boot, no for run)"),
    Opt("--settings", choices=("yes", "no", "trusted", "override"),
        help="read NAME.nspawn (docs/MIGRATING.md; default yes)"),
    Opt("-v", "--verbose", kind="flag", help="say what uspawn decided"),
    Opt("--debug", kind="flag", help="print the mount plan"),
]

_BOOT_ONLY = {"--hostname", "-D", "-M", "-U", "--private-users-ownership", "--capability",
              "--drop-capability", "--bind", "--bind-ro", "--tmpfs", "--network", "-p", "-v",
              "--debug", "--settings", "--memory", "--cpus", "--pids", "--property", "--lxcfs"}
BOOT_OPTS = [o for o in RUN_OPTS if o.names[0] in _BOOT_ONLY] + [
    Opt("-d", "--detach", kind="flag", help="return once the machine is ready"),
    Opt("--ready-timeout", default="90", metavar="SECONDS", help="with --detach (default 90)"),
    Opt("--console-log-size", metavar="SIZE",
        help="with --detach: cap of the console log, one rotated file kept (default 8M)"),
    Opt("--keep-unit", kind="flag",
        help="keep the machine in the calling systemd unit's cgroup (Delegate=yes) and "
             "register it with systemd-machined, as systemd-nspawn --keep-unit"),
]

COMMANDS = [
    Command("run", "run a command in a new container", RUN_OPTS, rest="cmd"),
    Command("boot", "boot the tree's init (systemd) as a system container", BOOT_OPTS,
            positionals=["machine"], optional_positionals=1),
    Command("list", "list running containers", [Opt("--json", kind="flag")]),
    Command("status", "show a running container", positionals=["name"]),
    Command("set", "change a running container's limits: uspawn set NAME KEY=VALUE...",
            positionals=["name"], rest="assignments"),
    Command("stop", "power a container off (SIGRTMIN+3, SIGKILL after the timeout)",
            [Opt("--timeout", default="30", metavar="SECONDS")], positionals=["name"]),
    Command("kill", "send a signal to a container's init", positionals=["name", "signal"],
            optional_positionals=1),
    Command("exec", "run a command inside a running container",
            [Opt("-t", "--tty", kind="flag", help="allocate a pseudo-terminal"),
             Opt("-E", "--setenv", kind="append", metavar="KEY=VALUE"),
             Opt("--chdir", default="/", metavar="DIR")],
            positionals=["name"], rest="cmd"),
    Command("shell", "open a login shell (with a pty) in a running container",
            positionals=["name"]),
    Command("enable", "boot a machine with the host (uspawn@NAME.service in "
            "uspawn-machines.target)", positionals=["name"]),
    Command("disable", "stop booting a machine with the host", positionals=["name"]),
    Command("logs", "show a detached machine's console log", [Opt("-f", "--follow", kind="flag")],
            positionals=["name"]),
    Command("doctor", "probe this host: what will it do to containers",
            [Opt("--json", kind="flag"),
             Opt("--path", default="", metavar="DIR", help="where container trees live")]),
    Command("check", "audit a tree before booting it", [Opt("--json", kind="flag")],
            positionals=["rootfs"]),
    Command("selftest", "kernel-upgrade canary: run containers and check /dev, mknod, IDs",
            [Opt("--json", kind="flag")]),
    Command("mkrootfs", "build the built-in busybox rootfs in DIRECTORY",
            positionals=["kind", "directory"]),
]


def _wants_version(args: list[str]) -> bool:
    """--version among the global options (`uspawn --root X --version` too)."""
    i = 0
    while i < len(args):
        if args[i] == "--version":
            return True
        if args[i] != "--root":
            return args[i].startswith("--root=") and _wants_version(args[i + 1 :])
        i += 2
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    timing.mark("imports (cli)")
    try:
        if _wants_version(args):
            print(f"uspawn {VERSION}")
            return 0
        try:
            command, ns = parse(GLOBAL_OPTS, COMMANDS, args)
        except HelpRequested as h:
            print(h.text)
            return 0
        timing.mark("argv parse")
        if command != "run":
            gc.enable()  # entry() turned it off for the start path only
        if command == "run":
            from uspawn.machine import settings
            from uspawn.machine.launch import run_command

            timing.mark("imports (run: machine, engine.console, kernel)")
            settings.apply(command, ns, _log)  # -D or /var/lib/machines/NAME, NAME.nspawn
            timing.mark("settings file")

            return run_command(ns, _log)
        if command == "boot":
            from uspawn.machine import settings

            settings.apply(command, ns, _log)  # NAME, -D or -M; NAME.nspawn
            # Normalised: boot reads it with float(), which takes "inf" and "nan".
            ns.ready_timeout = str(duration(ns.ready_timeout, "--ready-timeout", positive=True))
            if ns.console_log_size is not None:
                if not ns.detach:
                    raise UsageError("boot: --console-log-size needs --detach",
                                     "without --detach the console is not logged")
                from uspawn.machine.boot import parse_size

                parse_size(ns.console_log_size, "--console-log-size")
            if ns.keep_unit and ns.detach:
                raise UsageError("boot: --keep-unit and --detach exclude each other",
                                 "--keep-unit keeps the machine in the unit that runs "
                                 "`uspawn boot` in the foreground (uspawn@.service)")
            from uspawn.machine.launch import boot_command

            return boot_command(ns, _log)
        if command in ("exec", "shell"):
            from uspawn.machine.control import exec_command

            if command == "exec" and not ns.cmd:
                raise UsageError("exec: no command given", "uspawn exec NAME -- CMD [ARGS...]")
            return exec_command(ns.root, ns.name, ns.cmd if command == "exec" else None,
                                getattr(ns, "tty", False) or command == "shell",
                                getattr(ns, "setenv", []), getattr(ns, "chdir", "/"))
        if command == "set":
            from uspawn.machine import control as machines
            from uspawn.state.store import state_root

            return machines.set_command(state_root(ns.root), ns.name, ns.assignments)
        if command in ("list", "status", "stop", "kill", "logs"):
            from uspawn.machine import control as machines
            from uspawn.state.store import state_root

            root = state_root(ns.root)
            if command == "list":
                return machines.list_command(root, ns.json)
            if command == "status":
                return machines.status_command(root, ns.name)
            if command == "stop":
                return machines.stop_command(root, ns.name, duration(ns.timeout, "--timeout"))
            if command == "kill":
                return machines.kill_command(root, ns.name, ns.signal or "TERM")
            return machines.logs_command(ns.name, ns.follow)
        if command in ("enable", "disable"):
            from uspawn.machine import units

            return (units.enable if command == "enable" else units.disable)(ns.name, sys.stdout)
        if command == "doctor":
            from uspawn.diag.doctor import run_doctor

            return run_doctor(ns.json, sys.stdout, ns.path or None)
        if command == "check":
            from uspawn.diag.check import run_check

            return run_check(ns.rootfs, ns.json, sys.stdout)
        if command == "selftest":
            from uspawn.diag.selftest import run_selftest

            return run_selftest(ns.json, sys.stdout)
        if command == "mkrootfs":
            if ns.kind != "busybox":
                raise UsageError(f"mkrootfs: unknown kind {ns.kind!r}", "only busybox exists")
            from uspawn.tree.busybox import RootfsError, build_busybox_rootfs

            try:
                build_busybox_rootfs(ns.directory)
            except (RootfsError, OSError) as exc:
                raise UspawnError(f"mkrootfs {ns.directory}: {exc}") from None
            print(ns.directory)
            return 0
        raise UsageError(f"unknown command {command!r}")
    except UspawnError as exc:
        _log(exc.one_line())
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    # No cyclic GC on the start path: the ~9 collections while `run` imports and
    # sets up cost 2-3 ms and would free nothing (everything lives to the exit).
    # main() turns it back on for every other command, console.run once the
    # payload runs (a long foreground container must not accumulate cycles).
    gc.disable()
    guard_stdio()
    if os.geteuid() != 0 and ({"run", "boot"} & set(sys.argv[1:3])):
        _log("run: must be run as root for now (rootless mode is planned) "
             "(hint: sudo uspawn run ...)")
        sys.exit(EXIT_SETUP)
    code = run_guarded("uspawn", main)
    timing.mark("exit")
    # Skip interpreter teardown (~10 ms of module and GC cleanup): run_guarded
    # flushed the standard streams, nothing else is buffered.
    os._exit(code)
