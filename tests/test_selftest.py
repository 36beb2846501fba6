"""`uspawn selftest` on the real kernel: every canary passes on this machine, and a
/dev built the wrong way (USPAWN_TEST_FAULT=dev-nodev: nodes present but
unopenable, uspawn's own start-time verification skipped) makes the /dev canaries
fail with clear lines, as a 4.18-style kernel would."""

from __future__ import annotations

import io
import json
import os
import re

import pytest

from uspawn.diag.selftest import CANARIES, SELFTEST_ROOTFS, run_selftest


@pytest.fixture(autouse=True)
def _root(need_root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USPAWN_TEST_FAULT", raising=False)


def selftest(as_json: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = run_selftest(as_json, out)
    return code, out.getvalue()


def test_all_canaries_pass_on_this_machine() -> None:
    code, text = selftest()
    lines = text.splitlines()
    assert lines[-1] == f"{len(CANARIES)} passed, 0 failed", text
    assert code == 0
    assert lines[:-1] == [f"PASS {name}" for name, *_ in CANARIES]
    assert os.path.isfile(os.path.join(SELFTEST_ROOTFS, "bin/busybox"))  # built and cached
    assert os.stat(os.path.dirname(SELFTEST_ROOTFS)).st_mode & 0o777 == 0o700


def test_json_report() -> None:
    code, text = selftest(as_json=True)
    doc = json.loads(text)
    assert code == 0
    assert doc["failed"] == 0 and doc["passed"] == len(CANARIES)
    assert [c["name"] for c in doc["canaries"]] == [name for name, *_ in CANARIES]
    assert all(c["passed"] and c["reason"] == "" for c in doc["canaries"])


def test_dev_nodev_fault_fails_the_dev_canaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USPAWN_TEST_FAULT", "dev-nodev")
    code, text = selftest()
    assert code == 1
    lines = text.splitlines()
    assert re.fullmatch(r"\d+ passed, [1-9]\d* failed", lines[-1]), lines[-1]
    fails = {ln.split(":")[0][5:]: ln for ln in lines if ln.startswith("FAIL ")}
    for name in ("dev-null", "dev-zero", "dev-urandom", "private-devices-fallback"):
        assert name in fails, text
        assert "Permission denied" in fails[name], fails[name]
    assert fails["dev-null"] == "FAIL dev-null: sh: can't create /dev/null: Permission denied"
    # What does not depend on /dev keeps passing: the fault is pinned down.
    for name in ("mknod-refused", "var-write-nonroot", "ownership-map"):
        assert f"PASS {name}" in lines, text
    passed, failed = (int(x) for x in re.findall(r"\d+", lines[-1]))
    assert (passed, failed) == (len(CANARIES) - len(fails), len(fails))
