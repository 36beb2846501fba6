"""Print the kernel matrix table at the end of a pytest run (also with -q)."""

from __future__ import annotations

import pytest

from kernels import matrix


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not matrix.LAST_RESULTS:
        return
    results = [r for k in matrix.KERNELS for r in matrix.LAST_RESULTS if r.kernel.name == k.name]
    terminalreporter.write_sep("=", "kernel matrix (tests/kernels)")
    terminalreporter.write_line(matrix.table(results))
    terminalreporter.write_line(f"kernel matrix: {matrix.summary_line(results)}; "
                                f"table also in {matrix.CACHE / 'results.md'}")
