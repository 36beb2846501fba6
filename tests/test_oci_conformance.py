"""Regression tests for the OCI conformance defects of issue 13 (engine side).

Each test drives uspawn-runc with a bundle the way the runtime-tools validation
suite or runc's users do, on the real kernel.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_oci import Oci, make_bundle

Cfg = dict[str, Any]

# What busybox sh, echo and cat need; everything else gets EPERM.
_PAYLOAD_SYSCALLS = [
    "execve", "brk", "mmap", "munmap", "mprotect", "arch_prctl", "set_tid_address",
    "exit_group", "exit", "read", "write", "writev", "openat", "open", "close", "fstat",
    "newfstatat", "stat", "lstat", "fcntl", "ioctl", "rt_sigaction", "rt_sigprocmask",
    "rt_sigreturn", "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid",
    "uname", "prlimit64", "getcwd", "lseek", "dup2", "dup3", "wait4", "clone", "fork",
    "vfork", "access", "faccessat", "faccessat2", "readlink", "readlinkat", "statx",
    "set_robust_list", "rseq", "getrandom", "sigaltstack", "futex", "sendfile",
]


@pytest.fixture(name="oci")
def oci_fixture(tmp_path: Path, need_root: None) -> Iterator[Oci]:
    o = Oci(tmp_path / "oci-state")
    yield o
    for line in o("list", "-q", check=False).stdout.split():
        o("delete", "--force", line, check=False)


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def bundle_with(tmp_path: Path, rootfs: Path, args: list[str],
                edit: Callable[[Cfg], None]) -> Path:
    b = make_bundle(tmp_path, rootfs, args)
    cfg = json.loads((b / "config.json").read_text())
    edit(cfg)
    (b / "config.json").write_text(json.dumps(cfg))
    return b


@pytest.mark.parametrize("nnp", [True, False])
def test_errno_default_seccomp_profile_starts(oci: Oci, rootfs: Path, tmp_path: Path,
                                              nnp: bool) -> None:
    """A profile refusing every unlisted syscall with EPERM: after the filter only
    execve (and, without noNewPrivileges, the capset dropping CAP_SYS_ADMIN) may run."""
    def edit(cfg: Cfg) -> None:
        cfg["process"]["noNewPrivileges"] = nnp
        allowed = _PAYLOAD_SYSCALLS + ([] if nnp else ["capset"])
        cfg["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]}

    b = bundle_with(tmp_path, rootfs, ["sh", "-c", "echo seccomp-ok; grep Cap /proc/self/status"],
                    edit)
    r = oci("run", "-b", str(b), _cid("sc"), check=False)
    assert r.returncode == 0 and "seccomp-ok" in r.stdout, r.stderr
    # the capset after the load did drop CAP_SYS_ADMIN (bit 21) when it was bracketed
    eff = int(next(ln for ln in r.stdout.splitlines() if ln.startswith("CapEff")).split()[1], 16)
    assert not eff & (1 << 21)


def test_errno_profile_refusing_capset_is_one_line_error(oci: Oci, rootfs: Path,
                                                        tmp_path: Path) -> None:
    def edit(cfg: Cfg) -> None:
        cfg["process"]["noNewPrivileges"] = False
        cfg["linux"]["seccomp"] = {
            "defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": _PAYLOAD_SYSCALLS, "action": "SCMP_ACT_ALLOW"}]}

    b = bundle_with(tmp_path, rootfs, ["true"], edit)
    r = oci("run", "-b", str(b), _cid("sc"), check=False)
    assert r.returncode != 0 and "capset" in r.stderr and "Traceback" not in r.stderr
    assert "noNewPrivileges" in r.stderr
