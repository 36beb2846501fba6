"""Command line: argv -> commands. The only place that prints for humans.

Exit codes are documented in errors.py and README.md. Library code raises
UspawnError; this module prints it as one line (`uspawn: ...`) and returns
its exit code. A traceback means a bug in uspawn, never bad input.
"""

from __future__ import annotations

import os
import sys

from .cmdline import Command, HelpRequested, Opt, parse
from .errors import EXIT_SETUP, UsageError, UspawnError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

VERSION = "0.1.0"


def _log(msg: str) -> None:
    sys.stderr.write(f"uspawn: {msg}\n")


GLOBAL_OPTS = [
    Opt("--root", metavar="DIR", help="state directory (default /run/uspawn)"),
    Opt("--version", kind="flag", help="print the version"),
]

RUN_OPTS = [
    Opt("-D", "--directory", metavar="DIR", help="root directory of the container"),
    Opt("-M", "--machine", "--name", dest="name", metavar="NAME", help="container name"),
    Opt("--hostname", metavar="NAME", help="hostname (default: the container name)"),
    Opt("-U", "--private-users", default="pick", metavar="pick|no|BASE[:SIZE]",
        help="user namespace ID range"),
    Opt("--private-users-ownership", default="auto", choices=("auto", "map", "chown", "off"),
        help="make rootfs ownership match the range"),
    Opt("-u", "--user", metavar="NAME|UID[:GID]", help="user inside the container"),
    Opt("--chdir", default="/", metavar="DIR", help="working directory inside"),
    Opt("-E", "--setenv", kind="append", metavar="KEY=VALUE", help="set an environment variable"),
    Opt("--capability", kind="append", metavar="CAP[,CAP...]", help="add capabilities"),
    Opt("--drop-capability", kind="append", metavar="CAP[,CAP...]", help="drop capabilities"),
    Opt("--no-new-privileges", kind="flag", help="set no_new_privs"),
    Opt("--bind", kind="append", metavar="SRC[:DST[:OPTS]]", help="bind mount (idmapped)"),
    Opt("--bind-ro", kind="append", metavar="SRC[:DST[:OPTS]]", help="read-only bind mount"),
    Opt("--network", default="private", choices=("private", "host"), help="network namespace"),
    Opt("--read-only", kind="flag", help="mount the rootfs read-only"),
    Opt("-t", "--tty", kind="flag", help="allocate a pseudo-terminal"),
    Opt("-v", "--verbose", kind="flag", help="say what uspawn decided"),
    Opt("--debug", kind="flag", help="print the mount plan"),
]

COMMANDS = [
    Command("run", "run a command in a new container", RUN_OPTS, rest="cmd"),
    Command("mkrootfs", "build the built-in busybox rootfs in DIRECTORY",
            positionals=["kind", "directory"]),
]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--version" in args[:1]:
            print(f"uspawn {VERSION}")
            return 0
        try:
            command, ns = parse(GLOBAL_OPTS, COMMANDS, args)
        except HelpRequested as h:
            try:
                print(h.text)
            except BrokenPipeError:
                pass
            return 0
        if command == "run":
            if not ns.directory:
                raise UsageError("run: -D/--directory is required",
                                 "uspawn run -D ROOTFS -- CMD [ARGS...]")
            from .launch import run_command

            return run_command(ns, _log)
        if command == "mkrootfs":
            if ns.kind != "busybox":
                raise UsageError(f"mkrootfs: unknown kind {ns.kind!r}", "only busybox exists")
            from .busybox_rootfs import RootfsError, build_busybox_rootfs

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
    if os.geteuid() != 0 and "run" in sys.argv[1:3]:
        _log("run: must be run as root for now (rootless mode is planned) "
             "(hint: sudo uspawn run ...)")
        sys.exit(EXIT_SETUP)
    code = main()
    # Skip interpreter teardown (~10 ms of module and GC cleanup): nothing
    # is left to flush but the standard streams.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
