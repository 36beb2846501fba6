"""The `uspawn-pods` handler (uspawn-runc-pods, oci/pods.py): every pod in a user
namespace of its own, through containerd 1.6's CRI, driven with crictl.

A pod's containers share one user namespace whose range is leased host-wide like
`uspawn run`'s; two pods get disjoint ranges; /dev works for non-root, device mknod
is refused; what pod root writes to a host directory is host root's on disk; port
80 binds inside the pod (containerd's network namespace belongs to the host's user
namespace: the runtime sets ip_unprivileged_port_start=0 there); removing the pod
leaves no lease, and neither does `kill -9` of its shim followed by what containerd
does next. The `clean` fixture (conftest.py) checks mounts, cgroups, processes, veths,
netns and runtime state after each test.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import waits
from waits import wait_all_gone

from uspawn.kernel import nsfs

from .cri_env import CriEnv, pids_in_cgroup_tree
from .test_cri import SERVE, remove_pod, run_pod, wait_log

HANDLER = "uspawn-pods"
RANGES = Path("/run/uspawn/ranges")
RANGE_SIZE = 65536


def container(cri: CriEnv, pod: str, pod_name: str, name: str, script: str,
              user: int | None = None, binds: dict[str, str] | None = None,
              own_pid_ns: bool = False) -> str:
    """Create and start a container running `sh -c script`, as uid `user` if given,
    with host directories bound (container path -> host path); own_pid_ns: a pid
    namespace of its own (CONTAINER, what a kubelet asks for unless the pod shares
    its process namespace) instead of the sandbox's (POD, crictl's default)."""
    path = cri.container_config(name, ["/bin/sh", "-c", script])
    raw = json.loads(path.read_text())
    ctx: dict[str, object] = {}
    if user is not None:
        ctx["run_as_user"] = {"value": user}
    if own_pid_ns:
        ctx["namespace_options"] = {"pid": 1}  # CONTAINER
    raw["linux"] = {"security_context": ctx}
    if binds:
        raw["mounts"] = [{"container_path": c, "host_path": h} for c, h in binds.items()]
    path.write_text(json.dumps(raw))
    cid = cri.crictl("create", pod, str(path), str(cri.pod_config(pod_name)))
    cri.crictl("start", cid)
    return cid


def sandbox_pid(cri: CriEnv, pod: str) -> int:
    pid = cri.inspect("inspectp", pod)["info"]["pid"]
    assert isinstance(pid, int) and pid > 0
    return pid


def host_map(pid: int, name: str = "uid_map") -> list[list[int]]:
    return [[int(x) for x in line.split()]
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines()]


def pod_range(cri: CriEnv, pod: str) -> tuple[int, Path]:
    """The pod's host range base (from its sandbox's uid_map, which must be one
    non-identity range of 65536) and its lease file, which names the sandbox's init."""
    pid = sandbox_pid(cri, pod)
    uid_map = host_map(pid)
    assert len(uid_map) == 1 and uid_map[0][0] == 0 and uid_map[0][2] == RANGE_SIZE, uid_map
    base = uid_map[0][1]
    assert base >= RANGE_SIZE, f"container root is host uid {base}: not a private range"
    assert host_map(pid, "gid_map") == uid_map
    lease = RANGES / f"{base}-{RANGE_SIZE}.lock"
    owner = json.loads(lease.read_text())
    assert owner["pid"] == pid, (owner, pid)
    return base, lease


def exec_lines(cri: CriEnv, cid: str, script: str) -> list[str]:
    return cri.crictl("exec", "-s", cid, "sh", "-c", script).splitlines()


def test_pod_shares_one_user_namespace(clean: CriEnv) -> None:
    """Two containers of a pod: the sandbox's user namespace (same maps, same
    namespace), /dev/null for a non-root user, device mknod refused, host files
    written as pod root are host root's, port 80 inside the pod."""
    cri = clean
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        host_port_start = f.read()
    name = "userns"
    pod = run_pod(cri, name, HANDLER)
    base, lease = pod_range(cri, pod)
    sandbox_ns = os.readlink(f"/proc/{sandbox_pid(cri, pod)}/ns/user")

    data = cri.root / "pod-data"
    (data / "user-dir").mkdir(parents=True)
    os.chown(data / "user-dir", 1000, 1000)
    (data / "host-file").write_text("host\n")
    binds = {"/data": str(data)}
    server = container(cri, pod, name, "server",
                       "mkdir /tmp/www && echo hello-on-80 > /tmp/www/index.html"
                       " && httpd -p 80 -h /tmp/www && echo listening && " + SERVE,
                       binds=binds)
    client = container(cri, pod, name, "client", SERVE, user=1000, binds=binds,
                       own_pid_ns=True)
    wait_log(cri, name, "server", "listening")

    # The client's pid namespace is its own, and, like its mount namespace, owned by
    # the pod's user namespace (made after joining it), not by the host's.
    spid, cpid = sandbox_pid(cri, pod), cri.inspect("inspect", client)["info"]["pid"]
    pod_userns = os.stat(f"/proc/{spid}/ns/user")
    assert os.stat(f"/proc/{cpid}/ns/pid").st_ino != os.stat(f"/proc/{spid}/ns/pid").st_ino
    for ns in ("pid", "mnt", "ipc", "uts"):
        fd = os.open(f"/proc/{cpid}/ns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            owner = nsfs.owner_userns(fd)
        finally:
            os.close(fd)
        assert owner == (pod_userns.st_dev, pod_userns.st_ino), (ns, owner)

    # One user namespace for the pod: the sandbox's, seen from both containers.
    want = [f"0 {base} {RANGE_SIZE}"] * 2  # uid_map, gid_map
    for cid, uid in ((server, "0"), (client, "1000")):
        lines = exec_lines(cri, cid, "cat /proc/self/uid_map /proc/self/gid_map;"
                           " readlink /proc/self/ns/user; id -u")
        assert [" ".join(x.split()) for x in lines[:2]] == want, lines
        assert lines[2:] == [sandbox_ns, uid], (lines, sandbox_ns)

    # /dev works for a non-root user; device nodes cannot be made (FIFOs can).
    assert exec_lines(cri, client, "echo x > /dev/null && echo null-ok;"
                      " head -c 8 /dev/urandom | wc -c") == ["null-ok", "8"]
    res = cri.crictl_run("exec", "-s", server, "mknod", "/tmp/node", "c", "1", "3")
    assert res.returncode != 0 and "Operation not permitted" in res.stderr, res
    assert exec_lines(cri, server, "mkfifo /tmp/fifo && echo fifo-ok") == ["fifo-ok"]

    # A host directory: pod root is host root there (idmapped bind), uid 1000 is 1000.
    assert exec_lines(cri, server, "echo r > /data/by-root && stat -c '%u %g' /data/host-file"
                      " /data/by-root") == ["0 0", "0 0"]
    st = os.stat(data / "by-root")
    assert (st.st_uid, st.st_gid) == (0, 0), st
    gid = exec_lines(cri, client, "echo u > /data/user-dir/by-user && id -g")
    st = os.stat(data / "user-dir" / "by-user")
    assert [str(st.st_uid), str(st.st_gid)] == ["1000", *gid], (st, gid)

    # Port 80, bound by pod root in the pod's network namespace (containerd's),
    # reached from the other container on localhost.
    assert exec_lines(cri, client, "wget -qO- http://127.0.0.1:80/") == ["hello-on-80"]
    assert exec_lines(cri, client, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start") == ["0"]
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        assert f.read() == host_port_start, "the host's own setting changed"

    for cid in (server, client):
        cri.crictl("stop", "--timeout", "20", cid)
        cri.crictl("rm", cid)
    assert lease.exists(), "the range was released while the sandbox lives"
    remove_pod(cri, pod)
    assert not lease.exists(), f"{lease} left after RemovePodSandbox"


def test_pods_get_disjoint_ranges(clean: CriEnv) -> None:
    """Two pods at once: two leases, ranges that do not overlap, each container in its
    own pod's range."""
    cri = clean
    pods = {name: run_pod(cri, name, HANDLER) for name in ("range-a", "range-b")}
    ranges = {}
    for name, pod in pods.items():
        base, lease = pod_range(cri, pod)
        ranges[name] = (base, lease)
        cid = container(cri, pod, name, "main", SERVE)
        wait_log(cri, name, "main", "started")
        got = exec_lines(cri, cid, "cat /proc/self/uid_map")
        assert got[0].split() == ["0", str(base), str(RANGE_SIZE)], got
    (a, _), (b, _) = ranges.values()
    assert a + RANGE_SIZE <= b or b + RANGE_SIZE <= a, ranges
    for pod in pods.values():
        remove_pod(cri, pod)
    left = [str(lease) for _, lease in ranges.values() if lease.exists()]
    assert not left, f"leases left: {left}"


@pytest.mark.parametrize("handler", [HANDLER, "runc"])
def test_kill9_shim(clean: CriEnv, handler: str) -> None:
    """kill -9 of the pod's shim (containerd-shim-runc-v2), then what a kubelet does
    (StopPodSandbox, RemovePodSandbox): nothing of the pod is left, its range lease
    included. containerd 1.6 notices the shim's death and runs `shim delete`, which
    calls the runtime's `delete --force` for each of the pod's tasks: the pause process
    is killed by it, with runc as with uspawn-runc-pods (the runc run shows that this is
    containerd's doing, not the runtime's). The deletes may still be running when
    RemovePodSandbox returns (the pause's pid namespace ends only once the host's init
    has reaped the orphaned container processes): waited for, bounded."""
    cri = clean
    if handler == "runc" and cri.runc is None:
        pytest.skip("runc not installed (comparison only)")
    name = f"shimkill-{handler}"
    pod = run_pod(cri, name, handler)
    lease = pod_range(cri, pod)[1] if handler == HANDLER else None
    pause = waits.open_pidfds([sandbox_pid(cri, pod)])
    cid = container(cri, pod, name, "main", SERVE)
    wait_log(cri, name, "main", "started")
    shims = cri.shim_pids()
    assert len(shims) == 1, shims  # one shim per pod (containerd 1.6's runc v2 shim)
    os.kill(shims[0], signal.SIGKILL)
    wait_all_gone(cri.shim_pids, 15, "the killed shim")
    cri.crictl("stopp", pod)
    cri.crictl("rmp", pod)
    assert pod not in cri.crictl("pods", "-q").split()
    assert cid not in cri.crictl("ps", "-a", "-q").split()
    waits.wait_pidfds(pause, 30, "the pod's pause process")
    state = cri.root / f"{handler}-state" / "k8s.io"

    def gone() -> bool:
        return not ((state / pod).exists() or (state / cid).exists()
                    or (lease is not None and lease.exists()))

    waits.wait_until(gone, [state, RANGES], f"the runtime state of {pod} and {cid}"
                     + (f" and {lease}" if lease else "") + " to go", 30,
                     mask=waits.IN_DELETE)
    wait_all_gone(lambda: pids_in_cgroup_tree(cri.cgroup_parent), 30, "the pod's processes")
