"""Resource limits (--memory/--cpus/--pids/--property, `uspawn set`, `uspawn status`)
and lxcfs /proc views (issue 16).

Pure parsing first (no root); then containers on the real kernel: the limits
land in the container's cgroup (v1 hierarchies on a hybrid host, cgroup2
elsewhere), a fork bomb stops at TasksMax, a memory hog is OOM-killed inside
while the init lives, `uspawn set` changes a running container, and with lxcfs
/proc/meminfo, /proc/cpuinfo and /sys/devices/system/cpu/online follow.

lxcfs: a host lxcfs is used as found and never stopped. When there is none,
uspawn starts one; this module stops it again at its end only when the
pidfile says uspawn started it and no lxcfs ran before the module.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs
from waits import open_pidfds, read_until, wait_pidfds, wait_state

from uspawn.base.errors import SpecError, UsageError
from uspawn.kernel import cgroups, lxcfs
from uspawn.machine import limits

MiB = 1 << 20


def given(**props: str) -> dict[str, tuple[str, str]]:
    return {k: (v, "--property") for k, v in props.items()}


# --- parsing (no root) -------------------------------------------------------------------


def test_flags_become_systemd_properties() -> None:
    got = limits.from_flags("256M", "2", "200", ["CPUWeight=50"])
    assert got == {"MemoryMax": ("256M", "--memory"), "CPUQuota": ("200%", "--cpus"),
                   "TasksMax": ("200", "--pids"), "CPUWeight": ("50", "--property")}
    assert limits.from_flags(cpus="0.5")["CPUQuota"][0] == "50%"


def test_command_line_wins_over_the_settings_file() -> None:
    got = limits.from_flags("1G", properties=["TasksMax=10"],
                            file_props={"MemoryMax": "2G", "TasksMax": "5", "CPUQuota": "50%"},
                            file_name="/etc/systemd/nspawn/web.nspawn")
    assert got["MemoryMax"] == ("1G", "--memory")
    assert got["TasksMax"] == ("10", "--property")
    assert got["CPUQuota"] == ("50%", "/etc/systemd/nspawn/web.nspawn")


def test_sizes_and_units() -> None:
    assert limits.parse_size("256M") == 256 * MiB
    assert limits.parse_size("1G") == 1 << 30
    assert limits.parse_size("1.5K") == 1536
    assert limits.parse_size("4096") == 4096
    assert limits.parse_size("infinity") == -1
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limits.parse_size("50%") == ram // 2
    assert limits.parse_size("0") == 0  # MemorySwapMax=0: no swap
    for bad in ("abc", "12Q", "-5M", "²M", "150%"):
        with pytest.raises(ValueError):
            limits.parse_size(bad)


def test_oci_resources_from_properties() -> None:
    lim = limits.parse(given(MemoryMax="256M", MemorySwapMax="64M", CPUQuota="150%",
                             TasksMax="200", AllowedCPUs="0"), host_check=False)
    res = lim.resources()
    assert res is not None and res.memory and res.cpu and res.pids
    assert res.memory.limit == 256 * MiB
    assert res.memory.swap == 320 * MiB  # OCI counts memory plus swap
    assert (res.cpu.quota, res.cpu.period, res.cpu.cpus) == (150_000, 100_000, "0")
    assert res.pids.limit == 200
    assert limits.parse({}, host_check=False).resources() is None


def test_cpu_weight_round_trips_through_runcs_conversion() -> None:
    # On cgroup2 the engine writes cpu.weight = cgroups.cpu_weight(shares).
    for weight in (1, 2, 50, 100, 101, 999, 5000, 9999, 10000):
        assert cgroups.cpu_weight(limits.shares_for_v2_weight(weight)) == weight


@pytest.mark.parametrize("props,field", [
    ({"MemoryMax": "lots"}, "MemoryMax"),
    ({"CPUQuota": "2"}, "CPUQuota"),
    ({"CPUQuota": "0.5%"}, "CPUQuota"),
    ({"CPUWeight": "0"}, "CPUWeight"),
    ({"IOWeight": "10001"}, "IOWeight"),
    ({"AllowedCPUs": "3-1"}, "AllowedCPUs"),
    ({"TasksMax": "many"}, "TasksMax"),
    ({"MemorySwapMax": "1G"}, "MemorySwapMax"),  # needs MemoryMax
    ({"MemoryLow": "1G"}, "MemoryLow"),
])
def test_bad_values_are_refused_by_name(props: dict[str, str], field: str) -> None:
    with pytest.raises(UsageError) as exc:
        limits.parse(given(**props), host_check=False)
    assert field in str(exc.value)


def test_a_flag_is_named_in_its_error() -> None:
    with pytest.raises(UsageError, match=r"^--memory 'x'"):
        limits.parse(limits.from_flags(memory="x"), host_check=False)
    with pytest.raises(UsageError, match=r"^--cpus"):
        limits.from_flags(cpus="two")


def test_engine_errors_are_renamed_to_the_property() -> None:
    lim = limits.parse(limits.from_flags(pids="200"), host_check=False)
    exc = limits.renamed(SpecError("linux.resources.pids.limit: the kernel refuses 200"), lim)
    assert str(exc).startswith("TasksMax (from --pids) (linux.resources.pids.limit)")


# --- containers on the real kernel ------------------------------------------------------


@pytest.fixture(scope="module")
def lxcfs_mount(need_root: None) -> Iterator[str | None]:
    """A live lxcfs for the module (the host's, or one uspawn starts); None without lxcfs."""
    before = lxcfs.find()
    if before is not None:
        yield before
        return
    if lxcfs.binary() is None:
        yield None
        return
    mnt, _started = lxcfs.find_or_start()
    yield mnt
    pid = lxcfs.pid_of_started()
    if pid is not None:  # ours: no lxcfs ran before this module
        fds = open_pidfds([pid])
        os.kill(pid, 15)
        wait_pidfds(fds, what="the lxcfs this module started")
        # It unmounts in its own mount namespace; a copy may remain in this one.
        subprocess.run(["umount", "-l", mnt], capture_output=True, check=False)


def hybrid_or_v2(key: str) -> str:
    where = cgroups.placement(key)
    assert where is not None, f"no controller for {key}"
    return where[0]


def cgroup_file(name: str, v1: str, v2: str) -> str:
    for d in cgroup_dirs(name):
        for f in (v1, v2):
            p = os.path.join(d, f)
            if os.path.exists(p):
                return Path(p).read_text().strip()
    raise AssertionError(f"no {v1}/{v2} for {name} in {cgroup_dirs(name)}")


def start(uspawn: Runner, rootfs: Path, name: str, *flags: str) -> subprocess.Popen[str]:
    p = uspawn.popen("run", "-D", str(rootfs), "-M", name, *flags, "--", "sleep", "300",
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_state(uspawn.state, name, p)  # written after the payload's execve
    except AssertionError:
        p.kill()
        raise AssertionError(f"{name} did not start: {p.communicate()}") from None
    return p


def stop(uspawn: Runner, p: subprocess.Popen[str], name: str) -> None:
    uspawn.run("stop", name, "--timeout", "2")
    p.wait(timeout=20)
    assert cgroup_dirs(name) == []


def test_limits_reach_the_cgroup_and_status(uspawn: Runner, rootfs: Path) -> None:
    p = start(uspawn, rootfs, "lim1", "--memory", "256M", "--cpus", "1.5", "--pids", "200")
    try:
        assert cgroup_file("lim1", "memory.limit_in_bytes", "memory.max") == str(256 * MiB)
        assert cgroup_file("lim1", "pids.max", "pids.max") == "200"
        quota = cgroup_file("lim1", "cpu.cfs_quota_us", "cpu.max")
        assert quota in ("150000", "150000 100000")
        out = uspawn.run("status", "lim1").stdout
        assert "Memory:" in out and "of 256.0M" in out
        assert "Tasks:       1 of 200" in out
        assert "limit 1.5 CPUs" in out
    finally:
        stop(uspawn, p, "lim1")


def test_set_changes_a_running_container(uspawn: Runner, rootfs: Path) -> None:
    p = start(uspawn, rootfs, "lim2", "--memory", "256M", "--pids", "100")
    try:
        r = uspawn.run("set", "lim2", "MemoryMax=512M", "TasksMax=300")
        assert r.returncode == 0, r.stderr
        # Started without a CPU limit: on a hybrid host the container is not in the
        # v1 cpu hierarchy; refused by name (joining would leave a directory behind).
        r = uspawn.run("set", "lim2", "CPUQuota=50%")
        if hybrid_or_v2("cpu.quota") == "v1":
            assert r.returncode == 125 and r.stderr.startswith("uspawn: CPUQuota:"), r.stderr
        else:
            assert r.returncode == 0, r.stderr
        assert cgroup_file("lim2", "memory.limit_in_bytes", "memory.max") == str(512 * MiB)
        assert cgroup_file("lim2", "pids.max", "pids.max") == "300"
        assert "of 512.0M" in uspawn.run("status", "lim2").stdout
        r = uspawn.run("set", "lim2", "MemoryMax=lots")
        assert r.returncode == 2 and r.stderr.startswith("uspawn: MemoryMax: 'lots'"), r.stderr
        assert uspawn.run("set", "nosuch", "MemoryMax=1G").returncode != 0
    finally:
        stop(uspawn, p, "lim2")


def test_fork_bomb_stops_at_tasks_max(uspawn: Runner, rootfs: Path) -> None:
    # The bomb in a subshell that dies at the first failed fork; the init then
    # execs (no fork needed) and the test counts from the host.
    script = ("(n=0; while [ $n -lt 400 ]; do sleep 60 & n=$((n+1)); done) 2>/dev/null; "
              "echo bomb-done; exec sleep 60")
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "bomb", "--pids", "200", "--", "sh", "-c",
                     script, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "bomb-done"
        tasks = int(cgroup_file("bomb", "pids.current", "pids.current"))
        assert 150 < tasks <= 200, tasks
        events = cgroup_file("bomb", "pids.events", "pids.events")
        assert int(events.split()[-1]) > 0, events  # forks refused at the limit
        # The host is unaffected: it still forks.
        child = os.fork()
        if child == 0:
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
    finally:
        stop(uspawn, p, "bomb")


def test_memory_hog_is_oom_killed_inside_and_init_lives(uspawn: Runner, rootfs: Path) -> None:
    # dd fills a 300M buffer from /dev/zero: over the 128M limit (no swap beyond it).
    script = ("dd if=/dev/zero of=/dev/null bs=300M count=1 2>/dev/null; echo hog=$?; "
              "echo init-alive")
    r = uspawn.run("run", "-D", str(rootfs), "-M", "hog", "--memory", "128M",
                   "--property", "MemorySwapMax=0", "--", "sh", "-c", script, timeout=120)
    assert "hog=137" in r.stdout, r.stdout + r.stderr  # SIGKILL by the OOM killer
    assert "init-alive" in r.stdout
    assert r.returncode == 0


def test_limit_the_host_cannot_apply_is_an_error(uspawn: Runner, rootfs: Path) -> None:
    for key, prop in (("memory.high", "MemoryHigh=1G"), ("io.weight", "IOWeight=200")):
        why = cgroups.why_not(key)
        r = uspawn.run("run", "-D", str(rootfs), "-M", "nolim", "--property", prop, "--",
                       "true")
        if why is None:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode == 125
            assert r.stderr.strip().splitlines()[-1].startswith(
                f"uspawn: {prop.split('=')[0]}"), r.stderr
        assert cgroup_dirs("nolim") == []


def test_bad_flag_is_a_usage_error(uspawn: Runner, rootfs: Path) -> None:
    r = uspawn.run("run", "-D", str(rootfs), "--memory", "lots", "--", "true")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("uspawn: --memory 'lots'")


def test_lxcfs_views_follow_the_limits(uspawn: Runner, rootfs: Path,
                                       lxcfs_mount: str | None) -> None:
    if lxcfs_mount is None:
        pytest.skip("lxcfs is not installed (apt install lxcfs)")
    p = start(uspawn, rootfs, "lxv", "--lxcfs=yes", "--memory", "256M", "--cpus", "1")
    try:
        def inside(*cmd: str) -> str:
            r = uspawn.run("exec", "lxv", "--", *cmd)
            assert r.returncode == 0, r.stderr
            return r.stdout

        assert "MemTotal:         262144 kB" in inside("cat", "/proc/meminfo")
        assert inside("cat", "/proc/cpuinfo").count("processor") == 1
        assert inside("cat", "/sys/devices/system/cpu/online").strip() == "0"
        assert float(inside("cat", "/proc/uptime").split()[0]) < 60
        # `uspawn set` raises the limit live and the view follows.
        assert uspawn.run("set", "lxv", "MemoryMax=512M").returncode == 0
        assert "MemTotal:         524288 kB" in inside("cat", "/proc/meminfo")
        assert "Mem:" in inside("free")
    finally:
        stop(uspawn, p, "lxv")


def test_lxcfs_off(uspawn: Runner, rootfs: Path) -> None:
    r = uspawn.run("run", "-D", str(rootfs), "--lxcfs=no", "--memory", "256M", "--",
                   "grep", "-c", "lxcfs", "/proc/mounts")
    assert r.stdout.strip() == "0"


def test_boot_has_lxcfs_by_default_and_set_works(uspawn: Runner, rootfs: Path,
                                                 lxcfs_mount: str | None) -> None:
    """`boot` (busybox init): lxcfs views by default; memory, cpu and pids
    joined from the start, so `uspawn set` works on a machine booted without limits."""
    p = uspawn.popen("boot", "-D", str(rootfs), "-M", "limboot", stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_state(uspawn.state, "limboot", p)
        r = uspawn.run("set", "limboot", "MemoryMax=300M", "TasksMax=50", "CPUQuota=50%")
        assert r.returncode == 0, r.stderr
        assert cgroup_file("limboot", "memory.limit_in_bytes", "memory.max") == str(300 * MiB)
        if lxcfs_mount is not None:
            r = uspawn.run("exec", "limboot", "--", "cat", "/proc/meminfo")
            assert "MemTotal:         307200 kB" in r.stdout, r.stdout + r.stderr
    finally:
        uspawn.run("stop", "limboot", "--timeout", "3")
        p.wait(timeout=30)
    assert cgroup_dirs("limboot") == []


def test_exec_joins_the_limits(uspawn: Runner, rootfs: Path) -> None:
    """`uspawn exec` joins every hierarchy the init is in: on a hybrid host the v1
    memory/pids/cpu cgroups too (it joined only cgroup2, and escaped the limits)."""
    p = start(uspawn, rootfs, "lim3", "--memory", "64M", "--pids", "50", "--cpus", "1")
    try:
        r = uspawn.run("exec", "lim3", "--", "cat", "/proc/self/cgroup")
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines():
            _hid, ctrls, path = line.split(":", 2)
            if ctrls in ("memory", "pids", "cpu"):
                assert path == "/", r.stdout  # the container's cgroup namespace root
        r = uspawn.run("exec", "lim3", "--", "sh", "-c",
                       "dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo hog=$?")
        assert "hog=137" in r.stdout, r.stdout + r.stderr
    finally:
        stop(uspawn, p, "lim3")


def test_exec_at_the_task_limit_is_one_line(uspawn: Runner, rootfs: Path) -> None:
    # sh and its two sleeps fill the limit; `echo` is a builtin (no fork).
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "full", "--pids", "3", "--", "sh", "-c",
                     "sleep 60 & sleep 60 & echo full; wait", stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        read_until(p.stdout.fileno(), b"full\n")
        assert cgroup_file_or("full", "pids.current") == "3"
        r = uspawn.run("exec", "full", "--", "true")
        assert r.returncode == 126
        assert r.stderr.strip() == ("uspawn: exec: fork in the container: EAGAIN (its task "
                                    "limit, TasksMax or --pids, is reached; see `uspawn "
                                    "status`)"), r.stderr
    finally:
        stop(uspawn, p, "full")


def cgroup_file_or(name: str, f: str) -> str | None:
    try:
        return cgroup_file(name, f, f)
    except AssertionError:
        return None


def test_limits_from_a_settings_file(uspawn: Runner, rootfs: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """[X-Uspawn-Resources] of NAME.nspawn goes through the same path as the flags;
    the command line wins per key; a bad value names the file."""
    from uspawn.machine import settings

    machines = tmp_path / "machines"
    machines.mkdir(mode=0o700)
    os.rename(rootfs, machines / "bb")
    trusted = tmp_path / "nspawn"
    trusted.mkdir()
    monkeypatch.setenv(settings.ENV_MACHINES_DIR, str(machines))
    monkeypatch.setenv(settings.ENV_TRUSTED_DIRS, str(trusted))
    nspawn = trusted / "bb.nspawn"
    nspawn.write_text("[X-Uspawn-Resources]\nMemoryMax=200M\nTasksMax=77\n")
    p = uspawn.popen("run", "-M", "bb", "--memory", "300M", "--", "sleep", "300",
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_state(uspawn.state, "bb", p)
        assert cgroup_file("bb", "memory.limit_in_bytes", "memory.max") == str(300 * MiB)
        assert cgroup_file("bb", "pids.max", "pids.max") == "77"
    finally:
        stop(uspawn, p, "bb")
    nspawn.write_text("[X-Uspawn-Resources]\nCPUQuota=lots\n")
    r = uspawn.run("run", "-M", "bb", "--", "true")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"uspawn: CPUQuota=lots ({nspawn}): 'lots' is not a percentage (N%)"), r.stderr


# --- the Debian fixture: systemd, procps's free, nginx ----------------------------------

DEB = "limdeb"


@pytest.fixture(scope="module")
def debian_machine(tmp_path_factory: pytest.TempPathFactory, need_root: None,
                   lxcfs_mount: str | None) -> Iterator[Runner]:
    try:
        from fixtures.debian_tree import copy_debian_tree
    except ImportError as exc:
        pytest.skip(f"fixture module missing: {exc}")
    base = tmp_path_factory.mktemp("limmachines")
    base.chmod(0o700)
    tree = base / DEB
    try:
        copy_debian_tree(tree)
    except Exception as exc:  # debootstrap needs the Debian mirror
        pytest.skip(f"cannot build the Debian fixture: {exc}")
    runner = Runner(tmp_path_factory.mktemp("limstate"))
    r = runner.run("boot", "-D", str(tree), "-M", DEB, "--memory", "256M", "--cpus", "1",
                   "--pids", "200", "--detach", timeout=150)
    assert r.returncode == 0, r.stderr
    yield runner
    runner.run("stop", DEB, "--timeout", "10", timeout=60)
    assert cgroup_dirs(DEB) == []


def dsh(m: Runner, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return m.run("exec", DEB, "--", "sh", "-c", script, timeout=timeout)


def test_debian_free_and_cpus_follow_the_limits(debian_machine: Runner,
                                                lxcfs_mount: str | None) -> None:
    if lxcfs_mount is None:
        pytest.skip("lxcfs is not installed")
    out = dsh(debian_machine, "free -m").stdout
    assert out.splitlines()[1].split()[:2] == ["Mem:", "256"], out
    assert dsh(debian_machine, "getconf _NPROCESSORS_ONLN").stdout.strip() == "1"
    assert dsh(debian_machine, "grep -c ^processor /proc/cpuinfo").stdout.strip() == "1"
    # nginx's worker_processes auto counts online CPUs (sysconf): one for --cpus 1.
    # A served request proves the master forked its workers (it forks all of them
    # before any can accept): count them after one answer, not after a nap.
    r = debian_machine.run(
        "exec", DEB, "--", "bash", "-c",
        "systemctl is-active nginx >/dev/null || systemctl start nginx; "
        "grep -c '^worker_processes auto' /etc/nginx/nginx.conf; "
        "exec 3<>/dev/tcp/127.0.0.1/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && "
        "head -c 12 <&3 >/dev/null && exec 3>&-; "
        "ps -C nginx -o args= | grep -c 'worker process'")
    assert r.stdout.split() == ["1", "1"], r.stdout + r.stderr


def test_debian_memory_hog_killed_and_systemd_stays_up(debian_machine: Runner) -> None:
    r = dsh(debian_machine, "dd if=/dev/zero of=/dev/null bs=400M count=1 2>/dev/null; "
            "echo hog=$?")
    assert "hog=137" in r.stdout, r.stdout + r.stderr
    r = debian_machine.run("exec", DEB, "--", "systemctl", "is-system-running")
    assert r.stdout.strip() == "running", r.stdout + r.stderr


def test_debian_fork_bomb_stops_at_tasks_max(debian_machine: Runner) -> None:
    # 400 children wanted (perl-base is in every Debian: a failed fork is undef, where
    # dash exits and bash retries with back-off). It says when it is done forking
    # and, on a line from us, kills and reaps them all: the bomb ends by our hand,
    # not by a timer.
    bomb = ('$| = 1; my @kids; for (1..400) { my $pid = fork; next unless defined $pid; '
            'if (!$pid) { sleep 600; exit 0 } push @kids, $pid } '
            'print "bombed ", scalar(@kids), "\\n"; <STDIN>; kill "TERM", @kids; '
            'waitpid($_, 0) for @kids; print "reaped\\n"')
    p = debian_machine.popen("exec", DEB, "--", "perl", "-e", bomb, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdin is not None
        line = read_until(p.stdout.fileno(), b"\n", timeout=120)
        assert line.startswith(b"bombed "), line
        assert 150 <= int(line.split()[1]) < 200, line  # the rest hit TasksMax
        tasks = int(cgroup_file(DEB, "pids.current", "pids.current"))
        assert tasks <= 200
        events = cgroup_file(DEB, "pids.events", "pids.events")
        assert int(events.split()[-1]) > 0, events
        child = os.fork()  # the host still forks
        if child == 0:
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        out, err = p.communicate(input="\n", timeout=120)
        assert p.returncode == 0 and out.strip().endswith("reaped"), (out, err)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert int(cgroup_file(DEB, "pids.current", "pids.current")) < 150
    r = debian_machine.run("exec", DEB, "--", "systemctl", "is-system-running")
    assert r.stdout.strip() == "running", r.stdout + r.stderr


def test_debian_set_raises_memory_and_free_follows(debian_machine: Runner,
                                                  lxcfs_mount: str | None) -> None:
    r = debian_machine.run("set", DEB, "MemoryMax=512M")
    assert r.returncode == 0, r.stderr
    out = debian_machine.run("status", DEB).stdout
    assert "of 512.0M" in out and "Tasks:" in out and "limit 1 CPUs" in out, out
    if lxcfs_mount is not None:
        out = dsh(debian_machine, "free -m").stdout
        assert out.splitlines()[1].split()[:2] == ["Mem:", "512"], out
