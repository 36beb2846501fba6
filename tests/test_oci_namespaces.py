"""Configs without a mount namespace of the container's own (runtime-tools'
linux_ns_itype and linux_ns_path): the host's mount namespace, or one joined by
path. runc runs both (chroot instead of pivot_root, the mounts stay in that
namespace); uspawn-runc does the same without a user namespace, detaches the
mounts it stacked on the host's rootfs directory at delete, and refuses either
with a user namespace (its mounts must be locked in a namespace of its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_oci import Oci, make_bundle

Cfg = dict[str, Any]


def _bundle(tmp_path: Path, rootfs: Path, args: list[str], mount: Cfg | None,
            userns: bool = False) -> Path:
    b = make_bundle(tmp_path, rootfs, args, userns=userns)
    cfg = json.loads((b / "config.json").read_text())
    linux = cfg["linux"]
    nss = [n for n in linux["namespaces"] if n["type"] != "mount"]
    if not userns:
        nss = [n for n in nss if n["type"] != "user"]
        linux.pop("uidMappings", None)
        linux.pop("gidMappings", None)
    linux["namespaces"] = nss + ([mount] if mount else [])
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def _mounts_below(path: Path) -> list[str]:
    top = str(path.resolve())
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point == top or point.startswith(top + "/"):
            out.append(point)
    return out


def test_no_mount_namespace_runs_in_the_hosts_and_delete_detaches(
        oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = _bundle(tmp_path, rootfs, ["sh", "-c", "readlink /proc/self/ns/mnt; "
                                   "echo x > /dev/null && echo null-ok; exec sleep 100"], None)
    assert _mounts_below(b) == []
    cid = f"nomnt-{uuid.uuid4().hex[:8]}"
    oci("create", "-b", str(b), cid)
    state = json.loads(oci("state", cid).stdout)
    assert os.readlink(f"/proc/{state['pid']}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert f"{b / 'rootfs'}/proc" in _mounts_below(b)  # where runc puts them too
    oci("kill", cid, "KILL")
    oci("delete", "--force", cid)
    assert _mounts_below(b) == []


def test_no_mount_namespace_foreground_run_leaves_no_mount(
        oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = _bundle(tmp_path, rootfs, ["sh", "-c", "echo x > /dev/null && readlink /proc/self/ns/mnt"],
                None)
    r = oci("run", "-b", str(b), f"nomntrun-{uuid.uuid4().hex[:8]}", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.readlink("/proc/self/ns/mnt")
    assert _mounts_below(b) == []


def test_join_mount_namespace_by_path(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               "echo up; exec sleep 100"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        path = f"/proc/{holder.pid}/ns/mnt"
        assert os.readlink(path) != os.readlink("/proc/self/ns/mnt")
        b = _bundle(tmp_path, rootfs, ["readlink", "/proc/self/ns/mnt"],
                    {"type": "mount", "path": path})
        before = _mounts_below(b)
        r = oci("run", "-b", str(b), f"mntj-{uuid.uuid4().hex[:8]}", check=False)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == os.readlink(path)
        assert _mounts_below(b) == before  # the mounts went into the joined namespace
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("mount", [None, {"type": "mount", "path": "/proc/self/ns/mnt"}])
def test_a_user_namespace_needs_its_own_mount_namespace(oci: Oci, rootfs: Path,
                                                        tmp_path: Path, mount: Cfg | None) -> None:
    b = _bundle(tmp_path, rootfs, ["true"], mount, userns=True)
    r = oci("run", "-b", str(b), f"nsu-{uuid.uuid4().hex[:8]}", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "linux.namespaces: a user namespace needs a mount namespace of its own" in r.stderr


def test_join_pid_namespace_by_path_with_a_user_namespace(oci: Oci, rootfs: Path,
                                                          tmp_path: Path) -> None:
    """proc of a pid namespace made elsewhere (owned by the host's user namespace):
    stage A's helper mounts it as host root, so a new user namespace can join it
    (the init could not: only the pid namespace's owner may mount its proc)."""
    holder = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sh", "-c",
                               "echo up; exec sleep 100"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        [kid] = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
        path = f"/proc/{kid}/ns/pid"
        b = make_bundle(tmp_path, rootfs, ["sh", "-c", "readlink /proc/self/ns/pid; "
                                           "cat /proc/1/cmdline | tr '\\0' ' '"])
        cfg = json.loads((b / "config.json").read_text())
        nss = [n for n in cfg["linux"]["namespaces"] if n["type"] != "pid"]
        cfg["linux"]["namespaces"] = [*nss, {"type": "pid", "path": path}]
        (b / "config.json").write_text(json.dumps(cfg))
        r = oci("run", "-b", str(b), f"pidju-{uuid.uuid4().hex[:8]}", check=False)
        assert r.returncode == 0, r.stderr
        ns, cmdline = r.stdout.split("\n", 1)
        assert ns == os.readlink(path)
        assert cmdline.split() == ["sleep", "100"]  # pid 1 there is the holder's sleep
    finally:
        holder.kill()
        holder.wait()
