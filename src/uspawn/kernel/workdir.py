"""The payload's working directory, entered only if it lies inside the root.

chdir() follows whatever a path names, /proc magic links included. With a
directory fd the caller passed in (an inherited fd, or an OCI preserved fd),
a cwd of "/proc/self/fd/3" would start the payload in a host directory,
outside its root, where every relative path reaches host files: the cwd half
of runc's CVE-2024-21626. So the path is resolved from the current root with
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS), must be a directory, is
entered with fchdir() on that very inode, and the result is checked once more
with getcwd(), which fails (glibc: ENOENT, the kernel's "(unreachable)") when
the cwd is not below the root (runc's verifyCwd).

Used by the container init and by every process that joins a container
(exec, shell, OCI exec), after the root is the container's. Stdlib + this
package only: the init imports it before pivot_root.
"""

from __future__ import annotations

import errno
import os

from uspawn.kernel import syscalls as sc

FIELD = "process.cwd"
_OUTSIDE = ("the working directory (--chdir, --cwd, process.cwd) must be a directory inside "
            "the container; /proc magic links such as /proc/self/fd/N lead outside it and "
            "are refused")
_HINTS = {
    errno.EINVAL: "give an absolute path inside the container, e.g. /app",
    errno.ENOENT: "create the directory in the container's tree or pick one that exists",
    errno.ENOTDIR: "the working directory must be a directory, not a file",
    errno.ELOOP: _OUTSIDE,
    errno.EXDEV: _OUTSIDE,
}
_HINT = ("the working directory (--chdir, --cwd, process.cwd) must be a directory inside "
         "the container")


class WorkdirError(Exception):
    """The working directory cannot be entered: one line naming the path and errno."""

    def __init__(self, message: str, err: int, hint: str | None = None) -> None:
        super().__init__(message)
        self.errno = err
        self.hint = hint or _HINTS.get(err, _HINT)

    def with_hint(self) -> str:
        """The message with its hint, for channels that carry one string."""
        return f"{self} (hint: {self.hint})"


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def enter_workdir(path: str) -> None:
    """chdir to path, resolved inside the current root; WorkdirError if it is not there."""
    if not path.startswith("/"):
        # OCI requires an absolute cwd and runc refuses a relative one: it
        # would be resolved against whatever the cwd happens to be.
        raise WorkdirError(f"{FIELD} {path!r}: not an absolute path (EINVAL)", errno.EINVAL)
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _resolve(root, path)
    finally:
        os.close(root)
    try:
        os.fchdir(fd)
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise WorkdirError(f"{FIELD} {path}: fchdir: {exc.strerror} ({_errname(err)})",
                           err) from None
    finally:
        os.close(fd)
    _verify_inside(path)


def _resolve(root: int, path: str) -> int:
    """An O_PATH fd of the directory path names inside root."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return sc.openat2(root, path.lstrip("/") or ".", flags,
                          sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS)
    except OSError as exc:
        err = exc.errno or errno.EIO
        if err == errno.ELOOP and _is_magic(root, path):
            raise WorkdirError(f"{FIELD} {path}: resolves outside the container (ELOOP)",
                               err) from None
        if err == errno.ELOOP:
            raise WorkdirError(f"{FIELD} {path}: too many levels of symbolic links (ELOOP)",
                               err, "a symbolic link on the path loops") from None
        if err == errno.ENOTDIR:
            raise WorkdirError(f"{FIELD} {path}: not a directory (ENOTDIR)", err) from None
        raise WorkdirError(f"{FIELD} {path}: {exc.strerror} ({_errname(err)})", err) from None


def _is_magic(root: int, path: str) -> bool:
    """Whether ELOOP came from a magic link rather than a symlink loop.

    Retried with no RESOLVE_* flag (RESOLVE_IN_ROOT alone also refuses magic
    links): an O_PATH open reads nothing and runs no driver, and the fd is
    closed at once, so following the link only tells which message is true.
    Only a loop fails the same way again."""
    try:
        fd = sc.openat2(root, path.lstrip("/") or ".", os.O_PATH | os.O_CLOEXEC, 0)
    except OSError as exc:
        return exc.errno != errno.ELOOP
    os.close(fd)
    return True


def _verify_inside(path: str) -> None:
    """getcwd() must name a path below the root (defence in depth after openat2)."""
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = "unreachable"
    except OSError:
        return  # e.g. ENAMETOOLONG: says nothing about where the cwd is
    if not cwd.startswith("/"):
        raise WorkdirError(f"{FIELD} {path}: resolves outside the container "
                           f"(getcwd: {cwd})", errno.EXDEV)


def close_fds_from(first: int, keep: int = -1) -> None:
    """Close every fd >= first except keep (the channel that reports a failed exec).

    Close-on-exec is not enough for fds the payload is not given (whatever the
    caller of uspawn left open): they stay open until execve has resolved the
    executable, so /proc/self/fd/N in argv or in a hostile tree's symlink would
    run a host binary through them. Called before the cwd and the lookup."""
    if keep >= first:
        if keep > first:
            sc.close_range(first, keep - 1)
        sc.close_range(keep + 1)
    else:
        sc.close_range(first)
