"""Seccomp policy for containers: model, default policy, compiler, cache, installer.

A Policy is plain data (default action, rules, architectures, flags). It comes from
`default_policy()` (system containers: systemd as PID 1) or from an OCI
`linux.seccomp` object (`policy_from_oci()`). `compile_bpf()` turns it into a raw
classic-BPF program with libseccomp; `policy_bpf()` caches that program on disk so a
container start reads a file instead of compiling; `install()` loads it.

Constraints: this module is on the container start path and is imported before
pivot_root. It imports only the stdlib and uspawn.kernel.syscalls; pyseccomp (~15 ms of
imports) is imported inside compile_bpf(), which runs only on a cache miss. No
dataclasses or typing at runtime. Apply the filter last before execve, so it never has
to allow setup syscalls (STYLE.md, setup sequence). But resolve the program on the host
side: policy_bpf() reads the cache by path and may import pyseccomp, so after pivot_root
it would read the container's /var/cache (where container root owns the files) and miss
the host's stdlib. Call policy_bpf() before pivot_root and load the bytes later with
syscalls.seccomp_set_mode_filter(); install() is for callers still in the host's tree.
"""

from __future__ import annotations

import errno
import os
import sys

from uspawn.base import cachefile
from uspawn.kernel import syscalls

CACHE_DIR = "/var/cache/uspawn/seccomp"
# Bump when compile_bpf() can produce a different program for the same policy.
_COMPILER_VERSION = 1
_BPF_MAXINSNS = 4096  # linux/bpf_common.h: the kernel refuses longer programs
_NR_SCMP_ERROR = -1  # what libseccomp resolves a name to when no arch knows it


class SeccompPolicyError(ValueError):
    """A policy that cannot be compiled; the message names the field."""


# --- model ---

_ACTION_KINDS = ("ALLOW", "ERRNO", "KILL_PROCESS", "KILL_THREAD", "TRAP", "TRACE", "LOG")
_ARG_OPS = ("NE", "LT", "LE", "EQ", "GE", "GT", "MASKED_EQ")
# libseccomp's SCMP_ARCH_* names, lower case (the runtime-spec list as of libseccomp 2.5)
ARCHITECTURES = tuple(
    "x86 x86_64 x32 arm aarch64 mips mips64 mips64n32 mipsel mipsel64 mipsel64n32 ppc ppc64 "
    "ppc64le s390 s390x parisc parisc64 riscv64".split()
)
# OCI flags are recorded; prctl(PR_SET_SECCOMP) cannot pass them (see install()).
FLAGS = tuple(
    f"SECCOMP_FILTER_FLAG_{f}" for f in ("TSYNC", "LOG", "SPEC_ALLOW", "WAIT_KILLABLE_RECV")
)


class Action:
    """What the filter returns: ALLOW, ERRNO(n), KILL_PROCESS, KILL_THREAD, TRAP, TRACE(n), LOG."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: int = 0) -> None:
        if kind not in _ACTION_KINDS:
            raise SeccompPolicyError(f'unknown seccomp action "{kind}"')
        if kind in ("ERRNO", "TRACE"):
            if not 0 <= value <= 0xFFFF:  # SECCOMP_RET_DATA is 16 bits
                raise SeccompPolicyError(f"{kind} value {value} is out of range 0..65535")
        elif value:
            raise SeccompPolicyError(f"{kind} takes no errno/value (got {value})")
        self.kind = kind
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Action) and (self.kind, self.value) == (other.kind, other.value)

    def __repr__(self) -> str:
        return f"{self.kind}({self.value})" if self.kind in ("ERRNO", "TRACE") else self.kind


ALLOW = Action("ALLOW")
KILL_PROCESS = Action("KILL_PROCESS")
KILL_THREAD = Action("KILL_THREAD")
TRAP = Action("TRAP")
LOG = Action("LOG")


def ERRNO(err: int) -> Action:
    return Action("ERRNO", err)


class Arg:
    """A condition on syscall argument `index`: `arg OP value`; MASKED_EQ is
    `(arg & value) == value2` (libseccomp's datum_a is the mask, datum_b the value)."""

    __slots__ = ("index", "op", "value", "value2")

    def __init__(self, index: int, op: str, value: int, value2: int = 0) -> None:
        if not 0 <= index <= 5:
            raise SeccompPolicyError(f"argument index {index} is out of range 0..5")
        if op not in _ARG_OPS:
            raise SeccompPolicyError(f'unknown comparison "{op}"')
        for v in (value, value2):
            if not 0 <= v < 1 << 64:
                raise SeccompPolicyError(f"argument value {v} is not a uint64")
        self.index, self.op, self.value, self.value2 = index, op, value, value2

    def to_json(self) -> list[int | str]:
        return [self.index, self.op, self.value, self.value2]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Arg) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Arg({self.index}, {self.op}, {self.value:#x}, {self.value2:#x})"


class Rule:
    """`action` for each syscall in `names` when all `args` conditions hold."""

    __slots__ = ("action", "args", "names")

    def __init__(
        self, names: tuple[str, ...] | list[str], action: Action, args: tuple[Arg, ...] = ()
    ) -> None:
        if not names or not all(names):
            raise SeccompPolicyError("a seccomp rule needs at least one non-empty syscall name")
        self.names = tuple(names)
        self.action = action
        self.args = tuple(args)

    def to_json(self) -> list[object]:
        return [list(self.names), repr(self.action), [a.to_json() for a in self.args]]


class Policy:
    __slots__ = ("architectures", "default_action", "flags", "rules")

    def __init__(
        self,
        default_action: Action,
        rules: list[Rule] | tuple[Rule, ...] = (),
        architectures: tuple[str, ...] | list[str] = (),
        flags: tuple[str, ...] | list[str] = (),
    ) -> None:
        for arch in architectures:
            if arch not in ARCHITECTURES:
                raise SeccompPolicyError(f'unknown seccomp architecture "{arch}"')
        self.default_action = default_action
        self.rules = list(rules)
        self.architectures = tuple(architectures)
        self.flags = tuple(flags)

    def to_json(self) -> dict[str, object]:
        """Canonical form: the cache key is a digest of it."""
        return {
            "defaultAction": repr(self.default_action),
            "architectures": list(self.architectures),
            "flags": list(self.flags),
            "rules": [r.to_json() for r in self.rules],
        }

    def rules_for(self, name: str) -> list[Rule]:
        return [r for r in self.rules if name in r.names]


# --- the default policy for system containers ---

# Ordinary syscalls: the allow list of the moby/podman default profiles (moby
# profiles/seccomp/default.json), minus io_uring_* (left to the default action, as moby
# did in PR 46762: its rings run operations seccomp never sees, and 60% of the kernel
# exploits sent to Google's kCTF VRP in 2022 went through it), plus newer syscalls. Names one
# architecture lacks are skipped there by libseccomp; names this libseccomp does not
# know at all are skipped by compile_bpf() and get the default ENOSYS, which is what the
# caller would see on an older kernel.
_ALLOW = (
    "accept accept4 access alarm arch_prctl bind brk cachestat capget capset chdir chmod chown "
    "chown32 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep "
    "clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 "
    "epoll_create epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait "
    "epoll_wait_old eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 "
    "fadvise64 fadvise64_64 fallocate fanotify_mark fchdir fchmod fchmodat fchmodat2 fchown "
    "fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr file_getattr file_setattr flistxattr "
    "flock fork fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync "
    "ftruncate ftruncate64 futex futex_requeue futex_time64 futex_wait futex_waitv futex_wake "
    "futimesat get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid "
    "getegid32 geteuid geteuid32 getgid getgid32 getgroups getgroups32 getitimer getpeername "
    "getpgid getpgrp getpid getppid getpriority getrandom getresgid getresgid32 getresuid "
    "getresuid32 getrlimit getrusage getsid getsockname getsockopt gettid gettimeofday getuid "
    "getuid32 getxattr getxattrat inotify_add_watch inotify_init inotify_init1 "
    "inotify_rm_watch io_cancel io_destroy io_getevents io_pgetevents io_pgetevents_time64 "
    "io_setup io_submit ioprio_get ioprio_set ipc kill landlock_add_rule "
    "landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat "
    "listen listxattr listxattrat llistxattr _llseek lremovexattr lseek lsetxattr "
    "lsm_get_self_attr lsm_list_modules lsm_set_self_attr lstat lstat64 madvise "
    "map_shadow_stack membarrier memfd_create memfd_secret mincore mkdir mkdirat mlock mlock2 "
    "mlockall mmap mmap2 modify_ldt mprotect mq_getsetattr mq_notify mq_open mq_timedreceive "
    "mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap mseal msgctl "
    "msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep "
    "newfstatat _newselect nice open openat openat2 pause pidfd_open pidfd_send_signal pipe "
    "pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll ppoll_time64 prctl pread64 preadv "
    "preadv2 prlimit64 process_mrelease pselect6 pselect6_time64 pwrite64 pwritev pwritev2 "
    "read readahead readlink readlinkat readv recv recvfrom recvmmsg recvmmsg_time64 recvmsg "
    "remap_file_pages removexattr removexattrat rename renameat renameat2 restart_syscall "
    "rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn "
    "rt_sigsuspend rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo "
    "sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr "
    "sched_getparam sched_getscheduler sched_rr_get_interval sched_rr_get_interval_time64 "
    "sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp "
    "select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64 "
    "sendmmsg sendmsg sendto set_robust_list set_thread_area set_tid_address setfsgid "
    "setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32 setitimer setpgid "
    "setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid "
    "setreuid32 setrlimit setsid setsockopt setuid setuid32 setxattr setxattrat shmat shmctl "
    "shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn socket "
    "socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync "
    "sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete "
    "timer_getoverrun timer_gettime timer_gettime64 timer_settime timer_settime64 "
    "timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime timerfd_settime64 times "
    "tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat "
    "utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev "
    # arm, ppc, riscv specifics (moby's per-arch entries)
    "arm_fadvise64_64 arm_sync_file_range breakpoint cacheflush set_tls sync_file_range2 "
    "riscv_flush_icache"
    # ioctl is allowed by _tty_ioctl_rules(), all requests but two
).split()

# What a system container needs beyond an application container: systemd as PID 1
# mounts, sandboxes its units in namespaces (PrivateTmp=, ProtectSystem=, PrivateUsers=),
# sets the hostname and calls reboot() at poweroff, which in a child PID namespace only
# ends that namespace's init (reboot(2), "Behavior inside PID namespaces"). This follows
# systemd-nspawn's allow list (src/nspawn/nspawn-seccomp.c). The kernel still checks each
# against the capabilities of the container's own user namespace. clone3 is allowed:
# glibc >= 2.34 starts every thread with it, and its namespace flags sit in a struct
# seccomp cannot read, so unlike clone they could not be filtered anyway; capabilities
# restrict them instead. The precondition is a private PID namespace: without one,
# CAP_SYS_BOOT would reboot the host, so the caller must drop it.
_ALLOW_SYSTEM = (
    "chroot clone clone3 fsconfig fsmount fsopen fspick get_mempolicy kcmp mbind "
    "migrate_pages mount mount_setattr move_mount move_pages open_tree open_tree_attr "
    "pidfd_getfd pivot_root process_madvise process_vm_readv process_vm_writev ptrace reboot "
    "set_mempolicy set_mempolicy_home_node setdomainname sethostname setns umount umount2 "
    "unshare vhangup"
).split()

# Refused with EPERM, the errno of a missing capability, which callers already handle
# (systemd logs and carries on). Each touches state no namespace isolates.
_DENY = (
    # kernel code and memory: modules, kexec, port I/O, vm86 (moby, nspawn)
    "create_module delete_module finit_module get_kernel_syms init_module kexec_file_load "
    "kexec_load query_module ioperm iopl vm86 vm86old uselib "
    # "shocker" (2014): open_by_handle_at opens any inode of a host filesystem by handle;
    # name_to_handle_at stays allowed (systemd uses it for mount ids) and is harmless alone
    "open_by_handle_at "
    # global kernel facilities: keyrings are not namespaced (nspawn-seccomp.c), bpffs and
    # BPF programs are not either, perf and userfaultfd are favourite exploit aids
    # (vm.unprivileged_userfaultfd, kernel.perf_event_paranoid exist for that reason)
    "add_key keyctl request_key bpf perf_event_open userfaultfd "
    # fanotify_init: nspawn excludes it; with CAP_SYS_ADMIN it can place permission marks
    # on a whole superblock shared with the host (FAN_MARK_FILESYSTEM) and stall host I/O.
    # fanotify_mark stays allowed; it is useless without a group from fanotify_init.
    "fanotify_init "
    # host-wide state: swap, process accounting, quotas, kernel log, obsolete sysctl/nfsd
    "acct bdflush lookup_dcookie nfsservctl quotactl quotactl_fd swapoff swapon syslog "
    "_sysctl "
    # clocks: a time namespace offsets only CLOCK_MONOTONIC/BOOTTIME (time_namespaces(7)),
    # so setting CLOCK_REALTIME would set the host's clock. nspawn also drops @clock
    # unless CAP_SYS_TIME is kept; systemd reads "not synchronized" on a failed adjtimex.
    "adjtimex clock_adjtime clock_adjtime64 clock_settime clock_settime64 settimeofday stime"
).split()

# personality(2): only the values docker allows; READ_IMPLIES_EXEC and ADDR_NO_RANDOMIZE
# weaken the container's own hardening. Other values get the default action: libseccomp
# drops conditional rules when the same syscall has an unconditional one, and refuses two
# comparisons on one argument (EINVAL, checked with 2.5.4), so "EPERM for all others"
# cannot be written next to the allowed values.
_PERSONALITY_OK = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # LINUX, LINUX32, UNAME26, query

# Compat ABIs added next to the native one. i386 binaries still exist in some trees
# (wine, old vendor tools); without the x86 table they would be killed. x32 is left out:
# distribution kernels build it disabled (syscall.x32=) or not at all, so an x32 syscall
# takes the bad-arch action (see compile_bpf).
_ARCHES_FOR_MACHINE = {
    "x86_64": ("x86_64", "x86"), "aarch64": ("aarch64", "arm"), "s390x": ("s390x", "s390"),
    "ppc64le": ("ppc64le",), "riscv64": ("riscv64",),
}  # fmt: skip

# mknod(2)/mknodat(2) mode argument: the file type nibble (sys/stat.h).
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000


def _mknod_rules() -> list[Rule]:
    """Refuse character and block devices, pass every other file type to the kernel.

    systemd v240 NEWS asks managers that use user namespaces to do this. Linux 4.18 let
    userns root mknod devices it could not open (55956b59df33, reverted in 94f82008ce30),
    which broke every "try mknod, fall back on EPERM" path (PrivateDevices=, nspawn, LXC);
    with this filter the fallback is taken on every kernel. Only conditional rules, one
    per value of the S_IFMT nibble, so the 16 cases cover every mode: libseccomp would
    drop these conditions if an unconditional rule for the same syscall existed. The mask
    also catches garbage in the high bits, which the kernel truncates away (umode_t).
    """
    rules = []
    for name, index in (("mknod", 1), ("mknodat", 2)):
        for fmt in range(0, S_IFMT + 1, 0o010000):
            action = ERRNO(errno.EPERM) if fmt in (S_IFCHR, S_IFBLK) else ALLOW
            rules.append(Rule((name,), action, (Arg(index, "MASKED_EQ", S_IFMT, fmt),)))
    return rules


# ioctl(2) requests that inject input into a terminal: TIOCSTI pushes bytes into the
# tty's input queue as if typed, so a payload holding a host tty (or taking one with
# TIOCSCTTY) runs commands in the admin's shell (CVE-2016-7545 SELinux sandbox,
# CVE-2017-5226 bubblewrap); TIOCLINUX TIOCL_SETSEL + TIOCL_PASTESEL does the same on a
# virtual console through the selection buffer (CVE-2023-28100, flatpak). Both are
# refused, as flatpak's filter does. The values are the asm-generic ones; powerpc
# encodes TIOCSTI with the _IOW() direction and size bits.
_TTY_INJECT = {"ppc64le": (0x80017472, 0x541C)}
_TTY_INJECT_GENERIC = (0x5412, 0x541C)  # TIOCSTI, TIOCLINUX
_U32 = 0xFFFFFFFF


def tty_inject_requests() -> tuple[int, ...]:
    """TIOCSTI and TIOCLINUX on this machine."""
    return _TTY_INJECT.get(_machine(), _TTY_INJECT_GENERIC)


def complement_masks(excluded: tuple[int, ...], bits: int = 32) -> list[tuple[int, int]]:
    """(mask, value) pairs, one MASKED_EQ each, that together match exactly the
    `bits`-wide numbers not in `excluded`, each number by one pair only.

    A walk down the binary trie of the excluded values, from the top bit: wherever a
    branch holds none of them, one pair (the bits so far as the mask) covers it all.
    At most `bits` pairs per excluded value.
    """
    out: list[tuple[int, int]] = []

    def walk(mask: int, value: int, bit: int, here: list[int]) -> None:
        if bit < 0:
            return  # `value` itself is excluded
        b = 1 << bit
        for side in (0, b):
            below = [v for v in here if v & b == side]
            if below:
                walk(mask | b, value | side, bit - 1, below)
            else:
                out.append((mask | b, value | side))

    walk(0, 0, bits - 1, sorted(set(excluded)))
    return out


def _tty_ioctl_rules(action: Action = ALLOW) -> list[Rule]:
    """ioctl: EPERM for TIOCSTI and TIOCLINUX, `action` for every other request.

    The kernel truncates the request to unsigned int (ksys_ioctl), so only the low 32
    bits are compared: a payload setting bits 32-63 of TIOCSTI must not slip past an
    exact compare. libseccomp drops conditional rules of a syscall that also has an
    unconditional one, so "allow the rest" is spelled out as conditional rules too:
    disjoint MASKED_EQ tests whose union is every other low-32-bit value (34 rules).
    """
    refused = tty_inject_requests()
    rules = [Rule(("ioctl",), ERRNO(errno.EPERM), (Arg(1, "MASKED_EQ", _U32, r),))
             for r in refused]
    if action != ERRNO(errno.EPERM):
        rules += [Rule(("ioctl",), action, (Arg(1, "MASKED_EQ", m, v),))
                  for m, v in complement_masks(refused)]
    return rules


def with_tty_ioctl_filter(policy: Policy) -> Policy:
    """The same policy with ioctl TIOCSTI/TIOCLINUX refused (for OCI profiles).

    An unconditional ioctl rule becomes _tty_ioctl_rules() with its action; a profile
    that does not mention ioctl gets the two EPERM rules when its default lets ioctl
    through (ALLOW, LOG). Conditional ioctl rules of the profile are left as they are:
    adding rules that overlap them would make libseccomp pick one by its own order.
    """
    plain = [r for r in policy.rules if "ioctl" in r.names and not r.args]
    mentioned = any("ioctl" in r.names for r in policy.rules)
    if plain:
        action = plain[-1].action
    elif not mentioned and policy.default_action in (ALLOW, LOG):
        action = ERRNO(errno.EPERM)  # only the two refusals; the default does the rest
    else:
        return policy
    rules = []
    for r in policy.rules:
        keep = tuple(n for n in r.names if n != "ioctl") if not r.args else r.names
        if keep:
            rules.append(Rule(keep, r.action, r.args))
    return Policy(policy.default_action, rules + _tty_ioctl_rules(action),
                  policy.architectures, policy.flags)


def with_mknod_filter(policy: Policy) -> Policy:
    """The same policy with the userns mknod device filter (for OCI profiles).

    Where the profile lets mknod/mknodat through (an unconditional ALLOW rule, or
    an ALLOW default), those are replaced by the filter; a profile that already
    refuses them is left as it is.
    """
    names = ("mknod", "mknodat")
    allowed = any(r.action == ALLOW and not r.args and set(names) & set(r.names)
                  for r in policy.rules)
    mentioned = any(set(names) & set(r.names) for r in policy.rules)
    if not allowed and (mentioned or policy.default_action != ALLOW):
        return policy
    rules = []
    for r in policy.rules:
        keep = tuple(n for n in r.names if n not in names)
        if keep:
            rules.append(Rule(keep, r.action, r.args))
    return Policy(policy.default_action, rules + _mknod_rules(), policy.architectures,
                  policy.flags)


def default_policy(userns: bool) -> Policy:
    """The policy for system containers; `userns` adds the mknod device filter.

    Unknown syscalls return ENOSYS, never EPERM: glibc and others fall back to older
    syscalls only on ENOSYS (clone3 -> clone, moby issue 42680).
    """
    rules = [Rule(_ALLOW + _ALLOW_SYSTEM, ALLOW), Rule(_DENY, ERRNO(errno.EPERM))]
    rules += [Rule(("personality",), ALLOW, (Arg(0, "EQ", v),)) for v in _PERSONALITY_OK]
    rules += _tty_ioctl_rules()
    if userns:
        rules += _mknod_rules()
    else:
        rules.append(Rule(("mknod", "mknodat"), ALLOW))
    arches = _ARCHES_FOR_MACHINE.get(_machine(), ())
    return Policy(ERRNO(errno.ENOSYS), rules, arches)


# --- compiling ---


def _arg_groups(args: tuple[Arg, ...]) -> list[tuple[Arg, ...]]:
    """libseccomp refuses two conditions on one argument; like runc
    (libcontainer/seccomp/seccomp_linux.go, matchCall), make each its own rule."""
    if len({a.index for a in args}) == len(args):
        return [args]
    return [(a,) for a in args]


def compile_bpf(policy: Policy) -> bytes:
    """Compile `policy` with libseccomp into a raw sock_filter array."""
    import pyseccomp as scmp  # lazily: ~15 ms of imports, paid only on a cache miss

    def scmp_action(action: Action) -> int:
        if action.kind in ("ERRNO", "TRACE"):
            return int(getattr(scmp, action.kind)(action.value))
        return int(getattr(scmp, action.kind))

    flt = scmp.SyscallFilter(scmp_action(policy.default_action))
    # A syscall from an ABI the policy does not list (x32 shares AUDIT_ARCH_X86_64 with
    # x86-64, seccomp(2) NOTES) must not run unchecked: kill the process.
    flt.set_attr(scmp.Attr.ACT_BADARCH, scmp.KILL_PROCESS)
    if sum(len(r.names) for r in policy.rules) > 32:
        # Binary search over syscall numbers instead of a chain of ~400 compares. Only
        # with rules: libseccomp <= 2.5.4 misbehaves on an empty tree (runc does the same).
        flt.set_attr(scmp.Attr.CTL_OPTIMIZE, 2)
    for arch in policy.architectures:
        token = getattr(scmp.Arch, arch.upper())
        if not flt.exist_arch(token):
            flt.add_arch(token)
    for rule in policy.rules:
        if rule.action == policy.default_action:
            continue  # changes nothing, and libseccomp refuses it (EACCES)
        action = scmp_action(rule.action)
        for name in rule.names:
            if scmp.resolve_syscall(scmp.Arch.NATIVE, name) == _NR_SCMP_ERROR:
                continue  # newer than this libseccomp (or a typo): default action
            for conds in _arg_groups(rule.args):
                cmps = [scmp.Arg(a.index, getattr(scmp, a.op), a.value, a.value2) for a in conds]
                try:
                    flt.add_rule(action, name, *cmps)
                except OSError as e:
                    raise SeccompPolicyError(
                        f"seccomp rule {rule.action!r} for {name}{list(conds)}: "
                        f"libseccomp refused it: {e.strerror}"
                    ) from e
    with open(os.memfd_create("uspawn-seccomp", os.MFD_CLOEXEC), "w+b") as f:
        flt.export_bpf(f)  # writes to the fd itself, past Python's buffer
        f.seek(0)
        bpf = f.read()
    if not _valid_program(bpf):
        raise SeccompPolicyError(
            f"the compiled seccomp program has {len(bpf) // 8} instructions; "
            f"the kernel accepts 1..{_BPF_MAXINSNS} ending in a return"
        )
    return bpf


def _valid_program(bpf: bytes) -> bool:
    # Non-empty, whole instructions, within BPF_MAXINSNS, last one a BPF_RET (class 0x06).
    return 0 < len(bpf) <= 8 * _BPF_MAXINSNS and len(bpf) % 8 == 0 and bpf[-8] & 0x07 == 0x06


def _machine() -> str:
    return os.uname().machine  # not platform.machine(): `platform` costs ~1.3 ms


# --- the cache ---


def _libseccomp_id() -> str:
    """File name (with version), size and mtime of the libseccomp.so.2 that compile_bpf
    would load, found without loading it (loading costs what the cache saves)."""
    triplet = getattr(sys.implementation, "_multiarch", "") or f"{os.uname().machine}-linux-gnu"
    for d in (f"/usr/lib/{triplet}", f"/lib/{triplet}", "/usr/lib64", "/lib64", "/usr/lib",
              "/lib", "/usr/local/lib"):  # fmt: skip
        path = f"{d}/libseccomp.so.2"
        try:
            st = os.stat(path)
        except OSError:
            continue
        return f"{os.path.basename(os.path.realpath(path))}:{st.st_size}:{st.st_mtime_ns}"
    return "libseccomp-not-found"


def _sha256_hex(data: bytes) -> str:
    try:  # the builtin module; hashlib would load OpenSSL (~2.5 ms) for one digest
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # Python >= 3.12 renamed it _sha2; hashlib covers every build
        from hashlib import sha256
    return str(sha256(data).hexdigest())


def cache_key(policy: Policy) -> str:
    """sha256 over everything that decides the compiled program.

    The document is hashed through repr(), which is canonical for these plain
    lists/dicts/str/int built in a fixed order; json would load `re` (~4 ms).
    """
    doc = {
        "policy": policy.to_json(),
        "libseccomp": _libseccomp_id(),
        "machine": os.uname().machine,
        "compiler": _COMPILER_VERSION,
    }
    return _sha256_hex(repr(doc).encode())


def _read_cached(path: str) -> bytes | None:
    bpf = cachefile.read(path, 8 * _BPF_MAXINSNS + 1)
    return bpf if bpf is not None and _valid_program(bpf) else None


def policy_bpf(policy: Policy, cache_dir: str = CACHE_DIR) -> bytes:
    """The compiled program for `policy`, from the cache when possible.

    A hit costs a digest and one read; pyseccomp is not imported. A miss compiles and
    stores the program atomically; an unwritable cache only costs the compile time.
    """
    path = f"{cache_dir}/{cache_key(policy)}.bpf"
    # Whoever can write the cache chooses every container's filter: it must be ours alone.
    if cachefile.trusted_dir(cache_dir):
        bpf = _read_cached(path)
        if bpf is not None:
            return bpf
    bpf = compile_bpf(policy)
    try:
        cachefile.store(cache_dir, path, bpf)
    except OSError:
        pass  # read-only /var, ENOSPC, not root: the program itself is fine
    return bpf


def install(policy: Policy, cache_dir: str = CACHE_DIR) -> None:
    """Load `policy` into the calling thread. Needs no_new_privs or CAP_SYS_ADMIN.

    Only while the host's filesystem is the root (see the module docstring). Goes through
    prctl(PR_SET_SECCOMP), which takes no flags: Policy.flags (TSYNC, LOG, SPEC_ALLOW) are
    recorded, not applied.
    """
    syscalls.seccomp_set_mode_filter(policy_bpf(policy, cache_dir))


# --- OCI runtime-spec linux.seccomp ---

def _uint(obj: object, where: str, bits: int) -> int:
    if isinstance(obj, bool) or not isinstance(obj, int) or not 0 <= obj < 1 << bits:
        raise SeccompPolicyError(f"{where}: expected an unsigned {bits}-bit integer, got {obj!r}")
    return obj


def _strings(obj: object, where: str) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise SeccompPolicyError(f"{where}: expected an array of strings, got {obj!r}")
    return obj


def _optional(obj: dict[str, object], key: str) -> object:
    value = obj.get(key)
    return [] if value is None else value  # JSON null means absent, as in Go


def _oci_action(name: object, errno_ret: object, where: str, errno_where: str) -> Action:
    if name == "SCMP_ACT_NOTIFY":
        raise SeccompPolicyError(f'{where}: action "SCMP_ACT_NOTIFY" is not supported')
    kind = name.removeprefix("SCMP_ACT_") if isinstance(name, str) else ""
    kind = "KILL_THREAD" if kind == "KILL" else kind  # libseccomp: SCMP_ACT_KILL kills a thread
    if not (isinstance(name, str) and name.startswith("SCMP_ACT_") and kind in _ACTION_KINDS):
        raise SeccompPolicyError(f'{where}: unknown action "{name}"')
    if kind in ("ERRNO", "TRACE"):  # runtime-spec: errnoRet defaults to EPERM
        value = errno.EPERM if errno_ret is None else _uint(errno_ret, errno_where, 16)
        if kind == "ERRNO" and value >= 4095:  # MAX_ERRNO; libseccomp refuses it (EINVAL)
            raise SeccompPolicyError(f"{errno_where}: {value} is not an errno (0..4094)")
        return Action(kind, value)
    if errno_ret is not None:  # runtime-spec: "the runtime MUST print an error and fail"
        raise SeccompPolicyError(f'{errno_where}: action "{name}" takes no errno')
    return Action(kind)


def _oci_arg(obj: object, where: str) -> Arg:
    if not isinstance(obj, dict):
        raise SeccompPolicyError(f"{where}: expected an object")
    op = obj.get("op")
    if not isinstance(op, str) or op.removeprefix("SCMP_CMP_") not in _ARG_OPS:
        raise SeccompPolicyError(f'{where}.op: unknown operator "{op}"')
    index = _uint(obj.get("index"), f"{where}.index", 3)
    if index > 5:  # seccomp_data.args has six entries
        raise SeccompPolicyError(f"{where}.index: {index} is out of range 0..5")
    value = _uint(obj.get("value"), f"{where}.value", 64)
    value2 = _uint(obj.get("valueTwo", 0), f"{where}.valueTwo", 64)
    return Arg(index, op.removeprefix("SCMP_CMP_"), value, value2)


def policy_from_oci(obj: dict[str, object], where: str = "linux.seccomp") -> Policy:
    """Convert an OCI runtime-spec `linux.seccomp` object (config-linux.md#seccomp)."""
    if not isinstance(obj, dict):
        raise SeccompPolicyError(f"{where}: expected an object")
    if obj.get("listenerPath") is not None:
        raise SeccompPolicyError(f"{where}.listenerPath: seccomp notify is not supported")
    if "defaultAction" not in obj:
        raise SeccompPolicyError(f"{where}.defaultAction: missing (required)")
    default = _oci_action(
        obj["defaultAction"], obj.get("defaultErrnoRet"),
        f"{where}.defaultAction", f"{where}.defaultErrnoRet",
    )  # fmt: skip
    arches = []
    for i, name in enumerate(_strings(_optional(obj, "architectures"), f"{where}.architectures")):
        arch = name.removeprefix("SCMP_ARCH_").lower()
        if not name.startswith("SCMP_ARCH_") or arch not in ARCHITECTURES:
            raise SeccompPolicyError(f'{where}.architectures[{i}]: unknown architecture "{name}"')
        arches.append(arch)
    flags = _strings(_optional(obj, "flags"), f"{where}.flags")
    for i, flag in enumerate(flags):
        if flag not in FLAGS:
            raise SeccompPolicyError(f'{where}.flags[{i}]: unknown flag "{flag}"')
    syscall_list = _optional(obj, "syscalls")
    if not isinstance(syscall_list, list):
        raise SeccompPolicyError(f"{where}.syscalls: expected an array")
    rules = []
    for i, entry in enumerate(syscall_list):
        at = f"{where}.syscalls[{i}]"
        if not isinstance(entry, dict):
            raise SeccompPolicyError(f"{at}: expected an object")
        names = _strings(entry.get("names"), f"{at}.names")
        if not names or not all(names):
            raise SeccompPolicyError(f"{at}.names: needs at least one non-empty name")
        for j, name in enumerate(names):
            # libseccomp takes a C string: NUL would cut it, a surrogate cannot be encoded.
            if not (name.isascii() and name.replace("_", "a").isalnum()):
                raise SeccompPolicyError(f"{at}.names[{j}]: {name!r} is not a syscall name")
        action = _oci_action(entry.get("action"), entry.get("errnoRet"), f"{at}.action",
                             f"{at}.errnoRet")  # fmt: skip
        args = _optional(entry, "args")
        if not isinstance(args, list):
            raise SeccompPolicyError(f"{at}.args: expected an array")
        conds = tuple(_oci_arg(a, f"{at}.args[{j}]") for j, a in enumerate(args))
        rules.append(Rule(names, action, conds))
    return Policy(default, rules, arches, flags)
