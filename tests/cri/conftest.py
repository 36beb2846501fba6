"""Fixtures for the CRI tier: one private containerd per session (tests/cri/cri_env.py).

The `uspawn` handler runs the repo's .venv/bin/uspawn-runc, or $USPAWN_CRI_RUNTIME.
Needs root, containerd (Debian's 1.6), containernetworking-plugins and the cri-tools
source (../shared/cri-tools or $USPAWN_CRI_TOOLS_SRC; crictl is built from it once). What
is missing skips, and fails under USPAWN_MUST_WORK=1, except the cri-tools source: CI
machines may not carry it (as tests/oci_validation does with its suite).

This directory is a package so that this module is `cri.conftest` and does not shadow
tests/conftest.py, imported below as `conftest`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail

from uspawn.tree.busybox import build_busybox_rootfs

from .cri_env import (
    CNI_BIN,
    IMAGE,
    PAUSE_IMAGE,
    CriEnv,
    cgroup_dirs_under,
    ensure_tools,
    links_on_bridge,
    mounts_matching,
    pids_in_cgroup_tree,
    tools_src,
)

REPO = Path(__file__).resolve().parents[2]
USPAWN_RUNC = REPO / ".venv" / "bin" / "uspawn-runc"
USPAWN_RUNC_PODS = REPO / ".venv" / "bin" / "uspawn-runc-pods"


@pytest.fixture(scope="session")
def crictl_bin(need_root: None) -> Path:
    src = tools_src()
    if not any(src.glob("cri-tools-*.tar.gz")):
        pytest.skip(f"no cri-tools source at {src} (set USPAWN_CRI_TOOLS_SRC)")
    return ensure_tools(src) / "crictl"


# Package scope: containerd (a child of pytest) is stopped when tests/cri ends, not
# at the end of the session, where later tests see it as a child they did not start.
@pytest.fixture(scope="package")
def cri(crictl_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CriEnv]:
    for tool in ("containerd", "ctr", "containerd-shim-runc-v2"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} missing (apt-get install containerd)")
    if not (CNI_BIN / "bridge").is_file():
        skip_or_fail("CNI plugins missing (apt-get install containernetworking-plugins)")
    # USPAWN_CRI_RUNTIME: another binary for the `uspawn` handler (an older uspawn-runc,
    # or runc to check the harness itself).
    runtime = os.environ.get("USPAWN_CRI_RUNTIME") or str(USPAWN_RUNC)
    if not os.access(runtime, os.X_OK):
        skip_or_fail(f"{runtime} missing (scripts/setup.sh)")
    # The `uspawn-pods` handler (every pod in a user namespace of its own):
    # $USPAWN_CRI_PODS_RUNTIME or the repo's .venv/bin/uspawn-runc-pods.
    pods = os.environ.get("USPAWN_CRI_PODS_RUNTIME") or str(USPAWN_RUNC_PODS)
    if not os.access(pods, os.X_OK):
        skip_or_fail(f"{pods} missing (scripts/setup.sh)")
    root = Path(tempfile.mkdtemp(prefix="uspawn-cri-", dir="/tmp"))
    root.chmod(0o755)
    env = CriEnv(root, crictl_bin, runtime, shutil.which("runc"), uspawn_runc_pods=pods)
    try:
        env.start()
        rootfs = tmp_path_factory.mktemp("cri-image") / "busybox"
        build_busybox_rootfs(str(rootfs))
        archive = rootfs.parent / "images.tar"
        from .cri_env import write_image_archive

        # The sandbox ("pause") image: sleep as pid 1, killed with SIGKILL by
        # StopPodSandbox as the real pause would be.
        write_image_archive(rootfs, archive, {IMAGE: ["/bin/sh"],
                                              PAUSE_IMAGE: ["/bin/sleep", "2147483647"]})
        env.import_images(archive)
        shutil.rmtree(rootfs.parent)
    except BaseException:
        env.stop()
        raise
    yield env
    problems = env.stop()
    assert not problems, "CRI environment teardown:\n" + "\n".join(problems)


@pytest.fixture
def clean(cri: CriEnv) -> Iterator[CriEnv]:
    """The environment; afterwards every pod is gone and left nothing behind."""
    from waits import wait_all_gone

    yield cri
    problems = cri.remove_all_pods()
    # A pod's shim exits once its sandbox is removed (shortly after rmp returns).
    try:
        wait_all_gone(cri.shim_pids, 15, "shims")
    except AssertionError as exc:
        problems.append(str(exc))
    netns = cri.root / "state" / "io.containerd.grpc.v1.cri" / "netns"
    left = {
        "pods": cri.crictl("pods", "-q").split(),
        "mounts": mounts_matching([str(cri.root)]),
        "cgroups": cgroup_dirs_under(cri.cgroup_parent),
        "processes": pids_in_cgroup_tree(cri.cgroup_parent),
        "veths": links_on_bridge(cri.bridge),
        "netns": os.listdir(netns) if netns.is_dir() else [],
        "runtime state": [str(p) for d in ("uspawn-state", "runc-state", "uspawn-pods-state")
                          for p in (cri.root / d).glob("k8s.io/*")],
    }
    left = {k: v for k, v in left.items() if v}
    assert not problems and not left, f"left behind: {left} {problems}"
