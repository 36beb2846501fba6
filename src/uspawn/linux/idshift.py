"""Shift the owners of a container rootfs on disk (the "chown" ownership mode).

A container whose user namespace maps IDs 0..size-1 to host IDs base..base+size-1 sees its
files correctly only when they are owned by host IDs in that range. When no idmapped mount is
possible (DESIGN.md), every inode is chowned: an ID u in [from, from+size) becomes
u - from + to; IDs outside that range are left alone and counted as unmapped.

Constraints:
- Bases are multiples of size, so the source and target ranges are disjoint and an inode's
  owner tells whether it was shifted already. That is what makes the shift resumable, and
  hard links harmless: each inode is shifted exactly once.
- Before the first change the journal {"from", "to", "size"} is written as the
  trusted.uspawn.shift xattr of the root directory (or, where the filesystem has no trusted
  xattrs, a file in JOURNAL_DIR). The root directory is shifted last and the journal removed
  after it, so a tree without a journal is never half-shifted and its root's owner is its base.
- chown by root drops setuid/setgid and security.capability; they are restored after the
  chown. A kill between the two would lose them for good (the owner already says "done"), so
  the journal's "pending" list records mode and capability until the restore is done.
- The walk never leaves root: it goes by directory fds opened O_NOFOLLOW, skips other
  filesystems (st_dev) and mount points (mountinfo), and never follows a symlink, so one
  swapped in during the walk cannot redirect a chown or chmod outside the tree.
- Stdlib only; runs on the host while the container is not running.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import struct
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TextIO

JOURNAL_XATTR = "trusted.uspawn.shift"
JOURNAL_DIR = "/var/lib/uspawn/shift-journal"
XATTR_CAPS = "security.capability"
XATTR_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
# linux/capability.h
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_REVISION_3 = 0x03000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001
# linux/posix_acl_xattr.h, linux/posix_acl.h
POSIX_ACL_XATTR_VERSION = 2
ACL_USER = 2
ACL_GROUP = 8

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_ID = 0xFFFFFFFF  # (uid_t)-1 means "no change" to chown and is never a real owner
_HINTS = {
    errno.EPERM: "immutable or append-only file? (lsattr, chattr -i)",
    errno.EACCES: "run as root (CAP_CHOWN, CAP_FOWNER, CAP_SETFCAP, CAP_SYS_ADMIN)",
    errno.EROFS: "the filesystem is read-only; remount it read-write",
    errno.ENOSPC: "no space left for the journal or xattrs",
    errno.EMFILE: "tree deeper than the fd limit; raise ulimit -n",
    errno.ELOOP: "the tree changed during the shift; is the container running?",
    errno.ESTALE: "the tree changed during the shift; is the container running?",
}

_Ref = int | tuple[int, str]  # the root's fd, or (parent dir fd, name) for everything else


class ShiftError(Exception):
    """A shift failed. The message is one line: what, path, errno text and a hint."""


@dataclass(frozen=True)
class ShiftResult:
    from_base: int
    to_base: int
    files_changed: int
    resumed: bool
    unmapped: int = 0


def _fail(what: str, path: str, exc: OSError, journaled: bool = False) -> ShiftError:
    hint = _HINTS.get(exc.errno or 0, "")
    if journaled:
        hint += ("; " if hint else "") + "the journal keeps the shift; fix this and rerun to resume"
    hint = f" (hint: {hint})" if hint else ""
    return ShiftError(f"{what} {path}: {exc.strerror or exc}{hint}")


def _check_base(base: int, size: int) -> None:
    if size <= 0 or base < 0 or base % size or base + size > _MAX_ID:
        raise ShiftError(f"bad ID range {base}+{size}: the base must be a multiple of the size")


class _Journal:
    """The record of an unfinished shift: an xattr on the root directory, or a file for
    filesystems without trusted xattrs (ENOTSUP, e.g. ramfs)."""

    def __init__(self, root_fd: int, root: str) -> None:
        st = os.fstat(root_fd)
        self.fd, self.root = root_fd, root
        self.file = os.path.join(JOURNAL_DIR, f"{st.st_dev}-{st.st_ino}.json")

    def read(self) -> dict[str, Any] | None:
        try:
            raw = os.getxattr(self.fd, JOURNAL_XATTR)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return None
            if e.errno != errno.ENOTSUP:
                raise _fail("read journal of", self.root, e) from e
            try:
                with open(self.file, "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                return None
        try:
            data: dict[str, Any] = json.loads(raw)
            src, dst, size = int(data["from"]), int(data["to"]), int(data["size"])
            _check_base(src, size)
            _check_base(dst, size)
            if src == dst:
                raise ValueError("from == to")
        except (ValueError, KeyError, TypeError, ShiftError) as e:
            raise ShiftError(f"corrupt shift journal on {self.root}: {raw!r} ({e})") from e
        return data

    def write(self, data: dict[str, Any]) -> None:
        raw = json.dumps(data, sort_keys=True).encode()
        try:
            os.setxattr(self.fd, JOURNAL_XATTR, raw)
            os.fsync(self.fd)  # durable before the chowns it covers
            return
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise _fail("write journal on", self.root, e) from e
        try:
            os.makedirs(JOURNAL_DIR, mode=0o700, exist_ok=True)
            tmp = self.file + ".tmp"
            with open(tmp, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file)  # atomic: a reader sees the old or the new journal
            self._sync_dir()
        except OSError as e:
            raise _fail("write journal", self.file, e) from e

    def clear(self) -> None:
        try:
            os.removexattr(self.fd, JOURNAL_XATTR)
            os.fsync(self.fd)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.ENODATA):
                raise _fail("remove journal on", self.root, e) from e
        if os.path.exists(self.file):
            os.unlink(self.file)
            self._sync_dir()

    def _sync_dir(self) -> None:
        dfd = os.open(JOURNAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _mountpoints(root_fd: int) -> set[tuple[int, int, str]]:
    """(parent st_dev, parent st_ino, name) of each mount point below root. st_dev alone
    misses bind mounts of the same filesystem, which may bring in host files."""
    top = os.readlink(f"/proc/self/fd/{root_fd}").rstrip("/") + "/"
    found = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # proc(5): field 5 is the mount point, with space, tab, \n and \ as octal escapes
            raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4])
            mp = os.fsdecode(raw)
            if mp.startswith(top):
                parent, name = os.path.split(mp)
                try:
                    pst = os.lstat(parent)
                except OSError:
                    continue
                found.add((pst.st_dev, pst.st_ino, name))
    return found


def _xattr_ref(ref: _Ref) -> tuple[int | str, bool]:
    """(target, follow_symlinks) for the xattr calls, which take no dir_fd."""
    if isinstance(ref, int):
        return ref, True
    # The parent is reached through its fd's magic link and the last component is not
    # followed: this names exactly the entry we lstat'ed and cannot leave the tree.
    return f"/proc/self/fd/{ref[0]}/{ref[1]}", False


def _chmod(ref: _Ref, mode: int, ino: int) -> None:
    if isinstance(ref, int):
        os.chmod(ref, mode)
        return
    # Python 3.11 has no lchmod on Linux. An O_PATH fd pins the inode, so a symlink swapped
    # in after the lstat cannot redirect the chmod (to a setuid mode!) outside the tree.
    fd = os.open(ref[1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ref[0])
    try:
        st = os.fstat(fd)
        if stat.S_ISLNK(st.st_mode) or st.st_ino != ino:
            raise OSError(errno.ESTALE, "replaced during the shift")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


class _Shifter:
    def __init__(self, root: str, root_fd: int, progress: Callable[[int, int], None] | None):
        self.root, self.root_fd, self.progress = root, root_fd, progress
        self.journal = _Journal(root_fd, root)
        self.dev = os.fstat(root_fd).st_dev
        self.mounts = _mountpoints(root_fd)
        self.done = self.total = self.changed = self.unmapped = 0
        self.src = self.dst = self.size = 0
        self.resuming = self.active = False
        self.pending: dict[int, dict[str, Any]] = {}

    def entries(self) -> Generator[tuple[_Ref, os.stat_result, str], None, None]:
        """Every inode below root (not root itself), depth first, one open fd per level."""
        rst = os.fstat(self.root_fd)
        stack: list[tuple[int, Iterator[str], str, tuple[int, int]]] = []
        path = self.root
        try:
            names = iter(os.listdir(self.root_fd))
            stack.append((os.dup(self.root_fd), names, path, (rst.st_dev, rst.st_ino)))
            while stack:
                dfd, names, dpath, parent = stack[-1]
                name = next(names, None)
                if name is None:
                    os.close(dfd)
                    stack.pop()
                    continue
                path = os.path.join(dpath, name)
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed under us: nothing left to shift
                if st.st_dev != self.dev or (*parent, name) in self.mounts:
                    continue
                yield (dfd, name), st, path
                if stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, _O_DIR, dir_fd=dfd)
                    stack.append((sub, iter(os.listdir(sub)), path, (st.st_dev, st.st_ino)))
                    if os.fstat(sub).st_ino != st.st_ino:
                        raise OSError(errno.ESTALE, "replaced during the shift")
        except OSError as e:
            raise _fail("walk", path, e, self.active) from e
        finally:
            for dfd, _, _, _ in stack:
                os.close(dfd)

    def remap(self, i: int) -> int:
        """The shifted ID, or -1 when i is outside the source range."""
        return i - self.src + self.dst if self.src <= i < self.src + self.size else -1

    def shift_cap(self, value: bytes) -> bytes | None:
        """v2/v3 capability as v3 with the new rootid (v2 when it is 0); None: keep value."""
        if len(value) < 20:
            return None
        magic = struct.unpack_from("<I", value)[0]
        rev = magic & VFS_CAP_REVISION_MASK
        if rev == VFS_CAP_REVISION_2 and len(value) == 20:
            rootid = self.dst  # v2 belongs to the tree's root: make it the container's root
        elif rev == VFS_CAP_REVISION_3 and len(value) == 24:
            rootid = self.remap(struct.unpack_from("<I", value, 20)[0])
            if rootid < 0:
                return None
        else:
            return None
        eff = magic & VFS_CAP_FLAGS_EFFECTIVE
        if rootid == 0:  # the kernel reports v3 rootid 0 to init-ns readers as v2 anyway
            return struct.pack("<I", VFS_CAP_REVISION_2 | eff) + value[4:20]
        return struct.pack("<I", VFS_CAP_REVISION_3 | eff) + value[4:20] + struct.pack("<I", rootid)

    def shift_acl(self, value: bytes) -> bytes:
        if len(value) < 4 or (len(value) - 4) % 8:
            return value
        if struct.unpack_from("<I", value)[0] != POSIX_ACL_XATTR_VERSION:
            return value
        out = bytearray(value)
        for off in range(4, len(value), 8):
            tag, _perm, ident = struct.unpack_from("<HHI", value, off)
            new = self.remap(ident) if tag in (ACL_USER, ACL_GROUP) else -1
            if new >= 0:
                struct.pack_into("<I", out, off + 4, new)
        return bytes(out)

    def restore(self, ref: _Ref, ino: int, mode: int, cap: bytes | None) -> None:
        target, follow = _xattr_ref(ref)
        if cap is not None:
            new = self.shift_cap(cap)
            try:
                os.setxattr(target, XATTR_CAPS, new or cap, follow_symlinks=follow)
            except OSError as e:
                if e.errno != errno.EINVAL or new is None:
                    raise
                os.setxattr(target, XATTR_CAPS, cap, follow_symlinks=follow)
        if mode & (stat.S_ISUID | stat.S_ISGID):
            _chmod(ref, mode, ino)
        del self.pending[ino]
        self.write_journal()

    def write_journal(self) -> None:
        data: dict[str, Any] = {"from": self.src, "to": self.dst, "size": self.size}
        if self.pending:
            data["pending"] = list(self.pending.values())
        self.journal.write(data)

    def shift_inode(self, ref: _Ref, st: os.stat_result) -> None:
        uid, gid = self.remap(st.st_uid), self.remap(st.st_gid)
        # Unmapped: outside the container's range after the shift. IDs already in the target
        # range are hard links met twice or inodes shifted before a kill.
        dst = range(self.dst, self.dst + self.size)
        if (uid < 0 and st.st_uid not in dst) or (gid < 0 and st.st_gid not in dst):
            self.unmapped += 1
        if uid < 0 and gid < 0:
            p = self.pending.get(st.st_ino)
            if p is not None:  # chowned before a kill, not restored yet
                cap = bytes.fromhex(p["cap"]) if p["cap"] is not None else None
                self.restore(ref, st.st_ino, p["mode"], cap)
            return
        target, follow = _xattr_ref(ref)
        link = stat.S_ISLNK(st.st_mode)
        try:
            names = [] if link else os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            names = []
        # ACLs first: their IDs are range-checked too, so redoing them after a kill is harmless.
        for name in XATTR_ACLS:
            if name in names:
                old = os.getxattr(target, name, follow_symlinks=follow)
                if (new := self.shift_acl(old)) != old:
                    os.setxattr(target, name, new, follow_symlinks=follow)
        cap = None
        if stat.S_ISREG(st.st_mode) and XATTR_CAPS in names:
            cap = os.getxattr(target, XATTR_CAPS, follow_symlinks=follow)
        mode = stat.S_IMODE(st.st_mode)
        keep = cap is not None or (not link and mode & (stat.S_ISUID | stat.S_ISGID))
        if keep:
            hexcap = cap.hex() if cap is not None else None
            self.pending[st.st_ino] = {"ino": st.st_ino, "mode": mode, "cap": hexcap}
            self.write_journal()
        os.chown(target, uid, gid, follow_symlinks=follow)  # -1 leaves that ID alone
        if keep:
            self.restore(ref, st.st_ino, mode, cap)
        self.changed += 1

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def shift(self, src: int, dst: int, size: int, pending: list[dict[str, Any]] | None) -> None:
        self.src, self.dst, self.size = src, dst, size
        self.resuming, self.unmapped, self.active = pending is not None, 0, True
        self.pending = {int(p["ino"]): p for p in pending or []}
        if pending is None:
            self.write_journal()
        with closing(self.entries()) as it:
            for ref, st, path in it:
                try:
                    self.shift_inode(ref, st)
                except OSError as e:
                    raise _fail("shift", path, e, True) from e
                self.tick()
        try:
            # Last: the root's owner is what says "this tree is at dst" once the journal goes.
            self.shift_inode(self.root_fd, os.fstat(self.root_fd))
            self.tick()
            os.sync()  # every chown on disk before the journal that covers them goes
            self.journal.clear()
        except OSError as e:
            raise _fail("shift", self.root, e, True) from e


def _open_root(root: str) -> int:
    try:
        return os.open(root, _O_DIR)
    except OSError as e:
        raise _fail("open", root, e) from e


def current_base(root: str, size: int = 65536) -> int | None:
    """The base root is shifted to: its root directory's uid when that is a multiple of size.
    None when it is not, or while a shift is unfinished (the tree is then mixed)."""
    fd = _open_root(root)
    try:
        if _Journal(fd, root).read() is not None:
            return None
        uid = os.fstat(fd).st_uid
        return uid if uid % size == 0 else None
    finally:
        os.close(fd)


def shift_tree(
    root: str,
    target_base: int,
    size: int = 65536,
    progress: Callable[[int, int], None] | None = None,
) -> ShiftResult:
    """Shift every inode under root from its current base to target_base.

    An unfinished shift recorded in the journal is finished first (resumed=True), then the
    tree is shifted on to target_base if that differs."""
    _check_base(target_base, size)
    fd = _open_root(root)
    try:
        try:
            sh = _Shifter(root, fd, progress)
        except OSError as e:
            raise _fail("list the mounts under", root, e) from e
        journal = sh.journal.read()
        phases: list[tuple[int, int, int, list[dict[str, Any]] | None]] = []
        if journal is not None:
            cur = int(journal["to"])
            pending = journal.get("pending", [])
            phases.append((int(journal["from"]), cur, int(journal["size"]), pending))
        else:
            uid = os.fstat(fd).st_uid
            if uid % size:
                raise ShiftError(
                    f"shift {root}: root directory owned by uid {uid}, not a multiple of {size}"
                    " (hint: chown the root directory to the tree's base first)"
                )
            cur = uid
        if cur != target_base:
            _check_base(cur, size)
            phases.append((cur, target_base, size, None))
        if progress is not None and phases:
            with closing(sh.entries()) as it:
                sh.total = (sum(1 for _ in it) + 1) * len(phases)
        for src, dst, n, pending in phases:
            sh.shift(src, dst, n, pending)
        if progress is not None and phases:
            progress(sh.done, sh.done)
        return ShiftResult(
            from_base=phases[0][0] if phases else cur,
            to_base=target_base,
            files_changed=sh.changed,
            resumed=journal is not None,
            unmapped=sh.unmapped,
        )
    finally:
        os.close(fd)


class TerminalProgress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str = "Shifting owners", stream: TextIO | None = None,
                 interval: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label, self.interval = label, interval
        self.enabled = self.stream.isatty()
        self.last = 0.0
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or self.finished:
            return
        now, final = time.monotonic(), done >= total
        if not final and now - self.last < self.interval:
            return  # a redraw per inode would cost more than the chown
        self.last = now
        frac = min(done / total, 1.0) if total else 1.0
        width = max(10, shutil.get_terminal_size().columns - len(self.label) - 30)
        bar = "#" * int(width * frac)
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {frac:4.0%} {done}/{total}")
        if final:
            self.stream.write("\n")
            self.finished = True
        self.stream.flush()
