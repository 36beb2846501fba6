"""Fallback paths of older kernels, forced on this one (crun's no_openat2 trick).

uspawn runs under a seccomp filter that makes mount_setattr (Linux 5.12) return
ENOSYS, as on Debian bullseye's 5.10: no idmapped mounts (auto ownership must
chown), and nodev/read-only attributes must come from classic remounts done by
the container init. tests/kernels runs the real 5.10 kernel under qemu.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Runner

WRAPPER = r"""
import errno, os, sys
from uspawn.kernel import seccomp, syscalls
names = sys.argv[1].split(",")
policy = seccomp.Policy(seccomp.ALLOW, [seccomp.Rule(names, seccomp.ERRNO(errno.ENOSYS))])
syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
syscalls.seccomp_set_mode_filter(seccomp.compile_bpf(policy))
os.execv(sys.argv[2], sys.argv[2:])
"""


def run_without(syscalls: str, runner: Runner, *args: str) -> subprocess.CompletedProcess[str]:
    argv = runner.argv(*args)
    return subprocess.run([sys.executable, "-c", WRAPPER, syscalls, *argv],
                          capture_output=True, text=True, timeout=120)


def test_no_mount_setattr_chowns_and_still_hardens(uspawn: Runner, rootfs: Path,
                                                    tmp_path: Path) -> None:
    os.mknod(rootfs / "root" / "null2", 0o20666, os.makedev(1, 3))
    shared = tmp_path / "shared"
    shared.mkdir()
    r = run_without("mount_setattr", uspawn, "run", "-D", str(rootfs), "-v", "--bind-ro",
                    f"{shared}:/mnt/ro", "--", "sh", "-c",
                    "stat -c %u /bin/busybox; probe open /root/null2; "
                    "touch /mnt/ro/x 2>/dev/null; echo ro=$?; "
                    "probe open /proc/sys/net/ipv4/ip_forward; echo x > /dev/null && echo ok")
    assert r.returncode == 0, r.stderr
    assert "falling back to chown" in r.stderr and "rootfs ownership: chown" in r.stderr
    assert r.stdout.split() == ["0", "EACCES", "ro=1", "EROFS", "ok"]
    st = (rootfs / "bin" / "busybox").stat()
    assert st.st_uid >= 0x80000  # shifted on disk: the chown path was taken
    assert not (shared / "x").exists()


def test_no_mount_setattr_map_is_a_clear_error(uspawn: Runner, rootfs: Path) -> None:
    r = run_without("mount_setattr", uspawn, "run", "-D", str(rootfs),
                    "--private-users-ownership=map", "--", "true")
    assert r.returncode == 125
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "mount_setattr" in lines[0] and "ENOSYS" in lines[0]
    assert "hint:" in lines[0]


def test_no_clone3_falls_back_to_fork(uspawn: Runner, rootfs: Path) -> None:
    r = run_without("clone3", uspawn, "run", "-D", str(rootfs), "--", "cat", "/proc/self/cgroup")
    assert r.returncode == 0, r.stderr
    assert "0::/" in r.stdout
