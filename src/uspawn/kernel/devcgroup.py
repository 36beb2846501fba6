"""Device access policy for a container's cgroup (runc, crun and nspawn do the same).

A tree unpacked by root keeps device nodes (tar does), and on the rootfs - a
superblock owned by the host - such a node opens like any host node, the host's
disks included. Mount flags cannot stop that for good: container root owns its
mount namespace and may remount the rootfs without nodev, or unmount /dev to
reach the tree's own /dev. The device cgroup can: the kernel consults it on every
open and mknod of a device node, on any mount, and nothing inside the container
can detach it (bpf() needs privileges in the initial namespace, and the seccomp
policy refuses it anyway).

cgroup v2 (also the unified hierarchy of a hybrid host): a
BPF_PROG_TYPE_CGROUP_DEVICE program attached to the container's cgroup (with
BPF_F_ALLOW_MULTI, so it also holds for every sub-cgroup a delegated payload
makes), allowing exactly the configured nodes plus ptmx, the console and the pty
slaves. Legacy v1-only hosts get no policy yet.

Stdlib only; the bpf(2) calls live in uspawn.kernel.syscalls.
"""

from __future__ import annotations

import os
import struct

from uspawn.kernel import syscalls as sc

# linux/bpf.h
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
BPF_DEVCG_DEV_BLOCK = 1
BPF_DEVCG_DEV_CHAR = 2

# Access bits in the high half of bpf_cgroup_dev_ctx.access_type (linux/bpf.h).
ACC_MKNOD, ACC_READ, ACC_WRITE = 1, 2, 4
ACC_ALL = ACC_MKNOD | ACC_READ | ACC_WRITE

# Always allowed besides the configured nodes: /dev/ptmx (5:2), /dev/console (5:1),
# the pty slaves of the container's devpts (Unix98 majors 136..143, any minor).
ALWAYS = [("c", 5, 2, ACC_ALL), ("c", 5, 1, ACC_ALL),
          *(("c", m, -1, ACC_ALL) for m in range(136, 144))]

_LDXW = 0x61  # BPF_LDX | BPF_MEM | BPF_W
_AND32K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_JNEK = 0x55  # BPF_JMP | BPF_JNE | BPF_K
_MOV64K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
_MOV64X = 0xBF  # BPF_ALU64 | BPF_MOV | BPF_X
_RSH32K = 0x74  # BPF_ALU | BPF_RSH | BPF_K
_EXIT = 0x95  # BPF_JMP | BPF_EXIT


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def access_mask(access: str) -> int:
    """"rwm" letters as ACC_* bits."""
    return ((ACC_READ if "r" in access else 0) | (ACC_WRITE if "w" in access else 0)
            | (ACC_MKNOD if "m" in access else 0))


def program(allowed: list[tuple[str, int, int, int]]) -> bytes:
    """1 (allow) for an allowed (type, major, minor, access), else 0; minor -1 =
    any; access is a mask of ACC_* (an open for writing of a read-only entry misses).

    ctx is struct bpf_cgroup_dev_ctx {u32 access_type; u32 major; u32 minor};
    the low 16 bits of access_type are the device type, the high 16 the access.
    """
    code = [
        _insn(_LDXW, 2, 1, 0),  # r2 = ctx->access_type
        _insn(_MOV64X, 3, 2),  # r3 = access_type
        _insn(_AND32K, 2, imm=0xFFFF),  # r2 = device type
        _insn(_RSH32K, 3, imm=16),  # r3 = requested access
        _insn(_LDXW, 4, 1, 4),  # r4 = major
        _insn(_LDXW, 5, 1, 8),  # r5 = minor
    ]
    for kind, major, minor, access in allowed:
        dtype = BPF_DEVCG_DEV_BLOCK if kind == "b" else BPF_DEVCG_DEV_CHAR
        checks = [(4, major)] + ([] if minor < 0 else [(5, minor)])
        partial = access & ACC_ALL != ACC_ALL
        # each miss jumps past the remaining checks and the allow
        rest = len(checks) + 2 + (3 if partial else 0)
        code.append(_insn(_JNEK, 2, off=rest, imm=dtype))
        for i, (reg, value) in enumerate(checks):
            code.append(_insn(_JNEK, reg, off=rest - 1 - i, imm=value))
        if partial:  # r6 = requested & ~access, must be 0
            code += [_insn(_MOV64X, 6, 3), _insn(_AND32K, 6, imm=ACC_ALL & ~access),
                     _insn(_JNEK, 6, off=2, imm=0)]
        code += [_insn(_MOV64K, 0, imm=1), _insn(_EXIT)]
    code += [_insn(_MOV64K, 0, imm=0), _insn(_EXIT)]
    return b"".join(code)


def attach(cgroup_dir: str, nodes: list[tuple[str, int, int, int]]) -> None:
    """Allow exactly `nodes` (plus ALWAYS) to be opened or made in cgroup_dir's
    subtree, each with its access mask."""
    insns = program(nodes + ALWAYS)
    prog = sc.bpf_prog_load(BPF_PROG_TYPE_CGROUP_DEVICE, insns, b"uspawn_devices",
                            BPF_CGROUP_DEVICE)
    try:
        cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            sc.bpf_prog_attach(cg, prog, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)
        finally:
            os.close(cg)
    finally:
        os.close(prog)  # the attachment keeps the program alive
