#!/usr/bin/env python3
"""Host cost per machine (issue 17): what N running busybox-init machines cost the host.

Starts N machines with `uspawn boot --detach` (busybox init, READY=1 from its
sysinit: tests/fixtures/busybox_machine.py), then sums the PSS
(/proc/PID/smaps_rollup) of every host process that exists because of them:
each machine's supervisor (its state's runtime_pid) and every descendant of it
that is still in the host's pid namespace (the guardian), i.e. everything but
the machine itself. Then the same N trees under systemd-nspawn (-b -U
--private-network --console=read-only --register=no --keep-unit): the nspawn
process and its host-side descendants. Each machine's boot is awaited on its
/booted FIFO, never with a sleep. Everything is stopped afterwards (busybox
init powers off on SIGUSR2) and checked gone: supervisors, state, cgroups,
mounts, nspawn processes.

    python bench/bench_hostcost.py -n 1 -n 10 [-n 50] [--no-nspawn] [--json FILE]

PSS divides a shared page among the processes that map it, so the per-machine
figure of N machines is the host's real cost of one more machine at that N.
lxcfs is off (--lxcfs=no): it is one host daemon whatever N is, not a
per-machine cost. Must run as root. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "src"))

from fixtures.busybox_machine import BootFifo, make_bootable  # noqa: E402

WORK = Path("/var/tmp/uspawn-bench-hostcost")
PREFIX = "hc"
TARGET_KB = 2048  # the target: at most 2 MB PSS per machine


def log(msg: str) -> None:
    print(f"bench_hostcost: {msg}", file=sys.stderr, flush=True)


# --- measuring ------------------------------------------------------------------------------


def _ppids() -> dict[int, int]:
    out = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    out[int(e)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def host_side(roots: list[int]) -> list[int]:
    """roots and their descendants that live in our pid namespace (not the machine)."""
    ppids = _ppids()
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    mine = os.readlink("/proc/self/ns/pid")
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != mine:
                continue  # the machine's init and everything below it
        except OSError:
            continue
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(set(found))


def memory_kb(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of pid in kB, from smaps_rollup."""
    pss = rss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    return pss, rss


def measure(roots: list[int]) -> dict[str, object]:
    pids = host_side(roots)
    pss = rss = root_pss = 0
    comms = []
    for pid in pids:
        p, r = memory_kb(pid)
        pss += p
        rss += r
        if pid in roots:
            root_pss += p
        with open(f"/proc/{pid}/comm") as f:
            comms.append(f.read().strip())
    # root_pss_kb: the supervisors (uspawn) or nspawn processes; the rest are their
    # host-side children (uspawn's guardians).
    return {"pids": len(pids), "pss_kb": pss, "rss_kb": rss, "root_pss_kb": root_pss,
            "comms": sorted(set(comms))}


def wait_pids_gone(pids: list[int], timeout: float, what: str) -> None:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass
    try:
        deadline = time.monotonic() + timeout
        for fd in fds:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SystemExit(f"bench_hostcost: {what} still running after {timeout}s")
    finally:
        for fd in fds:
            os.close(fd)


# --- trees ----------------------------------------------------------------------------------


def template() -> Path:
    from uspawn.tree.busybox import build_busybox_rootfs

    tpl = WORK / "template"
    if not (tpl / "etc" / "inittab").exists():
        shutil.rmtree(tpl, ignore_errors=True)
        build_busybox_rootfs(str(tpl))
        make_bootable(tpl)
    return tpl


def trees(kind: str, n: int) -> list[Path]:
    tpl = template()
    out = []
    for i in range(n):
        d = WORK / "trees" / f"{kind}{i}"
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(tpl), str(d)], check=True)
        out.append(d)
    return out


# --- uspawn ---------------------------------------------------------------------------------


class Uspawn:
    def __init__(self, cmd: list[str], state: Path) -> None:
        self.cmd = [*cmd, "--root", str(state)]
        self.state = state

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.cmd, *args], capture_output=True, text=True,
                              timeout=timeout)

    def supervisor(self, name: str) -> int:
        st = json.loads((self.state / "containers" / name / "state.json").read_text())
        return int(st["runtime_pid"])


def run_uspawn(us: Uspawn, n: int) -> dict[str, object]:
    names = [f"{PREFIX}{i}" for i in range(n)]
    roots = trees("u", n)
    fifos = [BootFifo(t) for t in roots]
    started: list[str] = []
    try:
        t0 = time.monotonic()
        for name, tree in zip(names, roots, strict=True):
            r = us.run("boot", "-D", str(tree), "-M", name, "--detach", "--lxcfs=no",
                       "--ready-timeout", "120")
            if r.returncode != 0:
                raise SystemExit(f"bench_hostcost: uspawn boot {name}: {r.stderr.strip()}")
            started.append(name)
        for f in fifos:
            f.wait_boot(120)
        boot_s = time.monotonic() - t0
        sups = [us.supervisor(name) for name in names]
        m = measure(sups)
        m["boot_seconds"] = round(boot_s, 1)
        # Stop: busybox init powers off on SIGUSR2; each supervisor then cleans up and exits.
        for name in names:
            us.run("kill", name, "USR2")
        wait_pids_gone(sups, 60, "uspawn supervisors")
        started.clear()
        check_nothing_left(us, roots)
        for name in names:  # the console logs the supervisors kept
            for suffix in ("", ".1"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"/var/log/uspawn/{name}.console.log{suffix}")
        return m
    finally:
        for name in started:
            us.run("stop", name, "--timeout", "2")
        for f in fifos:
            f.close()
        for t in roots:
            shutil.rmtree(t, ignore_errors=True)


def check_nothing_left(us: Uspawn, roots: list[Path]) -> None:
    left = json.loads(us.run("list", "--json").stdout or "[]")
    cgroups = glob.glob(f"/sys/fs/cgroup/*/uspawn/{PREFIX}[0-9]*") + glob.glob(
        f"/sys/fs/cgroup/uspawn/{PREFIX}[0-9]*")
    with open("/proc/self/mountinfo") as f:
        mounts = [ln.split()[4] for ln in f if ln.split()[4].startswith(str(WORK) + "/")]
    states = list((us.state / "containers").glob("*")) if (us.state / "containers").exists() \
        else []
    problems = {"machines": left, "cgroups": cgroups, "mounts": mounts,
                "state": [str(s) for s in states]}
    if any(problems.values()):
        raise SystemExit(f"bench_hostcost: left behind after stop: {problems}")


# --- systemd-nspawn -------------------------------------------------------------------------


def run_nspawn(nspawn: str, n: int) -> dict[str, object]:
    roots = trees("n", n)
    fifos = [BootFifo(t) for t in roots]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t0 = time.monotonic()
        for i, tree in enumerate(roots):
            procs.append(subprocess.Popen(
                [nspawn, "-q", "-D", str(tree), "-M", f"{PREFIX}n{i}", "-b", "-U",
                 "--register=no", "--keep-unit", "--private-network", "--console=read-only",
                 "--kill-signal=SIGUSR2"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for f, p in zip(fifos, procs, strict=True):
            try:
                f.wait_boot(120)
            except AssertionError:
                p.kill()
                raise SystemExit(f"bench_hostcost: systemd-nspawn did not boot: "
                                 f"{p.communicate()[1].decode(errors='replace')[-500:]}") from None
        boot_s = time.monotonic() - t0
        m = measure([p.pid for p in procs])
        m["boot_seconds"] = round(boot_s, 1)
        for p in procs:
            p.terminate()  # nspawn sends --kill-signal (SIGUSR2: busybox poweroff)
        for p in procs:
            p.wait(timeout=60)
        bad = [p.returncode for p in procs if p.returncode != 0]
        if bad:
            raise SystemExit(f"bench_hostcost: systemd-nspawn exit codes {bad}")
        return m
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in fifos:
            f.close()
        for t in roots:
            shutil.rmtree(t, ignore_errors=True)


# --- main -----------------------------------------------------------------------------------


def default_uspawn() -> list[str]:
    venv = REPO_ROOT / ".venv" / "bin" / "uspawn"
    if venv.exists():
        return [str(venv)]
    exe = shutil.which("uspawn")
    return [exe] if exe else [sys.executable, "-m", "uspawn"]


def table(rows: list[dict[str, object]]) -> str:
    head = ("machines", "runtime", "host procs", "PSS total", "PSS/machine", "RSS/machine",
            "vs 2 MB", "boot s")
    lines = [head]
    for r in rows:
        n = int(str(r["machines"]))
        pss, rss = int(str(r["pss_kb"])), int(str(r["rss_kb"]))
        lines.append((str(n), str(r["runtime"]), str(r["pids"]), f"{pss / 1024:.1f} MB",
                      f"{pss / n / 1024:.2f} MB", f"{rss / n / 1024:.2f} MB",
                      f"{pss / n / TARGET_KB:.1f}x", str(r["boot_seconds"])))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip()
                     for x in lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("-n", "--machines", type=int, action="append",
                    help="how many machines at once (repeat; default 1 and 10)")
    ap.add_argument("--uspawn", help="the uspawn command (default: the repo's .venv)")
    ap.add_argument("--no-nspawn", action="store_true", help="skip systemd-nspawn")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("must run as root")
        return 2
    counts = args.machines or [1, 10]
    WORK.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(WORK, 0o700)  # trees below a 0700 directory, as /var/lib/machines
    (WORK / "trees").mkdir(exist_ok=True)
    us = Uspawn(args.uspawn.split() if args.uspawn else default_uspawn(), WORK / "state")
    nspawn = None if args.no_nspawn else shutil.which("systemd-nspawn")
    rows: list[dict[str, object]] = []
    for n in counts:
        log(f"uspawn: {n} machines")
        rows.append({"machines": n, "runtime": "uspawn", **run_uspawn(us, n)})
        if nspawn:
            log(f"systemd-nspawn: {n} machines")
            rows.append({"machines": n, "runtime": "systemd-nspawn", **run_nspawn(nspawn, n)})
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.uname().release}, "
          f"{os.cpu_count()} CPUs; host processes per machine outside it, PSS from smaps_rollup")
    print(table(rows))
    for r in rows:
        n, root, pss = (int(str(r[k])) for k in ("machines", "root_pss_kb", "pss_kb"))
        comms = ", ".join(map(str, r["comms"])) if isinstance(r["comms"], list) else "?"
        print(f"# {n} x {r['runtime']} ({comms}): per machine {root / n / 1024:.2f} MB in the "
              f"main process, {(pss - root) / n / 1024:.2f} MB in its host-side children")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
