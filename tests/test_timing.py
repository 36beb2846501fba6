"""USPAWN_TIMING (uspawn.base.timing) and what the start-path work of issue 18 keeps off it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import Runner

PHASES = ("interpreter", "imports (cli)", "claims (name, UID range lease, ownership)",
          "fork stage A (clone3 into the cgroup)", "A: clone the init into its namespaces",
          "B: sysctls, masks, verify /dev", "exec: fds, cwd, lookup, caps, seccomp (then execve)",
          "sync 8 exec (init: caps, seccomp, execve)", "wait (payload runs, exits)",
          "teardown (cgroup, leases, guardian)", "exit")


def _phases(stderr: str) -> list[tuple[str, float, float]]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("timing: "):
            head, _, tail = line[8:].rpartition(" at=")
            phase, _, ms = head.rpartition(" ")
            out.append((phase, float(ms), float(tail.split()[0])))
    return out


def _run(uspawn: Runner, rootfs: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(uspawn.argv("run", "-D", str(rootfs), "--", "/bin/true"),
                          capture_output=True, text=True, timeout=60, env=env)


def test_run_prints_every_phase_only_when_asked(uspawn: Runner, rootfs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "USPAWN_TIMING"}
    p = _run(uspawn, rootfs, env)
    assert p.returncode == 0, p.stderr
    assert "timing:" not in p.stderr
    t0 = time.perf_counter_ns()
    p = _run(uspawn, rootfs, {**env, "USPAWN_TIMING": str(t0)})
    wall = (time.perf_counter_ns() - t0) / 1e6
    assert p.returncode == 0, p.stderr
    got = _phases(p.stderr)
    names = [name for name, _, _ in got]
    for phase in PHASES:
        assert phase in names, (phase, p.stderr)
    assert all(ms >= 0 for _, ms, _ in got)
    # t0 came from here: the interpreter line is the time from our fork, and the
    # cumulative clock ends within the wall time we measured.
    assert got[0][0] == "interpreter" and got[0][1] > 0
    assert 0 < got[-1][2] <= wall


def _uspawn_runc_imports(root: Path, *args: str) -> set[str]:
    code = ("import sys\nfrom uspawn.oci import cli\ncli.main(sys.argv[1:])\n"
            "print(' '.join(sorted(sys.modules)))")
    p = subprocess.run([sys.executable, "-c", code, "--root", str(root), *args],
                       capture_output=True, text=True, timeout=60)
    return set(p.stdout.split())


def test_short_oci_calls_do_not_load_ctypes(tmp_path: Path) -> None:
    # start/state/kill/delete read a state file and signal or remove: kernel.mounts
    # (and with it ctypes, ~4 ms) is for the rare delete that detaches mounts.
    for args in (("state", "none"), ("start", "none"), ("kill", "none", "9"),
                 ("delete", "none")):
        mods = _uspawn_runc_imports(tmp_path, *args)
        assert "uspawn.oci.lifecycle" in mods, args
        assert "ctypes" not in mods and "uspawn.kernel.mounts" not in mods, args
