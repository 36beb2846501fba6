"""Unit tier for uspawn.kernel.seccomp: policy content, OCI conversion, cache, compiler.

No root needed; nothing is loaded into the kernel here (see test_seccomp_kernel.py).
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from uspawn.kernel import seccomp
from uspawn.kernel.seccomp import (
    ALLOW,
    ERRNO,
    Action,
    Arg,
    Policy,
    Rule,
    SeccompPolicyError,
    default_policy,
    policy_from_oci,
)

EPERM = ERRNO(errno.EPERM)
DANGEROUS = (
    "kexec_load kexec_file_load init_module finit_module delete_module open_by_handle_at "
    "perf_event_open userfaultfd add_key request_key keyctl swapon swapoff iopl ioperm acct "
    "lookup_dcookie quotactl quotactl_fd syslog nfsservctl settimeofday stime clock_settime "
    "clock_adjtime adjtimex bpf fanotify_init uselib create_module get_kernel_syms "
    "query_module vm86 vm86old _sysctl"
).split()
SYSTEM_NEEDS = (
    "mount umount2 pivot_root unshare setns clone clone3 reboot sethostname setdomainname "
    "chroot name_to_handle_at fsopen fsmount move_mount open_tree mount_setattr"
).split()


def evaluate(policy: Policy, name: str, args: tuple[int, ...] = (0,) * 6) -> Action:
    """What the policy decides for one call, by libseccomp's semantics for our rule shapes
    (rules of one syscall are disjoint, all conditions of a rule must hold)."""
    ops = {
        "EQ": lambda a, c: a == c.value,
        "NE": lambda a, c: a != c.value,
        "MASKED_EQ": lambda a, c: a & c.value == c.value2,
    }
    for rule in policy.rules_for(name):
        if all(ops[c.op](args[c.index], c) for c in rule.args):
            return rule.action
    return policy.default_action


def unconditional(policy: Policy, name: str) -> list[Action]:
    return [r.action for r in policy.rules_for(name) if not r.args]


# --- the default policy ---


@pytest.mark.parametrize("userns", [True, False])
def test_unknown_syscalls_get_enosys_never_eperm(userns: bool) -> None:
    # glibc falls back (clone3 -> clone, ...) only on ENOSYS: moby issue 42680
    policy = default_policy(userns)
    assert policy.default_action == ERRNO(errno.ENOSYS)
    assert evaluate(policy, "no_such_syscall") == ERRNO(errno.ENOSYS)


@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_syscalls_are_eperm(name: str) -> None:
    for userns in (True, False):
        assert unconditional(default_policy(userns), name) == [EPERM]


@pytest.mark.parametrize("name", SYSTEM_NEEDS)
def test_what_systemd_needs_is_allowed(name: str) -> None:
    for userns in (True, False):
        assert unconditional(default_policy(userns), name) == [ALLOW]


def test_io_uring_is_left_to_the_default() -> None:
    policy = default_policy(True)
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register"):
        assert policy.rules_for(name) == []


@pytest.mark.parametrize("userns", [True, False])
def test_no_syscall_mixes_unconditional_and_conditional_rules(userns: bool) -> None:
    # libseccomp silently drops the conditional rules of a syscall that also has an
    # unconditional one (checked with 2.5.4); the policy must never rely on that mix.
    policy = default_policy(userns)
    names = {n for r in policy.rules for n in r.names}
    for name in names:
        rules = policy.rules_for(name)
        plain = [r for r in rules if not r.args]
        assert len(plain) == len(rules) == 1 or not plain, name


def test_personality_only_standard_values() -> None:
    policy = default_policy(True)
    for value in (0, 8, 0x20000, 0x20008, 0xFFFFFFFF):
        assert evaluate(policy, "personality", (value,)) == ALLOW
    for value in (0x0040000, 0x0400000, 0x1_0000_0000):  # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC
        assert evaluate(policy, "personality", (value,)) != ALLOW


def test_mknod_rules_only_with_userns() -> None:
    with_userns = default_policy(True)
    for name, index in (("mknod", 1), ("mknodat", 2)):
        rules = with_userns.rules_for(name)
        assert rules and all(r.args and r.args[0].index == index for r in rules)
        assert unconditional(default_policy(False), name) == [ALLOW]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (stat.S_IFCHR | 0o600, EPERM),
        (stat.S_IFBLK | 0o600, EPERM),
        (stat.S_IFCHR | 0o600 | 1 << 32, EPERM),  # the kernel truncates to umode_t
        (stat.S_IFBLK | 0o644 | 1 << 16, EPERM),
        (stat.S_IFIFO | 0o600, ALLOW),
        (stat.S_IFSOCK | 0o600, ALLOW),
        (stat.S_IFREG | 0o600, ALLOW),
        (0o600, ALLOW),  # type 0 is a regular file
        (stat.S_IFDIR | 0o700, ALLOW),  # the kernel answers (EPERM/EINVAL), not the filter
    ],
)
def test_mknod_mode_filter(mode: int, expected: Action) -> None:
    policy = default_policy(True)
    assert evaluate(policy, "mknod", (0, mode, 0, 0, 0, 0)) == expected
    assert evaluate(policy, "mknodat", (0, 0, mode, 0, 0, 0)) == expected


def test_mknod_rules_cover_every_file_type() -> None:
    for name in ("mknod", "mknodat"):
        values = sorted(r.args[0].value2 for r in default_policy(True).rules_for(name))
        assert values == list(range(0, 0o170000 + 1, 0o010000))


def test_native_and_compat_arches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("uspawn.kernel.seccomp._machine", lambda: "x86_64")
    assert default_policy(True).architectures == ("x86_64", "x86")
    monkeypatch.setattr("uspawn.kernel.seccomp._machine", lambda: "sparc64")
    assert default_policy(True).architectures == ()


# --- model validation ---


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Action("FOO"), 'unknown seccomp action "FOO"'),
        (lambda: ERRNO(70000), "ERRNO value 70000 is out of range 0..65535"),
        (lambda: Action("ALLOW", 1), "ALLOW takes no errno/value (got 1)"),
        (lambda: Arg(6, "EQ", 0), "argument index 6 is out of range 0..5"),
        (lambda: Arg(0, "LIKE", 0), 'unknown comparison "LIKE"'),
        (lambda: Arg(0, "EQ", -1), "argument value -1 is not a uint64"),
        (lambda: Rule((), ALLOW), "a seccomp rule needs at least one non-empty syscall name"),
        (lambda: Policy(ALLOW, architectures=("vax",)), 'unknown seccomp architecture "vax"'),
    ],
)
def test_model_rejects_nonsense(make: object, message: str) -> None:
    with pytest.raises(SeccompPolicyError) as exc:
        make()  # type: ignore[operator]
    assert str(exc.value) == message


# --- OCI conversion ---

OCI_EXAMPLE = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_LOG"],
    "syscalls": [
        {"names": ["read", "write", "no_such_syscall"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
        {"names": ["reboot"], "action": "SCMP_ACT_KILL"},
        {"names": ["ptrace"], "action": "SCMP_ACT_TRACE", "errnoRet": 7},
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ"}],
        },
        {
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 40, "valueTwo": 0, "op": "SCMP_CMP_NE"}],
        },
        # two conditions on one argument: runc adds them as separate rules (OR)
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {"index": 0, "value": 0, "op": "SCMP_CMP_EQ"},
                {"index": 0, "value": 8, "op": "SCMP_CMP_EQ"},
            ],
        },
        # same action as the default: skipped by the compiler, as runc does
        {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},
    ],
}


def test_oci_conversion() -> None:
    policy = policy_from_oci(OCI_EXAMPLE)
    assert policy.default_action == ERRNO(38)
    assert policy.architectures == ("x86_64", "x86", "x32")
    assert policy.flags == ("SECCOMP_FILTER_FLAG_SPEC_ALLOW", "SECCOMP_FILTER_FLAG_LOG")
    actions = [r.action for r in policy.rules]
    assert actions[:5] == [ALLOW, EPERM, ERRNO(13), Action("KILL_THREAD"), Action("TRACE", 7)]
    assert policy.rules[0].names == ("read", "write", "no_such_syscall")
    assert policy.rules[5].args == (Arg(0, "MASKED_EQ", 2114060288, 0),)
    assert policy.rules[6].args == (Arg(0, "NE", 40),)


def test_oci_default_errno_is_eperm() -> None:
    policy = policy_from_oci({"defaultAction": "SCMP_ACT_ERRNO"})
    assert policy.default_action == EPERM
    assert policy.rules == [] and policy.architectures == ()


def test_oci_policy_compiles() -> None:
    bpf = seccomp.compile_bpf(policy_from_oci(OCI_EXAMPLE))
    assert len(bpf) > 0 and len(bpf) % 8 == 0


def bad(path: str, value: object) -> dict[str, object]:
    """OCI_EXAMPLE with one field replaced; path like "syscalls.3.action"."""
    import copy

    obj = copy.deepcopy(OCI_EXAMPLE)
    *parents, last = path.split(".")
    node: object = obj
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value  # type: ignore[index]
    return obj


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            bad("syscalls.3.action", "SCMP_ACT_FOO"),
            'linux.seccomp.syscalls[3].action: unknown action "SCMP_ACT_FOO"',
        ),
        (
            bad("syscalls.0.action", "SCMP_ACT_NOTIFY"),
            'linux.seccomp.syscalls[0].action: action "SCMP_ACT_NOTIFY" is not supported',
        ),
        (
            bad("defaultAction", "SCMP_ACT_NOTIFY"),
            'linux.seccomp.defaultAction: action "SCMP_ACT_NOTIFY" is not supported',
        ),
        (
            bad("syscalls.0.action", 3),
            'linux.seccomp.syscalls[0].action: unknown action "3"',
        ),
        (
            bad("defaultAction", "ALLOW"),
            'linux.seccomp.defaultAction: unknown action "ALLOW"',
        ),
        (
            bad("defaultAction", "SCMP_ACT_ALLOW"),
            'linux.seccomp.defaultErrnoRet: action "SCMP_ACT_ALLOW" takes no errno',
        ),
        (
            bad("syscalls.0", {"names": ["read"], "action": "SCMP_ACT_LOG", "errnoRet": 1}),
            'linux.seccomp.syscalls[0].errnoRet: action "SCMP_ACT_LOG" takes no errno',
        ),
        (
            bad("syscalls.2.errnoRet", -1),
            "linux.seccomp.syscalls[2].errnoRet: expected an unsigned 16-bit integer, got -1",
        ),
        (
            bad("architectures.1", "SCMP_ARCH_VAX"),
            'linux.seccomp.architectures[1]: unknown architecture "SCMP_ARCH_VAX"',
        ),
        (
            bad("flags.0", "SECCOMP_FILTER_FLAG_FOO"),
            'linux.seccomp.flags[0]: unknown flag "SECCOMP_FILTER_FLAG_FOO"',
        ),
        (
            bad("syscalls.5.args.0.op", "SCMP_CMP_LIKE"),
            'linux.seccomp.syscalls[5].args[0].op: unknown operator "SCMP_CMP_LIKE"',
        ),
        (
            bad("syscalls.5.args.0.index", 6),
            "linux.seccomp.syscalls[5].args[0].index: 6 is out of range 0..5",
        ),
        (
            bad("syscalls.5.args.0.value", "0x10"),
            "linux.seccomp.syscalls[5].args[0].value: "
            "expected an unsigned 64-bit integer, got '0x10'",
        ),
        (
            bad("syscalls.1.names", []),
            "linux.seccomp.syscalls[1].names: needs at least one non-empty name",
        ),
        (
            bad("syscalls.1.names", "mkdir"),
            "linux.seccomp.syscalls[1].names: expected an array of strings, got 'mkdir'",
        ),
        (bad("syscalls.1", "mkdir"), "linux.seccomp.syscalls[1]: expected an object"),
        (bad("syscalls", {}), "linux.seccomp.syscalls: expected an array"),
        (
            bad("listenerPath", "/run/agent.sock"),
            "linux.seccomp.listenerPath: seccomp notify is not supported",
        ),
        ({"syscalls": []}, "linux.seccomp.defaultAction: missing (required)"),
    ],
)
def test_oci_errors_name_the_field(obj: dict[str, object], message: str) -> None:
    with pytest.raises(SeccompPolicyError) as exc:
        policy_from_oci(obj)
    assert str(exc.value) == message
    assert isinstance(exc.value, ValueError)


# --- cache key ---


def test_cache_key_is_stable() -> None:
    key = seccomp.cache_key(default_policy(True))
    assert len(key) == 64 and key == seccomp.cache_key(default_policy(True))
    oci = seccomp.cache_key(policy_from_oci(OCI_EXAMPLE))
    assert oci == seccomp.cache_key(policy_from_oci(OCI_EXAMPLE)) != key


def test_cache_key_changes_with_the_policy() -> None:
    base = default_policy(True)
    default, rules, arches = base.default_action, base.rules, base.architectures
    variants = [
        base,
        default_policy(False),
        Policy(EPERM, rules, arches),
        Policy(default, rules, ("x86_64",)),
        Policy(default, rules[:-1], arches),
        Policy(default, [*rules, Rule(("getpid",), EPERM)], arches),
        Policy(default, rules, arches, ("SECCOMP_FILTER_FLAG_LOG",)),
    ]
    assert len({seccomp.cache_key(p) for p in variants}) == len(variants)


def test_cache_key_depends_on_compiler_and_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = default_policy(True)
    key = seccomp.cache_key(policy)
    monkeypatch.setattr(seccomp, "_COMPILER_VERSION", seccomp._COMPILER_VERSION + 1)
    assert seccomp.cache_key(policy) != key
    monkeypatch.undo()
    monkeypatch.setattr(seccomp, "_libseccomp_id", lambda: "libseccomp.so.2.6.0:1:2")
    assert seccomp.cache_key(policy) != key


# --- compiler and cache ---


@pytest.fixture(scope="module")
def compiled() -> bytes:
    return seccomp.compile_bpf(default_policy(True))


def test_compiled_program_shape(compiled: bytes) -> None:
    assert len(compiled) > 0 and len(compiled) % 8 == 0
    assert len(compiled) // 8 <= 4096
    assert compiled[-8] & 0x07 == 0x06  # ends in BPF_RET
    assert seccomp.compile_bpf(default_policy(True)) == compiled  # deterministic
    assert seccomp.compile_bpf(default_policy(False)) != compiled


def test_unknown_names_are_skipped() -> None:
    policy = Policy(ERRNO(errno.ENOSYS), [Rule(("read", "no_such_syscall_at_all"), ALLOW)])
    assert seccomp.compile_bpf(policy) == seccomp.compile_bpf(
        Policy(ERRNO(errno.ENOSYS), [Rule(("read",), ALLOW)])
    )


def test_cache_roundtrip(tmp_path: os.PathLike[str], compiled: bytes) -> None:
    cache = os.path.join(tmp_path, "var", "cache", "seccomp")
    policy = default_policy(True)
    assert seccomp.policy_bpf(policy, cache) == compiled
    path = os.path.join(cache, seccomp.cache_key(policy) + ".bpf")
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    assert os.listdir(cache) == [os.path.basename(path)]  # no temporary left behind
    with open(path, "rb") as f:
        assert f.read() == compiled
    assert seccomp.policy_bpf(policy, cache) == compiled


def test_cache_hit_does_not_import_pyseccomp(tmp_path: os.PathLike[str]) -> None:
    cache = os.path.join(tmp_path, "c")
    seccomp.policy_bpf(default_policy(True), cache)
    code = (
        "import sys\n"
        "from uspawn.kernel import seccomp\n"
        f"bpf = seccomp.policy_bpf(seccomp.default_policy(True), {cache!r})\n"
        "assert len(bpf) % 8 == 0 and bpf\n"
        "assert 'pyseccomp' not in sys.modules, 'cache hit imported pyseccomp'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "content", [b"", b"\x06\x00\x00\x00\x00\x00\x00", b"\x15\x00\x00\x00\x00\x00\x00\x00"]
)
def test_broken_cache_file_is_recompiled(
    tmp_path: os.PathLike[str], compiled: bytes, content: bytes
) -> None:
    cache = os.path.join(tmp_path, "c")
    os.mkdir(cache, 0o700)
    policy = default_policy(True)
    path = os.path.join(cache, seccomp.cache_key(policy) + ".bpf")
    with open(path, "wb") as f:
        f.write(content)  # empty, not whole instructions, not ending in RET
    assert seccomp.policy_bpf(policy, cache) == compiled
    with open(path, "rb") as f:
        assert f.read() == compiled


def test_untrusted_cache_dir_is_ignored(tmp_path: os.PathLike[str], compiled: bytes) -> None:
    cache = os.path.join(tmp_path, "c")
    os.mkdir(cache)
    os.chmod(cache, 0o777)  # anyone could have planted a weaker program
    policy = default_policy(True)
    planted = b"\x06\x00\x00\x00\x00\x00\xff\x7f"  # RET ALLOW
    with open(os.path.join(cache, seccomp.cache_key(policy) + ".bpf"), "wb") as f:
        f.write(planted)
    assert seccomp.policy_bpf(policy, cache) == compiled


def test_unwritable_cache_falls_back_to_memory(
    tmp_path: os.PathLike[str], compiled: bytes
) -> None:
    blocker = os.path.join(tmp_path, "file")
    with open(blocker, "w"):
        pass
    assert seccomp.policy_bpf(default_policy(True), os.path.join(blocker, "c")) == compiled


# --- ioctl: no terminal input injection (TIOCSTI, TIOCLINUX) ---

TIOCSTI, TIOCLINUX, TCGETS, TIOCGWINSZ, TIOCSCTTY = 0x5412, 0x541C, 0x5401, 0x5413, 0x540E


def test_tty_inject_requests_match_the_host() -> None:
    import termios

    assert seccomp.tty_inject_requests() == (termios.TIOCSTI, termios.TIOCLINUX)


@pytest.mark.parametrize("userns", [True, False])
@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        (TIOCSTI, EPERM),
        (TIOCLINUX, EPERM),
        (TIOCSTI | 1 << 32, EPERM),  # the kernel truncates the request to unsigned int
        (TIOCSTI | 0xFFFFFFFF << 32, EPERM),
        (TIOCLINUX | 1 << 63, EPERM),
        (TCGETS, ALLOW),
        (TIOCGWINSZ, ALLOW),
        (TIOCSCTTY, ALLOW),
        (TIOCSTI ^ 1, ALLOW),
        (TIOCSTI ^ 1 << 31, ALLOW),
        (TIOCSTI ^ 1 << 31 | 1 << 40, ALLOW),
        (0, ALLOW),
        (0xFFFFFFFF, ALLOW),
        (0xC0045878, ALLOW),  # FITHAW: anything else is the kernel's business
    ],
)
def test_ioctl_filter_model(userns: bool, cmd: int, expected: Action) -> None:
    assert evaluate(default_policy(userns), "ioctl", (0, cmd, 0, 0, 0, 0)) == expected


def test_complement_masks_partition_the_values() -> None:
    for excluded in ((TIOCSTI, TIOCLINUX), (0,), (0xFFFFFFFF, 0, 0x80017472), (7, 7)):
        pairs = seccomp.complement_masks(excluded)
        # every pair is within 32 bits and matches none of the excluded values
        assert all(m <= 0xFFFFFFFF and v & ~m == 0 for m, v in pairs)
        assert not [(m, v) for m, v in pairs for x in excluded if x & m == v]
        # pairwise disjoint, and together as large as everything else: a partition
        for i, (m1, v1) in enumerate(pairs):
            for m2, v2 in pairs[i + 1:]:
                assert (v1 ^ v2) & m1 & m2, ((m1, v1), (m2, v2))
        covered = sum(1 << (32 - bin(m).count("1")) for m, _ in pairs)
        assert covered == (1 << 32) - len(set(excluded))
        assert len(pairs) <= 32 * len(set(excluded))


# A classic-BPF interpreter for the instructions libseccomp emits, to run the compiled
# program (not only the policy model) over many requests. seccomp_data: nr, arch,
# instruction_pointer, args[6], little-endian.
_AUDIT_ARCH = {"x86_64": 0xC000003E, "x86": 0x40000003}
_NR_IOCTL = {"x86_64": 16, "x86": 54}


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...]) -> int:
    import struct

    data = struct.pack("<IIQ6Q", nr, arch, 0, *args)
    insns = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    acc, mem, pc = 0, [0] * 16, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # ld [k]
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x00:  # ld #k
            acc = k
        elif code == 0x02:  # st M[k]
            mem[k] = acc
        elif code == 0x60:  # ld M[k]
            acc = mem[k]
        elif code == 0x54:  # and #k
            acc &= k
        elif code == 0x05:  # ja
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # jeq, jgt, jge, jset
            taken = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        elif code == 0x06:  # ret #k
            return int(k)
        else:
            raise AssertionError(f"opcode {code:#x} not emulated")


def test_compiled_ioctl_filter(compiled: bytes) -> None:
    import random

    if os.uname().machine != "x86_64":
        pytest.skip("audit arch and syscall numbers listed for x86_64 only")
    ret_eperm, ret_allow = 0x00050000 | errno.EPERM, 0x7FFF0000
    rng = random.Random(19)
    refused = (TIOCSTI, TIOCLINUX)
    requests = [*range(0x5400, 0x5500), *(rng.getrandbits(64) for _ in range(2000))]
    requests += [x ^ 1 << i for x in refused for i in range(64)]
    requests += [x | rng.getrandbits(32) << 32 for x in refused for _ in range(50)]
    for arch in ("x86_64", "x86"):
        width = 64 if arch == "x86_64" else 32  # compat arguments are 32-bit
        for req in requests:
            req &= (1 << width) - 1
            want = ret_eperm if req & 0xFFFFFFFF in refused else ret_allow
            got = run_bpf(compiled, _NR_IOCTL[arch], _AUDIT_ARCH[arch], (3, req, 0, 0, 0, 0))
            assert got == want, (arch, hex(req), hex(got))


def test_oci_profile_gets_the_tty_ioctl_filter() -> None:
    from uspawn.kernel.seccomp import with_tty_ioctl_filter

    # moby's default profile shape: ioctl on the unconditional allow list
    docker = Policy(EPERM, [Rule(("read", "ioctl", "write"), ALLOW)])
    filtered = with_tty_ioctl_filter(docker)
    assert filtered.rules[0].names == ("read", "write")
    assert not [r for r in filtered.rules_for("ioctl") if not r.args]
    for req, want in ((TIOCSTI, EPERM), (TIOCSTI | 1 << 33, EPERM), (TCGETS, ALLOW)):
        assert evaluate(filtered, "ioctl", (0, req, 0, 0, 0, 0)) == want
    seccomp.compile_bpf(filtered)
    # an ALLOW default (uspawn-runc without a profile): only the two refusals
    permissive = with_tty_ioctl_filter(Policy(ALLOW, []))
    assert [r.action for r in permissive.rules] == [EPERM, EPERM]
    assert evaluate(permissive, "ioctl", (0, TIOCLINUX | 1 << 40, 0, 0, 0, 0)) == EPERM
    assert evaluate(permissive, "ioctl", (0, TCGETS, 0, 0, 0, 0)) == ALLOW
    # a profile that refuses ioctl, or filters it itself, is left alone
    for p in (Policy(EPERM, []),
              Policy(ALLOW, [Rule(("ioctl",), ALLOW, (Arg(1, "EQ", TCGETS),))])):
        assert with_tty_ioctl_filter(p) is p
