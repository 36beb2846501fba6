"""`uspawn check` on trees made by the tests (as root): foreign owners, half-shifted
trees, device nodes, systemd units, symlinks that point out of the tree, setuid
exposure, and the documented exit codes (0 healthy, 1 broken, 2 usage)."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from uspawn.base.errors import UsageError
from uspawn.diag.check import run_check
from uspawn.kernel import hardlinks, mounts, syscalls
from uspawn.kernel.idshift import JOURNAL_XATTR

Rows = dict[str, dict[str, str]]


@pytest.fixture(autouse=True)
def _root(need_root: None) -> None:
    pass


def check(tree: Path) -> tuple[int, Rows]:
    out = io.StringIO()
    code = run_check(str(tree), True, out)
    doc = json.loads(out.getvalue())
    assert doc["summary"]["exit_code"] == code
    return code, {r["name"]: r for r in doc["checks"]}


def make_tree(root: Path, base: int = 0) -> Path:
    """A small bootable-looking tree owned by base..base+65535."""
    for d in ("sbin", "etc", "var/lib", "home/user", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "sbin/init").write_text("#!/bin/sh\n")
    (root / "sbin/init").chmod(0o755)
    (root / "etc/os-release").write_text('NAME=t\nPRETTY_NAME="test tree"\n')
    (root / "var/lib/data").write_text("x")
    for p in [root, *root.rglob("*")]:
        os.lchown(p, base, base)
    os.lchown(root / "home/user", base + 1000, base + 1000)
    return root


def test_healthy_busybox_tree(rootfs_template: Path) -> None:
    code, rows = check(rootfs_template)
    assert code == 0
    bad = {n: r for n, r in rows.items() if r["verdict"] != "ok"}
    assert bad == {}
    assert "one 65536-ID range" in rows["ownership"]["meaning"]
    assert rows["ownership"]["detail"] == "base=0"


def test_table_output(rootfs_template: Path) -> None:
    out = io.StringIO()
    assert run_check(str(rootfs_template), False, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == f"rootfs: {rootfs_template}"
    assert lines[1].split()[:2] == ["CHECK", "VERDICT"]
    col = lines[1].index("VERDICT")
    table = lines[2:lines.index("")]
    starts = [ln for ln in table if ln[:1].strip()]  # continuation lines are indented
    assert len(starts) >= 6 and all(ln[col:col + 3] == "ok " for ln in starts)
    assert lines[-1].endswith(" 0 degraded, 0 broken")


def test_files_owned_by_uid_1000000_show_as_nobody(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    os.chown(tree / "var/lib/data", 1000000, 1000000)
    code, rows = check(tree)
    assert code == 1
    r = rows["ownership"]
    assert r["verdict"] == "broken"
    assert "nobody" in r["meaning"] and "/var/lib/data (1000000:1000000)" in r["meaning"]
    assert rows["half-shift"]["verdict"] == "ok"  # no root-owned file in that range


def test_half_shifted_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    other = 8 * 65536  # a shift to this base stopped half way, without a journal
    for p in (tree / "var", tree / "var/lib", tree / "var/lib/data"):
        os.lchown(p, other, other)
    code, rows = check(tree)
    assert code == 1
    r = rows["half-shift"]
    assert r["verdict"] == "broken"
    assert f"{other}..{other + 65535}" in r["meaning"]
    assert rows["ownership"]["verdict"] == "ok"  # not counted twice


def test_unfinished_shift_journal(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    to = 8 * 65536
    os.lchown(tree / "var/lib/data", to, to)  # the shifter got this far
    os.setxattr(tree, JOURNAL_XATTR, json.dumps({"from": 0, "to": to, "size": 65536}).encode())
    code, rows = check(tree)
    r = rows["half-shift"]
    assert r["verdict"] == "degraded"
    assert f"0 -> {to}" in r["meaning"] and "--private-users-ownership=chown" in r["fix"]
    assert rows["ownership"]["verdict"] == "ok"
    assert code == 0  # the next `uspawn run` finishes it


def test_device_nodes(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    os.mknod(tree / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    code, rows = check(tree)
    assert (code, rows["device-nodes"]["verdict"]) == (0, "degraded")  # hidden by uspawn's /dev
    os.mknod(tree / "var/lib/disk", stat.S_IFBLK | 0o600, os.makedev(8, 0))
    code, rows = check(tree)
    assert (code, rows["device-nodes"]["verdict"]) == (1, "broken")
    assert "/var/lib/disk (b 8:0)" in rows["device-nodes"]["meaning"]


def test_systemd_units(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    units = tree / "etc/systemd/system"
    (units / "web.service.d").mkdir(parents=True)
    (units / "web.service").write_text("[Service]\nExecStart=/bin/true\nPrivateDevices=yes\n"
                                       "PrivateUsers=no\n")
    (units / "web.service.d/policy.conf").write_text("[Service]\nDevicePolicy=closed\n")
    lib = tree / "usr/lib/systemd/system"
    lib.mkdir(parents=True)
    (lib / "db.service").write_text("[Service]\nPrivateDevices=true\nProtectKernelTunables=1\n")
    (tree / "lib").symlink_to("usr/lib")  # merged /usr: each directory is read once
    (units / "masked.service").symlink_to("/dev/null")
    code, rows = check(tree)
    assert code == 0
    pd = rows["PrivateDevices="]
    assert pd["verdict"] == "ok"
    assert "2 unit(s) (web.service, db.service)" in pd["meaning"]
    assert "EPERM" in pd["meaning"] and "fallback" in pd["meaning"]
    assert rows["DevicePolicy="]["verdict"] == "degraded"
    assert rows["DevicePolicy="]["detail"] == "web.service"
    assert rows["ProtectKernelTunables="]["verdict"] == "ok"
    assert "PrivateUsers=" not in rows  # =no is not a use
    assert rows["systemd-units"]["detail"] == "files=4"


def test_symlinks_resolve_inside_the_tree(tmp_path: Path) -> None:
    """Absolute symlinks that would reach host files are resolved in the tree."""
    tree = make_tree(tmp_path / "t")
    (tree / "sbin/init").unlink()
    (tree / "sbin/init").symlink_to("/bin/sh")  # the host has /bin/sh, the tree not
    (tree / "etc/os-release").unlink()
    (tree / "etc/os-release").symlink_to("/etc/os-release")
    (tree / "etc/systemd").mkdir()
    (tree / "etc/systemd/system").symlink_to("/lib/systemd/system")  # host units
    (tree / "escape").symlink_to("/")
    (tree / "loop").symlink_to("loop")
    code, rows = check(tree)
    assert rows["init"]["verdict"] == "degraded"
    assert rows["os-release"]["verdict"] == "degraded"
    assert rows["systemd-units"]["detail"] == "files=0"
    assert not any(n.endswith("=") for n in rows)
    assert rows["ownership"]["meaning"].startswith("all 15 files")  # nothing outside counted
    assert code == 0


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every host user can traverse (under /var/tmp, not pytest's 0700 tmp)."""
    d = Path(tempfile.mkdtemp(prefix="uspawn-check-", dir="/var/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def test_setuid_exposure(open_dir: Path) -> None:
    tree = make_tree(open_dir / "t")
    (tree / "sbin/su").write_text("")
    (tree / "sbin/su").chmod(0o4755)
    code, rows = check(tree)
    r = rows["setuid-exposure"]
    assert (code, r["verdict"]) == (0, "degraded")
    assert "/sbin/su" in r["meaning"] and r["fix"].startswith(f"chmod 0700 {open_dir}")
    (tree / "sbin").chmod(0o700)  # closed below the tree's root: out of reach again
    assert check(tree)[1]["setuid-exposure"]["verdict"] == "ok"
    (tree / "sbin").chmod(0o755)
    open_dir.chmod(0o700)
    code, rows = check(tree)
    assert rows["setuid-exposure"]["verdict"] == "ok"
    assert f"{open_dir} mode 0700" in rows["setuid-exposure"]["meaning"]


# --- hard links from outside the tree (issue 19) ------------------------------------


def test_hard_links_from_outside(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "t")
    os.link(tree / "var/lib/data", tree / "etc/data2")  # two names, both inside: fine
    code, rows = check(tree)
    assert (code, rows["hard-links"]["verdict"]) == (0, "ok")
    assert "1 files with several names" in rows["hard-links"]["meaning"]

    host = tmp_path / "host-shadow"
    host.write_text("secret")
    os.chown(host, 1000000, 1000000)  # a host owner: not a stray owner of the tree
    os.link(host, tree / "etc/shadow")
    code, rows = check(tree)
    r = rows["hard-links"]
    assert (code, r["verdict"], r["detail"]) == (1, "broken", "outside=1")
    assert "/etc/shadow (2 links, 1 inside)" in r["meaning"]
    assert "--private-users-ownership=chown" in r["fix"]
    # Its owner is the host's, not the tree's: no "chown it into the range" advice.
    assert rows["ownership"]["verdict"] == "ok" and rows["half-shift"]["verdict"] == "ok"

    out = io.StringIO()
    assert run_check(str(tree), False, out) == 1
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("hard-links"))
    assert line.split()[1] == "broken"


def _in_child(fn: Callable[[], None]) -> None:
    """fn in a forked child with a private mount namespace (mounts never reach pytest)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0


def test_hardlinks_scan_counts_names_inside(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a/b").mkdir(parents=True)
    host = tmp_path / "host"
    host.write_text("h")
    for name in ("z", "a/x", "a/b/y"):
        os.link(host, root / name)  # three host-file links, sorted by tree path below
    (root / "in").write_text("i")
    os.link(root / "in", root / "a/b/in2")  # both names inside
    (root / "sym").symlink_to(host)  # a symlink is not a second name
    os.mkfifo(tmp_path / "fifo")
    os.link(tmp_path / "fifo", root / "a/fifo")
    (root / "lnk").symlink_to("/etc/passwd")
    os.link(root / "lnk", tmp_path / "lnk2", follow_symlinks=False)  # the symlink itself

    # Each inode is named by the first name the walk meets (a directory's files come
    # before its subdirectories): the host file is /z.
    assert hardlinks.outside_links(str(root), 10) == ["/a/fifo", "/lnk", "/z"]
    found = hardlinks.scan(str(root), 2)
    assert [f.path for f in found.files] == ["/a/fifo", "/lnk"]
    assert (found.total, found.multi) == (3, 4)
    z = hardlinks.scan(str(root), 3).files[2]
    assert (z.path, z.nlink, z.inside) == ("/z", 4, 3)


def test_hardlinks_scan_of_a_path_skips_mounts_a_clone_sees_under_them(tmp_path: Path) -> None:
    """scan(path) does not enter mount points, so a name behind one counts as outside
    (conservative); scan_fd of a detached non-recursive clone (what `run` idmaps) has no
    submounts and sees the covered directory, so nothing is hidden from it."""
    root, other = tmp_path / "t", tmp_path / "other"
    (root / "covered").mkdir(parents=True)
    (root / "bind").mkdir()
    other.mkdir()
    (root / "f").write_text("f")
    os.link(root / "f", root / "covered/f2")
    (other / "g").write_text("g")
    os.link(other / "g", tmp_path / "g-host")  # linked outside, but not in the tree

    def scenario() -> None:
        syscalls.mount("tmpfs", str(root / "covered"), "tmpfs", 0)
        syscalls.mount(str(other), str(root / "bind"), None, syscalls.MS_BIND)
        assert hardlinks.outside_links(str(root), 5) == ["/f"]  # /covered/f2 not seen
        mnt = mounts.clone_tree(str(root), recursive=False)
        try:
            found = hardlinks.scan_fd(mnt, 5)
        finally:
            os.close(mnt)
        assert (found.total, found.multi) == (0, 1)  # f and covered/f2; bind/ is empty

    _in_child(scenario)


def test_usage_errors(tmp_path: Path) -> None:
    for bad in (tmp_path / "missing", tmp_path / "file"):
        if bad.name == "file":
            bad.write_text("")
        with pytest.raises(UsageError) as info:
            run_check(str(bad), False, io.StringIO())
        assert info.value.exit_code == 2
