"""Kernel-tier tests of the chown ownership mode (uspawn.kernel.idshift).

Real trees under tmp_path (ext4 here), run as root (skips go through conftest's
skip_or_fail). Mounts happen only in forked children with a private mount namespace, so
nothing leaks into pytest or the host.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail
from waits import IN_ATTRIB, tty_pending, wait_until

from uspawn.kernel import idshift, syscalls
from uspawn.kernel.idshift import (
    JOURNAL_XATTR,
    ShiftError,
    TerminalProgress,
    current_base,
    shift_tree,
)

SIZE = 65536
T = 5 * SIZE
T2 = 9 * SIZE
CAP_NET_RAW = 13
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF

pytestmark = pytest.mark.usefixtures("need_root")


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _acl_ids(raw: bytes) -> list[tuple[int, int]]:
    ents = [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw), 8)]
    return [(tag, ident) for tag, _perm, ident in ents]


def _file_acl(user: int, group: int) -> bytes:
    return _acl(
        (ACL_USER_OBJ, 6, ACL_UNDEFINED_ID),
        (ACL_USER, 6, user),
        (ACL_GROUP_OBJ, 4, ACL_UNDEFINED_ID),
        (ACL_GROUP, 4, group),
        (ACL_MASK, 6, ACL_UNDEFINED_ID),
        (ACL_OTHER, 4, ACL_UNDEFINED_ID),
    )


def _cap(path: Path) -> tuple[int, int, int | None]:
    """(magic_etc, permitted, rootid or None for v2) of a file capability."""
    raw = os.getxattr(path, "security.capability")
    magic, permitted = struct.unpack_from("<II", raw)
    return magic, permitted, struct.unpack_from("<I", raw, 20)[0] if len(raw) == 24 else None


def _set_cap_net_raw(path: Path) -> None:
    if shutil.which("setcap"):
        subprocess.run(["setcap", "cap_net_raw+ep", str(path)], check=True)
    else:  # v2: magic|effective, then permitted/inheritable for two u32 words
        raw = struct.pack("<IIIII", 0x02000001, 1 << CAP_NET_RAW, 0, 0, 0)
        os.setxattr(path, "security.capability", raw)


def _owner(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def _has_journal(root: Path) -> bool:
    try:
        os.getxattr(root, JOURNAL_XATTR)
    except OSError as e:
        assert e.errno == errno.ENODATA
        return False
    return True


def _in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child with a private mount namespace; its failure fails the test."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            fn()
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert status == 0, err


# --- the big tree: every name records its original owner, "<kind>_<uid>_<gid>_<n>" ---


def _build_tree(root: Path, dirs: int = 60, per_dir: int = 1000) -> None:
    root.mkdir()
    for j in range(dirs):
        d = root / f"d_{j}_{j + 1}_{j}"
        d.mkdir()
        os.chown(d, j, j + 1)
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for i in range(per_dir):
                uid, gid = (i * 7 + j) % SIZE, (i * 13) % 1000
                fd = os.open(f"f_{uid}_{gid}_{i}", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd)
                os.fchown(fd, uid, gid)
                os.close(fd)
        finally:
            os.close(dfd)


def _tally(root: Path, bases: tuple[int, ...]) -> dict[int | None, int]:
    """How many inodes are at each base (None: owner matches none of them)."""
    counts: dict[int | None, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            _kind, uid, gid, _n = name.split("_")
            got = _owner(Path(dirpath) / name)
            base = next((b for b in bases if got == (int(uid) + b, int(gid) + b)), None)
            counts[base] = counts.get(base, 0) + 1
    return counts


def _kill_mid_shift(root: Path, target: int, journal_exists: Callable[[], bool],
                    setup: str = "") -> int:
    """Start shift_tree in a subprocess, SIGKILL it once the walk is under way and check
    the tree is left mixed. Returns the base the tree was at."""
    src = current_base(str(root))
    assert src is not None and src != target
    code = (f"import sys, uspawn.kernel.idshift as m; {setup}"
            f"m.shift_tree(sys.argv[1], {target})")
    # The walk takes entries in listdir order: the first one is shifted first.
    first = os.listdir(root)[0]
    _kind, uid, gid, _n = first.split("_")
    shifted = (int(uid) + target, int(gid) + target)
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)])
    try:
        # chown of an entry is an IN_ATTRIB event on its directory: woken per change.
        wait_until(lambda: journal_exists() and _owner(root / first) == shifted, [root],
                   "the shift to start", proc=proc, mask=IN_ATTRIB)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # The kill must have hit the middle: journal kept, root not shifted, tree mixed.
    assert journal_exists()
    assert _owner(root) == (src, src)
    assert current_base(str(root)) == target  # where the next shift_tree will take it first
    counts = _tally(root, (src, target))
    assert counts.get(src, 0) > 0 and counts.get(target, 0) > 0 and None not in counts, counts
    return src


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """60060 inodes, built once: each test starts from whatever base the last one left."""
    root = tmp_path_factory.mktemp("idshift") / "rootfs"
    _build_tree(root)
    yield root
    shutil.rmtree(root)


def test_kill_then_resume_shifts_every_file_once(big_tree: Path) -> None:
    root = big_tree
    target = T2 if current_base(str(root)) == T else T
    src = _kill_mid_shift(root, target, lambda: _has_journal(root))

    res = shift_tree(str(root), target)

    assert res.resumed and (res.from_base, res.to_base) == (src, target)
    assert 0 < res.files_changed < 60061
    assert _tally(root, (target,)) == {target: 60060}  # no file missed, none shifted twice
    assert _owner(root) == (target, target) and not _has_journal(root)
    assert current_base(str(root)) == target


def test_kill_then_retarget_finishes_then_shifts_on(big_tree: Path) -> None:
    root = big_tree
    middle, final = (T2 if current_base(str(root)) == T else T), 3 * SIZE
    src = _kill_mid_shift(root, middle, lambda: _has_journal(root))

    res = shift_tree(str(root), final)

    assert res.resumed and (res.from_base, res.to_base) == (src, final)
    assert _tally(root, (final,)) == {final: 60060}
    assert current_base(str(root)) == final and not _has_journal(root)


def test_journal_file_fallback_without_trusted_xattrs(tmp_path: Path) -> None:
    # ramfs has no xattr support at all, so the journal must go to a file.
    mnt, jdir = tmp_path / "ramfs", tmp_path / "journal"
    mnt.mkdir()
    setup = f"m.JOURNAL_DIR = {str(jdir)!r}; "

    def scenario() -> None:
        syscalls.mount("none", str(mnt), "ramfs", 0)
        root = mnt / "rootfs"
        _build_tree(root)
        st = os.stat(root)
        jfile = jdir / f"{st.st_dev}-{st.st_ino}.json"
        idshift.JOURNAL_DIR = str(jdir)
        _kill_mid_shift(root, T, jfile.exists, setup)
        res = shift_tree(str(root), T)
        assert res.resumed
        assert _tally(root, (T,)) == {T: 60060}
        assert not jfile.exists() and current_base(str(root)) == T

    _in_child(scenario)


@pytest.fixture
def small_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A rootfs with the inode kinds that chown treats specially, and a file outside it."""
    root, outside = tmp_path / "rootfs", tmp_path / "outside"
    outside.write_text("host file")
    os.chown(outside, 1234, 1234)
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/su").write_text("setuid")
    os.chmod(root / "usr/bin/su", 0o4755)
    (root / "usr/bin/wall").write_text("setgid")
    os.chown(root / "usr/bin/wall", 0, 5)
    os.chmod(root / "usr/bin/wall", 0o2755)
    (root / "usr/bin/ping").write_text("cap")
    _set_cap_net_raw(root / "usr/bin/ping")
    (root / "srv").mkdir()
    os.chmod(root / "srv", 0o3775)  # setgid + sticky directory
    os.setxattr(root / "srv", "system.posix_acl_default", _file_acl(1000, 100))
    (root / "srv/doc").write_text("acl")
    os.chown(root / "srv/doc", 1000, 100)
    os.setxattr(root / "srv/doc", "system.posix_acl_access", _file_acl(1000, 100))
    os.symlink(outside, root / "escape")
    os.link(root / "srv/doc", root / "hardlink")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo")
    return root, outside


def test_shift_keeps_modes_acls_caps_and_stays_inside(small_tree: tuple[Path, Path]) -> None:
    root, outside = small_tree
    modes = {p: os.lstat(p).st_mode for p in root.rglob("*")}

    res = shift_tree(str(root), T)

    assert (res.from_base, res.to_base, res.resumed, res.unmapped) == (0, T, False, 0)
    assert res.files_changed == 11  # 10 inodes below root (hardlink is one) + root
    assert {p: os.lstat(p).st_mode for p in root.rglob("*")} == modes
    assert _owner(root / "usr/bin/su") == (T, T)
    assert _owner(root / "usr/bin/wall") == (T, T + 5)
    assert _owner(root / "srv/doc") == (T + 1000, T + 100)
    assert _owner(root / "escape") == (T, T)  # the link itself was lchowned...
    assert _owner(outside) == (1234, 1234)  # ...and not followed
    assert _owner(root / "null") == (T, T) and _owner(root / "fifo") == (T, T)
    for path, name in ((root / "srv/doc", "access"), (root / "srv", "default")):
        ids = _acl_ids(os.getxattr(path, f"system.posix_acl_{name}"))
        assert (ACL_USER, T + 1000) in ids and (ACL_GROUP, T + 100) in ids
        assert (ACL_USER_OBJ, ACL_UNDEFINED_ID) in ids
    # v2 became v3 owned by the container's root, so it still works inside the userns.
    assert _cap(root / "usr/bin/ping") == (0x03000001, 1 << CAP_NET_RAW, T)
    assert current_base(str(root)) == T and not _has_journal(root)


def test_shift_on_and_back_to_zero(small_tree: tuple[Path, Path]) -> None:
    root, _ = small_tree
    shift_tree(str(root), T)

    res = shift_tree(str(root), T2)
    assert (res.from_base, res.to_base, res.files_changed) == (T, T2, 11)
    assert _owner(root / "srv/doc") == (T2 + 1000, T2 + 100)
    assert _cap(root / "usr/bin/ping")[2] == T2
    assert os.stat(root / "usr/bin/su").st_mode & 0o7777 == 0o4755

    shift_tree(str(root), 0)
    assert _owner(root / "srv/doc") == (1000, 100) and current_base(str(root)) == 0
    assert _cap(root / "usr/bin/ping") == (0x02000001, 1 << CAP_NET_RAW, None)
    assert (ACL_USER, 1000) in _acl_ids(os.getxattr(root / "srv/doc", "system.posix_acl_access"))


def test_unmapped_ids_are_left_alone_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    for name, owner in (("a", (SIZE + 7, 3)), ("b", (4, 2 * SIZE)), ("c", (1, 1))):
        (root / name).touch()
        os.chown(root / name, *owner)

    res = shift_tree(str(root), T)

    assert (res.files_changed, res.unmapped) == (4, 2)  # a, b, c, root; a and b only half
    assert _owner(root / "a") == (SIZE + 7, T + 3)
    assert _owner(root / "b") == (T + 4, 2 * SIZE)
    assert _owner(root / "c") == (T + 1, T + 1)


def test_same_base_is_a_no_op_and_bad_input_fails(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "f").touch()
    res = shift_tree(str(root), 0)
    assert (res.from_base, res.to_base, res.files_changed) == (0, 0, 0)

    with pytest.raises(ShiftError, match="multiple"):
        shift_tree(str(root), T + 1)
    os.chown(root, 1000, 1000)
    assert current_base(str(root)) is None
    with pytest.raises(ShiftError, match=r"uid 1000, not a multiple.*hint"):
        shift_tree(str(root), T)
    with pytest.raises(ShiftError, match="No such file"):
        shift_tree(str(tmp_path / "missing"), T)
    assert _owner(root / "f") == (0, 0)


def test_failure_names_the_path_and_keeps_the_journal_for_a_rerun(tmp_path: Path) -> None:
    if not shutil.which("chattr"):
        skip_or_fail("chattr (e2fsprogs) not installed")
    root = tmp_path / "rootfs"
    (root / "a/b").mkdir(parents=True)
    for name in ("a/x", "a/b/locked", "a/b/y", "z"):
        (root / name).touch()
    subprocess.run(["chattr", "+i", str(root / "a/b/locked")], check=True)
    try:
        with pytest.raises(ShiftError) as exc:
            shift_tree(str(root), T)
    finally:
        subprocess.run(["chattr", "-i", str(root / "a/b/locked")], check=True)
    msg = str(exc.value)
    assert "\n" not in msg and str(root / "a/b/locked") in msg
    assert "Operation not permitted" in msg and "chattr -i" in msg and "rerun" in msg
    assert _has_journal(root) and _owner(root) == (0, 0) and current_base(str(root)) == T

    res = shift_tree(str(root), T)

    assert res.resumed and res.files_changed >= 1
    assert all(_owner(p) == (T, T) for p in [root, *root.rglob("*")])
    assert not _has_journal(root)


def test_mounts_under_root_are_not_crossed(tmp_path: Path) -> None:
    root, other = tmp_path / "rootfs", tmp_path / "host-dir"
    for d in (root / "tmpfs", root / "bind", other):
        d.mkdir(parents=True)
    (other / "host-file").touch()
    (root / "f").touch()

    def scenario() -> None:
        syscalls.mount("tmpfs", str(root / "tmpfs"), "tmpfs", 0)
        (root / "tmpfs/inner").touch()
        # Same filesystem as root, so st_dev alone would not notice this one.
        syscalls.mount(str(other), str(root / "bind"), None, syscalls.MS_BIND)
        shift_tree(str(root), T)
        assert _owner(root / "f") == (T, T)
        assert _owner(root / "tmpfs/inner") == (0, 0)
        assert _owner(root / "bind/host-file") == (0, 0)

    _in_child(scenario)
    assert _owner(other / "host-file") == (0, 0) and _owner(other) == (0, 0)
    assert _owner(root / "f") == (T, T) and current_base(str(root)) == T


def test_resume_restores_setuid_and_caps_lost_to_a_kill(small_tree: tuple[Path, Path]) -> None:
    """The state a kill between chown and restore leaves: the file is chowned (setuid and
    capability dropped by the kernel) and only the journal's pending entry remembers them."""
    root, _ = small_tree
    su, ping = root / "usr/bin/su", root / "usr/bin/ping"
    cap = os.getxattr(ping, "security.capability")
    pending = [
        {"ino": os.stat(su).st_ino, "mode": 0o4755, "cap": None},
        {"ino": os.stat(ping).st_ino, "mode": 0o644, "cap": cap.hex()},
    ]
    journal = {"from": 0, "to": T, "size": SIZE, "pending": pending}
    os.setxattr(root, JOURNAL_XATTR, json.dumps(journal).encode())
    for p in (su, ping):
        os.chown(p, T, T)
    assert os.stat(su).st_mode & 0o7777 == 0o755 and "security.capability" not in os.listxattr(ping)

    res = shift_tree(str(root), T)

    assert res.resumed
    assert os.stat(su).st_mode & 0o7777 == 0o4755
    assert _cap(ping) == (0x03000001, 1 << CAP_NET_RAW, T)
    assert not _has_journal(root)


def test_progress_reports_to_the_total_and_draws_only_on_a_tty(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    _build_tree(root, dirs=3, per_dir=10)
    calls: list[tuple[int, int]] = []
    shift_tree(str(root), T, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (34, 34) and [d for d, _ in calls[:34]] == list(range(1, 35))
    assert all(t == 34 for _, t in calls)

    quiet = io.StringIO()
    TerminalProgress(stream=quiet)(5, 10)
    assert quiet.getvalue() == ""

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = TerminalProgress(stream=tty, interval=60)
        bar(1, 4)
        bar(2, 4)  # within the interval: not drawn
        bar(4, 4)
        bar(4, 4)  # finished: nothing more
    # The slave is closed: everything written to it is for the master (a non-blocking
    # read flushes the pty's buffer work), no wait for it to arrive.
    out = tty_pending(master).decode()
    os.close(master)
    # Two draws (2/4 fell within the interval), then the newline (the tty adds a \r).
    assert out.count("/4") == 2 and "1/4" in out and out.endswith("4/4\r\n")


# --- hard links (issue 19): a tree file may be a host file under a second name ---


@pytest.fixture
def linked_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A rootfs with a file hard-linked to a host file next to it (same filesystem), a
    setuid file with two names inside the tree, and a FIFO linked from outside."""
    root, host = tmp_path / "rootfs", tmp_path / "host-file"
    host.write_text("host secret\n")
    os.chown(host, 0, 0)
    os.chmod(host, 0o600)
    os.utime(host, ns=(10**18, 10**18))
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    os.link(host, root / "etc/shadow")
    (root / "bin/su").write_text("setuid")
    os.chmod(root / "bin/su", 0o4755)
    os.link(root / "bin/su", root / "bin/su2")
    os.link(root / "bin/su", root / "su3")  # three names, all inside
    os.mkfifo(root / "fifo")
    os.link(root / "fifo", tmp_path / "host-fifo")
    return root, host


def _host_state(p: Path) -> tuple[int, int, int, int, bytes]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns, p.read_bytes()


def test_files_linked_from_outside_are_left_alone(linked_tree: tuple[Path, Path]) -> None:
    root, host = linked_tree
    before = _host_state(host)
    fifo_owner = _owner(root / "fifo")

    res = shift_tree(str(root), T)

    assert _host_state(host) == before  # owner, mode, mtime, content
    assert _owner(root / "fifo") == fifo_owner
    assert res.outside_links == ["/etc/shadow", "/fifo"]
    assert res.unmapped == 2  # both stay in 0..65535: nobody inside
    # Hard links with every name inside the tree are shifted, once, setuid kept.
    assert _owner(root / "bin/su") == (T, T) and os.stat(root / "su3").st_nlink == 3
    assert os.stat(root / "bin/su").st_mode & 0o7777 == 0o4755
    # root, etc, bin, su (three names): the two linked from outside are not counted
    assert res.files_changed == 4
    assert current_base(str(root)) == T and not _has_journal(root)
    assert "outside_links=['/etc/shadow', '/fifo']" in repr(res)

    # Back to 0: the host file is in neither range now and is still left alone.
    res = shift_tree(str(root), 0)
    assert _host_state(host) == before and res.outside_links == ["/etc/shadow", "/fifo"]
    assert _owner(root / "bin/su") == (0, 0)


def test_a_link_made_during_the_walk_is_seen_before_the_chown(
        linked_tree: tuple[Path, Path], tmp_path: Path) -> None:
    """The walk counts three names of /bin/su; a fourth made outside the tree after the
    walk met them (here from the progress callback) must stop the chown."""
    root, _ = linked_tree
    late = tmp_path / "late-link"

    def progress(done: int, total: int) -> None:
        if done == total - 1 and not late.exists():  # every entry walked, root still to do
            os.link(root / "bin/su", late)

    res = shift_tree(str(root), T, progress=progress)

    assert late.exists()
    # Named by whichever of its three names the walk met first.
    assert len({"/bin/su", "/bin/su2", "/su3"} & set(res.outside_links)) == 1
    assert _owner(late) == (0, 0)
    assert os.stat(late).st_mode & 0o7777 == 0o4755
    assert current_base(str(root)) == T


def test_resume_shifts_deferred_links_and_restores_their_setuid(
        linked_tree: tuple[Path, Path]) -> None:
    """A kill between the chown of a linked setuid file and its restore: the resumed
    shift (which defers it to after the walk) still puts setuid back."""
    root, host = linked_tree
    before = _host_state(host)
    su = root / "bin/su"
    journal = {"from": 0, "to": T, "size": SIZE,
               "pending": [{"ino": os.stat(su).st_ino, "mode": 0o4755, "cap": None}]}
    os.setxattr(root, JOURNAL_XATTR, json.dumps(journal).encode())
    os.chown(su, T, T)
    assert os.stat(su).st_mode & 0o7777 == 0o755

    res = shift_tree(str(root), T)

    assert res.resumed and res.outside_links == ["/etc/shadow", "/fifo"]
    assert os.stat(su).st_mode & 0o7777 == 0o4755 and _owner(su) == (T, T)
    assert _host_state(host) == before and not _has_journal(root)


def test_linked_files_deeper_than_path_max_are_shifted(tmp_path: Path) -> None:
    """A deferred file is reached again by name one directory at a time, so a path
    longer than PATH_MAX still works."""
    root = tmp_path / "rootfs"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(400):  # 400 * 16 bytes > PATH_MAX (4096)
            os.mkdir("d" * 15, dir_fd=fd)
            sub = os.open("d" * 15, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("a", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        os.link("a", "b", src_dir_fd=fd, dst_dir_fd=fd)
        res = shift_tree(str(root), T)
        assert res.outside_links == []
        assert os.stat("a", dir_fd=fd, follow_symlinks=False).st_uid == T
    finally:
        os.close(fd)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_a_name_under_a_mount_point_counts_as_outside(tmp_path: Path) -> None:
    """The walk does not enter mount points, so a second name behind one is not seen:
    the file is left alone, never shifted through the mount."""
    root, other = tmp_path / "rootfs", tmp_path / "host-dir"
    (root / "mnt").mkdir(parents=True)
    other.mkdir()
    (root / "f").write_text("x")
    os.link(root / "f", other / "g")

    def scenario() -> None:
        syscalls.mount(str(other), str(root / "mnt"), None, syscalls.MS_BIND)
        res = shift_tree(str(root), T)
        assert res.outside_links == ["/f"]
        assert _owner(root / "f") == (0, 0)

    _in_child(scenario)
    assert _owner(other / "g") == (0, 0)
