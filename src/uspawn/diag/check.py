"""`uspawn check ROOTFS`: audit a tree before it is booted in a user namespace.

One walk over the tree (lstat only, symlinks never followed, other
filesystems not entered) collects owners, device nodes and setuid files;
linux/hardlinks.py walks it once more for files hard-linked from outside it
(the very scan `uspawn run` refuses an idmapped tree on). Paths the tree names
(/sbin/init, os-release, unit directories, unit files) are resolved inside it
with openat2(RESOLVE_IN_ROOT) and read only when they are regular files, so a
symlink or a FIFO in a hostile tree never makes check read the host's files or
block.

Rows as in doctor: ok / degraded / broken. run_check() returns 0 when nothing is
broken, 1 when something breaks containers (or their isolation); a ROOTFS that is
not a directory raises UsageError (exit code 2). docs/DOCTOR.md lists every row.
"""

from __future__ import annotations

import os
import stat

from uspawn.base.errors import UsageError
from uspawn.diag.report import BROKEN, DEGRADED, OK, Row, report, row

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from collections.abc import Set as AbstractSet
    from typing import TextIO

    from uspawn.kernel.hardlinks import Found

RANGE = 65536
EXAMPLES = 3
UNIT_DIRS = ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system")
UNIT_SUFFIXES = (".service", ".socket", ".mount", ".swap")
_FALSE = ("", "no", "false", "0", "off")
_NO_BPF = ("not enforced: systemd attaches cgroup BPF programs for it, which needs "
           "CAP_BPF/CAP_SYS_ADMIN in the host namespace; inside a user-namespaced container "
           "systemd logs a warning and runs the service without it")
_DEVICE_POLICY = ("not enforced inside a user-namespaced container (the device cgroup needs "
                  "host privileges); harmless under uspawn, whose /dev holds only null, zero, "
                  "full, random, urandom and tty")
# Directive -> (verdict, what it means under uspawn, fix). Verdicts are for uspawn
# on a current kernel; PrivateDevices= gets the kernel release appended.
UNIT_DIRECTIVES: dict[str, tuple[str, str, str]] = {
    "PrivateDevices": (OK, "works: systemd tries mknod for its private /dev, uspawn's seccomp "
                       "policy refuses device mknod with EPERM on every kernel (also on "
                       "4.18-4.20, where the kernel itself would let it succeed with "
                       "unopenable nodes), so systemd takes its bind-mount fallback", ""),
    "DevicePolicy": (DEGRADED, _DEVICE_POLICY, "nothing to do for uspawn; rely on its minimal "
                     "/dev"),
    "DeviceAllow": (DEGRADED, _DEVICE_POLICY, "nothing to do for uspawn; rely on its minimal "
                    "/dev"),
    "PrivateUsers": (OK, "works: nested user namespaces are allowed (uspawn's policy allows "
                     "unshare; the kernel nests 32 levels)", ""),
    "ProtectKernelTunables": (OK, "works: /proc/sys and /sys are read-only under uspawn "
                              "already; systemd's extra read-only mounts are allowed", ""),
    "ProtectKernelModules": (OK, "works: container root has no CAP_SYS_MODULE anyway", ""),
    "ProtectKernelLogs": (OK, "works: container root has no CAP_SYSLOG anyway", ""),
    "ProtectControlGroups": (OK, "works: a read-only /sys/fs/cgroup for the service", ""),
    "ProtectClock": (DEGRADED, "its system-call filter works; its DeviceAllow= for /dev/rtc "
                     "is not enforced (see DeviceAllow=)", "nothing to do"),
    "ProtectHostname": (OK, "works: a UTS namespace inside the container's user namespace", ""),
    "PrivateNetwork": (OK, "works: a network namespace inside the container's", ""),
    "PrivateTmp": (OK, "works: mount namespaces inside the container's user namespace", ""),
    "PrivateMounts": (OK, "works: mount namespaces inside the container's user namespace", ""),
    "ProtectSystem": (OK, "works: read-only bind mounts inside the container", ""),
    "ProtectHome": (OK, "works: read-only or empty mounts inside the container", ""),
    "RestrictNamespaces": (OK, "works: a seccomp filter stacked on uspawn's", ""),
    "IPAddressDeny": (DEGRADED, _NO_BPF, "filter on the host, or give the container its own "
                      "network namespace (the default) and filter its veth"),
    "IPAddressAllow": (DEGRADED, _NO_BPF, "filter on the host"),
    "RestrictNetworkInterfaces": (DEGRADED, _NO_BPF, "filter on the host"),
    "SocketBindDeny": (DEGRADED, _NO_BPF, "filter on the host"),
    "SocketBindAllow": (DEGRADED, _NO_BPF, "filter on the host"),
}


class IdRange:
    """Inodes with a uid or gid in one 65536-aligned range."""

    def __init__(self) -> None:
        self.count = 0
        self.root_owned = False  # some file is owned by the range's uid 0
        self.examples: list[str] = []


class Scan:
    """What one walk of the tree saw."""

    def __init__(self) -> None:
        self.files = 0
        self.ranges: dict[int, IdRange] = {}  # by aligned base
        self.nodes: list[str] = []
        self.setuid: list[str] = []  # setuid/setgid executables other users can reach
        self.errors: list[str] = []

    def note_ids(self, rel: str, st: os.stat_result) -> None:
        for base in {st.st_uid - st.st_uid % RANGE, st.st_gid - st.st_gid % RANGE}:
            entry = self.ranges.setdefault(base, IdRange())
            entry.count += 1
            entry.root_owned |= st.st_uid == base
            if len(entry.examples) < EXAMPLES:
                entry.examples.append(f"{_short('/' + rel)} ({st.st_uid}:{st.st_gid})")


def walk(root: str, onerror: Callable[[str, OSError], None],
         descend: Callable[[os.stat_result], bool] = lambda st: True,
         ) -> Iterator[tuple[str, os.stat_result]]:
    """(tree-relative path, lstat) of root and everything below it, entering only
    directories for which descend(lstat) holds. Never follows symlinks and never
    enters another filesystem. Iterative on purpose: os.walk recurses in Python
    3.11, so ~1000 nested directories in a hostile tree would crash it."""
    root_st = os.lstat(root)
    yield "", root_st
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            onerror(f"/{rel}", exc)
            continue
        subdirs = []
        for entry in entries:
            path = f"{rel}/{entry.name}" if rel else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                onerror(f"/{path}", exc)
                continue
            yield path, st
            if stat.S_ISDIR(st.st_mode) and st.st_dev == root_st.st_dev and descend(st):
                subdirs.append(path)
        stack.extend(reversed(subdirs))


def _short(path: str, limit: int = 80) -> str:
    """Paths in messages stay readable; a hostile tree can nest thousands deep."""
    return path if len(path) <= limit else f"{path[:limit // 2 - 2]}...{path[2 - limit // 2:]}"


def scan_tree(root: str, not_ours: AbstractSet[tuple[int, int]] = frozenset()) -> Scan:
    """One walk: owners, device nodes, setuid files, unreadable entries. The owners of
    not_ours (st_dev, st_ino: files hard-linked from outside) are not tallied."""
    scan = Scan()

    def onerror(rel: str, exc: OSError) -> None:
        scan.errors.append(f"{_short(rel)}: {exc.strerror}")

    closed: set[str] = set()  # directories other users cannot traverse
    for rel, st in walk(root, onerror):
        scan.files += 1
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            closed.add(rel)
        if (st.st_dev, st.st_ino) not in not_ours:
            scan.note_ids(rel, st)
        mode = st.st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "c" if stat.S_ISCHR(mode) else "b"
            dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            scan.nodes.append(f"{_short('/' + rel)} ({kind} {dev})")
        elif stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID) and mode & 0o111:
            parts = rel.split("/")
            if not any("/".join(parts[:i]) in closed for i in range(1, len(parts))):
                scan.setuid.append(_short("/" + rel))  # within other users' reach
    return scan


def traverse_blocker(path: str) -> str | None:
    """The first directory on the way to path that other users cannot traverse
    (as 'DIR mode 0700'), or None when every user can reach path."""
    cur = "/"
    for part in ["", *os.path.realpath(path).strip("/").split("/")]:
        cur = os.path.join(cur, part)
        try:
            st = os.stat(cur)
        except OSError as exc:
            return f"{cur}: {exc.strerror}"
        if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH:
            return f"{cur} mode {stat.S_IMODE(st.st_mode):04o}"
    return None


def find_setuid(path: str, budget: float = 3.0) -> str | None:
    """First setuid/setgid executable under path (same filesystem, no symlinks),
    searching for at most `budget` seconds."""
    import time

    deadline = time.monotonic() + budget
    # Below a directory other users cannot traverse, nothing is in their reach.
    for rel, st in walk(path, lambda rel, exc: None, lambda st: bool(st.st_mode & stat.S_IXOTH)):
        if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID) \
                and st.st_mode & 0o111:
            return os.path.join(path, rel)
        if time.monotonic() > deadline:
            break
    return None


def _open_regular(rootfd: int, rel: str, seen: set[tuple[int, int]] | None = None
                  ) -> tuple[str, str] | None:
    """(text, resolved file name) of rel inside the tree if it resolves (inside) to
    a regular file not in seen (inodes already read: alias symlinks)."""
    from uspawn.kernel import mounts

    try:
        fd = mounts.open_in_root(rootfd, rel)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if seen is not None and (st.st_dev, st.st_ino) in seen:
            return None
        rfd = mounts.reopen_regular(fd)
        if rfd is None:
            return None
        if seen is not None:
            seen.add((st.st_dev, st.st_ino))
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        with open(rfd, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20), name
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_executable(rootfd: int, rel: str) -> bool:
    from uspawn.kernel import mounts

    try:
        fd = mounts.open_in_root(rootfd, rel)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
    finally:
        os.close(fd)


def _unit_files(rootfd: int) -> list[str]:
    """Unit files and drop-ins in the tree's unit directories (tree-relative),
    each directory resolved inside the tree and visited once (merged /usr)."""
    from uspawn.kernel import mounts

    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for d in UNIT_DIRS:
        try:
            fd = mounts.open_in_root(rootfd, d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(fd) as it:
                names = sorted(e.name for e in it)
        finally:
            os.close(fd)
        for name in names:
            if name.endswith(UNIT_SUFFIXES):
                found.append(f"{d}/{name}")
            elif name.endswith(".d"):
                try:
                    sub = mounts.open_in_root(rootfd, f"{d}/{name}", os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    continue
                try:
                    with os.scandir(sub) as it:
                        found += [f"{d}/{name}/{e.name}" for e in sorted(it, key=lambda e: e.name)
                                  if e.name.endswith(".conf")]
                finally:
                    os.close(sub)
    return found


def _unit_rows(rootfd: int) -> list[Row]:
    users: dict[str, list[str]] = {}
    files = _unit_files(rootfd)
    seen: set[tuple[int, int]] = set()
    for rel in files:
        found = _open_regular(rootfd, rel, seen)
        if found is None:
            continue  # masked (-> /dev/null), dangling, an alias read already, not a file
        text, name = found
        unit = rel.split("/")[-2][:-2] if rel.endswith(".conf") else name
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in UNIT_DIRECTIVES or value.lower() in _FALSE:
                continue
            if key == "DevicePolicy" and value == "auto":
                continue
            if unit not in users.setdefault(key, []):
                users[key].append(unit)
    rows = [row("systemd-units", OK, f"{len(files)} unit files and drop-ins; "
                f"{len(users)} sandboxing directives with a verdict below",
                detail=f"files={len(files)}")]
    release = os.uname().release
    for key in UNIT_DIRECTIVES:
        if key not in users:
            continue
        verdict, meaning, fix = UNIT_DIRECTIVES[key]
        names = users[key]
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        rows.append(row(f"{key}=", verdict, f"{len(names)} unit(s) ({listed}): {meaning}"
                        + (f" (Linux {release})" if key == "PrivateDevices" else ""), fix,
                        detail=" ".join(names)))
    return rows


def _ownership_rows(root: str, scan: Scan) -> list[Row]:
    from uspawn.kernel import idshift

    journal = None
    try:
        base = idshift.current_base(root, RANGE) or 0
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # The journal's own reader (xattr, or the file for filesystems without
            # trusted xattrs), so check and the shifter always agree.
            journal = idshift.pending_shift(fd, root)
        finally:
            os.close(fd)
    except (OSError, idshift.ShiftError) as exc:
        base = 0
        scan.errors.append(f"shift journal: {exc}")
    good = {base} | ({int(journal["from"]), int(journal["to"])} if journal else set())
    others = {b: v for b, v in scan.ranges.items() if b not in good}
    # Another range that holds root-owned files is a shifted copy of the tree;
    # without them, they are stray owners (unpacked without --numeric-owner ...).
    copies = {b: v for b, v in others.items() if v.root_owned}
    strays = {b: v for b, v in others.items() if b not in copies}

    def listing(ranges: dict[int, IdRange]) -> str:
        return "; ".join(f"{v.count} in {b}..{b + RANGE - 1}, e.g. {', '.join(v.examples)}"
                         for b, v in sorted(ranges.items()))

    span = f"{base}..{base + RANGE - 1}"
    rows = []
    if strays:
        n = sum(v.count for v in strays.values())
        rows.append(row("ownership", BROKEN, f"{n} files are owned by IDs outside the tree's "
                        f"range {span}: inside the container they show as nobody (65534) and "
                        "cannot be changed or deleted, even by its root (the '/var acts "
                        f"strangely' symptom). {listing(strays)}",
                        f"chown them to IDs in {span} (for a tree based at 0, the IDs the "
                        "container should see), or re-extract the tree", f"base={base}"))
    else:
        rows.append(row("ownership", OK, f"all {scan.files} files have owners in {span}: they "
                        "map into one 65536-ID range", detail=f"base={base}"))
    if copies:
        rows.append(row("half-shift", BROKEN, "files from two ID ranges, each with root-owned "
                        f"files: the tree ({span}) and {listing(copies)}. A shift was "
                        "interrupted without a journal or the tree was assembled from two "
                        "containers; the other range shows as nobody inside",
                        "shift the other range back by hand (chown each ID u to u - other base "
                        "+ tree base) or re-extract the tree", f"base={base}"))
    elif journal:
        rows.append(row("half-shift", DEGRADED, f"an unfinished uspawn shift (journal: "
                        f"{journal['from']} -> {journal['to']}): the next `uspawn run` with "
                        "ownership auto or chown finishes it before starting",
                        f"uspawn run -D {root} --private-users-ownership=chown -- true",
                        f"journal={journal['from']}->{journal['to']}"))
    else:
        rows.append(row("half-shift", OK, "one ID range, no unfinished shift journal",
                        detail=f"base={base}"))
    return rows


def _outside_links(root: str) -> tuple[Found | None, str]:
    """The hard-link scan of `uspawn run` (linux/hardlinks.py), or None and why not."""
    from uspawn.kernel import hardlinks

    try:
        return hardlinks.scan(root, EXAMPLES), ""
    except OSError as exc:
        return None, f"hard links: {_short(exc.filename or '/')}: {exc.strerror}"


def _hardlink_row(found: Found | None) -> Row:
    if found is None:
        return row("hard-links", DEGRADED, "the walk for hard links stopped early (see "
                   "the unreadable row): files linked from outside the tree may be missed",
                   "run check as root", "outside=?")
    if not found.total:
        return row("hard-links", OK, f"no file is hard-linked from outside the tree "
                   f"({found.multi} files with several names, all of them inside)",
                   detail="outside=0")
    shown = ", ".join(f"{_short(f.path)} ({f.nlink} links, {f.inside} inside)"
                      for f in found.files)
    more = f" and {found.total - len(found.files)} more" if found.total > len(found.files) else ""
    return row("hard-links", BROKEN, f"{found.total} files are hard-linked from outside the "
               f"tree ({shown}{more}): each is also a file elsewhere on the host, which an "
               "idmapped rootfs would hand to container root to read, write and chmod. "
               "`uspawn run` refuses the tree in map and auto mode; the chown shift leaves "
               "them unshifted (nobody inside). Their owners are left out of the ownership "
               "rows: they are not the tree's to change",
               "remove the extra names (copy the file instead of linking it; `find ROOTFS "
               "-xdev ! -type d -links +1` lists candidates), or use "
               "--private-users-ownership=chown", f"outside={found.total}")


def audit(root: str) -> list[Row]:
    """Every row for the tree at root (a directory)."""
    linked, why = _outside_links(root)
    scan = scan_tree(root, linked.inodes if linked else frozenset())
    if why:
        scan.errors.append(why)
    rows = _ownership_rows(root, scan)
    rows.append(_hardlink_row(linked))
    in_dev = [n for n in scan.nodes if n.startswith("/dev/")]
    outside = [n for n in scan.nodes if not n.startswith("/dev/")]
    if outside:
        rows.append(row("device-nodes", BROKEN, f"{len(outside)} device nodes outside /dev "
                        f"({', '.join(outside[:EXAMPLES])}): the rootfs is not mounted nodev, so "
                        "whoever owns them inside can open them with their host meaning (a "
                        "block node is raw disk access)", "delete them: find ROOTFS -xdev "
                        "\\( -type b -o -type c \\) -delete", f"count={len(outside)}"))
    elif in_dev:
        rows.append(row("device-nodes", DEGRADED, f"{len(in_dev)} device nodes in /dev "
                        f"({', '.join(in_dev[:EXAMPLES])}): hidden under uspawn's own /dev "
                        "tmpfs, never used", "delete them to keep the tree clean: "
                        "find ROOTFS/dev -xdev \\( -type b -o -type c \\) -delete",
                        f"count={len(in_dev)}"))
    else:
        rows.append(row("device-nodes", OK, "no device nodes in the tree (uspawn provides /dev)"))
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _is_executable(rootfd, "sbin/init"):
            rows.append(row("init", OK, "/sbin/init exists (resolved inside the tree): the tree "
                            "can be booted"))
        else:
            rows.append(row("init", DEGRADED, "no executable /sbin/init inside the tree: `uspawn "
                            "run CMD` works, booting it (systemd as PID 1) does not",
                            "install an init (systemd-sysv) or only run commands"))
        release = _open_regular(rootfd, "etc/os-release") or _open_regular(
            rootfd, "usr/lib/os-release")
        if release is not None:
            pretty = next((v.split("=", 1)[1].strip('"') for v in release[0].splitlines()
                           if v.startswith("PRETTY_NAME=")), "unnamed")
            rows.append(row("os-release", OK, f"os-release found: {pretty}"))
        else:
            rows.append(row("os-release", DEGRADED, "no /etc/os-release or /usr/lib/os-release: "
                            "systemd and systemd-nspawn expect one to boot a tree",
                            "add /usr/lib/os-release (NAME=, ID=, PRETTY_NAME=)"))
        rows += _unit_rows(rootfd)
    finally:
        os.close(rootfd)
    blocker = traverse_blocker(root)
    if scan.setuid and blocker is None:
        rows.append(row("setuid-exposure", DEGRADED, f"{len(scan.setuid)} setuid/setgid files "
                        f"(e.g. {scan.setuid[0]}) and every host user can traverse to the tree: "
                        "with an idmapped rootfs these are host-root-owned setuid binaries "
                        "that local users can run", f"chmod 0700 {os.path.dirname(root) or '/'}"
                        " (the directory holding the trees)", f"setuid={len(scan.setuid)}"))
    else:
        why = (f"the path is closed to other users ({blocker})" if blocker else
               "no setuid files")
        rows.append(row("setuid-exposure", OK, f"no setuid files reachable by host users: {why}",
                        detail=f"setuid={len(scan.setuid)}"))
    if scan.errors:
        rows.append(row("unreadable", DEGRADED, f"{len(scan.errors)} entries could not be "
                        f"audited: {'; '.join(scan.errors[:EXAMPLES])}", "run check as root; "
                        "paths longer than PATH_MAX cannot be read by path"))
    return rows


def run_check(rootfs: str, as_json: bool, out: TextIO) -> int:
    """Audit the tree at rootfs; 0 = nothing broken, 1 = problems that break
    containers. Raises UsageError (exit code 2) when rootfs is not a directory."""
    if not os.path.isdir(rootfs):
        raise UsageError(f"check: {rootfs}: not a directory", "uspawn check ROOTFS [--json]")
    root = os.path.abspath(rootfs)
    return report(audit(root), as_json, out, {"rootfs": root})
