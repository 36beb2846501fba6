#!/usr/bin/env python3
"""Boot-to-ready time of the Debian fixture: uspawn vs systemd-nspawn, in one run.

Both managers run in the foreground with NOTIFY_SOCKET pointing at a socket
of ours, and each forwards the machine's READY=1 to it (uspawn always,
nspawn with --notify-ready=yes). Measured: spawn -> READY=1 (boot), and
SIGTERM -> exit (clean power-off; both send SIGRTMIN+3 to the machine's
systemd). Each manager boots its own copy of the tree.

    python bench/bench_boot.py --runs 5
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _fixture(dest: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.debian_tree import copy_debian_tree

    dest.parent.mkdir(parents=True, exist_ok=True)
    return copy_debian_tree(dest)


def _uspawn() -> list[str]:
    exe = shutil.which("uspawn") or str(Path(sys.executable).parent / "uspawn")
    return [exe]


def measure(cmd: list[str], timeout: float) -> tuple[float, float]:
    """(boot seconds to READY=1, stop seconds from SIGTERM to exit)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "notify")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        boot = None
        try:
            while time.monotonic() - t0 < timeout:
                if select.select([s], [], [], 0.5)[0]:
                    if b"READY=1" in s.recv(4096):
                        boot = time.monotonic() - t0
                        break
                if p.poll() is not None:
                    break
            if boot is None:
                err = p.stderr.read().decode() if p.poll() is not None and p.stderr else ""
                raise RuntimeError(f"{cmd[0]}: no READY=1 within {timeout}s {err[-500:]}")
            t1 = time.monotonic()
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=90)
            return boot, time.monotonic() - t1
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            s.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=120)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="uspawn-bench-boot-", dir="/var/tmp"))
    try:
        trees = {"uspawn": _fixture(work / "u" / "bench-u"),
                 "nspawn": _fixture(work / "n" / "bench-n")}
        cmds = {
            "uspawn": [*_uspawn(), "boot", "-D", str(trees["uspawn"]), "-M", "bench-u"],
            "nspawn": ["systemd-nspawn", "-q", "-U", "-b", "--private-network",
                       "--register=no", "--keep-unit", "--notify-ready=yes",
                       "-D", str(trees["nspawn"]), "-M", "bench-n"],
        }
        if shutil.which("systemd-nspawn") is None:
            del cmds["nspawn"]
            print("nspawn: skipped: systemd-nspawn not installed (apt-get install "
                  "systemd-container)")
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
        for i in range(args.runs):
            order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
            for name in order:
                results[name].append(measure(cmds[name], args.timeout))
        print(f"\nboot-to-READY and SIGTERM-to-exit of the Debian fixture, {args.runs} runs")
        print(f"{'manager':<10} {'boot median s':>14} {'boot min s':>11} "
              f"{'stop median s':>14} {'boot vs uspawn':>15}")
        base = statistics.median(b for b, _ in results["uspawn"])
        for name, rows in results.items():
            boots = [b for b, _ in rows]
            stops = [s for _, s in rows]
            print(f"{name:<10} {statistics.median(boots):>14.2f} {min(boots):>11.2f} "
                  f"{statistics.median(stops):>14.2f} "
                  f"{statistics.median(boots) / base:>14.2f}x")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
