"""One error hierarchy and the documented exit codes.

Library code raises; only the CLI prints (one line) and picks the exit code.
Exit codes follow podman/runc conventions so wrappers can tell the payload's
own status from uspawn's:

    0..124  the payload's exit status (uspawn run/boot pass it through)
    125     uspawn could not set up or run the container (config, kernel, host)
    126     the command exists in the container but could not be executed
    127     the command was not found in the container
    128+N   the payload was killed by signal N
    2       command-line usage error
"""

from __future__ import annotations

import errno as _errno

EXIT_USAGE = 2
EXIT_SETUP = 125
EXIT_CANNOT_EXEC = 126
EXIT_NOT_FOUND = 127

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
