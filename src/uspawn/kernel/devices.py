"""/dev for user-namespaced containers: nodes on a host-owned superblock.

A filesystem mounted inside a non-initial user namespace gets SB_I_NODEV
(fs/super.c alloc_super): device nodes on it cannot be opened by anyone. And
mknod of char/block devices needs CAP_MKNOD in the *initial* namespace (Linux
4.18 briefly allowed it, 55956b59df33, reverted by 94f82008ce30; during those
releases the nodes existed but returned EACCES on open, which broke every
"try mknod, fall back on EPERM" path).

So the parent, still real root in the host namespaces, creates the /dev tmpfs
with fsopen (superblock owned by the initial user namespace), mknods the
nodes there, chowns them to the container's root, and hands the detached
mount to the child, which attaches it (crun >= 1.8 does the same). The child
then *opens* every node before the payload starts: a node that cannot be
opened is a setup error naming the node, never a silently broken container.
"""

from __future__ import annotations

import errno
import os
import stat

from uspawn.kernel import mounts
from uspawn.kernel import syscalls as sc


class DeviceNode:
    def __init__(self, path: str, kind: str, major: int, minor: int, mode: int = 0o666,
                 uid: int = 0, gid: int = 0, access: str = "rwm") -> None:
        self.path = path  # relative to /dev, e.g. "null" or "net/tun"
        self.kind = kind  # "c" (or "u"), "b" or "p" (a FIFO: no device number)
        self.major = major
        self.minor = minor
        self.mode = mode
        self.uid = uid
        self.gid = gid
        # What linux.resources.devices leaves of it ("rwm": all; "" = not openable)
        self.access = access

    def __repr__(self) -> str:
        return f"DeviceNode({self.path!r}, {self.kind}, {self.major}:{self.minor})"


# The OCI runtime-spec's default devices (config-linux.md "Default Devices").
DEFAULT_DEVICES = (
    DeviceNode("null", "c", 1, 3),
    DeviceNode("zero", "c", 1, 5),
    DeviceNode("full", "c", 1, 7),
    DeviceNode("random", "c", 1, 8),
    DeviceNode("urandom", "c", 1, 9),
    DeviceNode("tty", "c", 5, 0),
)

DEFAULT_SYMLINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
    ("core", "/proc/kcore"),
)


def build_dev_tmpfs(nodes: list[DeviceNode], root_uid: int, root_gid: int,
                    console: bool = False, broken_nodev: bool = False,
                    params: list[tuple[str, str | None]] | None = None, attrs: int = 0,
                    source: str | None = None) -> int:
    """Make the container's /dev as a detached tmpfs owned by the host namespace.

    Must run as real root in the initial user namespace. root_uid/root_gid are
    the host IDs of the container's root; node uid/gid are container IDs and
    are shifted by them. params/attrs/source come from the spec's /dev mount
    (size=65536k, mode=, ro, ...) and override the defaults; uid/gid in params
    are host IDs already. `ro` is left to the caller: the nodes are made
    first, then mount_setattr (or a deferred remount). Returns the detached mount fd.
    """
    opts: dict[str, str | None] = {"mode": "0755", "size": "4m", "nr_inodes": "1m",
                                   "uid": str(root_uid), "gid": str(root_gid)}
    opts.update(params or [])
    mnt = mounts.make_fs(
        "tmpfs", list(opts.items()),
        (sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC | attrs) & ~sc.MOUNT_ATTR_RDONLY
        | (sc.MOUNT_ATTR_NODEV if broken_nodev else 0),
        source,
    )
    try:
        for sub in ("pts", "shm", "mqueue"):
            os.mkdir(sub, 0o755, dir_fd=mnt)
            os.chown(sub, root_uid, root_gid, dir_fd=mnt)
        os.chmod("shm", 0o1777, dir_fd=mnt)
        for node in nodes:
            _make_node(mnt, node, root_uid, root_gid)
        own = {n.path for n in nodes}
        for name, target in DEFAULT_SYMLINKS:
            if name in own:
                continue  # the spec made a node there (/dev/ptmx as a device)
            os.symlink(target, name, dir_fd=mnt)
            os.chown(name, root_uid, root_gid, dir_fd=mnt, follow_symlinks=False)
        if console:
            # An empty file: the child bind-mounts its pty there.
            fd = os.open("console", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=mnt)
            os.close(fd)
            os.chown("console", root_uid, root_gid, dir_fd=mnt)
    except BaseException:
        os.close(mnt)
        raise
    return mnt


def _make_node(mnt: int, node: DeviceNode, root_uid: int, root_gid: int) -> None:
    parts = node.path.strip("/").split("/")
    for i in range(1, len(parts)):
        sub = "/".join(parts[:i])
        try:
            os.mkdir(sub, 0o755, dir_fd=mnt)
            os.chown(sub, root_uid, root_gid, dir_fd=mnt)
        except FileExistsError:
            pass
    rel = "/".join(parts)
    kind = {"b": stat.S_IFBLK, "p": stat.S_IFIFO}.get(node.kind, stat.S_IFCHR)
    try:
        os.unlink(rel, dir_fd=mnt)
    except FileNotFoundError:
        pass
    dev = 0 if node.kind == "p" else os.makedev(node.major, node.minor)
    os.mknod(rel, kind | (node.mode & 0o7777), dev, dir_fd=mnt)
    os.chown(rel, root_uid + node.uid, root_gid + node.gid, dir_fd=mnt, follow_symlinks=False)
    os.chmod(rel, node.mode & 0o7777, dir_fd=mnt)


class DeviceCheckError(Exception):
    def __init__(self, path: str, err: int) -> None:
        super().__init__(f"device node {path} cannot be opened: {os.strerror(err)} "
                         f"({errno.errorcode.get(err, err)})")
        self.path = path
        self.errno = err


def verify_nodes(nodes: list[DeviceNode], dev: str = "/dev") -> None:
    """Open every node as the payload would; raise DeviceCheckError on the first failure.

    /dev/tty gives ENXIO when the opener has no controlling terminal: the node
    itself works (the kernel reached the tty driver), so that is accepted.
    EACCES/EPERM are exactly the SB_I_NODEV / unopenable-node failures.
    """
    for node in nodes:
        path = f"{dev}/{node.path}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            if node.path == "tty" and exc.errno == errno.ENXIO:
                continue
            raise DeviceCheckError(path, exc.errno or errno.EIO) from None
        os.close(fd)
