"""Kernel tier for uspawn.kernel.seccomp: load the default userns policy and make syscalls.

Every test forks: the child sets no_new_privs, installs the filter, does its checks and
reports a JSON dict over a pipe, then os._exit()s; it never returns into pytest. Runs as
root on x86_64 (raw syscall numbers below are x86_64's); skips go through conftest's
skip_or_fail, so USPAWN_MUST_WORK=1 turns them into failures.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import signal
import socket
import stat
import threading
from collections.abc import Callable

import pytest
from conftest import skip_or_fail

from uspawn.kernel import seccomp, syscalls

# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl); >= 424 are shared by all arches.
NR = {
    "syslog": 103, "reboot": 169, "init_module": 175, "perf_event_open": 298,
    "kexec_load": 246, "add_key": 248, "keyctl": 250, "open_by_handle_at": 304,
    "clock_settime": 227, "bpf": 321, "userfaultfd": 323, "fanotify_init": 300,
    "mknodat": 259, "personality": 135, "clone3": 435, "statmount": 457, "ioctl": 16,
}  # fmt: skip
UNALLOCATED = 470  # nothing on x86_64 as of 6.18; checked below before relying on it
X32_SYSCALL_BIT = 0x40000000

Report = dict[str, object]


@pytest.fixture(autouse=True)
def _requirements(need_root: None) -> None:
    if platform.machine() != "x86_64":
        skip_or_fail("raw syscall numbers are x86_64's")


@pytest.fixture(scope="module")
def bpf() -> bytes:
    return seccomp.compile_bpf(seccomp.default_policy(userns=True))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def raw(name_or_nr: str | int, *args: int) -> int:
    """syscall(2) with integer arguments: the result, or -errno."""
    nr = NR[name_or_nr] if isinstance(name_or_nr, str) else name_or_nr
    ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_ulong(a) for a in args))
    return -ctypes.get_errno() if ret == -1 else int(ret)


def errname(ret: int) -> str:
    return errno.errorcode.get(-ret, str(ret)) if ret < 0 else "ok"


def in_filtered_child(
    check: Callable[[], Report], bpf: bytes | None = None, install: Callable[[], None] | None = None
) -> Report:
    """Fork; the child loads the filter (raw `bpf`, or by calling `install`), runs `check`
    and sends its report back. A child killed by a signal reports {"signal": n}."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never unwind into pytest
        status = 0
        try:
            os.close(rfd)
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            if install is not None:
                install()
            else:
                assert bpf is not None
                syscalls.seccomp_set_mode_filter(bpf)
            report = check()
        except BaseException as e:
            report, status = {"error": f"{type(e).__name__}: {e}"}, 1
        try:
            os.write(wfd, json.dumps(report).encode())
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        data = r.read()
    _, wstatus = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wstatus):
        return {"signal": os.WTERMSIG(wstatus)}
    result: Report = json.loads(data)
    assert os.WEXITSTATUS(wstatus) == 0, result
    return result


def mknod_errno(path: str, mode: int, device: int = 0) -> str:
    try:
        os.mknod(path, mode, device)
    except OSError as e:
        return errno.errorcode[e.errno or 0]
    return "ok"


def test_install_from_the_cache(tmp_path: os.PathLike[str]) -> None:
    cache = os.path.join(tmp_path, "cache")
    policy = seccomp.default_policy(userns=True)
    seccomp.policy_bpf(policy, cache)  # warm: the child's install() is a cache hit
    node = os.path.join(tmp_path, "null")

    def check() -> Report:
        return {"chr": mknod_errno(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))}

    assert in_filtered_child(check, install=lambda: seccomp.install(policy, cache)) == {
        "chr": "EPERM"
    }


def test_device_nodes_are_refused(tmp_path: os.PathLike[str], bpf: bytes) -> None:
    base = os.fspath(tmp_path)

    def check() -> Report:
        # the kernel truncates mode to umode_t: garbage in the high bits must not slip by
        path = ctypes.create_string_buffer(f"{base}/high".encode())
        high = stat.S_IFCHR | 0o600 | 1 << 32
        at_fdcwd = -100 & 0xFFFFFFFF
        return {
            "chr": mknod_errno(f"{base}/null", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
            "blk": mknod_errno(f"{base}/loop", stat.S_IFBLK | 0o600, os.makedev(7, 0)),
            "chr_high_bits": errname(
                raw("mknodat", at_fdcwd, ctypes.addressof(path), high, os.makedev(1, 3))
            ),
            "exists": os.listdir(base),
        }

    assert in_filtered_child(check, bpf) == {
        "chr": "EPERM", "blk": "EPERM", "chr_high_bits": "EPERM", "exists": []
    }  # fmt: skip


def test_other_file_types_are_allowed(tmp_path: os.PathLike[str], bpf: bytes) -> None:
    base = os.fspath(tmp_path)

    def check() -> Report:
        os.mkfifo(f"{base}/fifo", 0o600)
        os.mknod(f"{base}/regular", stat.S_IFREG | 0o600)
        os.mknod(f"{base}/plain", 0o600)  # type 0 is a regular file
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(f"{base}/sock")
        modes = {n: os.lstat(f"{base}/{n}").st_mode for n in sorted(os.listdir(base))}
        return {n: stat.S_IFMT(m) for n, m in modes.items()}

    assert in_filtered_child(check, bpf) == {
        "fifo": stat.S_IFIFO,
        "plain": stat.S_IFREG,
        "regular": stat.S_IFREG,
        "sock": stat.S_IFSOCK,
    }


def test_dangerous_syscalls_get_eperm(bpf: bytes) -> None:
    # Arguments chosen so that each call would fail harmlessly even without the filter.
    calls = {
        "kexec_load": (0, 0, 0, 0xFFFFFFFF),  # invalid flags: EINVAL if it got through
        "init_module": (0, 0, 0),
        "keyctl": (0, 0),  # KEYCTL_GET_KEYRING_ID of keyring 0
        "add_key": (0, 0, 0, 0, 0),
        "bpf": (0xFFFF, 0, 0),
        "perf_event_open": (0, 0, 0, 0, 0),
        "open_by_handle_at": (0xFFFFFFFF, 0, 0),
        "clock_settime": (0, 0),  # CLOCK_REALTIME, NULL
        "userfaultfd": (0xFFFFFFFF,),
        "syslog": (10, 0, 0),  # SYSLOG_ACTION_SIZE_BUFFER
        "fanotify_init": (0xFFFFFFFF, 0),
    }

    def check() -> Report:
        return {name: errname(raw(name, *args)) for name, args in calls.items()}

    assert in_filtered_child(check, bpf) == dict.fromkeys(calls, "EPERM")


def test_syscalls_the_policy_does_not_know_get_enosys(bpf: bytes) -> None:
    if raw(UNALLOCATED) != -errno.ENOSYS:
        skip_or_fail(f"syscall {UNALLOCATED} exists on this kernel")

    def check() -> Report:
        return {
            "unallocated": errname(raw(UNALLOCATED)),
            # a persona outside docker's list: ADDR_NO_RANDOMIZE
            "personality": errname(raw("personality", 0x0040000)),
        }

    assert in_filtered_child(check, bpf) == {"unallocated": "ENOSYS", "personality": "ENOSYS"}


def test_syscalls_newer_than_libseccomp_get_enosys(bpf: bytes) -> None:
    # statmount (6.8) is on the allow list, but libseccomp 2.5.4 cannot name it: the
    # program leaves it to the default, like a kernel that lacks it.
    import pyseccomp

    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "statmount") != -1:
        skip_or_fail("this libseccomp knows statmount, so the policy allows it")
    if raw("statmount", 0, 0, 0, 0) == -errno.ENOSYS:
        skip_or_fail("this kernel lacks statmount")
    result = in_filtered_child(lambda: {"statmount": errname(raw("statmount", 0, 0, 0, 0))}, bpf)
    assert result == {"statmount": "ENOSYS"}


def test_system_container_syscalls_are_allowed(bpf: bytes) -> None:
    def check() -> Report:
        syscalls.unshare(syscalls.CLONE_NEWUTS)
        syscalls.sethostname("seccomp-test")
        return {
            "reboot": errname(raw("reboot", 0, 0, 0, 0)),  # bad magic: EINVAL, nothing happens
            "clone3": errname(raw("clone3", 0, 0)),  # size 0: EINVAL, no child
            "personality": raw("personality", 0xFFFFFFFF) >= 0,  # query
            "hostname": socket.gethostname(),
        }

    assert in_filtered_child(check, bpf) == {
        "reboot": "EINVAL", "clone3": "EINVAL", "personality": True, "hostname": "seccomp-test"
    }  # fmt: skip


def test_ordinary_work_still_works(tmp_path: os.PathLike[str], bpf: bytes) -> None:
    path = os.path.join(tmp_path, "file")

    def check() -> Report:
        with open(path, "w") as f:
            f.write("hello")
        with open(path) as f:
            text = f.read()
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/true", ["/bin/true"])
        _, status = os.waitpid(pid, 0)
        seen = []
        t = threading.Thread(target=lambda: seen.append(threading.get_native_id()))
        t.start()  # glibc >= 2.34 starts threads with clone3
        t.join()
        return {"text": text, "true": os.waitstatus_to_exitcode(status), "thread": len(seen)}

    assert in_filtered_child(check, bpf) == {"text": "hello", "true": 0, "thread": 1}


def test_mount_in_a_new_user_and_mount_namespace(tmp_path: os.PathLike[str], bpf: bytes) -> None:
    target = os.path.join(tmp_path, "mnt")
    os.mkdir(target)

    def check() -> Report:
        # `unshare -Urm`: map root to root, then mount a tmpfs and use it
        syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
        for name, line in (("setgroups", "deny"), ("uid_map", "0 0 1"), ("gid_map", "0 0 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(line)
        syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        syscalls.mount("tmpfs", target, "tmpfs", 0, "size=1m")
        with open(os.path.join(target, "probe"), "w") as f:
            f.write("x")
        listing = os.listdir(target)
        syscalls.umount2(target)
        return {"listing": listing, "after": os.listdir(target)}

    assert in_filtered_child(check, bpf) == {"listing": ["probe"], "after": []}


def test_x32_syscalls_kill_the_process(bpf: bytes) -> None:
    # x32 shares AUDIT_ARCH_X86_64 (seccomp(2) NOTES); the policy does not list it, so the
    # bad-arch action applies before the kernel even looks at the number.
    def check() -> Report:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # SIGSYS would dump core
        return {"x32_getpid": errname(raw(X32_SYSCALL_BIT | 39))}

    assert in_filtered_child(check, bpf) == {"signal": signal.SIGSYS}


def _inject_on_own_ctty(cmds: dict[str, int]) -> Report:
    """What a payload does with a tty nobody controls: a new session takes it as its
    controlling terminal (TIOCSCTTY), then pushes one byte per request into its
    input (TIOCSTI). Injected bytes queue up as input on the slave side, where the
    host's reader would get them. TCGETS and TIOCGWINSZ must keep working."""
    import fcntl
    import select
    import termios
    import tty

    _master, slave = os.openpty()
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    byte = ctypes.c_char(b"X")
    out: Report = {
        name: errname(raw("ioctl", slave, cmd, ctypes.addressof(byte)))
        for name, cmd in cmds.items()
    }
    out["tcgets"] = len(termios.tcgetattr(slave))
    out["winsize"] = len(fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
    # injected bytes would sit in the slave's input queue (a reader gets them)
    os.set_blocking(slave, False)
    tty.setraw(slave, termios.TCSANOW)  # a partial line becomes readable
    out["queued"] = os.read(slave, 64).decode() if select.select([slave], [], [], 0.1)[0] else ""
    return out


def test_tiocsti_is_refused(bpf: bytes) -> None:
    import termios

    cmds = {"sti": termios.TIOCSTI, "sti_high": termios.TIOCSTI | 1 << 32,
            "sti_all_high": termios.TIOCSTI | 0xFFFFFFFF << 32,
            "linux": termios.TIOCLINUX, "linux_high": termios.TIOCLINUX | 1 << 63}
    # Control, same process shape without the filter: this kernel really injects
    # (legacy_tiocsti=1, and we are root), so the refusal below is the filter's.
    control = in_filtered_child(lambda: _inject_on_own_ctty({"sti": termios.TIOCSTI}),
                                install=lambda: None)
    if control.get("sti") != "ok":
        skip_or_fail(f"TIOCSTI does not work here even without the filter: {control}")
    assert control["queued"] == "X"
    result = in_filtered_child(lambda: _inject_on_own_ctty(cmds), bpf)
    assert result == {"sti": "EPERM", "sti_high": "EPERM", "sti_all_high": "EPERM",
                      "linux": "EPERM", "linux_high": "EPERM", "tcgets": 7, "winsize": 8,
                      "queued": ""}
