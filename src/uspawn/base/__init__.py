"""Lowest layer: errors and exit codes, the text sanitiser, the argv parser, test
fault switches, start-path timing. Stdlib only; imports nothing else of uspawn."""

from __future__ import annotations

import os


class timing:  # lower case: used like a module (`from uspawn.base import timing`)
    """USPAWN_TIMING=1: where one start spends its time, as `timing: <phase> <ms>` lines.

    A class in the package's __init__, not a module of its own, so that
    `from uspawn.base import timing` finds an attribute and imports no file: off
    (the default) it costs one environment lookup here and one attribute test per
    mark, no clock read, no write. On, every mark writes one line to stderr at
    once (fd 2, one write: it survives a crash or kill -9, and a forked child's
    lines interleave whole):

        timing: <phase> <ms since the previous mark of this process> at=<ms since t0> pid=<pid>

    t0 is the first mark of this process, or, when USPAWN_TIMING holds a
    CLOCK_MONOTONIC time in ns (time.perf_counter_ns() of the caller just before
    it forks the command; bench/bench_phases.py does this), that moment, so the
    first line ("interpreter") shows the interpreter's own start-up. A forked
    child keeps its parent's t0 and last mark (fork copies them), so its lines
    continue the parent's clock.
    """

    _value = os.environ.get("USPAWN_TIMING", "")
    ENABLED = _value not in ("", "0")
    t0 = int(_value) if ENABLED and _value.isdigit() and len(_value) > 6 else 0
    last = t0

    @staticmethod
    def mark(phase: str) -> None:
        """The phase that ends now. A no-op unless USPAWN_TIMING is set."""
        if not timing.ENABLED:
            return
        import time  # only when on

        now = time.perf_counter_ns()
        if not timing.t0:
            timing.t0 = timing.last = now
        line = (f"timing: {phase} {(now - timing.last) / 1e6:.2f} "
                f"at={(now - timing.t0) / 1e6:.2f} pid={os.getpid()}\n")
        timing.last = now
        try:
            os.write(2, line.encode())
        except OSError:
            pass  # a closed or full stderr must not change what the start does


def read_text(path: str) -> str | None:
    """A small kernel file (/proc, /sys, cgroup), stripped; None if it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# The first uspawn module any command imports: what came before is the
# interpreter (and site) starting up.
timing.mark("interpreter")
