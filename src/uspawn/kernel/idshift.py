"""Shift the owners of a container rootfs on disk (the "chown" ownership mode).

A container whose user namespace maps IDs 0..size-1 to host IDs base..base+size-1 sees its
files correctly only when they are owned by host IDs in that range. Without an idmapped mount
(DESIGN.md) every inode is chowned: an ID u in [from, from+size) becomes u - from + to; IDs
outside that range are left alone and counted as unmapped.

Constraints:
- Bases are multiples of size, so source and target ranges are disjoint and an inode's owner
  tells whether it was shifted already: the shift is resumable.
- A hard link may name a host file (a tree made with `cp -al`, a hostile tarball): re-owning
  it would hand that host file to the container (issue 19). So a non-directory with
  st_nlink > 1 is not shifted when the walk meets it; the walk counts its names, and at the
  end only inodes with all their names inside the tree are shifted (st_nlink checked again
  right before). The others are left alone and listed in ShiftResult.outside_links.
- Before the first change the journal {"from", "to", "size"} goes into the root directory's
  trusted.uspawn.shift xattr (a file in JOURNAL_DIR where the filesystem has no trusted
  xattrs). The root is shifted last and the journal removed after it, so a tree without a
  journal is never half-shifted and its root's owner is its base.
- chown by root drops setuid/setgid and security.capability, so they are restored after it.
  A kill in between would lose them for good (the owner already says "done"), so the
  journal's "pending" list keeps mode and capability until the restore is done.
- The walk never leaves root: directory fds opened O_NOFOLLOW, other filesystems (st_dev) and
  mount points (mountinfo) skipped, symlinks never followed, so a symlink swapped in during
  the walk cannot redirect a chown or chmod outside the tree. Deferred hard links are
  reached again by name from the root, one O_NOFOLLOW directory at a time, and the parent
  must be the directory the walk saw (st_dev, st_ino).
- Stdlib only; runs on the host while the container is stopped.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import sys
import time

from uspawn.kernel.hardlinks import mountpoints

# current_base() runs on every `uspawn run`: keep this module's imports to the
# stdlib's cheapest (json, re, shutil load lazily where a shift needs them;
# typing/dataclasses are for the type checker only).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Iterator
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
ACL_USER, ACL_GROUP = 2, 8

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_ID = 0xFFFFFFFF  # (uid_t)-1 means "no change" to chown and is never a real owner
_RACE = "the tree changed during the shift; is the container running?"
_HINTS = {
    errno.EPERM: "immutable or append-only file? (lsattr, chattr -i)",
    errno.EACCES: "run as root (CAP_CHOWN, CAP_FOWNER, CAP_SETFCAP, CAP_SYS_ADMIN)",
    errno.EROFS: "the filesystem is read-only; remount it read-write",
    errno.ENOSPC: "no space left for the journal or xattrs",
    errno.EMFILE: "tree deeper than the fd limit; raise ulimit -n",
    errno.ELOOP: _RACE,
    errno.ESTALE: _RACE,
}

_Ref = int | tuple[int, str]  # the root's fd, or (parent dir fd, name) for everything else
# (parent dir fd, name), lstat, path for messages, parent directory's st_ino
_Entry = tuple[_Ref, os.stat_result, str, int]


class ShiftError(Exception):
    """A shift failed. The message is one line: what, path, errno text and a hint."""


class ShiftResult:
    def __init__(self, from_base: int, to_base: int, files_changed: int, resumed: bool,
                 unmapped: int = 0, outside_links: list[str] | None = None) -> None:
        self.from_base = from_base
        self.to_base = to_base
        self.files_changed = files_changed  # inodes chowned, the root included
        self.resumed = resumed  # an unfinished shift from the journal was finished first
        self.unmapped = unmapped  # inodes with an ID outside the range after the shift
        # Tree paths ("/etc/x", sorted) of files left alone: also hard-linked from outside.
        self.outside_links = outside_links or []

    def __repr__(self) -> str:
        return (f"ShiftResult(from_base={self.from_base}, to_base={self.to_base}, "
                f"files_changed={self.files_changed}, resumed={self.resumed}, "
                f"unmapped={self.unmapped}, outside_links={self.outside_links})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShiftResult) and repr(self) == repr(other)

    __hash__ = None  # type: ignore[assignment]


def _fail(what: str, path: str, exc: OSError, journaled: bool = False) -> ShiftError:
    hint = _HINTS.get(exc.errno or 0, "")
    if journaled:
        hint += ("; " if hint else "") + "the journal keeps the shift; fix this and rerun to resume"
    hint = f" (hint: {hint})" if hint else ""
    return ShiftError(f"{what} {path}: {exc.strerror or exc}{hint}")


def _check_base(base: int, size: int) -> None:
    if size <= 0 or base < 0 or base % size or base + size > _MAX_ID:
        raise ShiftError(f"bad ID range {base}+{size}: the base must be a multiple of the size")


def pending_shift(fd: int, root: str) -> dict[str, Any] | None:
    """The journal of an unfinished shift of the tree at fd (None: none), read by the
    shifter's own reader so `check` and the shifter always agree."""
    return _Journal(fd, root).data


class _Journal:
    """The record of an unfinished shift: the root's xattr, or a file on filesystems
    without trusted xattrs (ENOTSUP, e.g. ramfs)."""

    def __init__(self, fd: int, root: str) -> None:
        st = os.fstat(fd)
        self.fd, self.root, self.in_file = fd, root, False
        self.file = os.path.join(JOURNAL_DIR, f"{st.st_dev}-{st.st_ino}.json")
        raw: bytes | None = None
        try:
            raw = os.getxattr(fd, JOURNAL_XATTR)
        except OSError as e:
            if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise _fail("read the shift journal of", root, e) from e
            self.in_file = e.errno == errno.ENOTSUP
        if self.in_file and os.path.exists(self.file):
            with open(self.file, "rb") as f:
                raw = f.read()
        self.data: dict[str, Any] | None = None if raw is None else self._parse(raw)

    def _parse(self, raw: bytes) -> dict[str, Any]:
        try:
            import json

            data: dict[str, Any] = json.loads(raw)
            src, dst, size = int(data["from"]), int(data["to"]), int(data["size"])
            _check_base(src, size)
            _check_base(dst, size)
            if src == dst:
                raise ValueError("from == to")
        except (ValueError, KeyError, TypeError, ShiftError) as e:
            raise ShiftError(f"corrupt shift journal of {self.root}: {raw!r} ({e})") from e
        return data

    def write(self, data: dict[str, Any] | None) -> None:
        """Replace the journal with data, or remove it (None). Durable on return: it must be
        on disk before the chowns it covers."""
        import json

        raw = None if data is None else json.dumps(data, sort_keys=True).encode()
        try:
            if not self.in_file:
                if raw is None:
                    os.removexattr(self.fd, JOURNAL_XATTR)
                else:
                    os.setxattr(self.fd, JOURNAL_XATTR, raw)
                os.fsync(self.fd)
                return
            os.makedirs(JOURNAL_DIR, mode=0o700, exist_ok=True)
            if raw is None:
                os.unlink(self.file)
            else:
                with open(self.file + ".tmp", "wb") as f:
                    f.write(raw)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(self.file + ".tmp", self.file)  # readers see old or new, never half
            dfd = os.open(JOURNAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)  # the rename or unlink itself
            finally:
                os.close(dfd)
        except OSError as e:
            raise _fail("write the shift journal of", self.root, e, data is not None) from e


def _xattr_ref(ref: _Ref) -> tuple[int | str, bool]:
    """(target, follow_symlinks) for chown and the xattr calls, which take no dir_fd."""
    if isinstance(ref, int):
        return ref, True
    # The parent is reached through its fd's magic link and the last component is not
    # followed: this names exactly the entry we lstat'ed and cannot leave the tree.
    return f"/proc/self/fd/{ref[0]}/{ref[1]}", False


def _chmod(ref: _Ref, mode: int, ino: int) -> None:
    if isinstance(ref, int):
        return os.chmod(ref, mode)
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
        try:
            self.mounts = mountpoints(root_fd)
        except OSError as e:
            raise _fail("list the mounts under", root, e) from e
        self.done = self.total = self.changed = self.unmapped = 0
        self.src = self.dst = self.size = 0
        self.journaled = self.journal.data is not None
        self.pending: dict[int, dict[str, Any]] = {}
        # Multi-link non-directories met by the walk, by (st_dev, st_ino):
        # [names seen, st_nlink, path for messages, parent dir st_ino, uid, gid].
        self.linked: dict[tuple[int, int], list[Any]] = {}
        self.outside: set[str] = set()  # tree paths left alone, over every pass

    def entries(self) -> Generator[_Entry, None, None]:
        """Every inode below root (not root itself), depth first, one open fd per level,
        with its parent directory's st_ino."""
        rst, path = os.fstat(self.root_fd), self.root
        stack: list[tuple[int, Iterator[str], str, tuple[int, int]]] = []
        try:
            names = iter(os.listdir(self.root_fd))
            stack.append((os.dup(self.root_fd), names, path, (rst.st_dev, rst.st_ino)))
            while stack:
                dfd, names, dpath, parent = stack[-1]
                if (name := next(names, None)) is None:
                    os.close(stack.pop()[0])
                    continue
                path = os.path.join(dpath, name)
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed under us: nothing left to shift
                if st.st_dev != self.dev or (*parent, name) in self.mounts:
                    continue
                yield (dfd, name), st, path, parent[1]
                if stat.S_ISDIR(st.st_mode):
                    sub = os.open(name, _O_DIR, dir_fd=dfd)
                    stack.append((sub, iter(os.listdir(sub)), path, (st.st_dev, st.st_ino)))
                    if os.fstat(sub).st_ino != st.st_ino:
                        raise OSError(errno.ESTALE, "replaced during the shift")
        except OSError as e:
            raise _fail("walk", path, e, self.journaled) from e
        finally:
            for dfd, _, _, _ in stack:
                os.close(dfd)

    def remap(self, i: int) -> int:
        """The shifted ID, or -1 when i is outside the source range."""
        return i - self.src + self.dst if self.src <= i < self.src + self.size else -1

    def shift_cap(self, value: bytes) -> bytes | None:
        """v2/v3 capability as v3 with the shifted rootid (v2 if that is 0); None: keep it."""
        magic = struct.unpack_from("<I", value)[0] if len(value) >= 20 else 0
        if magic & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_2 and len(value) == 20:
            rootid = self.dst  # v2 means the tree's root: make it the container's root
        elif magic & VFS_CAP_REVISION_MASK == VFS_CAP_REVISION_3 and len(value) == 24:
            rootid = self.remap(struct.unpack_from("<I", value, 20)[0])
        else:
            return None
        eff = magic & VFS_CAP_FLAGS_EFFECTIVE
        if rootid == 0:  # the kernel shows a v3 with rootid 0 to init-ns readers as v2 anyway
            return struct.pack("<I", VFS_CAP_REVISION_2 | eff) + value[4:20]
        if rootid < 0:
            return None
        return struct.pack("<I", VFS_CAP_REVISION_3 | eff) + value[4:20] + struct.pack("<I", rootid)

    def shift_acl(self, value: bytes) -> bytes:
        if len(value) < 4 or (len(value) - 4) % 8 or value[:4] != b"\x02\x00\x00\x00":
            return value  # not POSIX_ACL_XATTR_VERSION: leave what we do not understand
        out = bytearray(value)
        for off in range(4, len(value), 8):
            tag, _perm, ident = struct.unpack_from("<HHI", value, off)
            if tag in (ACL_USER, ACL_GROUP) and (new := self.remap(ident)) >= 0:
                struct.pack_into("<I", out, off + 4, new)
        return bytes(out)

    def write_journal(self) -> None:
        data: dict[str, Any] = {"from": self.src, "to": self.dst, "size": self.size}
        if self.pending:
            data["pending"] = list(self.pending.values())
        self.journal.write(data)

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

    def shift_inode(self, ref: _Ref, st: os.stat_result) -> None:
        uid, gid = self.remap(st.st_uid), self.remap(st.st_gid)
        # IDs in the target range are not unmapped: hard links met twice, or inodes shifted
        # before a kill.
        dst = range(self.dst, self.dst + self.size)
        if (uid < 0 and st.st_uid not in dst) or (gid < 0 and st.st_gid not in dst):
            self.unmapped += 1
        if uid < 0 and gid < 0:
            if (p := self.pending.get(st.st_ino)) is not None:  # chowned, then killed
                self.restore(ref, st.st_ino, p["mode"], p["cap"] and bytes.fromhex(p["cap"]))
            return
        target, follow = _xattr_ref(ref)
        link = stat.S_ISLNK(st.st_mode)
        try:
            names = [] if link else os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno != errno.ENOTSUP:
                raise
            names = []
        # ACLs before the chown: their IDs are range-checked too, so redoing them is harmless.
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
            hexcap = None if cap is None else cap.hex()
            self.pending[st.st_ino] = {"ino": st.st_ino, "mode": mode, "cap": hexcap}
            self.write_journal()
        os.chown(target, uid, gid, follow_symlinks=follow)  # -1 leaves that ID alone
        if keep:
            self.restore(ref, st.st_ino, mode, cap)
        self.changed += 1

    def count_link(self, st: os.stat_result, path: str, parent: int) -> None:
        if (rec := self.linked.get((st.st_dev, st.st_ino))) is None:
            self.linked[(st.st_dev, st.st_ino)] = [1, st.st_nlink, path, parent, st.st_uid,
                                                   st.st_gid]
        else:
            rec[0] += 1
            rec[1] = max(rec[1], st.st_nlink)

    def open_dir(self, parts: list[str], ino: int) -> int:
        """The directory root/parts..., reached one O_NOFOLLOW component at a time (also
        deeper than PATH_MAX), which must be the one the walk saw (st_ino, our st_dev)."""
        fd = os.dup(self.root_fd)
        try:
            for name in parts:
                sub = os.open(name, _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = sub
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self.dev, ino):
                raise OSError(errno.ESTALE, "replaced during the shift")
            return fd
        except BaseException:
            os.close(fd)
            raise

    def shift_linked(self, ino: int, seen: int, nlink: int, path: str, parent: int) -> bool:
        """Shift a multi-link inode if the walk found every one of its names. False: it
        has a name outside the tree (then or now) and is left alone."""
        if seen != nlink:
            return False
        *dirs, name = path[len(self.root):].lstrip("/").split("/")
        try:
            pfd = self.open_dir(dirs, parent)
        except FileNotFoundError:
            return True  # moved or removed since the walk: not ours to shift any more
        try:
            # The last look, right before the chown: a link made since the walk counts.
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if st.st_ino != ino or stat.S_ISDIR(st.st_mode):
                return True  # replaced since the walk: the new inode was never counted
            if st.st_nlink != seen:
                return False
            self.shift_inode((pfd, name), st)
            return True
        except FileNotFoundError:
            return True
        finally:
            os.close(pfd)

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def shift(self, src: int, dst: int, size: int, pending: list[dict[str, Any]] | None) -> None:
        """One journaled pass src -> dst; pending is None for a new pass, else a resume."""
        self.src, self.dst, self.size, self.unmapped = src, dst, size, 0
        self.journaled = True
        self.pending = {int(p["ino"]): p for p in pending or []}
        if pending is None:
            self.write_journal()
        self.linked = {}
        it = self.entries()
        try:
            for ref, st, path, parent in it:
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    self.count_link(st, path, parent)  # shifted after the walk, or never
                else:
                    try:
                        self.shift_inode(ref, st)
                    except OSError as e:
                        raise _fail("shift", path, e, True) from e
                self.tick()
        finally:
            it.close()  # closes the walk's directory fds (contextlib costs ~2 ms to import)
        for (_dev, ino), (seen, nlink, path, parent, uid, gid) in self.linked.items():
            try:
                if not self.shift_linked(ino, seen, nlink, path, parent):
                    self.outside.add("/" + path[len(self.root):].lstrip("/"))
                    ids = range(self.dst, self.dst + self.size)
                    self.unmapped += uid not in ids or gid not in ids
            except OSError as e:
                raise _fail("shift", path, e, True) from e
        try:
            # Last: once the journal is gone, the root's owner is what says "tree at dst".
            self.shift_inode(self.root_fd, os.fstat(self.root_fd))
            self.tick()
            os.sync()  # every chown on disk before the journal that covers them goes
        except OSError as e:
            raise _fail("shift", self.root, e, True) from e
        self.journal.write(None)

    def run(self, target: int, size: int) -> ShiftResult:
        phases: list[tuple[int, int, int, list[dict[str, Any]] | None]] = []
        if (j := self.journal.data) is not None:
            cur = int(j["to"])
            phases.append((int(j["from"]), cur, int(j["size"]), j.get("pending", [])))
        elif (cur := os.fstat(self.root_fd).st_uid) % size:
            raise ShiftError(
                f"shift {self.root}: root directory owned by uid {cur}, not a multiple of "
                f"{size} (hint: chown the root directory to the tree's base first)"
            )
        if cur != target:
            _check_base(cur, size)
            phases.append((cur, target, size, None))
        if self.progress is not None and phases:
            it = self.entries()  # a cheap first pass, only for the total
            try:
                self.total = (sum(1 for _ in it) + 1) * len(phases)
            finally:
                it.close()
        for src, dst, n, pending in phases:
            self.shift(src, dst, n, pending)
        if self.progress is not None and phases:
            self.progress(self.done, self.done)
        return ShiftResult(phases[0][0] if phases else cur, target, self.changed,
                           j is not None, self.unmapped, sorted(self.outside))


def _open_root(root: str) -> int:
    try:
        return os.open(root, _O_DIR)
    except OSError as e:
        raise _fail("open", root, e) from e


def current_base(root: str, size: int = 65536) -> int | None:
    """The base root is shifted to: its root directory's uid if that is a multiple of size,
    else None. An unfinished shift counts as at its target, since any shift_tree call
    finishes it first: so a caller picks chown (not an idmapped mount, which would map a
    mixed tree) and that base, and must still call shift_tree, which costs nothing when
    the tree is already there."""
    fd = _open_root(root)
    try:
        if (journal := _Journal(fd, root).data) is not None:
            return int(journal["to"])
        uid = os.fstat(fd).st_uid
        return None if uid % size else uid
    finally:
        os.close(fd)


def shift_tree(
    root: str,
    target_base: int,
    size: int = 65536,
    progress: Callable[[int, int], None] | None = None,
) -> ShiftResult:
    """Shift every inode under root from its current base to target_base. An unfinished
    shift in the journal is finished first (resumed=True), then shifted on if need be."""
    _check_base(target_base, size)
    fd = _open_root(root)
    try:
        return _Shifter(root, fd, progress).run(target_base, size)
    finally:
        os.close(fd)


class TerminalProgress:
    """progress= for shift_tree: a one-line bar on stderr, drawn only if that is a tty."""

    def __init__(self, label: str = "Shifting owners", stream: TextIO | None = None,
                 interval: float = 0.1) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.label, self.interval, self.last = label, interval, 0.0
        self.active = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        now, final = time.monotonic(), done >= total
        if not self.active or (not final and now - self.last < self.interval):
            return  # a redraw per inode would cost more than the chown
        self.last = now
        frac = min(done / total, 1.0) if total else 1.0
        import shutil

        width = max(10, shutil.get_terminal_size().columns - len(self.label) - 30)
        bar = "#" * int(width * frac)
        self.stream.write(f"\r{self.label} [{bar:<{width}}] {frac:4.0%} {done}/{total}")
        self.stream.write("\n" if final else "")
        self.stream.flush()
        self.active = not final
