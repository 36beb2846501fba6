"""The kernel matrix under pytest: one test per kernel (host, 5.10, 6.1, 6.12).

Each test boots its Debian kernel under qemu (tests/kernels/matrix.py) and asserts
that every check passed: selftest, doctor verdicts for that kernel, `uspawn run`
with a non-root /dev/null write and mknod EPERM, the ownership path (map/chown)
and, where uspawn takes the chown path, a shift killed mid-way and resumed.
A kernel whose package cannot be fetched is skipped with the reason
(skip_or_fail: a failure under USPAWN_MUST_WORK=1). USPAWN_SKIP_KERNEL_MATRIX=1
skips the matrix (also through skip_or_fail). `bash scripts/kernel-matrix.sh`
runs the same and writes docs/KERNELS.md.
"""

from __future__ import annotations

import os

import pytest
from conftest import skip_or_fail

from kernels import matrix

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prepared(need_root: None) -> matrix.Prepared:
    if os.environ.get("USPAWN_SKIP_KERNEL_MATRIX") == "1":
        skip_or_fail("USPAWN_SKIP_KERNEL_MATRIX=1")
    prep = matrix.prepare([k.name for k in matrix.KERNELS])
    matrix.log(f"prepared in {prep.seconds:.0f} s")
    return prep


@pytest.mark.parametrize("name", [k.name for k in matrix.KERNELS])
def test_kernel(name: str, prepared: matrix.Prepared) -> None:
    res = matrix.run_kernel(name, prepared)
    matrix.LAST_RESULTS.append(res)
    matrix.save_results(matrix.LAST_RESULTS)
    if res.skipped:
        skip_or_fail(f"kernel {name}: {res.skipped}")
    failures = res.failures()
    assert not failures, f"kernel {name} ({res.release}, {res.package}): " + "; ".join(
        failures) + f" (console log: {res.console_log})"
