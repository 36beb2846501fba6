#!/usr/bin/env python3
"""OCI lifecycle benchmark: uspawn-runc against runc and crun on one userns bundle.

For every runtime, in one interleaved run, two measurements on the bundle that
bench_run.py builds (busybox rootfs, /bin/true, terminal false, user namespace
0->100000:65536):

  cycle  `create --pid-file F ID` + `start ID` + wait for the init (pidfd on the pid
         from F) + `delete ID`, timed as a whole and per step;
  run    `run ID` in the foreground (+ `delete ID` when the runtime leaves it behind).

Every runtime command is timed with time.perf_counter_ns() around subprocess.run()
(stdin/stdout/stderr on /dev/null). Rootfs, bundles, the cgroup2 worker for crun on
hybrid hosts and the statistics are bench_run.py's. See bench/README.md.

    python bench/bench_oci.py --runs 20 [--warmup 3] [--json [FILE]]

Stdlib only. Must run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_run as br

DEFAULT_STATE = Path("/run/uspawn-bench-oci")
DEFAULT_USPAWN_RUNC = "/usr/local/bin/uspawn-runc"
RUNTIME_NAMES = ("uspawn-runc", "runc", "crun")
MODES = ("cycle", "run")
STEPS = ("create", "start", "wait", "delete")
OP_TAG = "@bench-oci-op"  # argv[0] of an in-process operation (see execute())
WAIT_TIMEOUT_S = 10.0
PR_SET_CHILD_SUBREAPER = 36

_run_timed = br.run_timed  # bound once: the worker replaces br.run_timed with execute()
_protected_pids: set[int] = set()  # our own long-lived children: never reaped by reap_strays()
_strays: dict[str, int] = {}  # comm -> number of orphans (not container inits) reaped


# --------------------------------------------------------------------------- operations


def set_subreaper() -> None:
    """Orphaned container inits come to us (as to conmon/containerd-shim), not to PID 1.

    PID 1 of this VM reaps orphans only now and then; as their subreaper we reap each
    init as soon as it has exited, so no zombie outlives its iteration."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        br.log(f"warning: PR_SET_CHILD_SUBREAPER: {os.strerror(err)}; PID 1 reaps the inits")


def reap_strays() -> None:
    """Reap exited orphans that were reparented to us (never a protected child)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in _protected_pids:
            return
        try:
            with open(f"/proc/{info.si_pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            comm = "?"
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)
            _strays[comm] = _strays.get(comm, 0) + 1


def run_step(argv: Sequence[str], capture: bool) -> br.RunResult:
    """One runtime command. capture=False: bench_run.run_timed, all stdio on /dev/null.

    capture=True (verification and diagnosis only) collects stdout/stderr in temporary
    *files*, not pipes: after `create` the container init still holds the runtime's
    stdio, and subprocess.run would wait for EOF on a pipe until the init exits."""
    if not capture:
        return _run_timed(argv, False)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter_ns()
        try:
            proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  check=False)
        except OSError as exc:
            return br.RunResult(time.perf_counter_ns() - t0, 127, f"{argv[0]}: {exc}")
        ns = time.perf_counter_ns() - t0
        out.seek(0)
        err.seek(0)
        return br.RunResult(ns, proc.returncode, err.read().decode(errors="replace"),
                            out.read().decode(errors="replace"))


def _step_failed(step: str, res: br.RunResult, t0: int) -> br.RunResult:
    return br.RunResult(time.perf_counter_ns() - t0, res.rc or 1,
                        f"[{step} failed, exit {res.rc}]\n{res.stderr}")


def wait_exit(pidfd: int, timeout: float) -> bool:
    """Block until the process behind pidfd has exited, then reap it if it is our child."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    if not poller.poll(int(timeout * 1000)):
        return False
    with contextlib.suppress(ChildProcessError):  # not ours: no subreaper, PID 1 reaps it
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    return True


def cycle(base: list[str], bundle: str, cid: str, pid_file: str,
          capture: bool) -> br.RunResult:
    """create + start + wait + delete; ns = the whole cycle, stdout = JSON of the steps."""
    steps: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_file)
    t0 = time.perf_counter_ns()
    res = run_step([*base, "create", "--bundle", bundle, "--pid-file", pid_file, cid], capture)
    steps["create"] = res.ns
    if res.rc != 0:
        return _step_failed("create", res, t0)
    try:
        with open(pid_file) as f:
            pid = int(f.read().strip())
        pidfd = os.pidfd_open(pid)  # before start: the pid cannot be recycled under us
    except (OSError, ValueError) as exc:
        return _step_failed("create", br.RunResult(0, 1, f"--pid-file {pid_file}: {exc}"),
                            t0)
    try:
        res = run_step([*base, "start", cid], capture)
        steps["start"] = res.ns
        if res.rc != 0:
            return _step_failed("start", res, t0)
        t1 = time.perf_counter_ns()
        if not wait_exit(pidfd, WAIT_TIMEOUT_S):
            msg = f"init {pid} still running {WAIT_TIMEOUT_S:.0f}s after start"
            return _step_failed("wait", br.RunResult(0, 124, msg), t0)
        steps["wait"] = time.perf_counter_ns() - t1
    finally:
        os.close(pidfd)
    res = run_step([*base, "delete", cid], capture)
    steps["delete"] = res.ns
    if res.rc != 0:
        return _step_failed("delete", res, t0)
    total = time.perf_counter_ns() - t0
    os.unlink(pid_file)
    return br.RunResult(total, 0, res.stderr, json.dumps(steps))


def run_and_delete(base: list[str], bundle: str, cid: str, capture: bool) -> br.RunResult:
    """`run` for a runtime that leaves the stopped container behind: run + delete."""
    steps: dict[str, int] = {}
    t0 = time.perf_counter_ns()
    res = run_step([*base, "run", "--bundle", bundle, cid], capture)
    steps["run"] = res.ns
    if res.rc != 0:
        return _step_failed("run", res, t0)
    res = run_step([*base, "delete", cid], capture)
    steps["delete"] = res.ns
    if res.rc != 0:
        return _step_failed("delete", res, t0)
    return br.RunResult(time.perf_counter_ns() - t0, 0, res.stderr, json.dumps(steps))


def execute(argv: Sequence[str], capture: bool) -> br.RunResult:
    """Run argv, or the operation [OP_TAG, json] in this process; then reap orphans.

    Used on the host and, in place of bench_run.run_timed, inside the cgroup2 worker,
    so that a crun cycle is timed in the worker's namespace exactly like the others."""
    try:
        if argv and argv[0] == OP_TAG:
            op: dict[str, Any] = json.loads(argv[1])
            if op["op"] == "cycle":
                return cycle(op["base"], op["bundle"], op["id"], op["pid_file"], capture)
            return run_and_delete(op["base"], op["bundle"], op["id"], capture)
        return _run_timed(argv, capture)
    finally:
        reap_strays()


def worker_main() -> int:
    """Body of OciWorker: bench_run's cgroup2 worker loop, serving operations too."""
    set_subreaper()
    br.run_timed = execute  # worker_main looks run_timed up at call time
    return br.worker_main()


# --------------------------------------------------------------------------- executors


class LocalOci:
    description = "host namespaces"

    def run(self, argv: Sequence[str], capture: bool) -> br.RunResult:
        return execute(argv, capture)

    def close(self) -> None:
        pass


class OciWorker(br.Cgroup2Worker):
    """bench_run's Cgroup2Worker, but running this file's worker_main (which knows the
    cycle operation, so that the crun cycle, its wait included, is timed in the worker)."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        unshare = shutil.which("unshare")
        if unshare is None:
            self.error = "unshare(1) not found"
            return
        self.proc = subprocess.Popen(
            [unshare, "-m", "--propagation", "private", "--",
             sys.executable, str(Path(__file__).resolve()), br.WORKER_FLAG],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )
        _protected_pids.add(self.proc.pid)
        hello = self._read()
        if hello is None or not hello.get("ok"):
            err = hello.get("error") if hello else None
            self.error = ("cgroup2 namespace setup failed: "
                          f"{err or self._drain_stderr() or 'worker exited during setup'}")
            self.close()


class Recording:
    """One benchmark row's executor: forwards to the real one and keeps the per-step
    times (JSON on stdout) of every uncaptured (warm-up or timed) operation."""

    def __init__(self, inner: br.Executor) -> None:
        self.inner = inner
        self.description = inner.description
        self.steps: list[dict[str, int]] = []

    def run(self, argv: Sequence[str], capture: bool) -> br.RunResult:
        res = self.inner.run(argv, capture)
        if res.rc == 0 and not capture and argv and argv[0] == OP_TAG:
            self.steps.append(json.loads(res.stdout))
        return res

    def close(self) -> None:
        pass  # the inner executor is shared and closed by main()


# --------------------------------------------------------------------------- runtimes


@dataclass
class ArgvFactory:
    """Container id -> argv for one row; remembers the last id it handed out."""

    mode: str
    base: list[str]
    bundle: Path
    pid_dir: Path
    needs_delete: bool = False  # run mode: the runtime keeps the container after `run`
    last_id: str = ""

    def __call__(self, cid: str) -> list[str]:
        self.last_id = cid
        if self.mode == "run" and not self.needs_delete:
            return [*self.base, "run", "--bundle", str(self.bundle), cid]
        op = {"op": "cycle" if self.mode == "cycle" else "run+delete", "base": self.base,
              "bundle": str(self.bundle), "id": cid, "pid_file": str(self.pid_dir / cid)}
        return [OP_TAG, json.dumps(op)]


@dataclass
class OciRuntime:
    name: str
    label: str = ""
    status: str = "pending"  # pending | skipped
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    rows: dict[str, br.Runtime] = field(default_factory=dict)  # mode -> bench_run row
    recorders: dict[str, Recording] = field(default_factory=dict)
    factories: dict[str, ArgvFactory] = field(default_factory=dict)


def build_runtimes(args: argparse.Namespace, bundle: Path, state: Path, pid_dir: Path,
                   executors: list[br.Executor], plain_bundle: Path) -> list[OciRuntime]:
    selected = {n for n in args.runtimes.split(",") if n}
    modes = [m for m in args.modes.split(",") if m]
    local = LocalOci()
    out: list[OciRuntime] = []
    also = dict(v.partition("=")[::2] for v in args.uspawn_runc_also)
    for name in [*RUNTIME_NAMES, *(f"uspawn-runc-{label}" for label in also)]:
        rt = OciRuntime(name, label=name)
        out.append(rt)
        if name.startswith("uspawn-runc-") and "uspawn-runc" in selected:
            # --uspawn-runc-also: another uspawn-runc (e.g. the commit before a
            # change), timed in the same interleaved rounds as the others.
            tool = shlex.split(also[name[len("uspawn-runc-"):]])
        elif name not in selected:
            rt.status, rt.reason = "skipped", "not selected (--runtimes)"
            continue
        flags: list[str] = []
        executor: br.Executor = local
        if name == "uspawn-runc":
            cmd = shlex.split(args.uspawn_runc) if args.uspawn_runc else [
                DEFAULT_USPAWN_RUNC if os.path.exists(DEFAULT_USPAWN_RUNC)
                else shutil.which("uspawn-runc") or DEFAULT_USPAWN_RUNC]
            exe = cmd[0] if os.sep in cmd[0] else shutil.which(cmd[0])
            if exe is None or not os.access(exe, os.X_OK):
                rt.status, rt.reason = "skipped", f"{cmd[0]} not found / not executable"
                continue
            tool = cmd
        elif not name.startswith("uspawn-runc-"):
            path = shutil.which(name)
            if path is None:
                rt.status, rt.reason = "skipped", f"{name} not found in PATH"
                continue
            tool = [path]
        if name == "runc":
            rt.notes.append("cgroups: runc default (cgroupfs; on this hybrid host v1 "
                            "controllers + unified, path /<ID>)")
        if name == "crun":
            layout = br.cgroup_layout()
            if layout != "unified":
                worker = OciWorker()
                executors.append(worker)
                if worker.error:
                    rt.status, rt.reason = "skipped", worker.error
                    continue
                executor = worker
                flags = ["--cgroup-manager=disabled"]
                rt.label = "crun, cgroup-manager=disabled"
                rt.notes.append(
                    f"{layout} cgroups: runs in a {worker.description}; every step is "
                    "timed inside the worker, the wait included; --cgroup-manager="
                    "disabled = no cgroup work at all (see bench/README.md)")
        if name == "crun":
            # Debian's crun 1.8.1 chowns the HOST's /dev/null to the container's root
            # when it runs a user-namespaced config (seen here): crun gets the plain
            # bundle, so its numbers are without a user namespace.
            rt.label += " (no userns)"
            rt.notes.append(br.CRUN_NOTE)
        rt_bundle = plain_bundle if name == "crun" else bundle
        base = [*tool, *flags, "--root", str(state / name)]
        commands = {
            "cycle": f"{shlex.join(base)} create --bundle {rt_bundle} --pid-file {pid_dir}/ID "
                     "ID; ... start ID; poll(pidfd of the init); ... delete ID",
            "run": f"{shlex.join(base)} run --bundle {rt_bundle} ID",
        }
        rt.notes[:0] = [commands[m] for m in modes]

        for mode in modes:
            factory = ArgvFactory(mode, base, rt_bundle, pid_dir)
            rec = Recording(executor)

            def cleanup(cid: str, base: list[str] = base, rec: Recording = rec) -> None:
                rec.inner.run([*base, "delete", "--force", cid], capture=True)
                with contextlib.suppress(OSError):
                    os.unlink(pid_dir / cid)

            row = br.Runtime(f"{name}-{mode}")
            row.variants.append(br.Variant(f"{rt.label} [{mode}]", factory, rec, cleanup,
                                           [commands[mode]], base))
            rt.rows[mode], rt.recorders[mode], rt.factories[mode] = row, rec, factory
    return out


def probe_run_leftover(rt: OciRuntime) -> None:
    """After the run-mode verification: does `run` leave the container? then time +delete."""
    row = rt.rows.get("run")
    if row is None or row.status != "ok":
        return
    factory = rt.factories["run"]
    var = row.variants[0]
    res = var.executor.run([*factory.base, "state", factory.last_id], capture=True)
    if res.rc == 0:
        factory.needs_delete = True
        var.executor.run([*factory.base, "delete", "--force", factory.last_id], capture=True)
        rt.notes.append("`run` leaves the stopped container: run mode = run + delete")


# --------------------------------------------------------------------------- results


def mode_result(rt: OciRuntime, mode: str, ref: float | None) -> dict[str, Any]:
    row = rt.rows.get(mode)
    if rt.status == "skipped" or row is None:
        return {"status": "skipped",
                "reason": rt.reason or f"not selected (--modes {mode} not given)"}
    out: dict[str, Any] = {"status": row.status, "reason": row.reason, "n": len(row.samples),
                           "notes": row.notes}
    if row.samples:
        out.update(br.stats(row.samples))
        out["ratio_to_uspawn_runc"] = out["median_ms"] / ref if ref else None
        out["samples_ms"] = [round(s / 1e6, 4) for s in row.samples]
        timed = rt.recorders[mode].steps[-len(row.samples):]
        if timed:
            out["steps"] = {step: br.stats([s[step] for s in timed]) for step in timed[0]}
    return out


def results(runtimes: list[OciRuntime]) -> list[dict[str, Any]]:
    refs: dict[str, float | None] = {}
    usp = next(rt for rt in runtimes if rt.name == "uspawn-runc")
    for mode in MODES:
        row = usp.rows.get(mode)
        refs[mode] = br.stats(row.samples)["median_ms"] if row and row.status == "ok" \
            and row.samples else None
    rows: list[dict[str, Any]] = []
    for rt in runtimes:
        rows.append({"runtime": rt.name, "label": rt.label, "notes": rt.notes,
                     "executor": next(iter(rt.recorders.values())).description
                     if rt.recorders else None,
                     **{mode: mode_result(rt, mode, refs[mode]) for mode in MODES}})
    return rows


def table(title: str, hdr: tuple[str, ...], lines: list[tuple[str, ...]],
          out: IO[str]) -> None:
    full = [ln for ln in lines if len(ln) == len(hdr)]
    widths = [max([len(hdr[i]), *(len(ln[i]) for ln in full)]) for i in range(len(hdr))]
    widths[0] = max([widths[0], *(len(ln[0]) for ln in lines)])

    def fmt(cols: tuple[str, ...]) -> str:
        if len(cols) != len(hdr):
            return f"{cols[0]:<{widths[0]}}  {cols[1]}"
        return "  ".join([f"{cols[0]:<{widths[0]}}",
                          *(f"{c:>{w}}" for c, w in zip(cols[1:], widths[1:], strict=True))])

    print(f"\n{title}", file=out)
    print(fmt(hdr), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for ln in lines:
        print(fmt(ln), file=out)


def render(rows: list[dict[str, Any]], runs: int, warmup: int, out: IO[str]) -> None:
    def head(r: dict[str, Any], mode: str) -> tuple[str, ...] | None:
        m = r[mode]
        if m["status"] == "ok" and m["n"]:
            ratio = m["ratio_to_uspawn_runc"]
            return (r["label"], str(m["n"]), f"{m['median_ms']:.2f}", f"{m['p90_ms']:.2f}",
                    f"{m['min_ms']:.2f}", f"{ratio:.2f}x" if ratio else "n/a")
        return None

    def other(r: dict[str, Any], mode: str) -> tuple[str, ...]:
        m = r[mode]
        word = "skipped" if m["status"] == "skipped" else "FAILED"
        return (r["label"], f"{word}: {m['reason']}")

    cyc: list[tuple[str, ...]] = []
    for r in rows:
        h = head(r, "cycle")
        steps = r["cycle"].get("steps", {})
        cyc.append((*h, *(f"{steps[s]['median_ms']:.2f}" if s in steps else "-"
                          for s in STEPS)) if h else other(r, "cycle"))
    table(f"create + start + wait + delete, {runs} runs after {warmup} warm-up "
          "(ms; ratio = median / uspawn-runc median; step columns = step medians)",
          ("runtime", "n", "median", "p90", "min", "vs uspawn-runc", *STEPS), cyc, out)
    run = [head(r, "run") or other(r, "run") for r in rows]
    table(f"run (foreground) /bin/true, {runs} runs after {warmup} warm-up (ms)",
          ("runtime", "n", "median", "p90", "min", "vs uspawn-runc"), run, out)
    print("\ncommands:", file=out)
    width = max(len(r["label"]) for r in rows) + 1
    for r in rows:
        # (the rows' own notes, "... failed verification: <command>", are in the JSON)
        notes = r["notes"] or [r[MODES[0]].get("reason", "")]
        for i, note in enumerate(notes):
            print(f"  {r['label'] + ':' if i == 0 else '':<{width}} {note}", file=out)


# --------------------------------------------------------------------------- main


def fix_bundle(bundle: Path) -> list[str]:
    """--bundle-fixups: the two changes uspawn-runc needs in a runc-1.1 `runc spec`."""
    path = bundle / "config.json"
    cfg = json.loads(path.read_text())
    done = []
    nss = cfg["linux"]["namespaces"]
    if not any(ns["type"] == "cgroup" for ns in nss):
        nss.append({"type": "cgroup"})
        done.append("added a cgroup namespace")
    if cfg["process"].get("capabilities", {}).pop("ambient", None) is not None:
        done.append("dropped process.capabilities.ambient")
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return done


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=20, help="timed runs per row (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument("--uspawn-runc", metavar="CMD", default=None,
                   help=f"uspawn-runc command (shell-split), default {DEFAULT_USPAWN_RUNC}")
    p.add_argument("--runtimes", default=",".join(RUNTIME_NAMES),
                   help="comma-separated subset of: " + ",".join(RUNTIME_NAMES))
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of: " + ",".join(MODES))
    p.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved: round-robin over all rows, rotated each round")
    p.add_argument("--cache-dir", type=Path, default=br.DEFAULT_CACHE,
                   help=f"rootfs (shared with bench_run) + CACHE/oci/bundles "
                        f"(default {br.DEFAULT_CACHE})")
    p.add_argument("--rootfs", type=Path, default=None,
                   help="use this rootfs instead of CACHE/busybox (must contain /bin/true)")
    p.add_argument("--rebuild-rootfs", action="store_true")
    p.add_argument("--uspawn-runc-also", action="append", default=[], metavar="LABEL=CMD",
                   help="one more uspawn-runc row, uspawn-runc-LABEL, run with CMD (e.g. "
                        "a launcher of the commit before a change): before/after in one run")
    p.add_argument("--bundle-fixups", action="store_true",
                   help="for all runtimes: add a cgroup namespace and drop "
                        "process.capabilities.ambient (what uspawn-runc needs)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                   help=f"parent of the --root dirs and pid files (default {DEFAULT_STATE})")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write JSON results to FILE, or to stdout (table then goes to stderr)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    for opt, names in (("runtimes", RUNTIME_NAMES), ("modes", MODES)):
        unknown = set(getattr(args, opt).split(",")) - set(names) - {""}
        if unknown:
            p.error(f"unknown {opt}: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == [br.WORKER_FLAG]:
        return worker_main()
    args = parse_args(argv)
    if os.geteuid() != 0:
        br.log("warning: not running as root; the runtimes will most likely fail")
    cache: Path = args.cache_dir.resolve()
    rootfs: Path = args.rootfs.resolve() if args.rootfs else cache / "busybox"
    if args.rootfs is None:
        br.ensure_rootfs(rootfs, args.rebuild_rootfs)
    if not (rootfs / "bin" / "true").exists() and not (rootfs / "bin" / "true").is_symlink():
        br.log(f"error: {rootfs}/bin/true does not exist")
        return 2
    spec_tool = shutil.which("runc") or shutil.which("crun") or shutil.which("uspawn-runc")
    if spec_tool is None:
        br.log("error: no runc, crun or uspawn-runc to write the config.json template")
        return 2
    bundle, plain_bundle = br.make_bundles(cache / "oci", rootfs, spec_tool)
    bundle_notes = [f"bundle {bundle}: `{os.path.basename(spec_tool)} spec` + user ns, "
                    "uid/gid 0->100000 (65536), /bin/true, terminal false, root read-only"]
    if args.bundle_fixups:
        bundle_notes.append("--bundle-fixups: " + "; ".join(fix_bundle(bundle)))
    for note in bundle_notes:
        br.log(note)

    state: Path = args.state_dir
    created_state = not state.exists()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid_dir = state / "pidfiles"
    pid_dir.mkdir(exist_ok=True)
    set_subreaper()

    executors: list[br.Executor] = []
    runtimes: list[OciRuntime] = []
    rows: list[br.Runtime] = []
    interrupted = False
    try:
        runtimes = build_runtimes(args, bundle, state, pid_dir, executors, plain_bundle)
        rows = [row for rt in runtimes for row in rt.rows.values()]
        br.log(f"verifying on {rootfs} (cgroups: {br.cgroup_layout()}) ...")
        for rt in runtimes:
            if rt.status == "skipped":
                br.log(f"  skipped {rt.label}: {rt.reason}")
                continue
            for row in rt.rows.values():
                br.verify(row)
            probe_run_leftover(rt)
        br.log(f"timing: {args.warmup} warm-up + {args.runs} runs per row, {args.order} ...")
        br.benchmark(rows, args.runs, args.warmup, args.order)
    except KeyboardInterrupt:
        br.log("interrupted: cleaning up, no results")
        interrupted = True
    finally:
        shutil.rmtree(pid_dir, ignore_errors=True)
        br.cleanup_state(rows, state, created_state)
        for ex in executors:
            ex.close()
        reap_strays()
    if interrupted:
        return 130
    if _strays:
        br.log("note: reaped orphans other than the container inits (on the host side): "
               + ", ".join(f"{n}x {comm}" for comm, n in sorted(_strays.items())))

    res = results(runtimes)
    doc = {
        "benchmark": "OCI lifecycle: create+start+wait+delete and run, /bin/true",
        "runs": args.runs, "warmup": args.warmup, "order": args.order,
        "rootfs": str(rootfs), "bundle": str(bundle), "bundle_notes": bundle_notes,
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "cgroups": br.cgroup_layout(),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "results": res,
    }
    table_out = sys.stdout
    if args.json == "-":
        table_out = sys.stderr
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    render(res, args.runs, args.warmup, table_out)
    for note in bundle_notes:
        print(f"  {note}", file=table_out)
    return 0 if all(row.status != "failed" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
