#!/usr/bin/env python3
"""Start time against rootfs size on the idmapped path (issue 18: "flat in rootfs size").

Two copies of bench_run.py's busybox rootfs, one with 10 000 extra one-byte files and
one with 100 000 (1000 per directory), then `uspawn run -D TREE -- /bin/true` on each,
interleaved (the order flips every round), the first rounds untimed. Prints the medians
and their ratio; uspawn takes the idmapped (`map`) ownership path on both, as its
`-v` line shows. The trees are kept in /var/tmp/uspawn-bench/treesize-N.

    python bench/bench_treesize.py [--runs 20] [--uspawn CMD]

Root; stdlib only. See bench/README.md ("Start time and tree size").
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BASE = Path("/var/tmp/uspawn-bench/busybox")  # bench_run.py's rootfs
SIZES = (10_000, 100_000)


def tree(n: int) -> Path:
    d = BASE.parent / f"treesize-{n}"
    if not (d / ".complete").exists():
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(BASE, d, symlinks=True)
        for i in range(n // 1000):
            sub = d / "data" / f"d{i}"
            sub.mkdir(parents=True)
            for j in range(1000):
                (sub / f"f{j}").write_bytes(b"x")
        (d / ".complete").touch()
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--uspawn", default=None, help="the uspawn command (default: the repo's venv)")
    ns = p.parse_args()
    if os.geteuid() != 0:
        print("bench_treesize: needs root", file=sys.stderr)
        return 2
    if not BASE.is_dir():
        print(f"bench_treesize: {BASE} missing: run bench/bench_run.py once", file=sys.stderr)
        return 2
    venv = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "uspawn"
    uspawn = shlex.split(ns.uspawn) if ns.uspawn else [str(venv)]
    trees = {n: tree(n) for n in SIZES}
    times: dict[int, list[float]] = {n: [] for n in SIZES}
    for rnd in range(ns.warmup + ns.runs):
        for n in SIZES if rnd % 2 else reversed(SIZES):
            t0 = time.perf_counter()
            r = subprocess.run([*uspawn, "run", "-v", "-D", str(trees[n]), "--", "/bin/true"],
                               capture_output=True, text=True, check=False)
            ms = (time.perf_counter() - t0) * 1000
            if r.returncode != 0:
                print(f"bench_treesize: {n}: exit {r.returncode}: {r.stderr}", file=sys.stderr)
                return 1
            if rnd == 0:
                own = [ln for ln in r.stderr.splitlines() if "ownership" in ln]
                print(f"{n} files: {own[0] if own else r.stderr.strip()}")
            if rnd >= ns.warmup:
                times[n].append(ms)
    print(f"uspawn run -- /bin/true, {ns.runs} runs each after {ns.warmup} warm-up (ms)")
    for n in SIZES:
        v = times[n]
        print(f"{n:>7} files: median {statistics.median(v):7.2f}  min {min(v):7.2f}")
    a, b = (statistics.median(times[n]) for n in SIZES)
    print(f"100k / 10k = {b / a:.2f}x (target: within 1.10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
