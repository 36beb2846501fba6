"""One error hierarchy and the documented exit codes.

Library code raises; only the CLI prints (one line) and picks the exit code.
Exit codes follow podman/runc conventions so wrappers can tell the payload's
own status from uspawn's:

    0..124  the payload's exit status (uspawn run/boot pass it through)
    125     uspawn could not set up or run the container (config, kernel, host)
    126     the command exists in the container but could not be executed
    127     the command was not found in the container
    128+N   the payload was killed by signal N
    133     boot: the machine asked for a reboot (as systemd-nspawn; machine/boot.py
            EXIT_REBOOT; 128+SIGTRAP too, as for nspawn: an init killed by SIGTRAP is a bug)
    2       command-line usage error
    141     (128+SIGPIPE) uspawn's own stdout is a pipe whose reader left
            (`uspawn list | head -1`): it stops quietly, as a C tool dies of SIGPIPE

uspawn-runc exits 1 for runtime errors (runc's convention) and 2 for usage.
Anything else that escapes a command (an OSError nobody expected, a bug) is
caught by the entry point: one line naming the call and path, "this is a
bug", exit 125; USPAWN_DEBUG=1 adds the traceback (last_resort).
"""

from __future__ import annotations

import errno as _errno

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

EXIT_USAGE = 2
EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127
EXIT_BROKEN_PIPE = 128 + 13

# Known errnos turned into advice, in one table (bubblewrap/mkosi style).
ERRNO_HINTS: dict[tuple[str, int], str] = {
    ("unshare", _errno.EPERM): "user namespaces may be disabled: check "
    "/proc/sys/user/max_user_namespaces and kernel.unprivileged_userns_clone; run `uspawn doctor`",
    ("unshare", _errno.EINVAL): "the calling process is multithreaded or the kernel "
    "lacks a namespace type",
    ("unshare", _errno.ENOSPC): "the user namespace limit is reached: raise "
    "/proc/sys/user/max_user_namespaces",
    ("open_tree", _errno.ENOSYS): "the kernel lacks the new mount API (Linux >= 5.2 needed)",
    ("mount_setattr", _errno.ENOSYS): "idmapped mounts need Linux >= 5.12; use "
    "--private-users-ownership=chown",
    ("mount_setattr", _errno.EINVAL): "this filesystem cannot be idmapped on this kernel; use "
    "--private-users-ownership=chown",
    ("mount", _errno.ENOSPC): "too many mounts: raise /proc/sys/fs/mount-max",
    ("openat2", _errno.ENOSYS): "openat2 needs Linux >= 5.6",
    ("fsopen", _errno.ENOSYS): "the kernel lacks the new mount API (Linux >= 5.2 needed)",
}


class UspawnError(Exception):
    """Base of every error uspawn reports to the user."""

    exit_code = EXIT_SETUP

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    def one_line(self) -> str:
        msg = str(self)
        return printable(f"{msg} (hint: {self.hint})" if self.hint else msg)


def printable(text: str) -> str:
    """text as one printable line: names, keys and paths from hostile input must
    neither break the line nor reach a terminal or log as control characters (or
    as lone surrogates, which cannot be encoded). The one sanitiser is
    textsafe.printable; error lines get a longer cap than single values."""
    from uspawn.base.textsafe import printable as _printable

    return _printable(text, 3 * 4096)


class UsageError(UspawnError):
    exit_code = EXIT_USAGE


class SpecError(UspawnError):
    """Invalid or unsupported configuration; names the field."""


class StateError(UspawnError):
    """Container state directory problems (name in use, no such container)."""


class SetupError(UspawnError):
    """Container setup failed in the kernel; names the syscall, path and errno."""


class ExecError(UspawnError):
    def __init__(self, message: str, hint: str | None = None, not_found: bool = False) -> None:
        super().__init__(message, hint)
        self.exit_code = EXIT_NOT_FOUND if not_found else EXIT_CANNOT_EXEC


def hint_for(exc: OSError) -> str | None:
    syscall = getattr(exc, "syscall", None)
    if syscall is None or exc.errno is None:
        return None
    return ERRNO_HINTS.get((syscall, exc.errno))


def wrap_oserror(context: str, exc: OSError) -> SetupError:
    """Turn a syscall failure into 'context: syscall path: reason' with a hint."""
    return SetupError(f"{context}: {exc}", hint_for(exc))


# --- the entry points' safety nets -----------------------------------------------------------


def guard_stdio() -> None:
    """Put /dev/null on whichever of fds 0-2 the caller closed (`uspawn list >&-`).

    Otherwise the first file uspawn opens becomes fd 1 or 2: an error line or
    a payload's output would land in a state file or a container's rootfs, and
    Python's sys.stdout is None (AttributeError on use). Output to a closed
    stream is discarded; the exit code still tells what happened.
    """
    import os
    import sys

    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open("/dev/null", os.O_RDWR)  # the lowest free fd: this one
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
    if sys.stdin is None:
        sys.stdin = open(0, closefd=False)
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")


def run_guarded(prog: str, main: Callable[[], int]) -> int:
    """main() under the entry points' safety nets; returns the exit code.

    - closed fds 0-2 get /dev/null first (guard_stdio);
    - EPIPE on stdout ends quietly with 141, as a C tool killed by SIGPIPE;
    - a write that fails for lack of space or an I/O error is one line, 125;
    - any other exception is a bug: one line naming it (last_resort), 125.
    The standard streams are flushed here, so a failure there is caught too.
    """
    import sys

    guard_stdio()
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
        code = EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is None and exc.errno in _OUTPUT_ERRNOS:
            _stderr(printable(f"{prog}: write failed: {exc.strerror} "
                              f"({_errno.errorcode.get(exc.errno or 0)})") + "\n")
        else:
            _stderr(last_resort(prog, exc) + "\n")
        quiet_stdout()
        code = EXIT_SETUP
    except Exception as exc:  # a bug: still one line and an exit code, no traceback
        _stderr(last_resort(prog, exc) + "\n")
        code = EXIT_SETUP
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass  # a reader gone or a closed stream: the exit code still tells
    return code


# Errors of a write to stdout/stderr that are the host's, not uspawn's (/dev/full, a full disk).
_OUTPUT_ERRNOS = (_errno.ENOSPC, _errno.EDQUOT, _errno.EIO, _errno.EFBIG)


def _stderr(text: str) -> None:
    import sys

    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def quiet_stdout() -> None:
    """After EPIPE on stdout: point fd 1 at /dev/null so the final flush cannot fail again."""
    import os

    null = os.open("/dev/null", os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def last_resort(prog: str, exc: BaseException) -> str:
    """The one line for an exception no command turned into a UspawnError (a bug):
    what failed (the call and path of an OSError, and where in uspawn), and that
    it is a bug to report. USPAWN_DEBUG=1 prints the traceback as well."""
    import os
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    call = getattr(exc, "syscall", None)
    if frames:
        last = frames[-1]
        mod = last.filename.rpartition("/uspawn/")[2] or os.path.basename(last.filename)
        where = f" at {mod}:{last.lineno} ({last.name})"
        call = call or _call_on(last.line or "")
    if isinstance(exc, OSError):
        errname = _errno.errorcode.get(exc.errno or 0, str(exc.errno))
        paths = " ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        what = " ".join(x for x in (call, paths) if x)
        msg = f"{what or 'a system call'}: {exc.strerror or exc} ({errname})"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    if os.environ.get("USPAWN_DEBUG") == "1":
        traceback.print_exception(exc)
    return printable(f"{prog}: internal error: {msg}{where}; this is a bug in {prog}, "
                     "please report it with the command line (USPAWN_DEBUG=1 shows the "
                     "traceback)")


def _call_on(line: str) -> str | None:
    """The innermost call on a source line: `os.listdir` in `sorted(os.listdir(d))`."""
    best = None
    for i, ch in enumerate(line):
        if ch == "(":
            j = i
            while j > 0 and (line[j - 1].isalnum() or line[j - 1] in "._"):
                j -= 1
            if j < i:
                best = line[j:i]
    return best
