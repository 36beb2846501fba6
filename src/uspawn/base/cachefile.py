"""Files in root's caches under /var/cache/uspawn: read only if ours alone, written
atomically. Whoever can write such a file decides what uspawn does with it (the
seccomp program of every container, a tree's hard-link verdict), so a directory or
file that another user could have written is never read."""

from __future__ import annotations

import errno
import os
import stat


def trusted_dir(path: str) -> bool:
    """A real directory, ours, writable by nobody else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def read(path: str, limit: int) -> bytes | None:
    """Up to limit bytes of a regular file of ours (never through a symlink), or None.
    The caller checks trusted_dir() of its directory first."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        return os.read(fd, limit)
    finally:
        os.close(fd)


def store(cache_dir: str, path: str, data: bytes) -> None:
    """Write path (in cache_dir, made 0700 if missing) atomically: a reader sees the
    old file or the whole new one. Nothing is written to a directory not ours alone."""
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    if not trusted_dir(cache_dir):
        return
    tmp = f"{path}.{os.getpid()}.tmp"  # the directory is ours alone: O_TRUNC is safe
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write", tmp)
            os.fsync(fd)  # a truncated file must never appear under the final name
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
