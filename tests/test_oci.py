"""End-to-end: the runc-compatible CLI (uspawn-runc) through full lifecycles.

Bundles are made in the test from the busybox rootfs. Set USPAWN_OCI_RUNTIME
to run the same tests against another runtime (e.g. runc) for comparison.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import pytest
from conftest import cgroup_dirs, mounts_under
from waits import has_signal, read_until, running, signal_masks, wait_exit


def runtime_cmd() -> list[str]:
    rt = os.environ.get("USPAWN_OCI_RUNTIME")
    return rt.split() if rt else [sys.executable, "-c", "from uspawn.oci.cli import entry; entry()"]


class Oci:
    env: dict[str, str] = {}  # extra environment variables of the runtime
    stdin: int | None = None

    def __init__(self, root: Path) -> None:
        self.root = root

    def command(self) -> list[str]:
        return runtime_cmd()

    def __call__(self, *args: str, timeout: float = 60, check: bool = True,
                 stdout: int | IO[str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the runtime. Output goes through temporary files, not pipes: a
        created container inherits the runtime's stdio and would hold a pipe
        open long after the runtime exited."""
        import tempfile

        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            p = subprocess.run([*self.command(), "--root", str(self.root), *args],
                               stdout=stdout if stdout is not None else out, stderr=err,
                               timeout=timeout, stdin=self.stdin,
                               env={**os.environ, **self.env} if self.env else None)
            out.seek(0)
            err.seek(0)
            r = subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())
        if check:
            assert r.returncode == 0, f"{args}: rc={r.returncode} {r.stderr}"
        return r

    def status(self, cid: str) -> str:
        return str(json.loads(self("state", cid).stdout)["status"])


def make_bundle(tmp_path: Path, rootfs: Path, args: list[str], terminal: bool = False,
                userns: bool = True, hooks: Mapping[str, object] | None = None) -> Path:
    from uspawn.oci.defaults import default_config

    b = tmp_path / "bundle"
    b.mkdir(exist_ok=True)
    os.rename(rootfs, b / "rootfs")
    cfg = default_config()
    proc = cfg["process"]
    assert isinstance(proc, dict)
    proc.update(args=args, terminal=terminal)
    root = cfg["root"]
    assert isinstance(root, dict)
    root["readonly"] = False
    linux = cfg["linux"]
    assert isinstance(linux, dict)
    if userns:
        # the template has a user namespace already; these tests pick their own range
        linux["namespaces"] = [n for n in linux["namespaces"]
                               if n["type"] != "user"] + [{"type": "user"}]
        m = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        linux["uidMappings"] = m
        linux["gidMappings"] = m
    if hooks:
        cfg["hooks"] = hooks
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def wait_stopped(oci: Oci, cid: str, timeout: float = 30) -> None:
    """Block until the container's init has exited (its pidfd), then check the
    runtime says "stopped": no polling of `state`."""
    st = json.loads(oci("state", cid).stdout)
    if st["status"] == "stopped":
        return
    try:
        pidfd = os.pidfd_open(st["pid"])
    except ProcessLookupError:  # exited and reaped since
        assert oci.status(cid) == "stopped"
        return
    try:
        # Asked again with the pidfd held: still running means the pidfd is the
        # init's (the runtime checks the pid's start time), not a recycled pid's.
        if oci.status(cid) != "stopped":
            assert select.select([pidfd], [], [], timeout)[0], f"{cid} never stopped"
    finally:
        os.close(pidfd)
    assert oci.status(cid) == "stopped"


def test_lifecycle_create_start_state_delete(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "cat /proc/self/uid_map; sleep 0.3"])
    out = tmp_path / "out"
    with open(out, "w") as f:
        oci("create", "--bundle", str(b), "--pid-file", str(tmp_path / "pid"), "c1", stdout=f)
    st = json.loads(oci("state", "c1").stdout)
    assert st["status"] == "created" and st["id"] == "c1" and st["bundle"] == str(b)
    assert int((tmp_path / "pid").read_text()) == st["pid"] > 0
    assert oci("delete", "c1", check=False).returncode != 0  # created, not stopped
    oci("start", "c1")
    assert oci.status("c1") in ("running", "stopped")
    assert oci("start", "c1", check=False).returncode != 0  # only once
    wait_stopped(oci, "c1")
    assert out.read_text().split() == ["0", "200000", "65536"]
    oci("delete", "c1")
    assert oci("state", "c1", check=False).returncode != 0
    assert oci("list", "-q").stdout.strip() == ""
    assert mounts_under(tmp_path) == []


def test_list_ps_pause_resume_kill(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sleep", "100"])
    oci("create", "--bundle", str(b), "c2", stdout=subprocess.DEVNULL)
    oci("start", "c2")
    rows = json.loads(oci("list", "--format", "json").stdout)
    assert [(r["id"], r["status"]) for r in rows] == [("c2", "running")]
    assert "c2" in oci("list").stdout
    pids = json.loads(oci("ps", "--format", "json", "c2").stdout)
    assert pids == [json.loads(oci("state", "c2").stdout)["pid"]]
    oci("pause", "c2")
    assert oci.status("c2") == "paused"
    oci("resume", "c2")
    assert oci.status("c2") == "running"
    # A pid-namespace init gets only the signals it has a handler for (SIGKILL and
    # SIGSTOP aside): sleep has none for TERM, so the kernel drops it at kill(2).
    init = json.loads(oci("state", "c2").stdout)["pid"]
    assert not has_signal(signal_masks(init)["SigCgt"], signal.SIGTERM)
    oci("kill", "c2", "TERM")
    # kill(2) returned: the TERM was dropped, or queued (and, being fatal, a SIGKILL
    # queued beside it). Nothing is pending and the init is not exiting: dropped.
    masks = signal_masks(init)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        assert not has_signal(masks["SigPnd"] | masks["ShdPnd"], sig), masks
    assert running(init)
    assert oci.status("c2") == "running"
    oci("kill", "c2", "9")
    wait_stopped(oci, "c2")
    assert oci("kill", "c2", "KILL", check=False).returncode != 0
    oci("delete", "c2")


def test_delete_force_in_every_state(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sleep", "100"])
    oci("create", "--bundle", str(b), "created", stdout=subprocess.DEVNULL)
    oci("create", "--bundle", str(b), "running", stdout=subprocess.DEVNULL)
    oci("start", "running")
    oci("create", "--bundle", str(b), "paused", stdout=subprocess.DEVNULL)
    oci("start", "paused")
    oci("pause", "paused")
    pids = [json.loads(oci("state", c).stdout)["pid"] for c in ("created", "running", "paused")]
    for cid in ("created", "running", "paused"):
        oci("delete", "--force", cid)
    # Dead (a zombie until its reaper, the host's pid 1, reaps it) or reaped.
    wait_exit(pids, 5, "the inits after delete --force")
    for pid in pids:
        if os.path.exists(f"/proc/{pid}/stat"):
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split(") ")[1].startswith("Z")
    assert oci("list", "-q").stdout.strip() == ""
    assert oci("delete", "--force", "never-existed").returncode == 0


def test_duplicate_id_and_bad_bundles(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["true"])
    results: list[int] = []

    def create() -> None:
        r = oci("create", "--bundle", str(b), "dup", check=False, stdout=subprocess.DEVNULL)
        results.append(r.returncode)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 1]
    r = oci("create", "--bundle", str(tmp_path / "nope"), "x", check=False)
    assert r.returncode == 1 and "config.json" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"process": {"args": "sh"}, "root": {"path": "r"}}')
    r = oci("create", "--bundle", str(bad), "y", check=False)
    assert r.returncode == 1 and "process.args" in r.stderr
    assert r.stderr.count("\n") == 1
    r = oci("create", "--bundle", str(b), "bad/id", check=False)
    assert r.returncode == 1 and "invalid container id" in r.stderr


def test_hooks(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\nread -r state\necho \"$1 $state\" >> {log}\n")
    script.chmod(0o755)

    def hook(name: str) -> dict[str, object]:
        return {"path": str(script), "args": ["hook.sh", name], "timeout": 5}

    # startContainer runs inside the container: a path in the container's tree.
    hooks = {"createRuntime": [hook("createRuntime")], "poststart": [hook("poststart")],
             "poststop": [hook("poststop")],
             "startContainer": [{"path": "/bin/sh", "args": ["sh", "-c",
                                                             "cat > /tmp/start-hook"]}]}
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "cat /tmp/start-hook"], hooks=hooks)
    out = tmp_path / "out"
    with open(out, "w") as f:
        oci("create", "--bundle", str(b), "h1", stdout=f)
    oci("start", "h1")
    wait_stopped(oci, "h1")
    oci("delete", "h1")
    lines = log.read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["createRuntime", "poststart", "poststop"]
    states = [json.loads(ln.split(" ", 1)[1]) for ln in lines]
    assert states[0]["id"] == "h1" and states[0]["pid"] > 0
    assert states[2]["status"] == "stopped"
    assert json.loads(out.read_text())["id"] == "h1"  # startContainer saw the state


def test_failing_hook_fails_create_cleanly(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    hooks = {"createRuntime": [{"path": "/bin/false"}]}
    b = make_bundle(tmp_path, rootfs, ["true"], hooks=hooks)
    r = oci("create", "--bundle", str(b), "hf", check=False)
    assert r.returncode == 1 and "createRuntime hook /bin/false" in r.stderr
    assert oci("list", "-q").stdout.strip() == ""
    assert mounts_under(tmp_path) == []
    assert cgroup_dirs("hf") == []


def _console_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def _recv_fd(listener: socket.socket, timeout: float = 60) -> int:
    listener.settimeout(timeout)  # a runtime that never connects fails the test, not the run
    conn, _ = listener.accept()
    try:
        _msg, anc, _f, _a = conn.recvmsg(1024, socket.CMSG_SPACE(4))
    finally:
        conn.close()
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            return int(struct.unpack("i", data[:4])[0])
    raise AssertionError("no fd received on the console socket")


def test_console_socket_and_exec(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "tty; echo ready; exec sleep 100"],
                    terminal=True)
    listener = _console_listener(tmp_path / "console.sock")
    box: list[int] = []
    t = threading.Thread(target=lambda: box.append(_recv_fd(listener)), daemon=True)
    t.start()
    oci("create", "--bundle", str(b), "--console-socket", str(tmp_path / "console.sock"), "t1")
    t.join(60)  # create returns after the fd is sent; a bound, not a wait
    master = box[0]
    assert stat.S_ISCHR(os.fstat(master).st_mode)
    oci("start", "t1")
    out = read_until(master, b"ready")
    assert b"/dev/pts/" in out and b"ready" in out
    # exec without a tty: output through our pipes
    r = oci("exec", "t1", "sh", "-c", "echo exec-$((40+2)); cat /proc/self/uid_map")
    assert r.stdout.split()[:2] == ["exec-42", "0"]
    # exec --process with a tty, detached, as conmon does
    proc = {"args": ["sh", "-c", "tty; echo detached-ok; sleep 5"], "cwd": "/", "terminal": True,
            "env": ["PATH=/bin:/usr/bin"], "user": {"uid": 1000, "gid": 1000}}
    (tmp_path / "p.json").write_text(json.dumps(proc))
    listener2 = _console_listener(tmp_path / "c2.sock")
    box2: list[int] = []
    t2 = threading.Thread(target=lambda: box2.append(_recv_fd(listener2)), daemon=True)
    t2.start()
    oci("exec", "--process", str(tmp_path / "p.json"), "--detach", "--tty",
        "--console-socket", str(tmp_path / "c2.sock"), "--pid-file", str(tmp_path / "xpid"),
        "t1")
    t2.join(60)
    got = read_until(box2[0], b"detached-ok")
    assert b"detached-ok" in got and b"/dev/pts/" in got
    xpid = int((tmp_path / "xpid").read_text())
    with open(f"/proc/{xpid}/status") as f:
        uid_line = next(ln for ln in f if ln.startswith("Uid:"))
    assert uid_line.split()[1] == str(200000 + 1000)
    for fd in (master, box2[0]):
        os.close(fd)
    oci("delete", "--force", "t1")


def test_run_foreground_exit_code(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "echo run-out; exit 7"])
    r = oci("run", "--bundle", str(b), "r1", check=False)
    assert r.returncode == 7 and r.stdout.strip() == "run-out", r.stderr
    assert oci("list", "-q").stdout.strip() == ""


def test_mknod_filter_applies_to_oci_profiles(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    from uspawn.oci.defaults import default_config

    b = make_bundle(tmp_path, rootfs, ["sh", "-c", "probe mknod /tmp/c c 1 3; mkfifo /tmp/f "
                                                   "&& echo fifo-ok"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["process"]["capabilities"]["bounding"].append("CAP_MKNOD")
    cfg["process"]["capabilities"]["effective"].append("CAP_MKNOD")
    cfg["process"]["capabilities"]["permitted"].append("CAP_MKNOD")
    cfg["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mknod", "mknodat"], "action": "SCMP_ACT_ALLOW"}]}
    (b / "config.json").write_text(json.dumps(cfg))
    assert default_config()  # the template itself loads
    r = oci("run", "--bundle", str(b), "m1", check=False)
    assert r.stdout.split() == ["EPERM", "fifo-ok"], r.stderr


def test_spec_and_features(tmp_path: Path, oci: Oci) -> None:
    oci("spec", "--bundle", str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["process"]["args"] == ["sh"] and cfg["root"]["path"] == "rootfs"
    assert oci("spec", "--bundle", str(tmp_path), check=False).returncode == 1  # exists
    feats = json.loads(oci("features").stdout)
    assert "createRuntime" in feats["hooks"] and feats["linux"]["cgroup"]["v2"] is True
    assert oci("--version").stdout.startswith("uspawn-runc version")


def test_concurrent_commands_on_one_id(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["sleep", "100"])
    oci("create", "--bundle", str(b), "cc", stdout=subprocess.DEVNULL)
    results: list[tuple[str, int, str]] = []

    def run(*args: str) -> None:
        r = oci(*args, check=False)
        results.append((args[0], r.returncode, r.stderr))

    threads = [threading.Thread(target=run, args=a) for a in
               (("start", "cc"), ("delete", "--force", "cc"), ("delete", "--force", "cc"),
                ("state", "cc"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all("Traceback" not in err for _, _, err in results)
    assert [rc for cmd, rc, _ in results if cmd == "delete"] == [0, 0]
    assert oci("list", "-q").stdout.strip() == ""
    assert cgroup_dirs("cc") == []


def test_cgroups_path_never_takes_over_a_foreign_cgroup(oci: Oci, rootfs: Path,
                                                        tmp_path: Path) -> None:
    from uspawn.kernel.cgroups import detect_layout

    _layout, unified = detect_layout()
    assert unified is not None
    foreign = Path(unified) / f"usptest-foreign-{os.getpid()}"
    (foreign / "child").mkdir(parents=True)
    try:
        b = make_bundle(tmp_path, rootfs, ["true"])
        cfg = json.loads((b / "config.json").read_text())
        cfg["linux"]["cgroupsPath"] = "/" + foreign.name
        (b / "config.json").write_text(json.dumps(cfg))
        r = oci("create", "--bundle", str(b), "fc", check=False)
        assert r.returncode == 1 and "belongs to someone else" in r.stderr
        assert (foreign / "child").is_dir()  # untouched
        assert oci("list", "-q").stdout.strip() == ""
    finally:
        (foreign / "child").rmdir()
        foreign.rmdir()


def _limit_files(pid: int) -> dict[str, str]:
    """memory and pids limits of pid's cgroups, wherever the host keeps them (v1 or v2)."""
    from uspawn.kernel.cgroups import detect_layout

    _layout, unified = detect_layout()
    found: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if ctrls == "" and unified:
                for key, name in (("memory", "memory.max"), ("pids", "pids.max")):
                    p = Path(unified + path) / name
                    if p.exists():
                        found[key] = p.read_text().strip()
            for ctrl, name in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max")):
                if ctrl in ctrls.split(","):
                    found[ctrl] = (Path("/sys/fs/cgroup", ctrl, path.lstrip("/")) / name
                                   ).read_text().strip()
    return found


@pytest.mark.parametrize("cgroups_path", ["/uspawn-test-{id}", "/uspawn-test/deep/c-{id}",
                                          "uspawn-test.slice:oci:c-{id}"])
def test_limits_apply_whatever_the_cgroups_path_shape(oci: Oci, rootfs: Path, tmp_path: Path,
                                                      cgroups_path: str) -> None:
    """linux.resources reach the kernel for every cgroupsPath depth and form, on v1
    hierarchies too (issue 12: they used to be skipped unless the path had two parts)."""
    cid = f"lim-{uuid.uuid4().hex[:8]}"
    b = make_bundle(tmp_path, rootfs, ["sleep", "60"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = cgroups_path.format(id=cid)
    cfg["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 42}}
    (b / "config.json").write_text(json.dumps(cfg))
    oci("create", "-b", str(b), cid)
    try:
        pid = int(json.loads(oci("state", cid).stdout)["pid"])
        assert _limit_files(pid) == {"memory": str(64 << 20), "pids": "42"}
    finally:
        oci("delete", "--force", cid)


def test_time_namespace_is_created(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """{"type": "time"} used to pass validation and be ignored."""
    b = make_bundle(tmp_path, rootfs, ["readlink", "/proc/self/ns/time"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["namespaces"].append({"type": "time"})
    (b / "config.json").write_text(json.dumps(cfg))
    r = oci("run", "-b", str(b), f"time-{uuid.uuid4().hex[:8]}")
    inside = r.stdout.strip()
    assert inside.startswith("time:[") and inside != os.readlink("/proc/self/ns/time")
