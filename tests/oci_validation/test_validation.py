"""uspawn-runc against the OCI runtime-tools validation suite, compared with expected.json.

A case expected to pass that fails is a regression and fails this test. A case expected
to fail that now passes is reported (a warning in pytest's summary) so that expected.json
gets updated; it does not fail. The suite's source is not part of the repository: without
/work/shared/oci-validation (or $USPAWN_OCI_VALIDATION_SRC) the run is skipped, also under
USPAWN_MUST_WORK=1, since CI machines may not carry it.

The full run with runc for comparison: `python tests/oci_validation/runner.py --runtime
uspawn-runc --runtime runc` (docs/OCI.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import skip_or_fail

from oci_validation import runner

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected.json"
# The whole suite takes about a minute against uspawn-runc on this 2-core VM; a hung case
# costs runner.DEFAULT_TIMEOUT at most.
RUN_TIMEOUT = 900


def expected() -> dict[str, dict[str, str]]:
    cases: dict[str, dict[str, str]] = json.loads(EXPECTED.read_text())["cases"]
    return cases


# ------------------------------------------------ counting rules (pure, no root, no suite)

TAP_OK = """TAP version 13
ok 1 - first
  ---
  {
    "error": "exit status 1",
    "stderr": "expected failure of the runtime"
  }
  ...
ok 2 - second # SKIP no apparmor
1..2
"""


def test_points_count_and_indented_yaml_is_not_tap() -> None:
    inner = "  stdout: |\n    TAP version 13\n    not ok 1 - inner\n    1..1\n"
    res = runner.score("c", TAP_OK.replace("1..2", inner + "1..2"), "", 0, 0.1, False)
    assert (res.passed, res.failed, res.skipped, res.result) == (2, 0, 1, "pass")


def test_not_ok_fails_with_its_diagnostic() -> None:
    out = 'TAP version 13\nok 1 - a\nnot ok 2 - b\n  ---\n  {"actual": "x"}\n  ...\n1..2\n'
    res = runner.score("c", out, "", 0, 0.1, False)
    assert (res.passed, res.failed, res.result) == (1, 1, "fail")
    assert res.failing_points[0]["point"] == "b"
    assert '"actual": "x"' in res.failing_points[0]["diagnostic"]
    out = "TAP version 13\nnot ok 1 - get data\n# open cpuset.cpus: ENOENT\n1..1\n"
    res = runner.score("c", out, "", 0, 0.1, False)
    assert res.failing_points[0]["diagnostic"] == "open cpuset.cpus: ENOENT"


def test_a_diagnostic_before_its_point_is_kept() -> None:
    """RuntimeInsideValidate prints the inner stdout first, then its point."""
    out = ('TAP version 13\n  ---\n  {"stdout": "TAP version 13\\nnot ok 1 - inner\\n1..1"}\n'
           '  ...\nnot ok 1 - outer\nok 2 - next\n1..2\n')
    res = runner.score("c", out, "", 0, 0.1, False)
    assert res.failing_points[0] == {"point": "outer", "diagnostic": "inner: not ok inner"}


@pytest.mark.parametrize(("out", "code", "timed_out", "reason"), [
    ("TAP version 13\nok 1 - a\n1..3\n", 0, False, "fewer points than the plan"),
    ("TAP version 13\nok 1 - a\n", 0, False, "fewer points than the plan"),
    ("TAP version 13\nok 1 - a\n1..1\n", 1, False, "exit status 1"),
    ("TAP version 13\nok 1 - a\n", None, True, "timed out"),
    ("TAP version 13\nok 1 - a\nBail out! no runtime\n1..1\n", 0, False, "bailed out"),
    # Several streams: the second one breaks its plan.
    ("TAP version 13\nok 1 - a\n1..1\nTAP version 13\n1..2\n", 0, False,
     "fewer points than the plan"),
])
def test_a_broken_case_adds_one_failure(out: str, code: int | None, timed_out: bool,
                                        reason: str) -> None:
    res = runner.score("c", out, "", code, 0.1, timed_out)
    assert (res.passed, res.failed, res.reason) == (1, 1, reason)


def test_pointless_case_passes_once_unless_an_error_diagnostic() -> None:
    clean = runner.score("c", "TAP version 13\n1..0\n", "level=error hook failed", 0, 0.1, False)
    assert (clean.passed, clean.failed) == (1, 0)
    bad = runner.score("c", 'TAP version 13\n  ---\n  {\n    "error": "Hooks MUST"\n  }\n'
                       "  ...\n1..0\n", "", 0, 0.1, False)
    assert (bad.passed, bad.failed, bad.reason) == (0, 1, "error diagnostic")
    died = runner.score("c", "", "failed to create the container", 1, 0.1, False)
    assert (died.passed, died.failed) == (0, 1)


def test_expectations_are_complete_and_explained() -> None:
    for case, exp in expected().items():
        assert exp["expected"] in ("pass", "fail", "racy"), case
        if exp["expected"] in ("fail", "racy"):
            assert exp.get("reason"), f"{case}: an expected failure or race needs a reason"


# ------------------------------------------------ the suite against uspawn-runc


@pytest.fixture(scope="module")
def suite_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    src = runner.suite_src()
    if not (src / "build.sh").is_file():
        # Not skip_or_fail: CI machines may not carry the suite's source.
        pytest.skip(f"OCI validation suite source not found at {src} "
                    "(set USPAWN_OCI_VALIDATION_SRC to a copy of ../shared/oci-validation)")
    if os.geteuid() != 0:
        skip_or_fail("the OCI validation suite needs root")
    out = tmp_path_factory.mktemp("oci-validation") / "results.json"
    proc = subprocess.run([sys.executable, str(HERE / "runner.py"), "--runtime", "uspawn-runc",
                           "--json", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)
    print(proc.stdout)
    assert proc.returncode != 3, f"the run changed host /dev nodes: {proc.stderr}"
    assert proc.returncode == 0, f"runner failed ({proc.returncode}): {proc.stderr}"
    results: dict[str, Any] = json.loads(out.read_text())["runs"][0]
    return results


def test_every_case_has_an_expectation(suite_results: dict[str, Any]) -> None:
    assert sorted(suite_results["cases"]) == sorted(expected())


def test_no_regression_against_expected(suite_results: dict[str, Any]) -> None:
    exp = expected()
    regressions, improved = [], []
    for case, res in sorted(suite_results["cases"].items()):
        want = exp.get(case, {}).get("expected")
        # "racy": the case races with itself (runc's result varies too); either
        # result is the case's, not the runtime's.
        if want == "pass" and res["result"] != "pass":
            points = "; ".join(f"{p['point']}: {p['diagnostic'][:300]}"
                               for p in res["failing_points"][:3])
            regressions.append(f"{case} ({res['passed']} passed, {res['failed']} failed): "
                               f"{points}")
        elif want == "fail" and res["result"] == "pass":
            improved.append(case)
    if improved:
        warnings.warn("OCI validation: now passing but expected to fail, update "
                      f"tests/oci_validation/expected.json: {', '.join(improved)}",
                      stacklevel=1)
    assert not regressions, "regressions against expected.json:\n" + "\n".join(regressions)


def test_run_left_nothing_behind(suite_results: dict[str, Any]) -> None:
    """The runner deleted what the cases left; nothing may remain after that."""
    assert not suite_results["dev_changed"]
    for d in runner.cgroup_dirs():
        assert not set(d.split("/")) & runner.SUITE_CGROUP_NAMES, f"cgroup left: {d}"
    with open("/proc/self/mountinfo") as f:
        left = [line for line in f if "/uspawn-oci-validation-" in line]
    assert not left, f"mounts left: {left}"
