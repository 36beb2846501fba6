"""Limits reach the kernel for every cgroupsPath shape (issue 13: v1 limits used
to be applied only when the path had exactly two components), and
rootfsPropagation takes effect. The same limits check runs on pure cgroup v2
in the kernel-matrix guests (tests/kernels/guest_checks.py, check_oci_cgroups)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from test_oci import Oci, make_bundle
from test_oci_conformance import _cgroup_file


def _memory_limit(pid: int) -> int:
    try:
        return int(_cgroup_file(pid, "memory", "memory.limit_in_bytes"))
    except FileNotFoundError:
        return int(_cgroup_file(pid, "memory", "memory.max"))


@pytest.mark.parametrize("shape", ["absolute", "relative", "nested-relative", "slice"])
def test_limits_apply_for_every_cgroups_path_shape(oci: Oci, rootfs: Path, tmp_path: Path,
                                                   shape: str) -> None:
    cid = f"cgp-{uuid.uuid4().hex[:8]}"
    path = {"absolute": f"/uspawn-test-{cid}",
            "relative": f"uspawn-test-{cid}",
            "nested-relative": f"uspawn-test-{cid}/a/b",
            "slice": f"uspawntest.slice:uspawn:{cid}"}[shape]
    b = make_bundle(tmp_path, rootfs, ["sleep", "60"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = path
    cfg["linux"]["resources"] = {"memory": {"limit": 48 << 20}, "pids": {"limit": 21}}
    (b / "config.json").write_text(json.dumps(cfg))
    oci("create", "-b", str(b), cid)
    try:
        pid = int(json.loads(oci("state", cid).stdout)["pid"])
        assert _cgroup_file(pid, "pids", "pids.max") == "21"
        assert _memory_limit(pid) == 48 << 20
        rows = Path(f"/proc/{pid}/cgroup").read_text()
        want = {"absolute": f"/uspawn-test-{cid}", "relative": f"uspawn-test-{cid}",
                "nested-relative": f"uspawn-test-{cid}/a/b",
                "slice": f"uspawntest.slice/uspawn-{cid}.scope"}[shape]
        assert want in rows, rows
    finally:
        oci("delete", "--force", cid)
    # delete removed the container's own directory (the parents a relative or
    # slice path names stay, as with runc).
    assert cid not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.parametrize("prop,expect", [("shared", "exposed"), ("slave", "hidden"),
                                         ("private", "hidden"), ("unbindable", "unbindable")])
def test_rootfs_propagation_takes_effect(oci: Oci, rootfs: Path, tmp_path: Path,
                                         prop: str, expect: str) -> None:
    """runtimetest's check, inside: / bound recursively elsewhere sees a mount made
    later under / only when / is shared; an unbindable / cannot be bound at all.
    (shared used to fail with pivot_root EINVAL, unbindable acted as private.)"""
    # /dev/shm: a tmpfs container root may write (the bundle's tree is host root's).
    script = ("cd /dev/shm && mkdir t m x && touch x/f || exit 9; "
              "mount -o rbind / t 2>/dev/null || { echo unbindable; exit 0; }; "
              "mount -o bind x m; [ -e t/dev/shm/m/f ] && echo exposed || echo hidden")
    b = make_bundle(tmp_path, rootfs, ["sh", "-c", script])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["rootfsPropagation"] = prop
    for key in ("bounding", "effective", "permitted"):  # to mount (the template has none)
        cfg["process"]["capabilities"][key].append("CAP_SYS_ADMIN")
    (b / "config.json").write_text(json.dumps(cfg))
    r = oci("run", "-b", str(b), f"prop-{uuid.uuid4().hex[:8]}", check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expect]


def test_hugepage_limits_reach_the_kernel(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    """kubelet sends every huge page size limited to 0 unless the pod asks: the
    limits used to be ignored with a warning (huge pages unlimited)."""
    cid = f"hug-{uuid.uuid4().hex[:8]}"
    b = make_bundle(tmp_path, rootfs, ["sleep", "60"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["resources"] = {"hugepageLimits": [{"pageSize": "2MB", "limit": 0},
                                                    {"pageSize": "1GB", "limit": 1 << 30}]}
    (b / "config.json").write_text(json.dumps(cfg))
    r = oci("create", "-b", str(b), cid, check=False)
    if not Path("/sys/kernel/mm/hugepages/hugepages-1048576kB").is_dir():
        assert r.returncode == 1 and "hugepageLimits[1].pageSize" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    try:
        pid = int(json.loads(oci("state", cid).stdout)["pid"])
        for size, want in (("2MB", 0), ("1GB", 1 << 30)):
            try:
                got = _cgroup_file(pid, "hugetlb", f"hugetlb.{size}.limit_in_bytes")
            except (FileNotFoundError, AssertionError):
                got = _cgroup_file(pid, "hugetlb", f"hugetlb.{size}.max")
            assert got == str(want), (size, got)
    finally:
        oci("delete", "--force", cid)


def test_unknown_hugepage_size_names_the_field(oci: Oci, rootfs: Path, tmp_path: Path) -> None:
    b = make_bundle(tmp_path, rootfs, ["true"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["resources"] = {"hugepageLimits": [{"pageSize": "3MB", "limit": 0}]}
    (b / "config.json").write_text(json.dumps(cfg))
    r = oci("run", "-b", str(b), f"hugx-{uuid.uuid4().hex[:8]}", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "linux.resources.hugepageLimits[0].pageSize: '3MB'" in r.stderr, r.stderr
    assert oci("list", "-q").stdout.split() == []
