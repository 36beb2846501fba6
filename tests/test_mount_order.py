"""The container's mounts on the real kernel: config order in mountinfo, the
namespace-bound filesystems locked like the rest, and nested proc/sysfs mounts
still possible (docs/SECURITY.md, "Host-side mounts are locked")."""

from __future__ import annotations

from pathlib import Path

from conftest import Runner


def _sh(uspawn: Runner, rootfs: Path, script: str) -> list[str]:
    r = uspawn.run("run", "-D", str(rootfs), "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_mountinfo_lists_the_mounts_in_config_order(uspawn: Runner, rootfs: Path) -> None:
    """runtimetest's "mounts[i] found in order": /proc before /dev although
    proc is made in the container's pid namespace and /dev on the host."""
    points = [ln.split()[4] for ln in
              _sh(uspawn, rootfs, "cat /proc/self/mountinfo")]
    wanted = ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"]
    assert [p for p in points if p in wanted] == wanted, points


def test_namespace_bound_filesystems_are_locked(uspawn: Runner, rootfs: Path) -> None:
    """Container root (CAP_SYS_ADMIN in its namespaces) cannot unmount /proc,
    /dev/pts, /dev/mqueue or /sys/fs/cgroup, nor drop their nosuid/noexec."""
    out = _sh(uspawn, rootfs,
              "for m in /proc /dev/pts /dev/mqueue /sys/fs/cgroup; do "
              "  umount $m 2>/dev/null && echo \"$m unmounted\" || echo \"$m kept\"; done; "
              "mount -o remount,suid,exec /dev/pts 2>/dev/null && echo pts-suid || echo pts-kept; "
              "grep ' /dev/pts ' /proc/self/mountinfo | cut -d' ' -f6")
    assert out[:5] == ["/proc kept", "/dev/pts kept", "/dev/mqueue kept",
                       "/sys/fs/cgroup kept", "pts-kept"], out
    assert {"nosuid", "noexec"} <= set(out[5].split(",")), out


def test_nested_proc_and_sysfs_mounts_work(uspawn: Runner, rootfs: Path) -> None:
    """A new proc, and a writable sysfs of a new network namespace, can be
    mounted inside (nested containers, systemd's ProtectProc=): no locked mount
    may cover a file of the visible proc/sysfs, and sysfs's read-only flag must
    not be locked (the kernel's mount_too_revealing)."""
    out = _sh(uspawn, rootfs,
              "mkdir -p /tmp/p /tmp/s; "
              "mount -t proc proc /tmp/p && echo proc-ok; "
              "unshare -n sh -c 'mount -t sysfs sys /tmp/s && echo sysfs-rw-ok'; "
              "touch /sys/x 2>/dev/null || echo sys-still-ro")
    assert out == ["proc-ok", "sysfs-rw-ok", "sys-still-ro"], out
