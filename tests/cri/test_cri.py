"""The CRI path (issue 14): containerd 1.6's CRI plugin runs pods through uspawn-runc
as the runtime handler `uspawn`, driven with crictl as a kubelet would drive it; the
same basic pod with runc for comparison. After each test nothing of its pods is left:
mounts, cgroups, veths, processes, shim sockets.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from waits import IN_CLOSE_WRITE, IN_MOVED_TO, wait_until

from .cri_env import CriEnv

# A long-running container that says it started and exits 3 on SIGTERM (the grace
# period test): `wait` is interrupted by the signal, the trap runs.
SERVE = 'trap "echo got TERM; exit 3" TERM; echo started; sleep 2147483647 & wait'


def run_pod(cri: CriEnv, name: str, handler: str) -> str:
    pod = cri.crictl("runp", "--runtime", handler, str(cri.pod_config(name)))
    info = cri.inspect("inspectp", pod)
    assert info["status"]["state"] == "SANDBOX_READY", info["status"]
    assert info["info"]["runtimeHandler"] == handler
    # The sandbox really ran under the handler's runtime: its state root has it.
    assert (cri.root / f"{handler}-state" / "k8s.io" / pod).exists(), \
        sorted(os.listdir(cri.root / f"{handler}-state"))
    assert cri.shim_pids(), "no shim found for this containerd (the leak check would miss it)"
    assert cri.shim_socket(pod).is_socket(), "the teardown would not find the shim's socket"
    return pod


def start_container(cri: CriEnv, pod: str, pod_name: str, name: str,
                    script: str) -> str:
    cid = cri.crictl("create", pod, str(cri.container_config(name, ["/bin/sh", "-c", script])),
                     str(cri.pod_config(pod_name)))
    cri.crictl("start", cid)
    return cid


def log_path(cri: CriEnv, pod_name: str, name: str) -> Path:
    return cri.root / "logs" / pod_name / f"{name}.log"


def wait_log(cri: CriEnv, pod_name: str, name: str, text: str) -> list[str]:
    """The container's CRI log lines once one of them carries text (inotify on the file's
    directory: containerd's log writer appends to it)."""
    path = log_path(cri, pod_name, name)

    def lines() -> list[str]:
        try:
            got = path.read_text().splitlines()
        except FileNotFoundError:
            return []
        return got if any(text in line for line in got) else []

    from waits import IN_CREATE, IN_MODIFY
    return wait_until(lines, [path.parent], f"{text!r} in {path}", timeout=30,
                      mask=IN_MODIFY | IN_CREATE)


def status(cri: CriEnv, cid: str) -> dict[str, object]:
    st = cri.inspect("inspect", cid)["status"]
    assert isinstance(st, dict)
    return st


def wait_exited(cri: CriEnv, cid: str, timeout: float = 30) -> dict[str, object]:
    """ContainerStatus once the container has exited (containerd's exit event).

    The CRI plugin checkpoints a container's status to <root>/io.containerd.grpc.v1.cri/
    containers/<id>/status (an atomic rename) while it holds the status lock, before it
    updates the copy it serves: inotify on that directory re-reads the file, and once
    the file has FinishedAt, ContainerStatus (which takes the lock) reports the exit."""
    cdir = cri.root / "root" / "io.containerd.grpc.v1.cri" / "containers" / cid
    assert (cdir / "status").is_file(), f"no CRI status checkpoint in {cdir}"

    def finished() -> bool:
        try:
            return bool(json.loads((cdir / "status").read_text()).get("FinishedAt"))
        except FileNotFoundError:
            return False

    wait_until(finished, [cdir], f"{cid} to exit (FinishedAt in {cdir}/status)", timeout,
               mask=IN_MOVED_TO | IN_CLOSE_WRITE)
    st = status(cri, cid)
    assert st["state"] == "CONTAINER_EXITED", st
    return st


def remove_pod(cri: CriEnv, pod: str) -> None:
    cri.crictl("stopp", pod)
    assert cri.inspect("inspectp", pod)["status"]["state"] == "SANDBOX_NOTREADY"
    cri.crictl("rmp", pod)
    assert pod not in cri.crictl("pods", "-q").split()


@pytest.mark.parametrize("handler", ["uspawn", "runc"])
def test_pod_lifecycle(clean: CriEnv, handler: str) -> None:
    cri = clean
    if handler == "runc" and cri.runc is None:
        pytest.skip("runc not installed (comparison only)")
    name = f"life-{handler}"
    pod = run_pod(cri, name, handler)
    cid = start_container(cri, pod, name, "main", SERVE)
    wait_log(cri, name, "main", "started")
    st = status(cri, cid)
    assert st["state"] == "CONTAINER_RUNNING", st

    # The container's processes live in the pod's cgroup parent, in its own cgroup.
    pid = cri.inspect("inspect", cid)["info"]["pid"]
    with open(f"/proc/{pid}/cgroup") as f:
        paths = {line.split(":", 2)[2].strip() for line in f}
    assert f"{cri.cgroup_parent}/{cid}" in paths, paths

    out = cri.crictl("exec", "-s", cid, "sh", "-c", "echo out; hostname; cat /proc/self/uid_map")
    lines = out.splitlines()
    assert lines[0] == "out" and lines[1] == name, out
    # Without the user-namespace mode a CRI config runs as runc runs it: no userns.
    assert lines[2].split() == ["0", "0", "4294967295"], out
    failed = cri.crictl_run("exec", "-s", cid, "sh", "-c", "echo bad >&2; exit 5")
    # crictl 1.26 exits 1 and names the command's status and stderr.
    assert failed.returncode == 1 and "exited with 5: bad" in failed.stderr, failed

    # CRI log format: "<RFC3339Nano time> stdout F <line>".
    first = log_path(cri, name, "main").read_text().splitlines()[0].split(" ", 3)
    assert first[1:] == ["stdout", "F", "started"], first

    # The sandbox's files containerd bind-mounts into every container of the pod
    # (the sandbox itself has a read-only root: issue 14's first failure).
    mounts = cri.crictl("exec", "-s", cid, "cat", "/proc/self/mounts")
    for target in ("/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/dev/shm"):
        assert f" {target} " in mounts, (target, mounts)
    assert cri.crictl("logs", cid) == "started"

    t0 = time.monotonic()
    cri.crictl("stop", "--timeout", "20", cid)
    # The grace period: SIGTERM first, which the container handles and exits 3,
    # well before the 20 s after which SIGKILL would come.
    assert time.monotonic() - t0 < 10
    st = status(cri, cid)
    assert st["state"] == "CONTAINER_EXITED" and st["exitCode"] == 3, st
    wait_log(cri, name, "main", "got TERM")
    cri.crictl("rm", cid)
    remove_pod(cri, pod)


@pytest.mark.parametrize("handler", ["uspawn", "runc"])
def test_stop_exited_container(clean: CriEnv, handler: str) -> None:
    """StopContainer of a container that already exited succeeds (a kubelet stops every
    container of a pod it tears down, exited or not)."""
    cri = clean
    if handler == "runc" and cri.runc is None:
        pytest.skip("runc not installed (comparison only)")
    name = f"exited-{handler}"
    pod = run_pod(cri, name, handler)
    cid = start_container(cri, pod, name, "once", "echo done; exit 7")
    st = wait_exited(cri, cid)
    assert st["exitCode"] == 7, st
    cri.crictl("stop", cid)
    cri.crictl("stop", cid)  # twice: still fine
    wait_log(cri, name, "once", "done")
    cri.crictl("rm", cid)
    remove_pod(cri, pod)


def test_containers_share_localhost(clean: CriEnv) -> None:
    """Two containers of one pod share its network namespace: one serves HTTP on
    127.0.0.1, the other fetches from it."""
    cri = clean
    name = "pair"
    pod = run_pod(cri, name, "uspawn")
    # busybox httpd without -f forks into the background after it has bound the port,
    # so "listening" in the log means the port is open.
    server = start_container(cri, pod, name, "server",
                             "mkdir /tmp/www && echo hello-from-server > /tmp/www/index.html"
                             " && httpd -p 127.0.0.1:8080 -h /tmp/www && echo listening && "
                             + SERVE)
    client = start_container(cri, pod, name, "client", SERVE)
    wait_log(cri, name, "server", "listening")
    out = cri.crictl("exec", "-s", client, "wget", "-qO-", "http://127.0.0.1:8080/")
    assert out == "hello-from-server"
    # The pod has one address from the test's CNI subnet, the same for both.
    ip = cri.inspect("inspectp", pod)["status"]["network"]["ip"]
    prefix = cri.subnet.rsplit(".", 1)[0] + "."
    assert ip.startswith(prefix), (ip, cri.subnet)
    for cid in (server, client):
        addrs = cri.crictl("exec", "-s", cid, "ip", "-4", "-o", "addr", "show", "eth0")
        assert f"inet {ip}/" in addrs, addrs
    for cid in (server, client):
        cri.crictl("stop", "--timeout", "20", cid)
        cri.crictl("rm", cid)
    remove_pod(cri, pod)


def test_remove_pod_with_running_containers(clean: CriEnv) -> None:
    """StopPodSandbox stops containers still running; RemovePodSandbox removes them."""
    cri = clean
    name = "busy"
    pod = run_pod(cri, name, "uspawn")
    cid = start_container(cri, pod, name, "main", SERVE)
    wait_log(cri, name, "main", "started")
    remove_pod(cri, pod)
    assert cid not in cri.crictl("ps", "-a", "-q").split()


def test_json_status_fields(clean: CriEnv) -> None:
    """ContainerStatus carries what a kubelet reads: image, times, log path."""
    cri = clean
    name = "status"
    pod = run_pod(cri, name, "uspawn")
    cid = start_container(cri, pod, name, "main", "echo hi; exit 0")
    st = wait_exited(cri, cid)
    assert st["exitCode"] == 0 and st["reason"] == "Completed", st
    assert st["logPath"] == str(log_path(cri, name, "main")), st
    # RFC 3339 times, compared to the second (Go trims trailing zeros of the fraction).
    started, finished = str(st["startedAt"])[:19], str(st["finishedAt"])[:19]
    assert "1970-01-01T00:00:00" < started <= finished, st
    assert json.dumps(st["image"]).find("uspawn-busybox") >= 0, st
    cri.crictl("rm", cid)
    remove_pod(cri, pod)


def test_privileged_container(clean: CriEnv) -> None:
    """A privileged container of a privileged pod gets the host's devices and every
    capability. uspawn-runc used to open each configured node before START and failed
    on the first that does not open by itself (/dev/hwrng here: EINVAL)."""
    cri = clean
    name = "priv"
    cfg = cri.pod_config(name)
    raw = json.loads(cfg.read_text())
    raw["linux"]["security_context"]["privileged"] = True
    cfg.write_text(json.dumps(raw))
    pod = cri.crictl("runp", "--runtime", "uspawn", str(cfg))
    ctr = cri.container_config("main", ["/bin/sh", "-c", SERVE])
    raw = json.loads(ctr.read_text())
    raw["linux"] = {"security_context": {"privileged": True}}
    ctr.write_text(json.dumps(raw))
    cid = cri.crictl("create", pod, str(ctr), str(cfg))
    cri.crictl("start", cid)
    host = {e for e in os.listdir("/dev") if not os.path.isdir(f"/dev/{e}")
            and not os.path.islink(f"/dev/{e}")}
    seen = set(cri.crictl("exec", "-s", cid, "ls", "/dev").split())
    # Host char and block nodes reach the container (containerd passes every one but
    # /dev/console; ptmx & co. are the container's own).
    missing = {e for e in host - seen - {"console"}
               if os.stat(f"/dev/{e}").st_mode & 0o170000 in (0o020000, 0o060000)}
    assert not missing, missing
    status = cri.crictl("exec", "-s", cid, "grep", "CapEff", "/proc/self/status")
    with open("/proc/self/status") as f:
        ours = next(line for line in f if line.startswith("CapEff"))
    assert status.split()[1] == ours.split()[1], (status, ours)
    cri.crictl("stop", "--timeout", "20", cid)
    cri.crictl("rm", cid)
    remove_pod(cri, pod)
