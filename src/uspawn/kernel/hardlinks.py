"""Files of a container tree that are also linked from outside it (issue 19).

A hard link is a second name for the same inode. A tree file hard-linked to a host
file is that host file: an idmapped rootfs hands it to container root (who can then
read, append to and chmod it), and a chown shift would re-own it. The kernel keeps
only the total, st_nlink; so the tree is walked, its names for each multi-link inode
are counted, and an inode with fewer names inside than st_nlink has the rest outside.

The walk follows idshift's rules: symlinks never followed (directories are opened
O_NOFOLLOW relative to their parent's fd), other filesystems (st_dev) and mount
points not entered. Names below a mount point are not counted, so a file linked from
there counts as linked from outside: conservative, and a non-recursive clone of the
tree (what the container gets) does not show that mount anyway. Scanning the
detached clone itself (scan_fd on an open_tree fd, which has no submounts) sees
exactly what the container will see, covered directories included.

Stdlib only; `uspawn run` calls it on the start path in `map` mode, so it does one
fstatat per non-directory, one open and fstat per directory, and nothing else; and
through scan_cached(), which keeps a clean tree's verdict with every directory's
inode and ctime, so the next start of an unchanged tree costs one lstat per
directory instead (a start flat in the number of files).
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# (parent st_dev, parent st_ino, name) of a mount point
MountPoints = set[tuple[int, int, str]] | frozenset[tuple[int, int, str]]


class Linked:
    """One inode with names outside the tree."""

    __slots__ = ("inside", "nlink", "path")

    def __init__(self, path: str, nlink: int, inside: int) -> None:
        self.path = path  # the first of its names inside the tree, "/"-rooted
        self.nlink = nlink  # st_nlink: every name it has
        self.inside = inside  # names the walk found inside the tree

    def __repr__(self) -> str:
        return f"Linked({self.path!r}, nlink={self.nlink}, inside={self.inside})"


class Found:
    """What scan() found: up to `limit` files (by path) and how many there are."""

    def __init__(self, files: list[Linked], inodes: set[tuple[int, int]], multi: int) -> None:
        self.files = files
        self.inodes = inodes  # (st_dev, st_ino) of every inode linked from outside
        self.total = len(inodes)
        self.multi = multi  # inodes with st_nlink > 1 seen (all links inside or not)


def mountpoints(root_fd: int) -> set[tuple[int, int, str]]:
    """(parent st_dev, parent st_ino, name) of each mount point below root. st_dev alone
    misses bind mounts from the same filesystem, which may bring in host files."""
    import re

    top = os.readlink(f"/proc/self/fd/{root_fd}").rstrip("/") + "/"
    found = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # proc(5): field 5 is the mount point; space, tab, \n and \ are octal escapes
            raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4])
            parent, name = os.path.split(os.fsdecode(raw))
            if (parent + "/").startswith(top):
                try:
                    pst = os.lstat(parent)
                except OSError:
                    continue  # overmounted or gone: the walk cannot meet it either
                found.add((pst.st_dev, pst.st_ino, name))
    return found


def scan_fd(root_fd: int, limit: int, skip: MountPoints = frozenset(),
            dirs: list[tuple[str, int, int]] | None = None) -> Found:
    """The inodes below root_fd (a directory or a detached mount) that have names
    outside it; skip: mount points not to enter (empty for a detached mount).
    dirs, if given, gets (tree path, st_ino, st_ctime_ns) of every directory walked."""
    dev = os.fstat(root_fd).st_dev
    links: dict[tuple[int, int], list[int]] = {}  # (dev, ino) -> [names inside, st_nlink]
    paths: dict[tuple[int, int], str] = {}  # (dev, ino) -> its first name inside
    # One level per open directory: fd, tree path, st_ino, subdirectories still to enter.
    stack: list[tuple[int, str, int, Iterator[str]]] = []
    path = ""
    try:
        # A readable fd of our own, also for O_PATH and open_tree fds.
        fd = os.open(".", _O_DIR, dir_fd=root_fd)
        try:
            top = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        ino = top.st_ino
        if dirs is not None:
            dirs.append(("", top.st_ino, top.st_ctime_ns))
        while True:
            if fd >= 0:
                stack.append((fd, path, ino, iter(())))  # closed by finally from here on
                stack[-1] = (fd, path, ino, iter(_list(fd, path, dev, links, paths)))
                fd = -1
            dfd, dpath, dino, names = stack[-1]
            if (name := next(names, None)) is None:
                os.close(stack.pop()[0])
                if not stack:
                    break
                continue
            if (dev, dino, name) in skip:
                continue
            path = f"{dpath}/{name}"
            try:
                sub = os.open(name, _O_DIR, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # removed, or replaced by a file or symlink, since the listing
                raise
            try:
                st = os.fstat(sub)
            except OSError:
                os.close(sub)
                raise
            if st.st_dev != dev:  # another filesystem (not seen as a mount: btrfs subvolume)
                os.close(sub)
                continue
            fd, ino = sub, st.st_ino
            if dirs is not None:
                dirs.append((path, st.st_ino, st.st_ctime_ns))
    except OSError as e:
        # The tree path, kept readable: a hostile tree nests thousands of levels deep.
        where = path if len(path) <= 160 else f"{path[:78]}...{path[-78:]}"
        raise OSError(e.errno, e.strerror, where or "/") from None
    finally:
        for dfd, _, _, _ in stack:
            os.close(dfd)
    outside = {k for k, (c, n) in links.items() if c < n}
    out = sorted((Linked(paths[k], links[k][1], links[k][0]) for k in outside),
                 key=lambda f: f.path)
    return Found(out[:limit], outside, len(links))


def _list(dfd: int, dpath: str, dev: int, links: dict[tuple[int, int], list[int]],
          paths: dict[tuple[int, int], str]) -> list[str]:
    """The subdirectory names of dfd; counts the names of its multi-link non-directories."""
    subdirs = []
    with os.scandir(dfd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):  # d_type: no syscall
                subdirs.append(e.name)
                continue
            try:
                st = e.stat(follow_symlinks=False)  # fstatat(dfd, name, AT_SYMLINK_NOFOLLOW)
            except FileNotFoundError:
                continue
            if st.st_nlink < 2 or st.st_dev != dev:
                continue
            key = (st.st_dev, st.st_ino)
            if (rec := links.get(key)) is None:
                links[key] = [1, st.st_nlink]
                paths[key] = f"{dpath}/{e.name}"
            else:
                rec[0] += 1
                rec[1] = max(rec[1], st.st_nlink)  # a link added during the walk counts
    return subdirs


# A clean verdict (no file linked from outside) per tree, with the inode number and
# ctime of every directory of it (tree/scan_cached). Root's alone (base/cachefile.py).
CACHE_DIR = "/var/cache/uspawn/treescan"
_CACHE_FORMAT = b"uspawn-treescan 1\n"
# A directory changed this recently may change again within the same tick of the
# (coarse) clock the filesystem stamps ctime with: such a tree is not cached.
_SETTLED_NS = 2_000_000_000
_CACHE_LIMIT = 64 << 20


def scan_cached(root_fd: int, limit: int, cache_dir: str = CACHE_DIR) -> Found:
    """scan_fd(root_fd) (a detached clone: no mount points), skipped when the tree's
    last scan found nothing and none of its directories has changed since.

    Why that is enough: a name inside the tree for an inode linked from outside can
    only appear by adding a directory entry (link, rename, a directory moved in),
    which sets that directory's ctime to now, and nobody can set a ctime back
    (utimensat sets it to now too); a new directory shows in its parent's ctime.
    A name added *outside* for a tree file leaves the tree's directories alone but
    gives the container nothing it did not have. So the check is one lstat per
    directory (inode and ctime as recorded, walked from the root, never through a
    symlink: a directory replaced by one has another inode), not one per file,
    which keeps a start flat in the number of files (bench/bench_treesize.py)."""
    st = os.fstat(root_fd)
    path = f"{cache_dir}/{st.st_dev}-{st.st_ino}"
    from uspawn.base import cachefile

    trusted = cachefile.trusted_dir(cache_dir)
    if trusted:
        data = cachefile.read(path, _CACHE_LIMIT)
        if data is not None and _unchanged(root_fd, data):
            return Found([], set(), 0)
    import time

    started = time.time_ns()
    dirs: list[tuple[str, int, int]] = []
    found = scan_fd(root_fd, limit, dirs=dirs)
    if found.total == 0 and all(c < started - _SETTLED_NS for _, _, c in dirs):
        lines = [_CACHE_FORMAT] + [f"{i} {c} {os.fsencode(p).hex()}\n".encode()
                                   for p, i, c in dirs]
        try:
            cachefile.store(cache_dir, path, b"".join(lines))
        except OSError:
            pass  # read-only /var, ENOSPC: the next start scans again
    return found


def _unchanged(root_fd: int, data: bytes) -> bool:
    """Is every directory recorded in data still there, the same inode, same ctime?"""
    if not data.startswith(_CACHE_FORMAT):
        return False
    lines = data[len(_CACHE_FORMAT):].split(b"\n")
    if lines[-1:] != [b""] or len(lines) < 2:
        return False
    import stat

    try:
        for line in lines[:-1]:
            ino, ctime, hexpath = line.split(b" ")
            rel = os.fsdecode(bytes.fromhex(hexpath.decode())).lstrip("/") or "."
            st = os.stat(rel, dir_fd=root_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode) or st.st_ino != int(ino) \
                    or st.st_ctime_ns != int(ctime):
                return False
    except (OSError, ValueError):
        return False
    return True


def scan(root: str, limit: int) -> Found:
    """scan_fd for a directory path: mount points below it are not entered. root
    itself may be a symlink (the admin named it; -D resolves it the same way)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return scan_fd(fd, limit, mountpoints(fd))
    finally:
        os.close(fd)


def outside_links(root: str, limit: int) -> list[str]:
    """Tree paths (up to limit, sorted) of files below root also linked from outside."""
    return [f.path for f in scan(root, limit).files]
