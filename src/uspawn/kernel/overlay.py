"""An overlayfs rootfs seen through a user namespace's ID map.

overlayfs itself cannot be idmapped (no FS_ALLOW_IDMAP), so the rootfs containerd
mounts for a container (an overlay of the image layers and the container's upper
directory at <bundle>/rootfs) cannot be handed to a user-namespaced container as
an idmapped mount the way a plain directory can. Its layers can (Linux 5.19, "ovl:
support idmapped layers"): this module reads the overlay's layers from mountinfo
and makes a second overlay of the same layers, each an idmapped detached mount,
given to overlayfs as file descriptors ("lowerdir+", "upperdir", "workdir" with
FSCONFIG_SET_FD and detached layer mounts: Linux 6.15). Files owned by 0 on disk
are then the container root's, and what the container writes lands in the same
upper directory owned by 0 on disk, as with runc without a user namespace.

overlayfs works on its upper and work directories with the credentials of the
process that created the mount: created by host root (fsuid 0, which the idmapped
upper mount cannot represent), it would fail to create its work directory
(EOVERFLOW) and go read-only. So the mount is created with the container root's
host IDs as filesystem IDs (capabilities kept), which the idmapped upper maps back
to 0 on disk.

containerd's own overlay stays mounted at the same place, unused: both share the
upper directory (overlayfs warns "upperdir is in-use", and index=off is forced, as
containerd sets it), so nothing but the container may write through the other one.
"""

from __future__ import annotations

import os

from uspawn.kernel import mounts
from uspawn.kernel import syscalls as sc

OVERLAYFS_SUPER_MAGIC = 0x794C7630  # linux/magic.h
# Options of the original mount that are passed on as they are shown in mountinfo.
_KEPT = ("redirect_dir", "metacopy", "xino", "uuid", "nfs_export", "userxattr", "volatile")


class OverlayError(ValueError):
    """The mount at a path is not an overlay this module can rebuild."""


class Layers:
    def __init__(self, lower: list[str], upper: str, work: str,
                 options: list[tuple[str, str | None]]) -> None:
        self.lower = lower  # top first, as in lowerdir=
        self.upper = upper
        self.work = work
        self.options = options


def is_overlay_mountpoint(path: str) -> bool:
    """path is the root of an overlayfs mount (the top mount there)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return sc.fstatfs_type(fd) == OVERLAYFS_SUPER_MAGIC and _mount_entry(path) is not None
    finally:
        os.close(fd)


def _unescape(s: str) -> str:
    r"""mountinfo's octal escapes (\040 for a space, \054 for a comma...)."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def _mount_entry(path: str) -> list[str] | None:
    """The mountinfo fields of the top mount at path, when path is its mount point."""
    top = mounts.mount_id(path)
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == top:
                return fields if _unescape(fields[4]) == real and fields[3] == "/" else None
    return None


def read_layers(path: str) -> Layers:
    """The layers of the overlay mounted at path, from /proc/self/mountinfo."""
    fields = _mount_entry(path)
    if fields is None:
        raise OverlayError(f"{path} is not the mount point of a mount")
    sep = fields.index("-")
    if fields[sep + 1] != "overlay":
        raise OverlayError(f"{path} is a {fields[sep + 1]} mount, not overlay")
    opts: dict[str, str | None] = {}
    for opt in fields[sep + 3].split(","):
        key, eq, value = opt.partition("=")
        opts[key] = value if eq else None
    lower = opts.get("lowerdir")
    if not lower or "\\" in lower or "::" in lower:
        raise OverlayError(f"overlay at {path}: lowerdir {lower!r} cannot be rebuilt "
                           "(escaped characters or data-only layers)")
    upper, work = opts.get("upperdir") or "", opts.get("workdir") or ""
    if bool(upper) != bool(work):
        raise OverlayError(f"overlay at {path}: upperdir without workdir")
    if upper and os.path.dirname(upper) != os.path.dirname(work):
        # One idmapped mount must hold both (overlayfs wants them on one mount).
        raise OverlayError(f"overlay at {path}: upperdir and workdir are not siblings")
    kept = [(k, v) for k, v in opts.items() if k in _KEPT]
    return Layers([_unescape(x) for x in lower.split(":")], _unescape(upper),
                  _unescape(work), kept)


def idmapped_overlay(layers: Layers, userns_fd: int, fs_ids: tuple[int, int]) -> int:
    """A new overlay of layers, each idmapped with userns_fd, as a detached mount fd.

    fs_ids: the host IDs the mount is created with (container root's): overlayfs
    acts on the upper directory with them."""
    fsfd = sc.fsopen("overlay")
    held: list[int] = []
    try:
        for lower in layers.lower:
            held.append(mnt := mounts.clone_tree(lower))
            mounts.set_attrs(mnt, userns_fd=userns_fd)
            sc.fsconfig_fd(fsfd, "lowerdir+", mnt)
        if layers.upper:
            held.append(parent := mounts.clone_tree(os.path.dirname(layers.upper)))
            mounts.set_attrs(parent, userns_fd=userns_fd)
            for key, sub in (("upperdir", layers.upper), ("workdir", layers.work)):
                held.append(fd := os.open(os.path.basename(sub), os.O_PATH | os.O_DIRECTORY
                                          | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent))
                sc.fsconfig_fd(fsfd, key, fd)
        for key, value in [*layers.options, ("index", "off")]:
            if value is None:
                sc.fsconfig(fsfd, sc.FSCONFIG_SET_FLAG, key)
            else:
                sc.fsconfig(fsfd, sc.FSCONFIG_SET_STRING, key, value)
        _create_as(fsfd, fs_ids)
        return sc.fsmount(fsfd)
    finally:
        for fd in held:
            os.close(fd)
        os.close(fsfd)


def _create_as(fsfd: int, fs_ids: tuple[int, int]) -> None:
    """FSCONFIG_CMD_CREATE with fs_ids as our filesystem IDs; changing the fsuid
    from 0 drops CAP_DAC_OVERRIDE & co. from the effective set, so they are raised
    again for the call (overlayfs keeps these credentials), then all is restored."""
    _eff, permitted, inheritable = sc.capget()
    try:
        sc.set_fs_ids(*fs_ids)
        sc.capset(permitted, permitted, inheritable)
        sc.fsconfig(fsfd, sc.FSCONFIG_CMD_CREATE)
    finally:
        sc.set_fs_ids(0, 0)
        sc.capset(_eff, permitted, inheritable)
