"""Command line: argv -> commands. The only place that prints for humans.

Exit codes are documented in errors.py and README.md. Library code raises
UspawnError; this module prints it as one line (`uspawn: ...`) and returns
its exit code. A traceback means a bug in uspawn, never bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_SETUP, EXIT_USAGE, UsageError, UspawnError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence


def _log(msg: str) -> None:
    sys.stderr.write(f"uspawn: {msg}\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, f"see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="uspawn", description="User-namespaced system containers.")
    p.add_argument("--version", action="version", version="uspawn 0.1.0")
    p.add_argument("--root", help="state directory (default /run/uspawn)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run a command in a new container")
    r.add_argument("-D", "--directory", required=True, help="root directory of the container")
    r.add_argument("-M", "--machine", "--name", dest="name", help="container name")
    r.add_argument("--hostname")
    r.add_argument("-U", "--private-users", default="pick", metavar="pick|no|BASE[:SIZE]")
    r.add_argument("--private-users-ownership", default="auto",
                   choices=("auto", "map", "chown", "off"))
    r.add_argument("-u", "--user", help="NAME|UID[:GID] inside the container")
    r.add_argument("--chdir", default="/", help="working directory inside the container")
    r.add_argument("-E", "--setenv", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--capability", action="append", default=[], metavar="CAP[,CAP...]")
    r.add_argument("--drop-capability", action="append", default=[], metavar="CAP[,CAP...]")
    r.add_argument("--no-new-privileges", action="store_true")
    r.add_argument("--bind", action="append", default=[], metavar="SRC[:DST[:OPTS]]")
    r.add_argument("--bind-ro", action="append", default=[], metavar="SRC[:DST[:OPTS]]")
    r.add_argument("--network", default="private", choices=("private", "host"))
    r.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    r.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    r.add_argument("-v", "--verbose", action="store_true")
    r.add_argument("--debug", action="store_true")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    m = sub.add_parser("mkrootfs", help="build the built-in busybox rootfs")
    m.add_argument("kind", choices=("busybox",))
    m.add_argument("directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns = build_parser().parse_args(argv)
        if ns.command == "run":
            from .launch import run_command

            return run_command(ns, _log)
        if ns.command == "mkrootfs":
            from .busybox_rootfs import RootfsError, build_busybox_rootfs

            try:
                build_busybox_rootfs(ns.directory)
            except (RootfsError, OSError) as exc:
                raise UspawnError(f"mkrootfs {ns.directory}: {exc}") from None
            print(ns.directory)
            return 0
        raise UsageError(f"unknown command {ns.command!r}")
    except UspawnError as exc:
        _log(exc.one_line())
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # argparse --help/--version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


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
