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

from .cri_env import CNI_BIN, IMAGE, PAUSE_IMAGE, CriEnv, ensure_tools, tools_src

REPO = Path(__file__).resolve().parents[2]
USPAWN_RUNC = REPO / ".venv" / "bin" / "uspawn-runc"


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
    root = Path(tempfile.mkdtemp(prefix="uspawn-cri-", dir="/tmp"))
    root.chmod(0o755)
    env = CriEnv(root, crictl_bin, runtime, shutil.which("runc"))
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
