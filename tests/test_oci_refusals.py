"""Settings uspawn-runc cannot apply are refused with one line naming the field,
never dropped (issue 13): net_cls/net_prio and blkio limits, and capabilities
the host withholds from the runtime (runc fails these configs too)."""

from __future__ import annotations

import ctypes
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from test_oci import Oci, make_bundle, runtime_cmd

PR_CAPBSET_DROP = 24
CAP_SYS_NICE = 23


def _bundle(tmp_path: Path, rootfs: Path, edit: Any) -> Path:
    b = make_bundle(tmp_path, rootfs, ["true"])
    cfg = json.loads((b / "config.json").read_text())
    edit(cfg)
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def _assert_refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.parametrize("field,value", [("network", {"classID": 1048577}),
                                         ("blockIO", {"weight": 10}),
                                         ("rdma", {"mlx5_1": {"hcaHandles": 3}}),
                                         ("unified", {"memory.high": "50000000"})])
def test_unapplied_resources_are_refused(oci: Oci, rootfs: Path, tmp_path: Path,
                                         field: str, value: object) -> None:
    b = _bundle(tmp_path, rootfs,
                lambda cfg: cfg["linux"].setdefault("resources", {}).update({field: value}))
    cid = f"res-{uuid.uuid4().hex[:8]}"
    _assert_refused(oci("run", "-b", str(b), cid, check=False),
                    f"linux.resources.{field}", "not supported")
    assert oci("list", "-q").stdout.split() == []


@pytest.mark.parametrize("field", ["network", "blockIO", "rdma", "unified"])
def test_empty_resource_sections_are_fine(oci: Oci, rootfs: Path, tmp_path: Path,
                                          field: str) -> None:
    b = _bundle(tmp_path, rootfs,
                lambda cfg: cfg["linux"].setdefault("resources", {}).update({field: {}}))
    r = oci("run", "-b", str(b), f"rese-{uuid.uuid4().hex[:8]}", check=False)
    assert r.returncode == 0, r.stderr


def _without_sys_nice() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_NICE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


@pytest.mark.parametrize("field", ["bounding", "effective"])
def test_capability_the_host_withholds_is_named(oci: Oci, rootfs: Path, tmp_path: Path,
                                                field: str) -> None:
    def edit(cfg: dict[str, Any]) -> None:
        c = cfg["process"]["capabilities"]
        c[field] = sorted(set(c.get(field, [])) | {"CAP_SYS_NICE"})
        if field == "effective":
            c["permitted"] = c["bounding"] = sorted(set(c.get("permitted", [])) - {"CAP_SYS_NICE"})

    b = _bundle(tmp_path, rootfs, edit)
    cmd = [*runtime_cmd(), "--root", str(oci.root), "run", "-b", str(b),
           f"cap-{uuid.uuid4().hex[:8]}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       preexec_fn=_without_sys_nice)
    _assert_refused(r, f"process.capabilities.{field}", "CAP_SYS_NICE", "bounding set")
    # The same config starts where the runtime holds the capability.
    if field == "bounding":
        assert oci("run", "-b", str(b), f"capok-{uuid.uuid4().hex[:8]}",
                   check=False).returncode == 0
