"""runc's command line where containerd, CRI and podman use it (issue 13, issue 14's wordings):
kill ID 0, --log written before stderr, ps options, --pid-file checks, exec into a created
container, exec --preserve-fds, the exec pty's owner and size, update, events.

Driven through uspawn-runc as tests/test_oci.py does (USPAWN_OCI_RUNTIME compares
with runc).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from test_oci import (
    Oci,
    _console_listener,
    _recv_fd,
    make_bundle,
    runtime_cmd,
    wait_stopped,
)
from waits import read_until, wait_file


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _running(oci: Oci, tmp_path: Path, rootfs: Path, cid: str,
             resources: dict[str, object] | None = None, args: list[str] | None = None) -> int:
    """A started container running `sleep 100`; returns its init pid."""
    b = make_bundle(tmp_path, rootfs, args or ["sleep", "100"])
    if resources is not None:
        cfg = json.loads((b / "config.json").read_text())
        cfg["linux"]["resources"] = resources
        (b / "config.json").write_text(json.dumps(cfg))
    oci("create", "--bundle", str(b), cid, stdout=subprocess.DEVNULL)
    oci("start", cid)
    return int(json.loads(oci("state", cid).stdout)["pid"])


def _one_line(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- kill ---------------------------------------------------------------------------


def test_kill_signal_0_checks_existence(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    cid = _cid("k0")
    _running(oci, tmp_path, rootfs, cid)
    oci("kill", cid, "0")
    oci("kill", cid, "SIG0")
    assert oci.status(cid) == "running"  # signal 0 delivered nothing
    oci("kill", cid, "KILL")
    wait_stopped(oci, cid)
    r = oci("kill", cid, "0", check=False)
    assert r.returncode == 1 and "container not running" in r.stderr, r.stderr
    _one_line(r)
    r = oci("kill", cid, "KILL", check=False)  # issue 14: containerd matches runc's wording
    assert r.returncode == 1 and "container not running" in r.stderr, r.stderr
    r = oci("kill", "no-such-id", "0", check=False)
    assert r.returncode == 1 and "does not exist" in r.stderr


# --- --log --------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_written_when_stderr_is_read_only(oci: Oci, tmp_path: Path, fmt: str) -> None:
    """containerd's shim hands the runtime a read-only /dev/null as stderr: the error
    must still reach --log (issue 14: it was written after the failing stderr write)."""
    log = tmp_path / "log.json"
    with open("/dev/null") as ro:  # O_RDONLY: every write to fd 2 fails with EBADF
        for args in (["state", "nope"], ["kill", "nope", "NOSUCHSIG"], ["nosuchcommand"]):
            p = subprocess.run([*runtime_cmd(), "--root", str(oci.root), "--log", str(log),
                                "--log-format", fmt, *args], stderr=ro,
                               stdout=subprocess.DEVNULL, timeout=60)
            assert p.returncode in (1, 2), args
    lines = log.read_text().splitlines()
    assert len(lines) == 3, lines
    if fmt == "json":
        recs = [json.loads(ln) for ln in lines]
        assert all(r["level"] == "error" for r in recs)
        assert "does not exist" in recs[0]["msg"] and "NOSUCHSIG" in recs[1]["msg"]
        assert "nosuchcommand" in recs[2]["msg"]
    else:
        assert "does not exist" in lines[0] and "level=error" in lines[0]


# --- ps -----------------------------------------------------------------------------


def test_ps_passes_options_and_fails_in_one_line_without_ps(oci: Oci, rootfs: Path,
                                                            tmp_path: Path) -> None:
    cid = _cid("ps")
    pid = _running(oci, tmp_path, rootfs, cid)
    r = oci("ps", cid, "--", "-eo", "pid,comm")
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["PID", "COMMAND"]
    assert [ln.split() for ln in rows] == [[str(pid), "sleep"]]
    lines = oci("ps", cid, "--", "-ef").stdout.splitlines()
    assert lines[0].split()[:2] == ["UID", "PID"] and len(lines) == 2
    assert json.loads(oci("ps", "--format", "json", cid).stdout) == [pid]
    empty = tmp_path / "emptybin"
    empty.mkdir()
    p = subprocess.run([*runtime_cmd(), "--root", str(oci.root), "ps", cid],
                       capture_output=True, text=True, env={**os.environ, "PATH": str(empty)},
                       timeout=60)
    assert p.returncode == 1 and "ps(1)" in p.stderr
    _one_line(subprocess.CompletedProcess(p.args, p.returncode, p.stdout, p.stderr))


# --- --pid-file ---------------------------------------------------------------------


def test_pid_file_in_missing_directory_refused_before_anything(oci: Oci, rootfs: Path,
                                                               tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sleep", "100"])
    missing = tmp_path / "missing" / "dir" / "p"
    r = oci("create", "--bundle", str(b), "--pid-file", str(missing), "pf", check=False)
    assert r.returncode == 1 and "missing/dir" in r.stderr
    _one_line(r)
    assert oci("list", "-q").stdout.strip() == ""  # no container was made
    oci("create", "--bundle", str(b), "pf", stdout=subprocess.DEVNULL)
    oci("start", "pf")
    marker = tmp_path / "ran"
    # The bundle's rootfs is the container's /: a marker there shows whether it ran.
    r = oci("exec", "--pid-file", str(missing), "pf", "sh", "-c", "touch /tmp/ran-marker",
            check=False)
    assert r.returncode == 1 and "missing/dir" in r.stderr
    _one_line(r)
    assert not (b / "rootfs" / "tmp" / "ran-marker").exists() and not marker.exists()


# --- exec ---------------------------------------------------------------------------


def test_exec_into_created_container(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "echo started > /tmp/started; sleep 100"])
    oci("create", "--bundle", str(b), "cr", stdout=subprocess.DEVNULL)
    assert oci.status("cr") == "created"
    r = oci("exec", "cr", "sh", "-c", "echo in-$((6*7)); cat /proc/self/uid_map")
    assert r.stdout.split()[:3] == ["in-42", "0", "200000"]
    assert oci.status("cr") == "created"  # exec does not start the container
    assert not (b / "rootfs" / "tmp" / "started").exists()
    oci("start", "cr")
    wait_file(b / "rootfs" / "tmp" / "started")  # the init ran its command


def test_exec_stopped_container_says_not_running(oci: Oci, rootfs: Path,
                                                 tmp_path: Path) -> None:
    _running(oci, tmp_path, rootfs, "xs", args=["true"])
    wait_stopped(oci, "xs")
    r = oci("exec", "xs", "true", check=False)
    assert r.returncode == 1 and "container not running" in r.stderr
    _one_line(r)


def test_exec_preserve_fds(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    cid = _cid("pfd")
    _running(oci, tmp_path, rootfs, cid)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    spare = os.open("/dev/null", os.O_RDONLY)
    try:
        # The runtime gets the pipes' write ends as its fds 3 and 4, and fd 5 besides.
        fds = {3: w1, 4: w2, 5: spare}
        script = ("echo three >&3; echo four >&4; "
                  "if [ -e /proc/self/fd/5 ]; then echo five-leaked >&3; fi")
        cmd = [*runtime_cmd(), "--root", str(oci.root), "exec", "--preserve-fds", "2",
               cid, "sh", "-c", script]

        def child_fds() -> None:
            for target, fd in fds.items():
                os.dup2(fd, target)

        p = subprocess.run(cmd, preexec_fn=child_fds, pass_fds=(3, 4, 5), timeout=60,
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    finally:
        for fd in (w1, w2, spare):
            os.close(fd)
    with os.fdopen(r1) as f3, os.fdopen(r2) as f4:
        assert f3.read() == "three\n" and f4.read() == "four\n"
    r = oci("exec", "--preserve-fds", "-1", cid, "true", check=False)
    assert r.returncode != 0 and "--preserve-fds" in r.stderr


def test_exec_tty_owned_by_process_user_with_console_size(oci: Oci, rootfs: Path,
                                                          tmp_path: Path) -> None:
    cid = _cid("tty")
    _running(oci, tmp_path, rootfs, cid)
    proc = {"args": ["sh", "-c", "stat -c 'owner=%u' $(tty); stty size; echo done"],
            "cwd": "/", "terminal": True, "env": ["PATH=/bin:/usr/bin"],
            "user": {"uid": 1000, "gid": 1000}, "consoleSize": {"height": 33, "width": 111}}
    (tmp_path / "p.json").write_text(json.dumps(proc))
    listener = _console_listener(tmp_path / "c.sock")
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(_recv_fd(listener)), daemon=True)
    t.start()
    oci("exec", "--process", str(tmp_path / "p.json"), "--detach", "--tty",
        "--console-socket", str(tmp_path / "c.sock"), cid)
    t.join(60)  # create returns after the fd is sent; a bound, not a wait
    try:
        out = read_until(box[0], b"done").decode()
    finally:
        os.close(box[0])
    assert "owner=1000" in out and "33 111" in out, out


# --- update -------------------------------------------------------------------------


def _cgroup_file(pid: int, ctrl: str, name: str) -> str:
    """A cgroup file of pid's cgroup for ctrl: cgroup2 when it has the controller
    (pure v2 hosts), else the v1 hierarchy (this hybrid host)."""
    from uspawn.kernel.cgroups import CGROUP_ROOT, detect_layout

    _layout, unified = detect_layout()
    v1_names = {"memory.max": "memory.limit_in_bytes", "memory.low": "memory.soft_limit_in_bytes",
                "cpu.weight": "cpu.shares", "cpu.max": "cpu.cfs_quota_us"}
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [ln.rstrip("\n").split(":", 2) for ln in f]
    for _n, ctrls, path in lines:
        if ctrls == "" and unified and ctrl in Path(unified + path, "cgroup.controllers"
                                                    ).read_text().split():
            return Path(unified + path, name).read_text().strip()
    for _n, ctrls, path in lines:
        if ctrl in ctrls.split(","):
            return Path(CGROUP_ROOT, ctrls, path.lstrip("/"), v1_names.get(name, name)
                        ).read_text().strip()
    raise AssertionError(f"pid {pid} is in no {ctrl} cgroup")


def _rt(oci: Oci, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*runtime_cmd(), "--root", str(oci.root), *args], input=stdin,
                          capture_output=True, text=True, timeout=60)


def test_update_from_flags_reaches_the_kernel(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """A container created without limits: update moves it into the hierarchies the
    new limits need (v1 here) and delete removes those cgroups again."""
    from conftest import cgroup_dirs

    cid = _cid("upd")
    pid = _running(oci, tmp_path, rootfs, cid)
    oci("update", "--memory", "64m", "--memory-reservation", "32M", "--pids-limit", "42",
        "--cpu-share", "512", "--cpu-period", "100000", "--cpu-quota", "50000",
        "--cpuset-cpus", "0", cid)
    assert _cgroup_file(pid, "memory", "memory.max") == str(64 << 20)
    assert _cgroup_file(pid, "memory", "memory.low") == str(32 << 20)
    assert _cgroup_file(pid, "pids", "pids.max") == "42"
    assert _cgroup_file(pid, "cpuset", "cpuset.cpus") == "0"
    shares = _cgroup_file(pid, "cpu", "cpu.weight")
    assert shares in ("512", "20")  # v1 cpu.shares, or v2 cpu.weight as runc converts
    assert _cgroup_file(pid, "cpu", "cpu.max") in ("50000", "50000 100000")
    # the payload is still running, in the container's pid namespace, and forks there
    r = oci("exec", cid, "sh", "-c", "echo forked")
    assert r.stdout.strip() == "forked"
    oci("update", "--memory", "-1", "--pids-limit", "-1", cid)
    assert _cgroup_file(pid, "pids", "pids.max") == "max"
    oci("delete", "--force", cid)
    assert cgroup_dirs(cid) == []


def test_update_from_resources_file_and_stdin(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    cid = _cid("updr")
    pid = _running(oci, tmp_path, rootfs, cid, resources={"pids": {"limit": 100}})
    res = tmp_path / "res.json"
    res.write_text(json.dumps({"memory": {"limit": 48 << 20}, "pids": {"limit": 50},
                               # what containerd's CRI sends along: ignored as by runc
                               "devices": [{"allow": False, "access": "rwm"}]}))
    oci("update", "-r", str(res), cid)
    assert _cgroup_file(pid, "memory", "memory.max") == str(48 << 20)
    assert _cgroup_file(pid, "pids", "pids.max") == "50"
    # a flag wins over the same field of the file
    oci("update", "-r", str(res), "--pids-limit", "60", cid)
    assert _cgroup_file(pid, "pids", "pids.max") == "60"
    p = _rt(oci, "update", "-r", "-", cid, stdin=json.dumps({"pids": {"limit": 70}}))
    assert p.returncode == 0, p.stderr
    assert _cgroup_file(pid, "pids", "pids.max") == "70"


def test_update_applies_hugepage_limits(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """containerd's CRI sends kubelet's hugepageLimits (every size, 0 unless asked) back
    with each update: applied, not refused (update used to call them unsupported)."""
    cid = _cid("uph")
    pid = _running(oci, tmp_path, rootfs, cid)
    f = tmp_path / "huge.json"
    f.write_text(json.dumps({"hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}]}))
    p = _rt(oci, "update", "-r", str(f), cid)
    assert p.returncode == 0, p.stderr
    try:
        got = _cgroup_file(pid, "hugetlb", "hugetlb.2MB.limit_in_bytes")
    except (FileNotFoundError, AssertionError):
        got = _cgroup_file(pid, "hugetlb", "hugetlb.2MB.max")
    assert got == str(4 << 20)


def test_update_errors_name_the_flag(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    cid = _cid("upe")
    pid = _running(oci, tmp_path, rootfs, cid, resources={"pids": {"limit": 100}})
    cases = [(["--memory", "lots"], "--memory"), (["--cpu-period", "5"], "--cpu-period"),
             (["--pids-limit", "x"], "--pids-limit"), (["--blkio-weight", "10"], "--blkio-weight"),
             (["--cpu-quota", "5"], "--cpu-quota"),
             (["--memory", "64m", "--memory-swap", "1m"], "--memory-swap"),
             (["--cpuset-cpus", "999"], "--cpuset-cpus"),
             ([], "nothing to change")]
    for args, needle in cases:
        p = _rt(oci, "update", *args, cid)
        assert p.returncode in (1, 2) and needle in p.stderr, (args, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"blockIO": {"weight": 100}}))
    p = _rt(oci, "update", "-r", str(bad), cid)
    assert p.returncode == 1 and "blockIO" in p.stderr and "not supported" in p.stderr, p.stderr
    bad.write_text(json.dumps({"hugepageLimits": [{"pageSize": "3MB", "limit": 1}]}))
    p = _rt(oci, "update", "-r", str(bad), cid)
    assert p.returncode == 1 and "hugepageLimits[0].pageSize: '3MB'" in p.stderr, p.stderr
    p = _rt(oci, "update", "-r", str(tmp_path / "missing.json"), cid)
    assert p.returncode == 1 and "missing.json" in p.stderr
    assert _cgroup_file(pid, "pids", "pids.max") == "100"  # nothing half-applied
    oci("kill", cid, "KILL")
    wait_stopped(oci, cid)
    p = _rt(oci, "update", "--pids-limit", "5", cid)
    assert p.returncode == 1 and "container not running" in p.stderr


# --- events -------------------------------------------------------------------------


def test_events_stats_once(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    cid = _cid("evs")
    _running(oci, tmp_path, rootfs, cid,
             resources={"memory": {"limit": 64 << 20}, "pids": {"limit": 33}})
    ev = json.loads(oci("events", "--stats", cid).stdout)
    assert ev["type"] == "stats" and ev["id"] == cid
    data = ev["data"]
    assert data["cpu"]["usage"]["total"] > 0
    assert data["memory"]["usage"]["limit"] == 64 << 20
    assert data["pids"] == {"current": 1, "limit": 33}


def test_events_reports_an_oom_kill_of_the_init(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """The OOM kill that ends the container comes between events' last poll and the
    exit: the stream must still report it before it ends."""
    cid = _cid("evi")
    b = make_bundle(tmp_path, rootfs, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M",
                                       "count=1"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["resources"] = {"memory": {"limit": 16 << 20, "swap": 16 << 20}}
    (b / "config.json").write_text(json.dumps(cfg))
    oci("create", "--bundle", str(b), cid, stdout=subprocess.DEVNULL)
    ev = subprocess.Popen([*runtime_cmd(), "--root", str(oci.root), "events", "--interval",
                           "60s", cid], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert ev.stdout is not None
        assert json.loads(ev.stdout.readline())["type"] == "stats"  # it is watching
        oci("start", cid)
        out, err = ev.communicate(timeout=30)  # ends with the container
    finally:
        if ev.poll() is None:
            ev.kill()
            ev.wait()
    kinds = [json.loads(line)["type"] for line in out.splitlines()]
    assert ev.returncode == 0 and kinds == ["oom"], (kinds, err)


def test_events_stream_until_exit_with_oom(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """Stats every --interval and an oom event when the kernel OOM-kills inside;
    the stream ends when the container stops."""
    cid = _cid("evo")
    os.mkfifo(rootfs / "tmp" / "go")  # the payload waits on it before the OOM
    os.chmod(rootfs / "tmp" / "go", 0o666)
    _running(oci, tmp_path, rootfs, cid,
             args=["sh", "-c", "read x < /tmp/go; dd if=/dev/zero of=/dev/null bs=64M count=1;"
                   " exec sleep 100"],
             resources={"memory": {"limit": 16 << 20, "swap": 16 << 20}})
    go = tmp_path / "bundle" / "rootfs" / "tmp" / "go"  # make_bundle moved the rootfs
    gofd = -1
    ev = subprocess.Popen([*runtime_cmd(), "--root", str(oci.root), "events", "--interval",
                           "300ms", cid], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
    try:
        assert ev.stdout is not None
        kinds = [json.loads(ev.stdout.readline())["type"]]
        # The first stats line comes after events read the OOM counter: the kill
        # below is counted from here, whenever events polls next.
        assert kinds == ["stats"]
        # O_RDWR never blocks on a FIFO; the line waits in it until the payload reads.
        # (Not `exec dd`: on this hybrid host an exec'd process is not in the
        # container's v1 memory cgroup.)
        gofd = os.open(go, os.O_RDWR)
        os.write(gofd, b"go\n")
        while "oom" not in kinds or kinds.count("stats") < 3:
            line = ev.stdout.readline()
            assert line and len(kinds) < 60, kinds  # 60 stats lines: 18 s without an oom
            kinds.append(json.loads(line)["type"])
        oci("kill", cid, "KILL")
        out, err = ev.communicate(timeout=20)  # the stream ends with the container
    finally:
        if gofd >= 0:
            os.close(gofd)
        if ev.poll() is None:
            ev.kill()
            ev.wait()
    assert ev.returncode == 0, err
    kinds += [json.loads(ln)["type"] for ln in out.splitlines()]
    assert kinds.count("stats") >= 3 and kinds.count("oom") == 1, kinds
    p = _rt(oci, "events", "--interval", "nope", cid)
    assert p.returncode in (1, 2) and "--interval" in p.stderr


def test_init_console_owned_by_process_user(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "stat -c 'owner=%u' $(tty); echo done; "
                                                   "sleep 100"], terminal=True)
    cfg = json.loads((b / "config.json").read_text())
    cfg["process"]["user"] = {"uid": 1000, "gid": 1000}
    (b / "config.json").write_text(json.dumps(cfg))
    listener = _console_listener(tmp_path / "c.sock")
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(_recv_fd(listener)), daemon=True)
    t.start()
    cid = _cid("itty")
    oci("create", "--bundle", str(b), "--console-socket", str(tmp_path / "c.sock"), cid)
    t.join(60)  # create returns after the fd is sent; a bound, not a wait
    oci("start", cid)
    try:
        out = read_until(box[0], b"done").decode()
    finally:
        os.close(box[0])
    assert "owner=1000" in out, out


def test_flag_parsers() -> None:
    """Pure logic of update and events (no root needed)."""
    from uspawn.base.errors import UsageError
    from uspawn.oci.events import interval
    from uspawn.oci.update import _by_name, limit_key, parse_number, parse_size

    assert parse_size("64m", "--memory") == 64 << 20
    assert parse_size("1G", "--memory") == 1 << 30
    assert parse_size("4096", "--memory") == 4096
    assert parse_size("-1", "--memory") == -1
    for bad in ("lots", "1.5q", "-2", "nan", ""):
        with pytest.raises(UsageError, match="--memory"):
            parse_size(bad, "--memory")
    assert parse_number("-1", "--pids-limit") == -1
    with pytest.raises(UsageError, match="--cpu-share"):
        parse_number("1e3", "--cpu-share")
    assert interval("5s") == 5 and interval("500ms") == 0.5 and interval("2") == 2
    assert interval("1m") == 60
    for bad in ("0", "-1s", "fast", "nan"):
        with pytest.raises(UsageError, match="--interval"):
            interval(bad)
    assert limit_key("memory", "disable_oom_killer") == "memory.disableOOMKiller"
    names = {"linux.resources.memory.swap": "--memory-swap",
             "linux.resources.memory.swappiness": "linux.resources.memory.swappiness"}
    assert _by_name("linux.resources.memory.swap: 5 is below", names) == "--memory-swap: 5 is below"
    assert _by_name("other", names) == "other"
