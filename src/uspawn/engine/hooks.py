"""OCI hooks: run a program with the container state on stdin, within its timeout.

Used on the host side (createRuntime, poststart, poststop, ...) and by the
container init for startContainer. No subprocess module: it costs ~5 ms to
import and init must import everything before pivot_root.
"""

from __future__ import annotations

import os
import select

from uspawn.kernel import sig
from uspawn.kernel import syscalls as sc


class HookError(Exception):
    pass


def run_hook(path: str, args: list[str], env: list[str], timeout: int | None, state: str,
             what: str) -> None:
    """Run one hook; raise HookError (one line) if it fails or times out."""
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    errr, errw = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(rfd, 0)
            os.dup2(errw, 2)
            os.execve(path, args or [path], dict(e.split("=", 1) for e in env if "=" in e))
        finally:
            os._exit(127)
    os.close(rfd)
    os.close(errw)
    try:
        try:
            os.write(wfd, state.encode())
        except BrokenPipeError:
            pass
        os.close(wfd)
        pidfd = sc.pidfd_open(pid)
        try:
            if not select.select([pidfd], [], [], timeout)[0]:
                os.kill(pid, sig.SIGKILL)
                os.waitpid(pid, 0)
                raise HookError(f"{what} hook {path}: timed out after {timeout}s")
        finally:
            os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        err = os.read(errr, 4096).decode(errors="replace").strip().splitlines()
    finally:
        os.close(errr)
    code = os.waitstatus_to_exitcode(status)
    if code == 127 and not os.path.exists(path):
        raise HookError(f"{what} hook {path}: no such file")
    if code != 0:
        raise HookError(f"{what} hook {path}: exit status {code}"
                        + (f": {err[-1]}" if err else ""))
