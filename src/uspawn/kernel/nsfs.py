"""Namespace files given by path (OCI linux.namespaces[].path): open them safely.

Host root joins these paths while still real root, so the path is hostile input:
a FIFO there would block a plain open(2) (120 s of a wedged `create`), a device
node would be opened by host root (driver side effects), a regular file would
only fail later in setns with a confusing EINVAL. So the path is opened O_PATH
first (never blocks, runs no driver open), the object is checked to live on
nsfs, and only then reopened for reading through /proc/self/fd: the same inode,
whatever is renamed or swapped at the path meanwhile. Symlinks are followed on
purpose: /proc/PID/ns/net is a magic link and /run/netns/NAME a bind mount, and
the check is on what was opened, not on the path.

NS_GET_NSTYPE (Linux 4.11) confirms the namespace type; older kernels skip it and
leave the mismatch to setns(fd, CLONE_NEW*), which refuses it with EINVAL.
"""

from __future__ import annotations

import errno
import fcntl
import os

from uspawn.kernel import syscalls as sc

NSFS_MAGIC = 0x6E736673  # linux/magic.h
NS_GET_NSTYPE = 0xB703  # linux/nsfs.h: _IO(0xb7, 0x3)
NS_GET_USERNS = 0xB701  # linux/nsfs.h: _IO(0xb7, 0x1), the owning user namespace
CLONE_NEWTIME = sc.CLONE_NEWTIME

NS_CLONE_FLAGS = {
    "mount": sc.CLONE_NEWNS, "uts": sc.CLONE_NEWUTS, "ipc": sc.CLONE_NEWIPC,
    "network": sc.CLONE_NEWNET, "cgroup": sc.CLONE_NEWCGROUP, "pid": sc.CLONE_NEWPID,
    "user": sc.CLONE_NEWUSER, "time": CLONE_NEWTIME,
}


class NsPathError(ValueError):
    """A namespace path that is not a namespace of the wanted type (the caller
    prefixes the config field)."""


def _describe(mode: int) -> str:
    import stat

    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a namespace file"


def open_ns(path: str, nstype: str) -> int:
    """Open a namespace file for setns(); returns an O_RDONLY|O_CLOEXEC fd.

    Raises NsPathError (not a namespace, or of another type) or OSError (the
    path cannot be opened at all: ENOENT, EACCES, ELOOP...).
    """
    if nstype not in NS_CLONE_FLAGS:
        raise NsPathError(f"unknown namespace type {nstype!r}")
    pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if sc.fstatfs_type(pfd) != NSFS_MAGIC:
            kind = _describe(os.fstat(pfd).st_mode)
            raise NsPathError(f"{path} is {kind}, not a namespace file (nsfs)")
        # Safe now: an nsfs inode has no open side effects and never blocks.
        fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(pfd)
    try:
        _check_type(fd, path, nstype)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_type(fd: int, path: str, nstype: str) -> None:
    try:
        got = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            return  # kernel < 4.11: setns(fd, flag) checks the type
        raise
    if got != NS_CLONE_FLAGS[nstype]:
        names = {v: k for k, v in NS_CLONE_FLAGS.items()}
        raise NsPathError(f"{path} is a {names.get(got, hex(got))} namespace, not {nstype}")


def check_ns_path(path: str, nstype: str) -> None:
    """Refuse what open_ns() would refuse, without keeping anything open."""
    os.close(open_ns(path, nstype))


def owner_userns(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the user namespace that owns namespace fd, or None when
    the kernel does not say (before 4.9, or an owner outside ours: EPERM)."""
    try:
        owner = fcntl.ioctl(fd, NS_GET_USERNS)
    except OSError:
        return None
    try:
        st = os.fstat(owner)
        return st.st_dev, st.st_ino
    finally:
        os.close(owner)
