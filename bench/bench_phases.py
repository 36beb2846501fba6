#!/usr/bin/env python3
"""Where one start spends its time: per-phase medians of `uspawn run` and `uspawn-runc`.

Runs, interleaved, N rounds of

  run        uspawn run -D ROOTFS -- /bin/true
  oci-cycle  uspawn-runc create / start / (pidfd wait) / delete   on bench_oci.py's bundle
  oci-run    uspawn-runc run
  python     the bare interpreter: python -I -S -c pass, and python -c pass

each with USPAWN_TIMING=<CLOCK_MONOTONIC ns just before the fork> in its environment,
so the first `timing: interpreter` line of every command is the time from our fork to
the first uspawn module (fork, exec, interpreter, site). uspawn's lines
(`timing` in src/uspawn/base/__init__.py) are collected per command and phase; the table shows the
median ms of each phase and of the whole command as seen from here. Several variants
(`--variant LABEL=PYTHONPATH`) run side by side in the same rounds: the before/after
of a change measured on the same noisy machine.

    python bench/bench_phases.py --runs 20 [--variant before=/tmp/old/src] [--json FILE]

Stdlib only. Must run as root. The rootfs and bundle are bench_run.py's and
bench_oci.py's (run those once first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_oci as bo

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PY = str(REPO / ".venv/bin/python")
ROOTFS = "/var/tmp/uspawn-bench/busybox"
BUNDLE = "/var/tmp/uspawn-bench/oci/bundles/oci-userns"
STATE = "/run/uspawn-bench-phases"
RUN_PY = "from uspawn.cli import entry; entry()"
RUNC_PY = "from uspawn.oci.cli import entry; entry()"
TOTAL = "= total (wall, from fork to reaped)"

Samples = dict[str, dict[str, list[float]]]  # "variant command" -> phase -> ms


TIMING_ON = True  # --off: run without USPAWN_TIMING (totals only, what users get)


def timed(argv: list[str], env: dict[str, str], own: bool = True,
          ) -> tuple[float, list[tuple[str, float]], int]:
    """Run argv with USPAWN_TIMING=t0; (wall ms, [(phase, ms)] of its own pid, pid)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter_ns()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err,
                                env={**env, "USPAWN_TIMING": str(t0)} if TIMING_ON else env)
        rc = proc.wait()
        wall = (time.perf_counter_ns() - t0) / 1e6
        err.seek(0)
        text = err.read().decode(errors="replace")
    if rc != 0:
        raise SystemExit(f"bench_phases: {' '.join(argv)}: exit {rc}\n{text}")
    phases = []
    for line in text.splitlines():
        if not line.startswith("timing: "):
            continue
        head, _, tail = line[8:].rpartition(" at=")
        phase, _, ms = head.rpartition(" ")
        if own and not tail.endswith(f"pid={proc.pid}"):
            phase = "(child) " + phase
        phases.append((phase, float(ms)))
    return wall, phases, proc.pid


def record(samples: Samples, key: str, wall: float, phases: list[tuple[str, float]]) -> None:
    row = samples.setdefault(key, {})
    seen: dict[str, float] = {}
    for phase, ms in phases:
        seen[phase] = seen.get(phase, 0.0) + ms
    for phase, ms in seen.items():
        row.setdefault(phase, []).append(ms)
    row.setdefault(TOTAL, []).append(wall)


def one_round(samples: Samples, label: str, py: str, env: dict[str, str], n: int) -> None:
    cid = f"phases-{os.getpid()}-{label}-{n}"
    run = [py, "-c", RUN_PY, "run", "-D", ROOTFS, "--", "/bin/true"]
    wall, ph, _ = timed(run, env)
    record(samples, f"{label} run", wall, ph)
    runc = [py, "-c", RUNC_PY, "--root", f"{STATE}/{label}"]
    pid_file = f"{STATE}/{cid}.pid"
    wall, ph, _ = timed([*runc, "create", "--bundle", BUNDLE, "--pid-file", pid_file, cid], env)
    record(samples, f"{label} oci create", wall, ph)
    with open(pid_file) as f:
        pidfd = os.pidfd_open(int(f.read()))
    try:
        wall, ph, _ = timed([*runc, "start", cid], env)
        record(samples, f"{label} oci start", wall, ph)
        bo.wait_exit(pidfd, 10.0)
    finally:
        os.close(pidfd)
    wall, ph, _ = timed([*runc, "delete", cid], env)
    record(samples, f"{label} oci delete", wall, ph)
    wall, ph, _ = timed([*runc, "run", "--bundle", BUNDLE, cid + "r"], env)
    record(samples, f"{label} oci run", wall, ph)
    bo.reap_strays()


def interpreter_round(samples: Samples, py: str, env: dict[str, str]) -> None:
    for name, argv in (("python -I -S -c pass", [py, "-I", "-S", "-c", "pass"]),
                       ("python -c pass", [py, "-c", "pass"])):
        wall, _, _ = timed(argv, env)
        record(samples, name, wall, [])


def render(samples: Samples, runs: int) -> str:
    out = [f"per-phase medians over {runs} runs (ms; phase = time since the previous mark "
           "of the same process; (child) = a forked child's marks)"]
    for key, row in samples.items():
        out.append(f"\n[{key}]")
        for phase, vals in row.items():
            out.append(f"  {statistics.median(vals):8.2f}  {phase}  (n={len(vals)})")
    out += paired(samples)
    return "\n".join(out)


def paired(samples: Samples) -> list[str]:
    """now/variant per command: the median of the per-round ratios of the totals (both
    ran in the same round, so the machine's load hits the pair alike), and of the
    medians; below 1 = now is faster."""
    out = []
    for key, row in samples.items():
        label, _, command = key.partition(" ")
        if label == "now" or not command or f"now {command}" not in samples:
            continue
        a, b = samples[f"now {command}"][TOTAL], row[TOTAL]
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        out.append(f"now/{label} {command}: paired median ratio {statistics.median(ratios):.3f}"
                   f" (medians {statistics.median(a):.2f} / {statistics.median(b):.2f} ms, "
                   f"n={len(ratios)})")
    return ["", *out] if out else []


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--python", default=DEFAULT_PY, help="the interpreter with uspawn")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=PYTHONPATH",
                    help="also run uspawn from PYTHONPATH (e.g. a `git archive` of the "
                         "commit before a change); the working tree is 'now'")
    ap.add_argument("--off", action="store_true",
                    help="USPAWN_TIMING unset: only the totals, as users run it (use this "
                         "for --variant comparisons: the timing lines cost ~0.2 ms)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    global TIMING_ON
    TIMING_ON = not args.off
    for path in (ROOTFS, BUNDLE):
        if not os.path.exists(path):
            raise SystemExit(f"bench_phases: {path} missing: run bench_run.py and "
                             "bench_oci.py once first")
    os.makedirs(STATE, exist_ok=True)
    bo.set_subreaper()
    base_env = {k: v for k, v in os.environ.items() if k != "USPAWN_TIMING"}
    variants = [("now", dict(base_env))]
    for v in args.variant:
        label, _, path = v.partition("=")
        variants.append((label, {**base_env, "PYTHONPATH": path}))
    samples: Samples = {}
    try:
        for n in range(args.warmup + args.runs):
            order = variants[n % len(variants):] + variants[:n % len(variants)]
            target = samples if n >= args.warmup else {}
            interpreter_round(target, args.python, base_env)
            for label, env in order:
                one_round(target, label, args.python, env, n)
            print(f"round {n + 1}/{args.warmup + args.runs}", file=sys.stderr)
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["rm", "-rf", STATE], check=False)
    print(render(samples, args.runs))
    if args.json:
        Path(args.json).write_text(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
