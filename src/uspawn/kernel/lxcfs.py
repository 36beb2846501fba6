"""lxcfs (Debian's package): /proc and /sys files that show a container its own
limits (meminfo from its memory limit, cpuinfo/stat/online from its CPU quota
and cpuset, uptime from its init's start).

lxcfs is one FUSE daemon per host that answers each read with the view of the
reader's cgroup. uspawn finds the host's (a fuse.lxcfs mount, wherever it is:
/var/lib/lxcfs is Debian's) or starts one there, and bind-mounts its files
read-only over the container's. It never stops an lxcfs: other containers on
the host may read through it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

MOUNTPOINT = "/var/lib/lxcfs"
# The files uspawn shows through lxcfs (below its mount point -> in the container).
FILES = ("proc/meminfo", "proc/cpuinfo", "proc/stat", "proc/uptime", "proc/loadavg",
         "proc/diskstats", "proc/swaps", "sys/devices/system/cpu/online")
# --enable-cfs: CPU views follow the CFS quota (CPUQuota/--cpus), not only the
# cpuset; --enable-loadavg: a per-container loadavg. Debian's unit passes
# neither; an lxcfs uspawn starts gets both.
START_ARGS = ("--enable-cfs", "--enable-loadavg")
PIDFILE = "/run/uspawn-lxcfs.pid"


class LxcfsError(Exception):
    pass


def _lxcfs_mounts() -> list[str]:
    """Mount points of fuse.lxcfs mounts in this mount namespace, live or dead."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.readlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if fields[sep + 1] == "fuse.lxcfs" or (fields[sep + 1].startswith("fuse")
                                               and fields[sep + 2] == "lxcfs"):
            found.append(fields[4].replace("\\040", " "))
    return found


def find() -> str | None:
    """The mount point of a live lxcfs (a fuse.lxcfs mount whose files answer)."""
    for mnt in _lxcfs_mounts():
        if _answers(mnt):
            return mnt
    return None


def _clear_dead_mount(mountpoint: str) -> None:
    """An lxcfs that crashed or was killed leaves its mount behind, and every
    access to it fails with ENOTCONN (mkdir there: EEXIST). Debian's init script
    lazily unmounts it before starting lxcfs ("cleanup in case of crash"); so do
    we, and only a fuse.lxcfs mount at mountpoint that does not answer."""
    target = os.path.normpath(mountpoint)
    for _stacked in range(8):  # one dead mount may cover another
        if target not in _lxcfs_mounts() or _answers(target):
            return
        from uspawn.kernel import syscalls as sc

        try:
            sc.umount2(target, sc.MNT_DETACH)
        except OSError as exc:
            raise LxcfsError(f"umount2 {target} (a dead lxcfs mount): {exc.strerror}; "
                             f"hint: umount -l {target}") from None


def _answers(mnt: str) -> bool:
    """A daemon that died leaves its mount behind (ENOTCONN on every access)."""
    try:
        with open(os.path.join(mnt, "proc/uptime")) as f:
            f.read(64)
        return True
    except OSError:
        return False


def binary() -> str | None:
    return shutil.which("lxcfs", path="/usr/bin:/usr/sbin:/usr/local/bin:/bin:/sbin")


def start(mountpoint: str = MOUNTPOINT, timeout: float = 5.0, pidfile: str = PIDFILE) -> str:
    """Start lxcfs on mountpoint (it daemonizes once its mount is up); return it."""
    exe = binary()
    if exe is None:
        raise LxcfsError("lxcfs is not installed (Debian: apt install lxcfs)")
    target = os.path.realpath(mountpoint)  # as mountinfo names it
    _clear_dead_mount(target)
    try:
        os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    except OSError as exc:  # a dead FUSE mount of another kind, or a file there
        raise LxcfsError(f"mkdir {mountpoint}: {exc.strerror}; hint: is something else "
                         f"mounted there? (umount -l {mountpoint})") from None
    import tempfile

    # stderr to a file, not a pipe: the daemon keeps its stderr open for its life.
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([exe, *START_ARGS, "-p", pidfile, mountpoint],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True, close_fds=True)
        except OSError as exc:
            raise LxcfsError(f"start {exe}: {exc.strerror}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Its own mount point: another lxcfs may serve elsewhere.
            if target in _lxcfs_mounts() and _answers(target):
                if proc.poll() is None:
                    _reap_later(proc)
                return target
            if proc.poll() not in (None, 0):
                break  # the launcher failed (a daemonized lxcfs exits 0 first)
            time.sleep(0.05)
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    raise LxcfsError(f"{exe} {mountpoint}: no lxcfs mount appeared"
                     + (f" (exit status {proc.returncode})" if proc.returncode else "")
                     + (f": {lines[-1]}" if lines else ""))


def _reap_later(proc: subprocess.Popen[bytes]) -> None:
    """lxcfs in the foreground of our process (it did not fork): leave it running;
    it is the host's daemon now, in its own session."""
    proc.returncode = 0  # never waited for or killed by Popen's finaliser


def find_or_start(mountpoint: str = MOUNTPOINT) -> tuple[str, bool]:
    """(mount point, True if started now). On a systemd host the package's unit
    is started: an lxcfs forked by uspawn would live in the caller's cgroup
    (uspawn@NAME.service) and die with it, under every other machine's views."""
    found = find()
    if found is not None:
        return found, False
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        r = subprocess.run(["systemctl", "start", "lxcfs.service"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30, check=False)
        deadline = time.monotonic() + 5
        while r.returncode == 0 and time.monotonic() < deadline:
            found = find()
            if found is not None:
                return found, True
            time.sleep(0.05)
        err = (r.stderr.strip().splitlines() or ["no lxcfs mount appeared"])[-1]
        raise LxcfsError(f"systemctl start lxcfs.service: {err}")
    return start(mountpoint), True


def files(mountpoint: str) -> list[tuple[str, str]]:
    """(source below the lxcfs mount, destination in the container) for each file it has."""
    return [(os.path.join(mountpoint, rel), "/" + rel) for rel in FILES
            if os.path.exists(os.path.join(mountpoint, rel))]


def pid_of_started() -> int | None:
    """The pid of an lxcfs uspawn started (its pidfile), if it still runs."""
    try:
        with open(PIDFILE) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/comm") as f:
            return pid if f.read().strip() == "lxcfs" else None
    except (OSError, ValueError, IndexError):
        return None
