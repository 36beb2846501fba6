"""Read-only is read-only, and nothing propagates to the host (issue 19).

The mounts a container gets from the host side (rootfs, /dev, binds, tmpfs) are
built by stage A in a mount namespace owned by the host user namespace; the
init's unshare copies them into a namespace owned by the container's user
namespace, and the kernel locks them there. Container root keeps CAP_SYS_ADMIN
in its own namespaces, so every way to undo a flag is tried: a classic remount,
mount_setattr (recursive), unmounting to reveal what is below, and a writable
clone of the read-only mount. Each must be refused and the host data unchanged.

Every detached clone is made private before anything is mounted on it: a bind
from a shared host mount, and a rootfs below one, must not carry mounts made in
the container back to the host (on a systemd host / is shared; scripts/run-tests
runs the whole suite that way too).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs
from waits import IN_DELETE, wait_until

from .conftest import REFUSED, Attacker, HostGuard, mounts_mentioning, results, snapshot_dir
from .test_host_output import LOG_DIR, _install_init, notify_bin  # noqa: F401 (fixture)

IN_MOVED_FROM = 0x40  # inotify(7): a record renamed away counts as removed

LOCK_ATTACKS = """\
t=$1
echo "remount: $(attackprobe remount-rw $t)"
echo "setattr: $(attackprobe setattr-rw $t)"
echo "umount: $(attackprobe umount $t)"
mkdir -p /tmp/copy
echo "clone: $(attackprobe clone-rw $t /tmp/copy)"
echo "write: $(attackprobe write $t/data.txt changed)"
echo "write-copy: $(attackprobe write /tmp/copy/data.txt changed)"
echo "create: $(touch $t/new 2>/dev/null && echo ok || echo EROFS)"
"""


def assert_refused(report: dict[str, str], keys: tuple[str, ...]) -> None:
    for key in keys:
        assert key in report, (key, report)
        assert report[key].split()[0] in REFUSED, (key, report[key], report)


@pytest.fixture
def writable_data(tmp_path: Path) -> Path:
    """Host data that only the mount's read-only flag protects (mode 0777/0666)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "data.txt").write_text("original\n")
    d.chmod(0o777)
    (d / "data.txt").chmod(0o666)
    return d


@pytest.mark.parametrize("opts", ["", ":idmap"])
def test_read_only_bind_stays_read_only(attack: Attacker, host: HostGuard,
                                        writable_data: Path, opts: str) -> None:
    if opts == ":idmap":
        # Idmapped, container root is host root on the files (and uspawn refuses
        # to idmap a world-writable source): only the read-only flag protects them.
        writable_data.chmod(0o755)
        (writable_data / "data.txt").chmod(0o644)
    before = snapshot_dir(writable_data)
    out = attack.script(LOCK_ATTACKS, "/ro", extra=("--bind-ro", f"{writable_data}:/ro{opts}"))
    assert_refused(results(out), ("remount", "setattr", "umount", "clone", "write",
                                  "write-copy", "create"))
    assert snapshot_dir(writable_data) == before
    host.assert_untouched()


def test_read_only_rootfs_stays_read_only(attack: Attacker, host: HostGuard,
                                          tree: Path) -> None:
    (tree / "data.txt").write_text("original\n")
    out = attack.script(LOCK_ATTACKS, "/", extra=("--read-only",))
    assert_refused(results(out), ("remount", "setattr", "umount", "clone", "write",
                                  "write-copy", "create"))
    assert (tree / "data.txt").read_text() == "original\n"
    assert not (tree / "new").exists()
    host.assert_untouched()


def test_dev_and_binds_cannot_be_unmounted(attack: Attacker, host: HostGuard,
                                           writable_data: Path) -> None:
    """Unmounting a host-side mount would reveal what is below it (MNT_LOCKED)."""
    out = attack.sh('echo "dev: $(attackprobe umount /dev)"; '
                    'echo "bind: $(attackprobe umount /rw)"',
                    extra=("--bind", f"{writable_data}:/rw"))
    assert_refused(results(out), ("dev", "bind"))
    host.assert_untouched()


@pytest.fixture
def shared_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs on the host with shared propagation, as systemd makes every mount."""
    top = tmp_path / "shared"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "uspawn-test", str(top)],
                   check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(top)], check=True)
        yield top
    finally:
        subprocess.run(["umount", "-R", "-l", str(top)], check=False)


def test_mounts_in_a_bind_from_a_shared_mount_stay_inside(
        attack: Attacker, host: HostGuard, shared_mount: Path) -> None:
    (shared_mount / "inner").mkdir()
    out = attack.sh('mount -t tmpfs inside /data/inner && echo "mounted: ok"; '
                    'mkdir -p /data/inner/x && echo "listed: $(ls /data/inner)"',
                    extra=("--bind", f"{shared_mount}:/data"))
    assert results(out).get("mounted") == "ok"  # the container may mount in its own tree
    assert mounts_mentioning(shared_mount / "inner") == [], "a container mount reached the host"
    assert (shared_mount / "inner").exists() and list((shared_mount / "inner").iterdir()) == []


def test_rootfs_below_a_shared_mount(attack: Attacker, host: HostGuard, tree: Path,
                                     shared_mount: Path) -> None:
    """pivot_root refuses a shared root (EINVAL), and API mounts made on a clone
    that stayed a peer of the host's mount would be left on the host."""
    shared_tree = shared_mount / "tree"
    subprocess.run(["cp", "-a", str(tree), str(shared_tree)], check=True)
    out = attack.sh('mount -t tmpfs x /mnt && echo "mounted: ok"; '
                    'echo "proc: $(test -e /proc/self/status && echo ok)"', tree=shared_tree)
    assert results(out) == {"mounted": "ok", "proc": "ok"}
    assert mounts_mentioning(shared_tree) == [], "container mounts left on the host"


def test_boot_with_its_state_directory_on_a_shared_mount(
        uspawn: Runner, tree: Path, host: HostGuard, shared_mount: Path,
        notify_bin: Path) -> None:  # noqa: F811 (the imported fixture)
    """/run/host is a bind of the machine's directory in the state directory: on a
    shared mount, mounts made on it (the machine's /run/host) used to land on the
    host, and the supervisor's cleanup then failed silently, leaking the state
    and the UID-range lease."""
    state = shared_mount / "state"
    state.mkdir()
    runner = Runner(state)
    name = host.machine()
    _install_init(tree, notify_bin, """
mount -o bind /etc/passwd /run/host/container-manager
/bin/notify READY=1
exec sleep 600
""")
    r = runner.run("boot", "-D", str(tree), "-M", name, "--detach", "--ready-timeout", "60",
                   timeout=90)
    try:
        assert r.returncode == 0, r.stderr
        assert mounts_mentioning(state) == [], "a mount of the machine reached the host"
    finally:
        runner.run("stop", name, "--timeout", "2", timeout=60)
        for log in LOG_DIR.glob(f"{name}.console.log*"):
            log.unlink()
    # The supervisor removes the record after `stop` returned: wait for the removal.
    containers = state / "containers"
    containers.mkdir(exist_ok=True)
    wait_until(lambda: not list(containers.glob("*")), [containers], "state left behind",
               timeout=30, mask=IN_DELETE | IN_MOVED_FROM)
    ranges = state / "ranges"
    assert not ranges.exists() or list(ranges.iterdir()) == [], "UID-range lease left behind"
    assert cgroup_dirs(name) == []
    assert mounts_mentioning(state) == []
