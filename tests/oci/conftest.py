"""Fixtures for the podman tests: the runtime under test and an isolated podman.

The runtime comes from USPAWN_OCI_RUNTIME (a path or a command name); by default
/usr/local/bin/uspawn-runc. Develop against runc with

    USPAWN_OCI_RUNTIME=$(which runc) .venv/bin/python -m pytest -q tests/oci

podman itself comes from Debian (scripts/install-podman.sh; run here automatically
when podman is missing and we are root). Missing podman or a missing default runtime
skips, and fails under USPAWN_MUST_WORK=1. USPAWN_OCI_TRACE_OUT=FILE keeps the runtime
command lines podman and conmon issued (one per line) after the session.

This directory is a package so that this module is `oci.conftest` and does not
shadow tests/conftest.py, imported below as `conftest`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail

from uspawn.tree.busybox import build_busybox_rootfs

from .podman_env import USPAWN_RUNC_PATHS, PodmanEnv, resolve_runtime

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install-podman.sh"


@pytest.fixture(scope="session")
def oci_runtime() -> str:
    value = os.environ.get("USPAWN_OCI_RUNTIME")
    if value:
        path = resolve_runtime(value)
        if path is None:
            pytest.fail(f"USPAWN_OCI_RUNTIME={value!r} is not an executable file")
        return path
    for cand in USPAWN_RUNC_PATHS:
        path = resolve_runtime(cand)
        if path:
            return path
    skip_or_fail(f"runtime missing: no uspawn-runc at {' or '.join(USPAWN_RUNC_PATHS)} "
                 "(set USPAWN_OCI_RUNTIME=$(which runc) to test the harness with runc)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def podman_bin(need_root: None) -> str:
    found = shutil.which("podman")
    if found is None:
        res = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True,
                             timeout=600, stdin=subprocess.DEVNULL)
        found = shutil.which("podman")
        if res.returncode != 0 or found is None:
            skip_or_fail(f"podman missing and scripts/install-podman.sh failed "
                         f"(exit {res.returncode}): {res.stderr.strip()[-500:]}")
            raise AssertionError("unreachable")
    if shutil.which("conmon") is None:
        skip_or_fail("podman present but conmon missing (bash scripts/install-podman.sh)")
    return found


@pytest.fixture(scope="session")
def penv(podman_bin: str, oci_runtime: str) -> Iterator[PodmanEnv]:
    root = Path(tempfile.mkdtemp(prefix="uspawn-podman-", dir="/tmp"))
    env = PodmanEnv(root, oci_runtime, podman_bin)
    try:
        env.setup()
        rootfs = root / "rootfs"
        build_busybox_rootfs(str(rootfs))
        env.import_image(rootfs)
        shutil.rmtree(rootfs)
        yield env
    finally:
        out = os.environ.get("USPAWN_OCI_TRACE_OUT")
        if out:
            env.dump_calls(Path(out))
        problems = env.cleanup()
        if problems:
            warnings.warn("podman cleanup: " + "\n".join(problems), stacklevel=1)
