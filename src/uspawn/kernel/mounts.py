"""Mounts with the fd-based mount API, and path resolution inside a rootfs.

Every mount uspawn makes is a detached mount (fsopen/fsmount or open_tree)
attached with move_mount onto an O_PATH fd that was resolved *inside* the
rootfs with openat2(RESOLVE_IN_ROOT). A symlink or `..` planted in a hostile
tree therefore cannot redirect a mount to the host, and nothing is resolved a
second time by string between the check and the use (runc CVE-2019-19921,
CVE-2021-30465).

Needs Linux >= 5.6 (openat2; fsopen/open_tree are 5.2, mount_setattr 5.12
and only for read-only/idmap attributes).
"""

from __future__ import annotations

import errno
import os
import stat

from uspawn.kernel import syscalls as sc

# OCI/fstab option -> (attr to set, attr to clear)
_ATTR_OPTIONS: dict[str, tuple[int, int]] = {
    "ro": (sc.MOUNT_ATTR_RDONLY, 0),
    "rw": (0, sc.MOUNT_ATTR_RDONLY),
    "nosuid": (sc.MOUNT_ATTR_NOSUID, 0),
    "suid": (0, sc.MOUNT_ATTR_NOSUID),
    "nodev": (sc.MOUNT_ATTR_NODEV, 0),
    "dev": (0, sc.MOUNT_ATTR_NODEV),
    "noexec": (sc.MOUNT_ATTR_NOEXEC, 0),
    "exec": (0, sc.MOUNT_ATTR_NOEXEC),
}
_PROPAGATION = {
    "private": sc.MS_PRIVATE,
    "rprivate": sc.MS_PRIVATE,
    "slave": sc.MS_SLAVE,
    "rslave": sc.MS_SLAVE,
    "shared": sc.MS_SHARED,
    "rshared": sc.MS_SHARED,
}
# Options that only tune access-time behaviour or are implied; accepted, no-op here.
_IGNORED = {"relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime",
            "async", "sync", "defaults", "tmpcopyup", "nodiratime", "diratime", "private"}


class MountOptions:
    """Parsed mount options: per-mount attributes vs. filesystem parameters."""

    def __init__(self) -> None:
        self.attr_set = 0
        self.attr_clr = 0
        self.propagation = 0
        self.bind = False
        self.recursive = False
        self.idmap = False
        self.fs_params: list[tuple[str, str | None]] = []


def parse_options(options: list[str]) -> MountOptions:
    out = MountOptions()
    for opt in options:
        if opt in _ATTR_OPTIONS:
            s, c = _ATTR_OPTIONS[opt]
            out.attr_set = (out.attr_set | s) & ~c
            out.attr_clr = (out.attr_clr | c) & ~s
        elif opt in ("bind", "rbind"):
            out.bind = True
            out.recursive = opt == "rbind"
        elif opt in ("idmap", "ridmap"):
            out.idmap = True
        elif opt in _PROPAGATION and opt != "private":
            out.propagation = _PROPAGATION[opt]
        elif opt in _IGNORED:
            continue
        else:
            key, sep, value = opt.partition("=")
            out.fs_params.append((key, value if sep else None))
    return out


def make_fs(fstype: str, params: list[tuple[str, str | None]], attrs: int = 0,
            source: str | None = None) -> int:
    """Create a new filesystem instance and return it as a detached mount fd."""
    fsfd = sc.fsopen(fstype)
    try:
        if source:
            sc.fsconfig(fsfd, sc.FSCONFIG_SET_STRING, "source", source)
        for key, value in params:
            if value is None:
                sc.fsconfig(fsfd, sc.FSCONFIG_SET_FLAG, key)
            else:
                sc.fsconfig(fsfd, sc.FSCONFIG_SET_STRING, key, value)
        sc.fsconfig(fsfd, sc.FSCONFIG_CMD_CREATE)
        return sc.fsmount(fsfd, attrs)
    finally:
        os.close(fsfd)


def clone_tree(path: str, recursive: bool = False, dirfd: int = -100) -> int:
    """A detached copy of the mount at path (a bind mount not yet attached)."""
    flags = sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC
    if recursive:
        flags |= sc.AT_RECURSIVE
    if not path:
        flags |= sc.AT_EMPTY_PATH
    return sc.open_tree(dirfd, path, flags)


def set_attrs(mnt_fd: int, attr_set: int = 0, attr_clr: int = 0, userns_fd: int = 0,
              recursive: bool = False, propagation: int = 0) -> None:
    flags = sc.AT_EMPTY_PATH | (sc.AT_RECURSIVE if recursive else 0)
    if userns_fd:
        attr_set |= sc.MOUNT_ATTR_IDMAP
    sc.mount_setattr(mnt_fd, "", flags, attr_set, attr_clr, propagation, userns_fd)


_ATTR_TO_MS = ((sc.MOUNT_ATTR_RDONLY, sc.MS_RDONLY), (sc.MOUNT_ATTR_NOSUID, sc.MS_NOSUID),
               (sc.MOUNT_ATTR_NODEV, sc.MS_NODEV), (sc.MOUNT_ATTR_NOEXEC, sc.MS_NOEXEC))


def attrs_to_ms(attrs: int) -> int:
    return sum(ms for attr, ms in _ATTR_TO_MS if attrs & attr)


def set_attrs_or_defer(mnt_fd: int, attr_set: int, recursive: bool = False) -> int:
    """mount_setattr (Linux >= 5.12); on older kernels return the MS_* flags the
    init must apply with a classic remount once the mount is attached (a
    detached mount cannot be remounted by mount(2)). 0 = done."""
    if not attr_set:
        return 0
    try:
        set_attrs(mnt_fd, attr_set, recursive=recursive)
        return 0
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        return attrs_to_ms(attr_set)


_PROPAGATION_BITS = sc.MS_PRIVATE | sc.MS_SLAVE | sc.MS_SHARED | sc.MS_REC


def make_private(mnt_fd: int, propagation: int = sc.MS_PRIVATE,
                 recursive: bool = False) -> int:
    """Take a detached clone out of its source's peer group (or make it a slave).

    open_tree(OPEN_TREE_CLONE) of a shared mount gives a peer of it: a mount
    made on the clone would appear in the source's namespace (the host's).
    Returns 0, or on Linux < 5.12 (no mount_setattr) the MS_* bits that
    remount_attached() applies right after the clone is attached, before
    anything is mounted on it.
    """
    try:
        set_attrs(mnt_fd, recursive=recursive, propagation=propagation)
        return 0
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        return propagation | (sc.MS_REC if recursive else 0)


def remount_attached(mnt_fd: int, ms_flags: int) -> None:
    """Classic remount of an attached mount, named by its fd (pre-5.12 fallback).

    Propagation bits (from make_private) are applied first, on their own; then
    MS_REMOUNT|MS_BIND sets exactly the remaining flags on this one mount."""
    path = f"/proc/self/fd/{mnt_fd}"
    if ms_flags & _PROPAGATION_BITS:
        sc.mount(None, path, None, ms_flags & _PROPAGATION_BITS)
    flags = ms_flags & ~_PROPAGATION_BITS
    if flags:
        sc.mount(None, path, None, sc.MS_REMOUNT | sc.MS_BIND | flags)


def remount_flags(ms_flags: int) -> int:
    """The remount part of a deferred value (propagation bits removed)."""
    return ms_flags & ~_PROPAGATION_BITS


def attach(mnt_fd: int, target_fd: int) -> None:
    """Attach a detached mount onto the inode target_fd refers to."""
    sc.move_mount(mnt_fd, "", target_fd, "",
                  sc.MOVE_MOUNT_F_EMPTY_PATH | sc.MOVE_MOUNT_T_EMPTY_PATH)


_RESOLVE = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS


def open_in_root(rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    """Open path as if rootfd were `/`: symlinks and `..` cannot leave it."""
    return sc.openat2(rootfd, path.lstrip("/") or ".", flags | os.O_CLOEXEC, _RESOLVE)


def reopen_regular(path_fd: int) -> int | None:
    """A readable fd for the regular file an O_PATH fd holds, else None.

    Check, then open the very inode: opening a FIFO would block forever, and
    opening a device node as host root runs its driver (a watchdog, a tape).
    """
    if not stat.S_ISREG(os.fstat(path_fd).st_mode):
        return None
    return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC)


def ensure_in_root(rootfd: int, path: str, kind: str = "dir", mode: int = 0o755) -> int:
    """Resolve path inside rootfd, creating what is missing; return an O_PATH fd.

    kind is "dir" or "file" for the last component. Every lookup starts at the
    root (RESOLVE_IN_ROOT), so symlinks and `..` resolve exactly as the container
    will see them; a missing component is created in its parent, itself resolved
    inside the root, so a concurrent symlink swap can at worst make the mount
    fail, never escape. A destination other than "/" that resolves to the root
    itself (a tree's /dev -> /) is refused: it would cover the whole container.
    """
    rel = path.strip("/")
    if not rel:
        return os.dup(rootfd)
    try:
        fd = open_in_root(rootfd, rel)
    except FileNotFoundError:
        fd = _create_in_root(rootfd, rel, kind, mode)
    if _same_inode(fd, rootfd):
        os.close(fd)
        raise OSError(errno.EINVAL, "resolves to the container's root directory", path)
    return fd


def _create_in_root(rootfd: int, rel: str, kind: str, mode: int) -> int:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    fd = -1
    for i, name in enumerate(parts):
        prefix = "/".join(parts[: i + 1])
        try:
            fd = open_in_root(rootfd, prefix)
        except FileNotFoundError:
            dirfd = open_in_root(rootfd, "/".join(parts[:i]), os.O_RDONLY | os.O_DIRECTORY)
            try:
                if i == len(parts) - 1 and kind == "file":
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=dirfd))
                else:
                    try:
                        os.mkdir(name, mode, dir_fd=dirfd)
                    except FileExistsError:
                        pass
            finally:
                os.close(dirfd)
            fd = open_in_root(rootfd, prefix)
        if i < len(parts) - 1:
            os.close(fd)
    return fd


def _same_inode(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_dir_fd(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def make_rslave_root(propagation: int = sc.MS_SLAVE) -> None:
    """Stop our mounts from propagating back to the host's mount namespace."""
    sc.mount(None, "/", None, sc.MS_REC | propagation)


def pivot_into(rootfd: int) -> None:
    """Make root the new `/` and detach the old root entirely.

    pivot_root(".", ".") stacks the old root on top of the new one; the lazy
    unmount then drops it, so no host path stays reachable (the trick runc and
    LXC use; it needs no put_old directory inside a possibly read-only tree).
    """
    os.fchdir(rootfd)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")


def attach_at(mnt: int, path: str) -> None:
    """Attach a detached mount at an absolute path we trust (after pivot_root); closes mnt."""
    target = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attach(mnt, target)
    finally:
        os.close(target)
        os.close(mnt)


def _existing_in_root(rootfd: int, path: str) -> int | None:
    """O_PATH fd of path resolved inside rootfd, or None if it is missing."""
    try:
        return open_in_root(rootfd, path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def mask_path(rootfd: int, path: str, null_fd: int) -> None:
    """Hide path: /dev/null over a file, an empty read-only tmpfs over a directory."""
    target = _existing_in_root(rootfd, path)
    if target is None:
        return
    try:
        if is_dir_fd(target):
            mnt = make_fs("tmpfs", [("size", "0"), ("mode", "0555")],
                          sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                          | sc.MOUNT_ATTR_NOEXEC)
        else:
            mnt = clone_tree("", dirfd=null_fd)
        try:
            attach(mnt, target)
        finally:
            os.close(mnt)
    finally:
        os.close(target)


def make_readonly(rootfd: int, path: str) -> None:
    """Re-attach path read-only on top of itself (recursively)."""
    target = _existing_in_root(rootfd, path)
    if target is None:
        return
    try:
        mnt = clone_tree("", recursive=True, dirfd=target)
        try:
            flags = sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
            deferred = set_attrs_or_defer(mnt, flags, recursive=True)
            attach(mnt, target)
            if deferred:
                # Only the top mount (fine for /proc/sys & co.); noexec kept as proc had it.
                remount_attached(mnt, deferred | sc.MS_NOEXEC)
        finally:
            os.close(mnt)
    finally:
        os.close(target)


def idmap_supported_error(exc: OSError) -> bool:
    """True when mount_setattr failed because idmapping is unsupported here."""
    return exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)


def mount_id(path: str) -> int:
    """The ID of the topmost mount at path (/proc/self/fdinfo's mnt_id)."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    finally:
        os.close(fd)
    return 0


def detach_if_covered(path: str, mnt_id_before: int) -> bool:
    """Lazily detach what was stacked on path since its top mount was
    mnt_id_before (with everything mounted on it); False if nothing was."""
    try:
        if mount_id(path) == mnt_id_before:
            return False
    except (FileNotFoundError, NotADirectoryError):
        return False
    sc.umount2(path, sc.MNT_DETACH)
    return True
