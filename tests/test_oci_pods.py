"""uspawn-runc-pods without containerd (oci/pods.py; the CRI tier drives it through
containerd in tests/cri/test_cri_pods.py): the binary name selects the mode, a sandbox
gets a leased range of its own, a container of its pod joins the sandbox's user
namespace, and what cannot be joined is refused with one line naming the field,
before anything runs. The sandbox record is checked against /proc: a live process
with another start time, or with other ID maps, is never taken for the sandbox.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import cgroup_dirs
from test_oci import Oci

from uspawn.state.store import proc_starttime

TYPE = "io.kubernetes.cri.container-type"
SANDBOX = "io.kubernetes.cri.sandbox-id"
RANGES = Path("/run/uspawn/ranges")


class PodsOci(Oci):
    """uspawn-runc started as uspawn-runc-pods (entry(pods=True), as bin/uspawn-runc-pods);
    env: extra environment variables."""

    stdin = subprocess.DEVNULL

    def command(self) -> list[str]:
        return [sys.executable, "-c", "from uspawn.oci.cli import entry; entry(pods=True)"]


@pytest.fixture
def pods(tmp_path: Path, need_root: None) -> Iterator[PodsOci]:
    o = PodsOci(tmp_path / "oci-state")
    yield o
    for line in o("list", "-q", check=False).stdout.split():
        o("delete", "--force", line, check=False)


def pod_bundle(tmp_path: Path, template: Path, name: str, args: list[str],
               annotations: dict[str, str] | None = None,
               joined: dict[str, str] | None = None) -> Path:
    """A bundle asking for no user namespace (as containerd's CRI configs), with a
    copy of template as rootfs; joined: namespace type -> path."""
    from uspawn.oci.defaults import default_config

    b = tmp_path / name
    b.mkdir()
    subprocess.run(["cp", "-a", str(template), str(b / "rootfs")], check=True)
    cfg = default_config()
    proc, root, linux = cfg["process"], cfg["root"], cfg["linux"]
    assert isinstance(proc, dict) and isinstance(root, dict)
    proc.update(args=args, terminal=False)
    root["readonly"] = False
    assert isinstance(linux, dict)
    joined = joined or {}
    linux["namespaces"] = [n for n in linux["namespaces"]
                           if n["type"] not in ("user", *joined)]
    linux["namespaces"] += [{"type": t, "path": p} for t, p in joined.items()]
    linux.pop("uidMappings", None)
    linux.pop("gidMappings", None)
    cfg["annotations"] = annotations or {}
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def _one_line_refusal(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def _maps(pid: int) -> list[str]:
    return [" ".join(Path(f"/proc/{pid}/{m}").read_text().split()) for m in ("uid_map",
                                                                            "gid_map")]


def test_binary_name_selects_the_mode(tmp_path: Path) -> None:
    """A link named uspawn-runc-pods to uspawn-runc is the pods mode (argv[0]), as is
    the script of that name."""
    venv_bin = Path(sys.executable).parent
    link = tmp_path / "uspawn-runc-pods"
    link.symlink_to(venv_bin / "uspawn-runc")
    for exe, name in ((venv_bin / "uspawn-runc", "uspawn-runc"), (link, "uspawn-runc-pods"),
                      (venv_bin / "uspawn-runc-pods", "uspawn-runc-pods")):
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             check=True).stdout
        assert out.splitlines()[0] == f"{name} version 0.1.0", (exe, out)


def test_sandbox_and_container_share_a_user_namespace(pods: PodsOci,
                                                       rootfs_template: Path,
                                                       tmp_path: Path) -> None:
    sid, cid = f"pod-{uuid.uuid4().hex[:8]}", f"ctr-{uuid.uuid4().hex[:8]}"
    sb = pod_bundle(tmp_path, rootfs_template, "sandbox", ["sleep", "1000"],
                    {TYPE: "sandbox", SANDBOX: sid})
    pods("run", "-d", "-b", str(sb), sid)
    st = json.loads((pods.root / sid / "state.json").read_text())
    spid = st["pid"]
    base = st["pod"]["uid_map"][0][1]
    assert _maps(spid) == [f"0 {base} 65536"] * 2 and base >= 65536, _maps(spid)
    lease = RANGES / f"{base}-65536.lock"
    assert json.loads(lease.read_text())["pid"] == spid

    ns = {t: f"/proc/{spid}/ns/{f}" for t, f in (("ipc", "ipc"), ("uts", "uts"),
                                                  ("network", "net"), ("pid", "pid"))}
    ctr = pod_bundle(tmp_path, rootfs_template, "container",
                     ["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map;"
                      " readlink /proc/self/ns/user; id -u; mknod /tmp/n c 1 3 2>&1;"
                      " echo x > /dev/null && echo null-ok"],
                     {TYPE: "container", SANDBOX: sid}, ns)
    out = pods("run", "-b", str(ctr), cid).stdout.splitlines()
    assert [" ".join(x.split()) for x in out[:2]] == [f"0 {base} 65536"] * 2, out
    assert out[2:4] == [os.readlink(f"/proc/{spid}/ns/user"), "0"], out
    assert "Operation not permitted" in out[4] and out[5] == "null-ok", out
    assert lease.exists(), "the container's delete dropped the sandbox's lease"
    pods("delete", "--force", sid)
    assert not lease.exists()


def test_a_container_keeps_the_pods_range_after_its_sandbox_died(
        pods: PodsOci, rootfs_template: Path, tmp_path: Path) -> None:
    """Each container of a pod co-owns the pod's range (BASE-SIZE@ID.lock, handed to
    its init): with the sandbox gone and the container still running in the range,
    nobody can lease it; the container's delete frees it."""
    from uspawn.base.errors import StateError
    from uspawn.state.store import RangeAllocator

    sid, cid = f"pod-{uuid.uuid4().hex[:8]}", f"ctr-{uuid.uuid4().hex[:8]}"
    sb = pod_bundle(tmp_path, rootfs_template, "sandbox", ["sleep", "1000"],
                    {TYPE: "sandbox", SANDBOX: sid})
    pods("run", "-d", "-b", str(sb), sid)
    st = json.loads((pods.root / sid / "state.json").read_text())
    spid, base = st["pid"], st["pod"]["uid_map"][0][1]
    # A pid namespace of its own (a kubelet's default): it outlives the sandbox's init.
    ns = {t: f"/proc/{spid}/ns/{f}" for t, f in (("ipc", "ipc"), ("uts", "uts"),
                                                  ("network", "net"))}
    ctr = pod_bundle(tmp_path, rootfs_template, "container", ["sleep", "1000"],
                     {TYPE: "container", SANDBOX: sid}, ns)
    pods("run", "-d", "-b", str(ctr), cid)
    cpid = json.loads((pods.root / cid / "state.json").read_text())["pid"]
    share = RANGES / f"{base}-65536@{cid}.lock"
    assert json.loads(share.read_text())["pid"] == cpid
    pods("delete", "--force", sid)
    assert not (RANGES / f"{base}-65536.lock").exists()
    assert Path(f"/proc/{cpid}").exists() and _maps(cpid) == [f"0 {base} 65536"] * 2
    with pytest.raises(StateError, match="already used"):
        RangeAllocator().lease(base).release()  # taken while the container runs
    pods("delete", "--force", cid)
    assert not share.exists()
    RangeAllocator().lease(base).release()  # free again


def test_config_with_a_user_namespace_runs_as_today(pods: PodsOci, rootfs: Path,
                                                    tmp_path: Path) -> None:
    from test_oci import make_bundle

    b = make_bundle(tmp_path, rootfs, ["cat", "/proc/self/uid_map"])  # maps 200000
    out = pods("run", "-b", str(b), f"own-{uuid.uuid4().hex[:8]}").stdout
    assert out.split() == ["0", "200000", "65536"], out


@pytest.mark.parametrize("annotations,words", [
    ({TYPE: "container"}, (f"annotations.{SANDBOX}: missing",)),
    ({TYPE: "container", SANDBOX: "no-such-pod"}, ("pod sandbox 'no-such-pod' does not exist",)),
    ({TYPE: "container", SANDBOX: "../x"}, (f"annotations.{SANDBOX}", "not a container id")),
    ({TYPE: "bogus"}, (f"annotations.{TYPE}: unknown value 'bogus'", "hint")),
])
def test_unjoinable_pods_are_refused(pods: PodsOci, rootfs_template: Path, tmp_path: Path,
                                     annotations: dict[str, str], words: tuple[str]) -> None:
    b = pod_bundle(tmp_path, rootfs_template, "bad", ["true"], annotations)
    cid = f"bad-{uuid.uuid4().hex[:8]}"
    _one_line_refusal(pods("run", "-b", str(b), cid, check=False), *words)
    assert cid not in pods("list", "-q").stdout.split()


@pytest.mark.parametrize("case", ["other start time", "other maps"])
def test_sandbox_record_is_checked_against_proc(pods: PodsOci, rootfs_template: Path,
                                                tmp_path: Path, case: str) -> None:
    """A record naming a live process that is not the pod's sandbox init (a recycled
    pid: another start time; or a process in another user namespace) is refused."""
    me = os.getpid()
    start = proc_starttime(me)
    assert start is not None
    sid = f"fake-{uuid.uuid4().hex[:8]}"
    (pods.root / sid).mkdir(parents=True)
    m = [[0, 300000, 65536]]
    (pods.root / sid / "state.json").write_text(json.dumps(
        {"id": sid, "pid": me, "pid_start": start + 1 if case == "other start time" else start,
         "pod": {"sandbox": sid, "uid_map": m, "gid_map": m}}))
    b = pod_bundle(tmp_path, rootfs_template, "ctr", ["true"], {TYPE: "container", SANDBOX: sid})
    cid = f"ctr-{uuid.uuid4().hex[:8]}"
    r = pods("run", "-b", str(b), cid, check=False)
    if case == "other start time":
        _one_line_refusal(r, f"pod sandbox {sid!r} is not running")
    else:
        _one_line_refusal(r, "are not the recorded pod maps")
    assert cid not in pods("list", "-q").stdout.split()
    (pods.root / sid / "state.json").unlink()
    (pods.root / sid).rmdir()


def test_failed_sandbox_start_leaves_no_lease(pods: PodsOci, rootfs_template: Path,
                                             tmp_path: Path) -> None:
    """The sandbox's range is leased before the engine runs; a start that fails in the
    container (a sysctl pod root may not write) releases it and leaves nothing."""
    ranges = tmp_path / "ranges"  # the allocator's directory, this test's own
    pods.env = {"USPAWN_RANGES_DIR": str(ranges)}
    b = pod_bundle(tmp_path, rootfs_template, "sb", ["true"], {TYPE: "sandbox"})
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["sysctl"] = {"vm.swappiness": "10"}  # the host's, not the pod's
    (b / "config.json").write_text(json.dumps(cfg))
    sid = f"fail-{uuid.uuid4().hex[:8]}"
    _one_line_refusal(pods("run", "-d", "-b", str(b), sid, check=False), "vm.swappiness")
    assert os.listdir(ranges) == [], "the range lease of a failed start was left"
    assert sid not in pods("list", "-q").stdout.split()
    assert not (pods.root / sid).exists()
    assert cgroup_dirs(sid) == []
