"""ctypes bindings for the syscalls the stdlib does not wrap.

This is the only module that touches ctypes. Every prototype is declared once,
at import, on one libc handle opened with use_errno=True; constants keep their
kernel header names. Wrappers raise SyscallError (an OSError that remembers the
syscall and the path), so callers can add context and the CLI can print one line.

Constraints: stdlib only, imported before pivot_root (nothing here may be
imported lazily once the host filesystem is gone).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# --- clone/unshare flags (linux/sched.h) ---
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080  # unshare() only: for children, as CLONE_NEWPID

# --- mount(2) flags (linux/mount.h) ---
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_UNBINDABLE = 1 << 17
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 2

# --- new mount API (linux/mount.h) ---
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5  # value: an fd (overlayfs layers "lowerdir+", "upperdir": 6.15)
FSCONFIG_CMD_CREATE = 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR_IDMAP = 0x100000
MOUNT_ATTR_SIZE_VER0 = 32

# --- openat2 (linux/openat2.h) ---
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10

# --- prctl (linux/prctl.h) ---
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

# --- capabilities (linux/capability.h) ---
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# --- clone3 ---
CLONE_INTO_CGROUP = 0x200000000
CLONE_PARENT = 0x00008000  # the child's parent is the caller's parent
SIGCHLD = 17  # the same on every architecture uspawn supports

# --- misc ---
CLOSE_RANGE_CLOEXEC = 4
# TIOCSCTTY and TIOCGPTPEER are not in the stdlib termios module everywhere.
TIOCSCTTY = 0x540E
TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431

# Syscalls without a glibc wrapper in Debian 12's glibc. The numbers from 424
# up are shared by every architecture; pivot_root is not.
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
SYS_pidfd_send_signal = 424
SYS_open_tree = 428
SYS_move_mount = 429
SYS_fsopen = 430
SYS_fsconfig = 431
SYS_fsmount = 432
SYS_pidfd_open = 434
SYS_clone3 = 435
SYS_close_range = 436
SYS_openat2 = 437
SYS_mount_setattr = 442

_libc = ctypes.CDLL(None, use_errno=True)
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int
_c_uint = ctypes.c_uint
_c_ulong = ctypes.c_ulong
_c_long = ctypes.c_long
_c_void_p = ctypes.c_void_p

_libc.syscall.restype = _c_long
_libc.unshare.argtypes = [_c_int]
_libc.unshare.restype = _c_int
_libc.setns.argtypes = [_c_int, _c_int]
_libc.setns.restype = _c_int
_libc.mount.argtypes = [_c_char_p, _c_char_p, _c_char_p, _c_ulong, _c_char_p]
_libc.mount.restype = _c_int
_libc.umount2.argtypes = [_c_char_p, _c_int]
_libc.umount2.restype = _c_int
_libc.prctl.argtypes = [_c_int, _c_ulong, _c_ulong, _c_ulong, _c_ulong]
_libc.prctl.restype = _c_int
_libc.sethostname.argtypes = [_c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = _c_int
_libc.setdomainname.argtypes = [_c_char_p, ctypes.c_size_t]
_libc.setdomainname.restype = _c_int
_libc.capset.argtypes = [_c_void_p, _c_void_p]
_libc.capset.restype = _c_int
_libc.capget.argtypes = [_c_void_p, _c_void_p]
_libc.capget.restype = _c_int


class SyscallError(OSError):
    """An OSError that names the syscall (and the path, when there is one)."""

    def __init__(self, err: int, syscall: str, path: str | None = None) -> None:
        super().__init__(err, os.strerror(err), path)
        self.syscall = syscall

    def __str__(self) -> str:
        where = f" {self.filename}" if self.filename else ""
        name = errno.errorcode.get(self.errno or 0, "?")
        return f"{self.syscall}{where}: {self.strerror} ({name})"


# SyscallError variants that are also the matching builtin OSError subclass,
# so `except FileNotFoundError` works on our errors as on the stdlib's.
_BY_ERRNO: dict[int, type[SyscallError]] = {
    code: type(f"SyscallError_{base.__name__}", (SyscallError, base), {})
    for code, base in (
        (errno.ENOENT, FileNotFoundError), (errno.EEXIST, FileExistsError),
        (errno.ENOTDIR, NotADirectoryError), (errno.EISDIR, IsADirectoryError),
        (errno.EPERM, PermissionError), (errno.EACCES, PermissionError),
        (errno.ESRCH, ProcessLookupError), (errno.EAGAIN, BlockingIOError),
    )
}


def _check(ret: int, syscall: str, path: str | bytes | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        p = os.fsdecode(path) if path is not None else None
        raise _BY_ERRNO.get(err, SyscallError)(err, syscall, p)
    return ret


def _b(path: str | bytes | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


# --- namespaces ---


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


# --- classic mount API ---


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)), "mount", target
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SyscallError(errno.ENOSYS, "pivot_root")
    _check(
        _libc.syscall(_c_long(nr), _c_char_p(_b(new_root)), _c_char_p(_b(put_old))),
        "pivot_root",
        new_root,
    )


# --- new mount API (Linux >= 5.2; mount_setattr >= 5.12) ---


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return _check(
        _libc.syscall(_c_long(SYS_open_tree), _c_int(dirfd), _c_char_p(_b(path)), _c_uint(flags)),
        "open_tree",
        path or None,
    )


def move_mount(from_dirfd: int, from_path: str, to_dirfd: int, to_path: str, flags: int) -> None:
    _check(
        _libc.syscall(
            _c_long(SYS_move_mount),
            _c_int(from_dirfd),
            _c_char_p(_b(from_path)),
            _c_int(to_dirfd),
            _c_char_p(_b(to_path)),
            _c_uint(flags),
        ),
        "move_mount",
        to_path or None,
    )


def fsopen(fstype: str, flags: int = FSOPEN_CLOEXEC) -> int:
    return _check(
        _libc.syscall(_c_long(SYS_fsopen), _c_char_p(_b(fstype)), _c_uint(flags)),
        "fsopen",
        fstype,
    )


def fsconfig(fd: int, cmd: int, key: str | None = None, value: str | None = None) -> None:
    _check(
        _libc.syscall(
            _c_long(SYS_fsconfig),
            _c_int(fd),
            _c_uint(cmd),
            _c_char_p(_b(key)),
            _c_char_p(_b(value)),
            _c_int(0),
        ),
        "fsconfig",
        key,
    )


def fsconfig_fd(fd: int, key: str, value_fd: int) -> None:
    """fsconfig(FSCONFIG_SET_FD): a parameter given as an open file (or mount)."""
    _check(
        _libc.syscall(
            _c_long(SYS_fsconfig),
            _c_int(fd),
            _c_uint(FSCONFIG_SET_FD),
            _c_char_p(_b(key)),
            _c_char_p(None),
            _c_int(value_fd),
        ),
        "fsconfig",
        key,
    )


def fsmount(fd: int, attr_flags: int = 0, flags: int = FSMOUNT_CLOEXEC) -> int:
    return _check(
        _libc.syscall(_c_long(SYS_fsmount), _c_int(fd), _c_uint(flags), _c_uint(attr_flags)),
        "fsmount",
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(
    dirfd: int,
    path: str,
    flags: int,
    attr_set: int = 0,
    attr_clr: int = 0,
    propagation: int = 0,
    userns_fd: int = 0,
) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, userns_fd)
    _check(
        _libc.syscall(
            _c_long(SYS_mount_setattr),
            _c_int(dirfd),
            _c_char_p(_b(path)),
            _c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(MOUNT_ATTR_SIZE_VER0),
        ),
        "mount_setattr",
        path or None,
    )


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags, mode, resolve)
    return _check(
        _libc.syscall(
            _c_long(SYS_openat2),
            _c_int(dirfd),
            _c_char_p(_b(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        "openat2",
        path,
    )


# --- processes ---


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), "prctl")


def pidfd_open(pid: int) -> int:
    return _check(
        _libc.syscall(_c_long(SYS_pidfd_open), _c_int(pid), _c_uint(0)), "pidfd_open"
    )


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    _check(
        _libc.syscall(
            _c_long(SYS_pidfd_send_signal), _c_int(pidfd), _c_int(sig), _c_void_p(None), _c_uint(0)
        ),
        "pidfd_send_signal",
    )


def close_range(first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
    ret = _libc.syscall(
        _c_long(SYS_close_range), _c_uint(first), _c_uint(last), _c_uint(flags)
    )
    err = ctypes.get_errno() if ret < 0 else 0
    if err == errno.ENOSYS or (err == errno.EINVAL and flags & CLOSE_RANGE_CLOEXEC):
        # Linux < 5.9 has no close_range, < 5.11 no CLOSE_RANGE_CLOEXEC: walk
        # what /proc says is open (slower, same result).
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if first <= fd <= last:
                if flags & CLOSE_RANGE_CLOEXEC:
                    try:
                        os.set_inheritable(fd, False)
                    except OSError:
                        pass
                else:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
        return
    _check(ret, "close_range")


_KEYCTL = {"x86_64": 250, "aarch64": 219, "ppc64le": 271, "s390x": 280}
KEYCTL_JOIN_SESSION_KEYRING = 1


def keyctl_join_session_keyring() -> int:
    nr = _KEYCTL.get(os.uname().machine)
    if nr is None:
        raise SyscallError(errno.ENOSYS, "keyctl")
    return _check(_libc.syscall(_c_long(nr), _c_int(KEYCTL_JOIN_SESSION_KEYRING),
                                _c_void_p(None)), "keyctl")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    _check(_libc.setdomainname(raw, len(raw)), "setdomainname")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(
        _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
        _CapData(effective >> 32, permitted >> 32, inheritable >> 32),
    )
    _check(_libc.capset(ctypes.byref(hdr), ctypes.byref(data)), "capset")


def capget() -> tuple[int, int, int]:
    """Return (effective, permitted, inheritable) of the calling thread."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), ctypes.byref(data)), "capget")
    eff = data[0].effective | (data[1].effective << 32)
    perm = data[0].permitted | (data[1].permitted << 32)
    inh = data[0].inheritable | (data[1].inheritable << 32)
    return eff, perm, inh


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def seccomp_set_mode_filter(bpf: bytes) -> None:
    """Install a classic-BPF seccomp program (raw struct sock_filter array).

    Needs no_new_privs or CAP_SYS_ADMIN in the caller's user namespace.
    """
    if len(bpf) % 8:
        raise ValueError("seccomp program length is not a multiple of 8")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p).value)
    _check(
        _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0),
        "seccomp",
    )


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64), ("pidfd", ctypes.c_uint64),
        ("child_tid", ctypes.c_uint64), ("parent_tid", ctypes.c_uint64),
        ("exit_signal", ctypes.c_uint64), ("stack", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64), ("tls", ctypes.c_uint64),
        ("set_tid", ctypes.c_uint64), ("set_tid_size", ctypes.c_uint64),
        ("cgroup", ctypes.c_uint64),
    ]


# A handle whose calls keep the GIL held: the clone3 child must come back to
# the interpreter in the same state os.fork() leaves it in.
_pylibc = ctypes.PyDLL(None, use_errno=True)
_pylibc.syscall.restype = _c_long
_pyapi = ctypes.pythonapi


def fork_into_cgroup(cgroup_fd: int) -> int:
    """os.fork(), but the child is born in the cgroup2 directory cgroup_fd.

    Moving a task by writing cgroup.procs waits for an RCU grace period
    (percpu_down_write of cgroup_threadgroup_rwsem): 10-15 ms measured here,
    more than half of a container start. clone3(CLONE_INTO_CGROUP) (Linux
    5.7) places the child at fork time instead, as crun does. Raises
    SyscallError (ENOSYS, EINVAL on old kernels or v1 cgroups) so callers can
    fall back.
    """
    return clone(CLONE_INTO_CGROUP, cgroup_fd)


# (s390x passes the stack first: not listed, so it needs clone3.)
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "ppc64le": 120}


def clone(flags: int, cgroup_fd: int = 0) -> int:
    """fork() with clone flags (new namespaces at birth); 0 in the child.

    The CPython fork hooks run as in os.fork(). Caveat: glibc's cached tid in
    the child's thread block is not updated (no CLONE_CHILD_SETTID), so the
    child must not use pthread_kill/raise before it execs; uspawn's children
    only set up and exec. clone3 (5.3) first, else the classic clone syscall
    (no CLONE_INTO_CGROUP there). Namespace flags at clone time matter: a
    child born in a new user namespace while its parent stays real root in
    the host's is what lets the parent build mounts that the child's mount
    namespace then inherits locked.
    """
    # clone3 refuses an exit signal with CLONE_PARENT: the child takes the caller's
    # own (SIGCHLD, to the shared parent), as the classic clone does.
    args = _CloneArgs(flags=flags, exit_signal=0 if flags & CLONE_PARENT else SIGCHLD,
                      cgroup=cgroup_fd)
    _pyapi.PyOS_BeforeFork()
    ret = _pylibc.syscall(_c_long(SYS_clone3), ctypes.byref(args),
                          ctypes.c_size_t(ctypes.sizeof(args)))
    err = ctypes.get_errno() if ret < 0 else 0
    if ret < 0 and err == errno.ENOSYS and not flags & CLONE_INTO_CGROUP:
        nr = _SYS_CLONE.get(os.uname().machine)
        if nr is not None:
            # All pointer arguments NULL, so their per-architecture order does not matter.
            ret = _pylibc.syscall(_c_long(nr), _c_ulong(flags | SIGCHLD), _c_ulong(0),
                                  _c_ulong(0), _c_ulong(0), _c_ulong(0))
            err = ctypes.get_errno() if ret < 0 else 0
    if ret == 0:
        _pyapi.PyOS_AfterFork_Child()
        return 0
    _pyapi.PyOS_AfterFork_Parent()
    if ret < 0:
        raise _BY_ERRNO.get(err, SyscallError)(err, "clone3")
    return int(ret)


_libc.setfsuid.argtypes = [_c_uint]
_libc.setfsuid.restype = _c_int
_libc.setfsgid.argtypes = [_c_uint]
_libc.setfsgid.restype = _c_int


def set_fs_ids(uid: int, gid: int) -> None:
    """setfsgid + setfsuid: files created from now on belong to uid:gid.

    The calls report no errors; the previous value read back tells. Changing
    the fsuid from 0 clears the filesystem capabilities from the effective set
    (CAP_DAC_OVERRIDE, CAP_CHOWN, ...); the caller raises them again if needed.
    """
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    if _libc.setfsgid(gid) != gid or _libc.setfsuid(uid) != uid:
        raise SyscallError(errno.EPERM, "setfsuid")


_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8


def _bpf(cmd: int, attr: bytes) -> int:
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise SyscallError(errno.ENOSYS, "bpf")
    buf = ctypes.create_string_buffer(attr, len(attr))
    return _check(_libc.syscall(_c_long(nr), _c_int(cmd), buf, _c_uint(len(attr))), "bpf")


def bpf_prog_load(prog_type: int, insns: bytes, name: bytes, expected_attach_type: int) -> int:
    """Load an eBPF program (struct bpf_insn array); return its fd."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    # union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level,
    # log_size, log_buf, kern_version, prog_flags, prog_name[16], prog_ifindex,
    # expected_attach_type
    attr = struct.pack("<IIQQIIQII16sII", prog_type, len(insns) // 8, ctypes.addressof(code),
                       ctypes.addressof(license_), 0, 0, 0, 0, 0, name[:15], 0,
                       expected_attach_type)
    return _bpf(BPF_PROG_LOAD, attr)


def bpf_prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    # BPF_PROG_ATTACH: target_fd, attach_bpf_fd, attach_type, attach_flags
    _bpf(BPF_PROG_ATTACH, struct.pack("<IIII", target_fd, prog_fd, attach_type, flags))


_libc.fstatfs.argtypes = [_c_int, _c_void_p]
_libc.fstatfs.restype = _c_int


def fstatfs_type(fd: int) -> int:
    """f_type of the filesystem holding fd (works on O_PATH fds since Linux 3.12).

    os.fstatvfs has no f_type; struct statfs starts with it (a long, but an
    unsigned int on s390x) on every Linux ABI, and 256 bytes cover the struct.
    """
    buf = ctypes.create_string_buffer(256)
    _check(_libc.fstatfs(_c_int(fd), buf), "fstatfs")
    word = ctypes.c_uint if os.uname().machine == "s390x" else ctypes.c_ulong
    return int(word.from_buffer(buf).value)
