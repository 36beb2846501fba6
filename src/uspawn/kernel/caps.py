"""Capability names, the default set, and applying a process's capability sets."""

from __future__ import annotations

from uspawn.kernel import syscalls as sc

# linux/capability.h order.
CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_NUMBERS = {name: i for i, name in enumerate(CAP_NAMES)}

# systemd-nspawn's default capability set (nspawn.c, arg_caps_retain): what a
# system container needs to boot systemd and run ordinary daemons. CAP_MKNOD is
# kept so mknod of FIFOs/sockets works; device mknod is refused by seccomp.
# CAP_NET_ADMIN is added when the container has its own network namespace.
DEFAULT_CAPS = (
    "CAP_AUDIT_CONTROL", "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_IPC_OWNER", "CAP_KILL",
    "CAP_LEASE", "CAP_LINUX_IMMUTABLE", "CAP_MKNOD", "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST", "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP",
    "CAP_SETUID", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_CHROOT", "CAP_SYS_NICE",
    "CAP_SYS_PTRACE", "CAP_SYS_RESOURCE", "CAP_SYS_TTY_CONFIG",
)


class CapabilityError(ValueError):
    pass


def normalize(name: str) -> str:
    """Accept `net_admin`, `NET_ADMIN` or `CAP_NET_ADMIN`; return the CAP_ form."""
    up = name.strip().upper()
    if not up.startswith("CAP_"):
        up = "CAP_" + up
    if up not in CAP_NUMBERS:
        raise CapabilityError(f"unknown capability {name!r}")
    return up


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(CAP_NAMES) - 1


def mask(names: list[str]) -> int:
    """Bit mask of the named capabilities that this kernel knows."""
    top = last_cap()
    bits = 0
    for name in names:
        n = CAP_NUMBERS[normalize(name)]
        if n <= top:
            bits |= 1 << n
    return bits


def bounding_set() -> int:
    """This process's capability bounding set (what any child can ever hold)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                return int(line.split()[1], 16)
    return (1 << (last_cap() + 1)) - 1


def drop_bounding(keep: int) -> None:
    for cap in range(last_cap() + 1):
        if not keep & (1 << cap):
            sc.prctl(sc.PR_CAPBSET_DROP, cap)


def apply_sets(effective: int, permitted: int, inheritable: int, ambient: int) -> None:
    sc.capset(effective, permitted, inheritable)
    sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_CLEAR_ALL)
    # The kernel raises an ambient capability only if it is both permitted and
    # inheritable (capabilities(7)); configs (runc's own template) list others
    # too, and runc skips those, so do we.
    ambient &= permitted & inheritable
    for cap in range(last_cap() + 1):
        if ambient & (1 << cap):
            sc.prctl(sc.PR_CAP_AMBIENT, sc.PR_CAP_AMBIENT_RAISE, cap)
