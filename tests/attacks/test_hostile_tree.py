"""Hostile trees: what the rootfs itself ships (symlinks, device nodes, FIFOs).

The tree is untrusted: it may come from a tarball unpacked by root (which keeps
device nodes and symlinks). uspawn's own mounts (/dev, /proc, /sys, /tmp, /run),
the files it reads on the host side (/etc/passwd for --user) and the working
directory are all resolved inside the tree, and the host never changes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import skip_or_fail

from .conftest import SECRET, assert_clean_error, mounts_mentioning, remove_deep, results

if TYPE_CHECKING:
    from .conftest import Attacker, HostGuard


def _host_block_device() -> tuple[int, int]:
    """The block device under the tests' own directory (the host's disk)."""
    st = os.stat(__file__)
    return os.major(st.st_dev), os.minor(st.st_dev)


# --- /dev ---------------------------------------------------------------------------


def test_dev_entries_symlinked_to_host_nodes(attack: Attacker, host: HostGuard,
                                             tree: Path) -> None:
    """The tree's /dev/* (symlinks to host nodes, a real block node) never show:
    /dev is uspawn's own tmpfs with exactly the default nodes."""
    dev = tree / "dev"
    maj, mnr = _host_block_device()
    (dev / "null").symlink_to("/dev/vda")
    (dev / "zero").symlink_to("../../../../../../../dev/vda")
    (dev / "kmsg").symlink_to("/dev/kmsg")
    (dev / "secret").symlink_to(str(host.secret))
    os.mknod(dev / "disk", stat.S_IFBLK | 0o666, os.makedev(maj, mnr))
    out = attack.sh(
        "stat -c '%n %F %t:%T' /dev/null /dev/zero; "
        "for f in kmsg secret disk vda; do test -e /dev/$f || test -L /dev/$f "
        "&& echo present: $f; done; "
        "echo blockdevs: $(find / -xdev -type b 2>/dev/null | wc -l); "
        "echo null: $(echo x > /dev/null && echo ok)")
    lines = out.splitlines()
    assert lines[:2] == ["/dev/null character special file 1:3",
                         "/dev/zero character special file 1:5"]
    assert not any(ln.startswith("present:") for ln in lines), out
    rep = results(out)
    assert rep["null"] == "ok"
    assert rep["blockdevs"] == "0"  # /dev has none; the rootfs' own node is hidden under it
    host.assert_untouched()


@pytest.mark.parametrize("target", ["/host/dev", "../../../../../../dev", "dev"])
def test_dev_is_a_symlink(attack: Attacker, host: HostGuard, tree: Path, target: str) -> None:
    """A tree whose /dev is a symlink (to /host/dev, to itself via ../..): refused
    clearly, or /dev is uspawn's tmpfs inside the tree."""
    (tree / "dev").rmdir()
    (tree / "dev").symlink_to(target)
    r = attack.run("sh", "-c", "stat -c '%F %t:%T' /dev/null")
    if r.returncode != 0:
        assert_clean_error(r, "/dev")
    else:
        assert r.stdout == "character special file 1:3\n"
    assert not (host.marker / "null").exists()
    host.assert_untouched()


@pytest.mark.parametrize("which", ["dev", "proc", "tmp", "run"])
def test_mount_destination_resolving_to_root(attack: Attacker, host: HostGuard, tree: Path,
                                             which: str) -> None:
    (tree / which).rmdir()
    (tree / which).symlink_to("/")
    before = sorted(os.listdir(tree))
    r = attack.run("true")
    assert_clean_error(r, f"/{which}")
    assert r.returncode == 125
    assert sorted(os.listdir(tree)) == before  # nothing made in the tree's root either
    host.assert_untouched()


# --- /proc, /sys, /tmp, /run ----------------------------------------------------------


@pytest.mark.parametrize("which", ["proc", "sys", "tmp", "run"])
@pytest.mark.parametrize("form", ["abs-marker", "rel-marker", "deep-marker", "rel-etc"])
def test_api_mountpoint_symlinked_outside(attack: Attacker, host: HostGuard, tree: Path,
                                          which: str, form: str) -> None:
    """/proc, /sys, /tmp or /run in the tree point outside: proc/sysfs/tmpfs land
    inside the tree (or uspawn refuses); the host's marker and mounts never change."""
    target = {"abs-marker": str(host.marker), "rel-marker": host.relative_from(tree, ""),
              "deep-marker": host.deep_relative(), "rel-etc": "../../../../../../etc"}[form]
    (tree / which).rmdir()
    (tree / which).symlink_to(target)
    r = attack.run("sh", "-c", "readlink -f /" + which + "; cat /proc/self/mountinfo")
    if r.returncode != 0:
        assert_clean_error(r, f"/{which}")
    else:
        assert form == "rel-etc"
        assert r.stdout.splitlines()[0] == "/etc"  # the tree's /etc, inside the container
    assert sorted(os.listdir(host.marker)) == ["secret.txt", "sub"]
    assert mounts_mentioning(host.marker) == []
    host.assert_untouched()


# --- /etc files ---------------------------------------------------------------------


def test_etc_hostname_and_resolv_conf_symlinked_to_host(attack: Attacker, host: HostGuard,
                                                        tree: Path) -> None:
    """uspawn writes no /etc files today; links to host files must read as the tree's
    view (dangling), and the host files stay as they were."""
    etc = tree / "etc"
    (etc / "hostname").unlink()
    (etc / "hostname").symlink_to(str(host.secret))
    (etc / "resolv.conf").symlink_to("../../../../../../../../etc/resolv.conf")
    (etc / "hosts").symlink_to(host.relative_from(tree, "etc") + "/secret.txt")
    out = attack.sh("for f in hostname resolv.conf hosts; do cat /etc/$f 2>/dev/null; done; "
                    "hostname", extra=("--hostname", "atk"))
    assert SECRET.strip() not in out
    assert out.splitlines()[-1] == "atk"
    assert os.readlink(etc / "hostname") == str(host.secret)  # the tree is left as shipped
    host.assert_untouched()


@pytest.mark.parametrize("kind", ["fifo", "chardev"])
def test_etc_passwd_not_a_regular_file(attack: Attacker, host: HostGuard, tree: Path,
                                       kind: str) -> None:
    passwd = tree / "etc" / "passwd"
    passwd.unlink()
    if kind == "fifo":
        os.mkfifo(passwd)
    else:
        os.mknod(passwd, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    try:
        r = attack.run("true", extra=("--user", "user"), timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("uspawn hung on a FIFO at the tree's /etc/passwd")
    assert_clean_error(r, "/etc/passwd")
    assert "not a regular file" in r.stderr
    host.assert_untouched()


# --- --chdir ------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["abs-marker", "rel-marker", "deep-marker", "abs-etc"])
def test_chdir_to_symlink_out_of_tree(attack: Attacker, host: HostGuard, tree: Path,
                                      form: str) -> None:
    target = {"abs-marker": str(host.marker), "rel-marker": host.relative_from(tree, ""),
              "deep-marker": host.deep_relative(), "abs-etc": "/etc"}[form]
    (tree / "work").symlink_to(target)
    r = attack.run("sh", "-c", "pwd -P; ls; touch planted; cat secret.txt 2>/dev/null; true",
                   extra=("--chdir", "/work"))
    if r.returncode != 0:
        assert_clean_error(r, "/work")
    else:
        lines = r.stdout.splitlines()
        assert lines[0] == "/etc"  # the tree's /etc, seen from inside
        assert "passwd" in lines and "secret.txt" not in lines
        assert (tree / "etc" / "planted").exists()
    assert SECRET.strip() not in r.stdout
    assert not Path("/etc/planted").exists()
    assert not (host.marker / "planted").exists()
    host.assert_untouched()


def test_chdir_through_proc_magic_link(attack: Attacker, host: HostGuard) -> None:
    """--chdir /proc/1/root/...: after pivot_root that is the container's own root."""
    r = attack.run("sh", "-c", "pwd -P; ls", extra=("--chdir", f"/proc/1/root{host.marker}"))
    if r.returncode != 0:
        assert_clean_error(r)
    assert SECRET.strip() not in r.stdout and "secret.txt" not in r.stdout
    host.assert_untouched()


# --- the rootfs path itself ---------------------------------------------------------


def test_rootfs_is_a_symlink(attack: Attacker, host: HostGuard, tree: Path,
                             tmp_path: Path) -> None:
    to_tree = tmp_path / "link-to-tree"
    to_tree.symlink_to(tree)
    assert attack.sh("ls /bin/attackprobe", tree=to_tree) == "/bin/attackprobe\n"

    to_host_root = tmp_path / "link-to-slash"
    to_host_root.symlink_to("/")
    assert_clean_error(attack.run("true", tree=to_host_root), "refusing")

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert_clean_error(attack.run("true", tree=loop), str(loop))

    # A directory that is no tree at all: no shell, refused by exec with one line.
    empty = tmp_path / "not-a-tree"
    empty.mkdir()
    to_empty = tmp_path / "link-to-not-a-tree"
    to_empty.symlink_to(empty)
    assert_clean_error(attack.run("/bin/sh", "-c", "true", tree=to_empty), "/bin/sh")
    host.assert_untouched()


def test_tree_with_thousands_of_nested_directories(attack: Attacker, host: HostGuard,
                                                   tree: Path) -> None:
    """3000 nested directories under /var (deeper than PATH_MAX can name): the chown
    shift walks them all by fd, the container starts, nothing hangs."""
    try:
        fd = os.open(tree / "var", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(3000):
                os.mkdir("d", dir_fd=fd)
                sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = sub
        finally:
            os.close(fd)
        out = attack.sh("stat -c %u /var/d/d/d; find /var/d -maxdepth 1000 | wc -l",
                        extra=("--private-users-ownership", "chown"), timeout=60)
        assert out.split() == ["0", "1001"]  # /var/d and 1000 levels below it
        base = tree.stat().st_uid
        assert base != 0
        fd = os.open(tree / "var", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(3000):
                sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = sub
                assert os.fstat(fd).st_uid == base
        finally:
            os.close(fd)
        host.assert_untouched()
    finally:
        remove_deep(tree / "var" / "d")


# --- device nodes shipped in the tree ------------------------------------------------


@pytest.fixture
def host_disk(tmp_path: Path, need_root: None) -> Iterator[tuple[Path, str]]:
    """A loop device over a file with a marker: a stand-in for the host's disk."""
    losetup = shutil.which("losetup")
    if losetup is None:
        skip_or_fail("losetup (util-linux) is needed for the block-device attacks")
    img = tmp_path / "host-disk.img"
    img.write_bytes(b"HOST-DISK-MARKER" + bytes(1 << 20))
    try:
        dev = subprocess.run([str(losetup), "-f", "--show", str(img)], capture_output=True,
                             text=True, check=True, timeout=20).stdout.strip()
    except subprocess.CalledProcessError as exc:
        skip_or_fail(f"cannot set up a loop device: {exc.stderr.strip()}")
    try:
        yield img, dev
    finally:
        subprocess.run([str(losetup), "-d", dev], timeout=20)


def _plant_node(tree: Path, dev: str, mode: int) -> None:
    st = os.stat(dev)
    node = tree / "root" / "disk"
    os.mknod(node, stat.S_IFBLK | mode, st.st_rdev)
    os.chmod(node, mode)


# Why both layers matter: the rootfs is mounted nodev, but container root owns its
# mount namespace (`mount -o remount,bind,dev /`, `umount /dev`); the BPF device
# cgroup policy (linux/devcgroup.py) is what container root cannot undo.


def test_device_node_shipped_in_tree(attack: Attacker, host: HostGuard, tree: Path,
                                     host_disk: tuple[Path, str]) -> None:
    """A block node for a host disk, planted by a tarball unpacked as root: the rootfs is
    mounted nodev, so neither container root nor a container user (mode 0666) opens it."""
    img, dev = host_disk
    before = img.read_bytes()
    _plant_node(tree, dev, 0o666)
    for user in ("root", "user"):
        out = attack.sh("head -c 16 /root/disk 2>/dev/null; echo; "
                        "printf PWNED | dd of=/root/disk bs=1 seek=100 conv=notrunc "
                        "2>/dev/null; echo write=$?", extra=("--user", user))
        assert "HOST-DISK-MARKER" not in out
        assert "write=0" not in out
    assert img.read_bytes() == before
    host.assert_untouched()


@pytest.mark.parametrize("where", ["root", "dev"])
def test_device_node_shipped_in_tree_after_remount_dev(attack: Attacker, host: HostGuard,
                                                       tree: Path, host_disk: tuple[Path, str],
                                                       where: str) -> None:
    """Container root owns its mount namespace: nodev on the rootfs alone is undone by
    `mount -o remount,bind,dev /`, and a node in the tree's own /dev comes back with
    `umount /dev`; only a device cgroup holds."""
    img, dev = host_disk
    before = img.read_bytes()
    st = os.stat(dev)
    node = tree / where / "disk"
    os.mknod(node, stat.S_IFBLK | 0o600, st.st_rdev)
    out = attack.sh(f"umount -l /dev 2>/dev/null; mount -o remount,bind,dev / 2>/dev/null; "
                    f"echo \"mounted-on-dev: $(grep -c ' /dev ' /proc/self/mountinfo)\"; "
                    f"head -c 16 /{where}/disk 2>/dev/null; echo")
    assert "HOST-DISK-MARKER" not in out
    assert img.read_bytes() == before
    host.assert_untouched()


# --- hard links to host files (issue 19) --------------------------------------------


def _host_file(tmp_path: Path) -> Path:
    """A root-only host file next to the tree (same filesystem: hard links need one)."""
    f = tmp_path / "host-shadow"
    f.write_text(SECRET)
    os.chown(f, 0, 0)
    f.chmod(0o600)
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return f


def _state(p: Path) -> tuple[int, int, int, int, str]:
    st = p.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns, p.read_text()


_LINK_PAYLOAD = ("cat /etc/shadow-link; echo appended >> /etc/shadow-link; "
                 "chmod 0666 /etc/shadow-link; chown 0:0 /etc/shadow-link; "
                 "echo owners: $(stat -c %u /etc/shadow-link /bin/pair1 /bin/pair2)")


@pytest.mark.parametrize("mode", ["map", "auto"])
def test_hard_link_to_host_file_refused_with_idmapped_rootfs(
        attack: Attacker, host: HostGuard, tree: Path, tmp_path: Path, mode: str) -> None:
    """An idmapped rootfs would hand the host file behind a hard link to container
    root (read, append, chmod as host root): the start is refused, with one line."""
    victim = _host_file(tmp_path)
    os.link(victim, tree / "etc" / "shadow-link")
    os.link(host.secret, tree / "secret-link")  # the guard's marker file too
    before = _state(victim)
    r = attack.run("sh", "-c", _LINK_PAYLOAD, extra=("--private-users-ownership", mode))
    line = assert_clean_error(r, str(tree), "/etc/shadow-link is hard-linked from outside the "
                              "tree (2 links, 1 inside), and 1 more", "ownership=chown")
    assert r.returncode == 125 and SECRET.strip() not in r.stdout + line
    assert _state(victim) == before
    host.assert_untouched()


def test_hard_link_added_after_a_clean_start_is_refused(
        attack: Attacker, host: HostGuard, tree: Path, tmp_path: Path) -> None:
    """A start keeps a clean tree's verdict (kernel/hardlinks.scan_cached) so later
    starts need not stat every file; a hard link added afterwards changes its
    directory's ctime, and the next start scans again and refuses."""
    time.sleep(2.1)  # settled: a verdict is kept only for directories older than 2 s
    r = attack.run("true", extra=("--private-users-ownership", "map"))
    assert r.returncode == 0, r.stderr
    st = tree.stat()
    assert Path(f"/var/cache/uspawn/treescan/{st.st_dev}-{st.st_ino}").is_file()
    victim = _host_file(tmp_path)
    os.link(victim, tree / "etc" / "shadow-link")
    before = _state(victim)
    r = attack.run("sh", "-c", _LINK_PAYLOAD, extra=("--private-users-ownership", "map"))
    assert_clean_error(r, str(tree), "/etc/shadow-link is hard-linked from outside the tree "
                       "(2 links, 1 inside)", "ownership=chown")
    assert r.returncode == 125 and SECRET.strip() not in r.stdout
    assert _state(victim) == before
    host.assert_untouched()


def test_hard_link_to_host_file_left_alone_by_the_chown_shift(
        attack: Attacker, host: HostGuard, tree: Path, tmp_path: Path) -> None:
    """The shift re-owns only inodes whose names are all inside the tree: the host
    file keeps its owner (nobody inside, so container root cannot read, append or
    chmod it), while a pair of hard links within the tree is shifted as usual."""
    victim = _host_file(tmp_path)
    os.link(victim, tree / "etc" / "shadow-link")
    (tree / "bin" / "pair1").write_text("pair\n")
    os.link(tree / "bin" / "pair1", tree / "bin" / "pair2")
    before = _state(victim)
    r = attack.run("sh", "-c", _LINK_PAYLOAD + "; true",
                   extra=("--private-users-ownership", "chown"))
    assert r.returncode == 0, r.stderr
    assert SECRET.strip() not in r.stdout
    assert results(r.stdout)["owners"] == "65534 0 0"  # host file: nobody; the pair: root
    warning = [ln for ln in r.stderr.splitlines() if "hard-linked" in ln]
    assert len(warning) == 1 and "/etc/shadow-link" in warning[0], r.stderr
    assert _state(victim) == before
    base = tree.stat().st_uid
    assert base != 0 and (tree / "bin" / "pair2").stat().st_uid == base
    host.assert_untouched()


def test_check_reports_hard_links_from_outside(attack: Attacker, host: HostGuard, tree: Path,
                                               tmp_path: Path) -> None:
    victim = _host_file(tmp_path)
    os.link(victim, tree / "etc" / "shadow-link")
    before = _state(victim)
    r = attack.runner.run("check", "--json", str(tree))
    assert r.returncode == 1, r.stderr
    rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert rows["hard-links"]["verdict"] == "broken"
    assert "/etc/shadow-link (2 links, 1 inside)" in rows["hard-links"]["meaning"]
    assert _state(victim) == before
    host.assert_untouched()
