"""lxcfs found or started (kernel/lxcfs.py): a dead lxcfs mount is cleared.

An lxcfs killed by SIGKILL (or crashed, or one whose mount was copied into a
namespace it left) leaves a fuse.lxcfs mount that fails every access with
ENOTCONN; starting a new one on it used to fail with "File exists" for every
later `boot`. Everything here runs in a private mount namespace of a child
process, with its own mount point and pidfile: the host's lxcfs (if any) and its
mount are never touched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from uspawn.kernel import lxcfs

SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from waits import wait_exit
from uspawn.kernel import lxcfs

mnt, pidfile = sys.argv[1], sys.argv[2]

def pid():
    with open(pidfile) as f:
        return int(f.read().split()[0])

started = []
try:
    assert lxcfs.start(mnt, pidfile=pidfile) == mnt
    started.append(pid())
    os.kill(started[0], signal.SIGKILL)
    wait_exit(started, what="the first lxcfs")
    assert mnt in lxcfs._lxcfs_mounts() and not lxcfs._answers(mnt), "no dead mount"
    try:
        os.listdir(mnt)
    except OSError as exc:
        print("dead:", exc.strerror)
    assert lxcfs.start(mnt, pidfile=pidfile) == mnt
    started.append(pid())
    assert started[1] != started[0]
    with open(os.path.join(mnt, "proc/uptime")) as f:
        print("uptime:", f.read().split()[0])
    print("mounts:", lxcfs._lxcfs_mounts().count(mnt))
finally:  # never leave an lxcfs behind, whatever failed
    try:
        started.append(pid())
    except (OSError, ValueError):
        pass
    for p in set(started):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_exit(set(started), what="lxcfs")
"""


def test_start_clears_a_dead_lxcfs_mount(need_root: None, tmp_path: Path) -> None:
    if lxcfs.binary() is None:
        pytest.skip("lxcfs is not installed (apt install lxcfs)")
    mnt = tmp_path / "lxcfs"
    tests_dir = str(Path(__file__).parent)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                        sys.executable, "-c", SCRIPT, str(mnt), str(tmp_path / "lxcfs.pid"),
                        tests_dir], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "dead: Transport endpoint is not connected" in r.stdout, r.stdout
    assert "uptime:" in r.stdout and "mounts: 1" in r.stdout, r.stdout


def test_a_live_mount_is_never_cleared(need_root: None, tmp_path: Path) -> None:
    """_clear_dead_mount leaves anything but a dead fuse.lxcfs mount alone."""
    target = tmp_path / "plain"
    target.mkdir()
    lxcfs._clear_dead_mount(str(target))  # not a mount at all: nothing happens
    assert target.is_dir()
