"""Regression tests for the OCI conformance defects of issue 13 (engine side).

Each test drives uspawn-runc with a bundle the way the runtime-tools validation
suite or runc's users do, on the real kernel.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
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


def _set_mount(cfg: Cfg, dest: str, **fields: Any) -> None:
    cfg["mounts"] = [m for m in cfg["mounts"] if m["destination"] != dest]
    cfg["mounts"].append({"destination": dest, **fields})


def _mountinfo_line(out: str, dest: str) -> list[str]:
    for ln in out.splitlines():
        parts = ln.split()
        if len(parts) > 4 and parts[4] == dest:
            return parts
    raise AssertionError(f"no mount on {dest} in:\n{out}")


def test_mount_sources_and_options_are_honoured(oci: Oci, rootfs: Path,
                                                tmp_path: Path) -> None:
    """/dev size=65536k used to give 4m; /proc showed source "none"."""
    def edit(cfg: Cfg) -> None:
        _set_mount(cfg, "/dev", type="tmpfs", source="devsrc",
                   options=["nosuid", "strictatime", "mode=755", "size=65536k"])
        _set_mount(cfg, "/proc", type="proc", source="procsrc", options=["nosuid"])
        _set_mount(cfg, "/sys", type="sysfs", source="syssrc", options=["nosuid", "ro"])
        _set_mount(cfg, "/tmp", type="tmpfs", source="tmpsrc",
                   options=["nosuid", "size=1m", "mode=1770"])

    b = bundle_with(tmp_path, rootfs, ["sh", "-c", "cat /proc/self/mountinfo; echo ===; "
                                       "stat -c %a /tmp"], edit)
    r = oci("run", "-b", str(b), _cid("mnt"), check=False)
    assert r.returncode == 0, r.stderr
    info, rest = r.stdout.split("===")
    for dest, src in (("/dev", "devsrc"), ("/proc", "procsrc"), ("/sys", "syssrc"),
                      ("/tmp", "tmpsrc")):
        line = _mountinfo_line(info, dest)
        assert line[line.index("-") + 2] == src, line
    assert "ro" in _mountinfo_line(info, "/sys")[5].split(",")
    assert "size=65536k" in _mountinfo_line(info, "/dev")[-1].split(",")
    assert "size=1024k" in _mountinfo_line(info, "/tmp")[-1].split(",")
    assert rest.split() == ["1770"]


def test_fifo_device_and_ptmx_node(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    def edit(cfg: Cfg) -> None:
        cfg["linux"]["devices"] = [
            {"path": "/dev/myfifo", "type": "p", "fileMode": 0o640},
            {"path": "/dev/ptmx", "type": "c", "major": 5, "minor": 2, "fileMode": 0o666}]

    b = bundle_with(tmp_path, rootfs, ["sh", "-c", "stat -c '%F %a' /dev/myfifo; "
                                       "stat -c %F /dev/ptmx"], edit)
    r = oci("run", "-b", str(b), _cid("dev"), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["fifo 640", "character special file"]


def test_readonly_dev_tmpfs(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    def edit(cfg: Cfg) -> None:
        _set_mount(cfg, "/dev", type="tmpfs", source="tmpfs",
                   options=["nosuid", "mode=755", "ro"])

    b = bundle_with(tmp_path, rootfs, ["sh", "-c", "echo x > /dev/null && touch /dev/new; "
                                       "echo rc=$?"], edit)
    r = oci("run", "-b", str(b), _cid("rodev"), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("rc=1"), r.stdout


def test_resources_devices_deny_a_listed_node(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """A node in linux.devices that linux.resources.devices denies does not open
    (the default nodes stay usable, as runc appends them after the rules)."""
    def edit(cfg: Cfg) -> None:
        cfg["linux"]["devices"] = [
            {"path": "/dev/mytun", "type": "c", "major": 10, "minor": 200},
            {"path": "/dev/myfuse", "type": "c", "major": 10, "minor": 229}]
        cfg["linux"]["resources"] = {"devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "r"}]}

    # opening is what the device cgroup decides; nothing is read or written
    script = ("for n in mytun myfuse null; do (exec 3</dev/$n) 2>/dev/null && echo $n:r "
              "|| echo $n:-; (exec 3>/dev/$n) 2>/dev/null && echo $n:w || echo $n:-; done")
    b = bundle_with(tmp_path, rootfs, ["sh", "-c", script], edit)
    r = oci("run", "-b", str(b), _cid("devr"), check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["mytun:-", "mytun:-", "myfuse:r", "myfuse:-", "null:r",
                                "null:w"]


def test_device_rule_evaluation() -> None:
    from uspawn.engine import spec as S
    from uspawn.engine.plan import device_access

    R = S.DeviceRule
    assert device_access([], "c", 1, 3) == "rwm"
    rules = [R(allow=False, access="rwm"), R(allow=True, type="c", major=1, access="rw"),
             R(allow=False, type="c", major=1, minor=3, access="w")]
    assert device_access(rules, "c", 1, 5) == "rw"
    assert device_access(rules, "c", 1, 3) == "r"
    assert device_access(rules, "b", 1, 5) == ""
    assert device_access(rules, "p", 0, 0) == "rwm"


def test_relative_bind_source_is_in_the_bundle(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    def edit(cfg: Cfg) -> None:
        cfg["mounts"].append({"destination": "/data", "type": "bind", "source": "shared",
                              "options": ["rbind", "ro"]})

    b = bundle_with(tmp_path, rootfs, ["cat", "/data/hello"], edit)
    (b / "shared").mkdir()
    (b / "shared" / "hello").write_text("from-bundle\n")
    r = oci("run", "-b", str(b), _cid("rel"), check=False)
    assert r.returncode == 0 and r.stdout == "from-bundle\n", r.stderr


def _cgroup_file(pid: int, ctrl: str, name: str) -> str:
    """A cgroup file of pid: the v1 hierarchy of ctrl, else cgroup2."""
    from uspawn.kernel.cgroups import detect_layout

    _layout, unified = detect_layout()
    with open(f"/proc/{pid}/cgroup") as f:
        rows = [ln.rstrip("\n").split(":", 2) for ln in f]
    for _, ctrls, path in rows:
        if ctrl in ctrls.split(","):
            return (Path("/sys/fs/cgroup", ctrl, path.lstrip("/")) / name).read_text().strip()
    for _, ctrls, path in rows:
        if ctrls == "" and unified:
            return (Path(unified + path) / name).read_text().strip()
    raise AssertionError(f"no {ctrl} cgroup for {pid}")


def test_cgroup_settings_reach_the_kernel(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """cpu.shares, a period-only CPU setting, memory reservation, swap, swappiness,
    disableOOMKiller and cpuset used to be dropped (or their hierarchy not joined)."""
    from uspawn.kernel.cgroups import cpu_weight, detect_layout

    layout, _ = detect_layout()
    v1 = layout != "unified"
    cpus = sorted(os.sched_getaffinity(0))[0]
    memory: dict[str, Any] = {"limit": 64 << 20, "reservation": 32 << 20,
                              "swap": 128 << 20}
    if v1:
        memory.update(swappiness=10, disableOOMKiller=True)

    def edit(cfg: Cfg) -> None:
        cfg["linux"]["cgroupsPath"] = f"/uspawn-test-{cid}"
        cfg["linux"]["resources"] = {"memory": memory,
                                     "cpu": {"shares": 512, "period": 50000,
                                             "cpus": str(cpus), "mems": "0"}}

    cid = _cid("cgs")
    b = bundle_with(tmp_path, rootfs, ["sleep", "60"], edit)
    oci("create", "-b", str(b), cid)
    pid = int(json.loads(oci("state", cid).stdout)["pid"])
    if v1:
        assert _cgroup_file(pid, "cpu", "cpu.shares") == "512"
        assert _cgroup_file(pid, "cpu", "cpu.cfs_period_us") == "50000"
        assert _cgroup_file(pid, "memory", "memory.soft_limit_in_bytes") == str(32 << 20)
        assert _cgroup_file(pid, "memory", "memory.memsw.limit_in_bytes") == str(128 << 20)
        assert _cgroup_file(pid, "memory", "memory.swappiness") == "10"
        assert "oom_kill_disable 1" in _cgroup_file(pid, "memory", "memory.oom_control")
    else:
        assert _cgroup_file(pid, "cpu", "cpu.weight") == str(cpu_weight(512))
        assert _cgroup_file(pid, "cpu", "cpu.max") == "max 50000"
        assert _cgroup_file(pid, "memory", "memory.low") == str(32 << 20)
        assert _cgroup_file(pid, "memory", "memory.swap.max") == str(64 << 20)
    assert _cgroup_file(pid, "cpuset", "cpuset.cpus") == str(cpus)
    oci("delete", "--force", cid)


@pytest.mark.parametrize(("resources", "field"), [
    ({"cpu": {"period": 10}}, "linux.resources.cpu.period"),
    ({"memory": {"swappiness": 300}}, "linux.resources.memory.swappiness"),
    ({"cpu": {"cpus": "9999"}}, "linux.resources.cpu.cpus"),
])
def test_invalid_cgroup_setting_names_the_field(oci: Oci, rootfs: Path, tmp_path: Path,
                                                resources: Cfg, field: str) -> None:
    def edit(cfg: Cfg) -> None:
        cfg["linux"]["resources"] = resources

    b = bundle_with(tmp_path, rootfs, ["true"], edit)
    r = oci("run", "-b", str(b), _cid("bad"), check=False)
    assert r.returncode != 0 and field in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cpu_weight_conversion() -> None:
    from uspawn.kernel.cgroups import cpu_weight

    assert (cpu_weight(2), cpu_weight(1024), cpu_weight(262144)) == (1, 39, 10000)


def test_create_container_hook_runs_in_the_container_mount_namespace(
        oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """runtime-spec: createContainer runs in the container namespace, before
    pivot_root, its path resolved in the runtime's root. It used to run on the host."""
    import tempfile

    hookdir = Path(tempfile.mkdtemp(prefix="uspawn-hook-"))
    try:
        hookdir.chmod(0o755)  # reachable by container root (an unmapped host uid)
        hook = hookdir / "hook.sh"
        hook.write_text("#!/bin/sh\necho hook-mnt=$(readlink /proc/self/ns/mnt)\n")
        hook.chmod(0o755)

        def edit(cfg: Cfg) -> None:
            cfg["hooks"] = {"createContainer": [{"path": str(hook)}]}

        b = bundle_with(tmp_path, rootfs, ["readlink", "/proc/self/ns/mnt"], edit)
        r = oci("run", "-b", str(b), _cid("hook"), check=False)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.split()
        assert len(lines) == 2 and lines[0] == f"hook-mnt={lines[1]}", r.stdout
        assert lines[1] != os.readlink("/proc/self/ns/mnt")
    finally:
        for f in hookdir.iterdir():
            f.unlink()
        hookdir.rmdir()


def test_join_pid_namespace_by_path(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    import subprocess

    # The forked child is the one in the new pid namespace: its line says it runs.
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c",
                               "echo up; exec sleep 100"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        [kid] = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
        path = f"/proc/{kid}/ns/pid"
        assert os.readlink(path) != os.readlink("/proc/self/ns/pid")

        def edit(cfg: Cfg) -> None:
            linux = cfg["linux"]
            linux["namespaces"] = [n for n in linux["namespaces"]
                                   if n["type"] not in ("user", "pid")]
            linux["namespaces"].append({"type": "pid", "path": path})
            linux.pop("uidMappings", None)
            linux.pop("gidMappings", None)

        b = bundle_with(tmp_path, rootfs, ["sh", "-c", "readlink /proc/self/ns/pid; echo $$"],
                        edit)
        r = oci("run", "-b", str(b), _cid("pidj"), check=False)
        assert r.returncode == 0, r.stderr
        ns, pid = r.stdout.split()
        assert ns == os.readlink(path) and pid != "1"
    finally:
        holder.kill()
        holder.wait()


# With a user namespace (make_bundle's default); without one both run, as with runc
# (tests/test_oci_namespaces.py). A pid namespace joined by path with a new user
# namespace works since stage A's helper mounts its proc (tests/test_oci_namespaces.py).
@pytest.mark.parametrize("what", ["mount-path", "no-mount"])
def test_unsupported_namespace_configs_name_the_reason(oci: Oci, rootfs: Path, tmp_path: Path,
                                                       what: str) -> None:
    def edit(cfg: Cfg) -> None:
        nss = cfg["linux"]["namespaces"]
        if what == "mount-path":
            nss[:] = [n for n in nss if n["type"] != "mount"]
            nss.append({"type": "mount", "path": "/proc/self/ns/mnt"})
        else:
            nss[:] = [n for n in nss if n["type"] != "mount"]

    b = bundle_with(tmp_path, rootfs, ["true"], edit)
    r = oci("run", "-b", str(b), _cid("ns"), check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "namespace" in r.stderr, r.stderr
