"""USPAWN_TIMING=1: where one start spends its time, as `timing: <phase> <ms>` lines.

Off (the default) it costs one dict lookup at import and one global test per
mark: no other import, no clock read, no write. On, every mark writes one line
to stderr at once (fd 2, one write, so it survives a crash or a kill -9 and a
forked child's lines interleave whole):

    timing: <phase> <ms since the previous mark of this process> at=<ms since t0> pid=<pid>

t0 is the first mark of this process, or, when USPAWN_TIMING holds a
CLOCK_MONOTONIC time in ns (what time.perf_counter_ns()/clock_gettime give any
process on this host just before it forks the command: bench/bench_run.py
--timing does), that moment, so the first line shows the interpreter's own
start-up. A forked child keeps its parent's t0 and last mark (fork copies
them), so its lines continue the parent's clock.
"""

from __future__ import annotations

import os
import time

_value = os.environ.get("USPAWN_TIMING", "")
ENABLED = _value not in ("", "0")
_t0 = int(_value) if ENABLED and _value.isdigit() and len(_value) > 6 else 0
_last = _t0


def mark(phase: str) -> None:
    """The phase that ends now. A no-op unless USPAWN_TIMING is set."""
    if not ENABLED:
        return
    global _t0, _last
    now = time.perf_counter_ns()
    if not _t0:
        _t0 = _last = now
    line = (f"timing: {phase} {(now - _last) / 1e6:.2f} at={(now - _t0) / 1e6:.2f} "
            f"pid={os.getpid()}\n")
    _last = now
    try:
        os.write(2, line.encode())
    except OSError:
        pass  # a closed or full stderr must not change what the start does


# The first uspawn module a command imports: what came before is the interpreter
# (and site) starting up.
mark("interpreter")
