#!/usr/bin/env python3
"""Container start-up benchmark: `uspawn run` against runc, crun, bwrap and systemd-nspawn.

Every runtime starts /bin/true inside the same busybox rootfs; the harness times
the whole command (fork/exec of the runtime binary until it has exited and been
reaped) with time.perf_counter_ns() around subprocess.run(). Iterations are
interleaved round-robin across runtimes (the order rotates every round) so that
host noise and drift hit every runtime alike. See bench/README.md.

    python bench/bench_run.py --runs 30 [--warmup 3] [--json [FILE]]

Stdlib only. Must run as root (runc, crun and systemd-nspawn need it).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path("/var/tmp/uspawn-bench")
DEFAULT_STATE = Path("/run/uspawn-bench")
DEFAULT_USPAWN = "/opt/uspawn-venv/bin/uspawn"
RUNTIME_NAMES = ("uspawn", "runc", "crun", "bwrap", "systemd-nspawn")
BASELINE = "baseline"
USERNS_MAP = {"containerID": 0, "hostID": 100000, "size": 65536}
WORKER_FLAG = "--_worker-cgroup2"


# --------------------------------------------------------------------------- executors


@dataclass
class RunResult:
    ns: int
    rc: int
    stderr: str
    stdout: str = ""


def run_timed(argv: Sequence[str], capture: bool) -> RunResult:
    """Run argv once; return wall time in ns (only the subprocess.run call is timed)."""
    out: int = subprocess.PIPE if capture else subprocess.DEVNULL
    t0 = time.perf_counter_ns()
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              check=False)
    except OSError as exc:
        return RunResult(time.perf_counter_ns() - t0, 127, f"{argv[0]}: {exc}")
    t1 = time.perf_counter_ns()
    if not capture:
        return RunResult(t1 - t0, proc.returncode, "")
    return RunResult(t1 - t0, proc.returncode, (proc.stderr or b"").decode(errors="replace"),
                     (proc.stdout or b"").decode(errors="replace"))


class Executor(Protocol):
    description: str

    def run(self, argv: Sequence[str], capture: bool) -> RunResult: ...

    def close(self) -> None: ...


class LocalExecutor:
    description = "host namespaces"

    def run(self, argv: Sequence[str], capture: bool) -> RunResult:
        return run_timed(argv, capture)

    def close(self) -> None:
        pass


class Cgroup2Worker:
    """A long-lived `unshare -m` child in which /sys/fs/cgroup is a plain cgroup2 mount.

    crun refuses hybrid cgroup hosts ("cgroups in hybrid mode not supported"), so its
    iterations run in this private mount namespace. The namespace is set up once; the
    worker times each iteration itself with the same run_timed() as the host side, so
    neither the unshare/remount nor the request/reply pipe is counted.
    """

    description = "long-lived `unshare -m` worker with cgroup2 mounted on /sys/fs/cgroup"

    def __init__(self) -> None:
        self.error: str | None = None
        unshare = shutil.which("unshare")
        if unshare is None:
            self.proc: subprocess.Popen[str] | None = None
            self.error = "unshare(1) not found"
            return
        self.proc = subprocess.Popen(
            [unshare, "-m", "--propagation", "private", "--",
             sys.executable, str(Path(__file__).resolve()), WORKER_FLAG],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )
        hello = self._read()
        if hello is None or not hello.get("ok"):
            err = hello.get("error") if hello else None
            if err is None:
                err = self._drain_stderr() or "worker exited during setup"
            self.error = f"cgroup2 namespace setup failed: {err}"
            self.close()

    def _read(self) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return None
        data: dict[str, Any] = json.loads(line)
        return data

    def _drain_stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return self.proc.stderr.read().strip()

    def run(self, argv: Sequence[str], capture: bool) -> RunResult:
        if self.proc is None or self.proc.stdin is None or self.proc.poll() is not None:
            return RunResult(0, 125, f"cgroup2 worker not running: {self.error or 'exited'}")
        try:
            self.proc.stdin.write(json.dumps({"argv": list(argv), "capture": capture}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return RunResult(0, 125, "cgroup2 worker died: " + self._drain_stderr())
        reply = self._read()
        if reply is None:
            return RunResult(0, 125, "cgroup2 worker died: " + self._drain_stderr())
        return RunResult(int(reply["ns"]), int(reply["rc"]), str(reply["stderr"]),
                         str(reply["stdout"]))

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self.proc = None


def worker_main() -> int:
    """Body of the Cgroup2Worker process (already inside `unshare -m`)."""

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    for cmd in (["umount", "-l", "/sys/fs/cgroup"],
                ["mount", "-t", "cgroup2", "none", "/sys/fs/cgroup"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            reply({"ok": False, "error": f"{shlex.join(cmd)}: {proc.stderr.strip()}"})
            return 1
    reply({"ok": True})
    gc.disable()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            res = run_timed(req["argv"], bool(req["capture"]))
        except KeyboardInterrupt:  # ^C hits the whole process group; keep serving cleanup
            res = RunResult(0, 130, "interrupted")
        reply({"ns": res.ns, "rc": res.rc, "stderr": res.stderr, "stdout": res.stdout})
    return 0


# --------------------------------------------------------------------------- runtimes


@dataclass
class Variant:
    label: str                                  # row label
    argv: Callable[[str], list[str]]            # container id -> argv
    executor: Executor
    cleanup: Callable[[str], None] | None = None  # container id -> best-effort delete
    notes: list[str] = field(default_factory=list)
    state_cmd: list[str] | None = None          # OCI runtime: [tool, *flags, --root, DIR]


@dataclass
class Runtime:
    name: str
    variants: list[Variant] = field(default_factory=list)
    status: str = "pending"                     # ok | failed | skipped
    reason: str = ""
    chosen: Variant | None = None
    samples: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counter: int = 0

    @property
    def label(self) -> str:
        return self.chosen.label if self.chosen else self.name

    def next_id(self) -> str:
        self.counter += 1
        return f"ubench-{os.getpid()}-{self.name}-{self.counter}"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def indent(text: str) -> str:
    text = text.strip() or "(no stderr)"
    return "\n".join("    | " + line for line in text.splitlines()[-40:])


def cgroup_layout() -> str:
    """'unified', 'hybrid' or 'legacy', from the fstype(s) at /sys/fs/cgroup."""
    top = ""
    has_v2 = False
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4]
            fstype = right.split()[0]
            if mnt == "/sys/fs/cgroup":
                top = fstype
            elif mnt.startswith("/sys/fs/cgroup/") and fstype == "cgroup2":
                has_v2 = True
    if top == "cgroup2":
        return "unified"
    return "hybrid" if has_v2 else "legacy"


def ensure_rootfs(rootfs: Path, rebuild: bool) -> None:
    if not rebuild and (rootfs / "bin" / "busybox").is_file():
        return
    log(f"building busybox rootfs in {rootfs} ...")
    if not rootfs.parent.exists():
        rootfs.parent.mkdir(parents=True)
        os.chmod(rootfs.parent, 0o755)  # uid 100000 (runc/crun userns) must traverse it
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    code = ("import sys; from uspawn.tree.busybox import build_busybox_rootfs; "
            "build_busybox_rootfs(sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(rootfs)], check=True, env=env)


def make_bundles(cache: Path, rootfs: Path, spec_tool: str) -> tuple[Path, Path]:
    """(userns bundle, default bundle): `runc spec` + root.path, args, terminal.

    Regenerated on every run; the bundles stay in the cache dir."""
    bundles = []
    for name, userns in (("oci-userns", True), ("oci-default", False)):
        bundle = cache / "bundles" / name
        bundle.mkdir(parents=True, exist_ok=True)
        cfg_path = bundle / "config.json"
        cfg_path.unlink(missing_ok=True)
        subprocess.run([spec_tool, "spec"], cwd=bundle, check=True,
                       stdout=subprocess.DEVNULL)
        cfg = json.loads(cfg_path.read_text())
        cfg["root"] = {"path": str(rootfs), "readonly": True}
        cfg["process"]["args"] = ["/bin/true"]
        cfg["process"]["terminal"] = False
        if userns:
            nss = cfg["linux"]["namespaces"]
            if not any(ns["type"] == "user" for ns in nss):
                nss.append({"type": "user"})
            cfg["linux"]["uidMappings"] = [dict(USERNS_MAP)]
            cfg["linux"]["gidMappings"] = [dict(USERNS_MAP)]
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        bundles.append(bundle)
    return bundles[0], bundles[1]


CRUN_NOTE = ("no user namespace: crun 1.8.1 chowns the host's /dev/null in userns mode, "
             "so it is not run that way here")


def oci_variants(tool: str, path: str, state_root: Path, userns_bundle: Path,
                 default_bundle: Path, executor: Executor, global_flags: list[str],
                 extra_note: str, spec_tool: str) -> list[Variant]:
    state_cmd = [path, *global_flags, "--root", str(state_root)]

    def argv_for(bundle: Path) -> Callable[[str], list[str]]:
        return lambda cid: [*state_cmd, "run", "-b", str(bundle), cid]

    def cleanup(cid: str) -> None:
        executor.run([*state_cmd, "delete", "-f", cid], capture=True)

    flags = " ".join(global_flags)
    out = []
    for bundle, suffix, note in (
        (userns_bundle, "userns",
         f"config: `{spec_tool} spec` + user ns, uid/gid 0->100000 (65536)"),
        (default_bundle, "no userns",
         f"config: plain `{spec_tool} spec` (userns config FAILED here, see stderr above)"),
    ):
        label = f"{tool} ({suffix})"
        notes = [f"{tool} {flags + ' ' if flags else ''}--root {state_root} run -b {bundle} ID",
                 note]
        if extra_note:
            notes.append(extra_note)
        out.append(Variant(label, argv_for(bundle), executor, cleanup, notes, state_cmd))
    return out


def fixed(argv: list[str]) -> Callable[[str], list[str]]:
    """argv factory for runtimes that need no per-run container id."""
    return lambda _cid: argv


def build_runtimes(args: argparse.Namespace, rootfs: Path, cache: Path, state: Path,
                   selected: set[str], executors: list[Executor]) -> list[Runtime]:
    local = LocalExecutor()
    runtimes: list[Runtime] = []

    def add(name: str) -> Runtime | None:
        rt = Runtime(name)
        runtimes.append(rt)
        if name not in selected:
            rt.status, rt.reason = "skipped", "not selected (--runtimes)"
            return None
        return rt

    # baseline: the harness' own fork/exec/wait cost
    if not args.no_baseline and (rt := add(BASELINE)):
        true = shutil.which("true") or "/bin/true"
        rt.variants.append(Variant("host /bin/true (no container)", fixed([true]), local,
                                   notes=[f"{true} on the host: subprocess.run overhead"]))

    # uspawn
    if rt := add("uspawn"):
        default = DEFAULT_USPAWN if os.path.exists(DEFAULT_USPAWN) else shutil.which("uspawn")
        cmd = shlex.split(args.uspawn) if args.uspawn else [default or DEFAULT_USPAWN]
        exe = cmd[0] if os.sep in cmd[0] else shutil.which(cmd[0])
        if exe is None or not os.access(exe, os.X_OK):
            rt.status, rt.reason = "skipped", f"{cmd[0]} not found / not executable"
        else:
            full = [*cmd, "run", "-D", str(rootfs), "--", "/bin/true"]
            rt.variants.append(Variant("uspawn", fixed(full), local,
                                       notes=[shlex.join(full)]))
    # --uspawn-also: more uspawn rows (e.g. the commit before a change), timed in
    # the same interleaved rounds: before/after on one noisy machine.
    for spec in args.uspawn_also if "uspawn" in selected else []:
        label, _, also = spec.partition("=")
        rt = Runtime(f"uspawn-{label}")
        runtimes.append(rt)
        full = [*shlex.split(also), "run", "-D", str(rootfs), "--", "/bin/true"]
        rt.variants.append(Variant(f"uspawn ({label})", fixed(full), local,
                                   notes=[shlex.join(full)]))

    runc = shutil.which("runc")
    crun = shutil.which("crun")
    bundles: tuple[Path, Path] | None = None
    spec_tool = runc or crun
    spec_name = os.path.basename(spec_tool or "runc")
    if spec_tool and ({"runc", "crun"} & selected):
        bundles = make_bundles(cache, rootfs, spec_tool)

    # runc
    if rt := add("runc"):
        if runc is None or bundles is None:
            rt.status, rt.reason = "skipped", "runc not found in PATH"
        else:
            rt.variants = oci_variants("runc", runc, state / "runc", bundles[0], bundles[1],
                                       local, [], "cgroups: runc default (cgroupfs, v1 "
                                       "controllers + unified, path /<ID>)", spec_name)

    # crun. Never with the userns bundle: Debian's crun 1.8.1 chowns the HOST's
    # /dev/null to the container's root when it runs a user-namespaced config
    # (seen here: /dev/null became 100000:100000). Its rows therefore measure
    # crun without a user namespace (cheaper than with one).
    if rt := add("crun"):
        layout = cgroup_layout()
        if crun is None or bundles is None:
            rt.status, rt.reason = "skipped", "crun not found in PATH"
        elif layout == "unified":
            rt.variants = oci_variants("crun", crun, state / "crun", bundles[1], bundles[1],
                                       local, [], CRUN_NOTE, spec_name)[:1]
        else:
            worker = Cgroup2Worker()
            executors.append(worker)
            if worker.error:
                rt.status, rt.reason = "skipped", worker.error
            else:
                rt.variants = oci_variants(
                    "crun", crun, state / "crun", bundles[1], bundles[1], worker,
                    ["--cgroup-manager=disabled"],
                    f"{layout} cgroups: runs in a {worker.description} (set up once; only "
                    "the crun subprocess.run is timed); --cgroup-manager=disabled = no "
                    "cgroup work at all; " + CRUN_NOTE, spec_name)[:1]
                rt.variants[0].label = "crun (no userns)"

    # bwrap
    if rt := add("bwrap"):
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            rt.status, rt.reason = "skipped", "bwrap not found in PATH"
        else:
            argv = [bwrap, "--unshare-all", "--uid", "0", "--gid", "0", "--bind", str(rootfs),
                    "/", "--proc", "/proc", "--dev", "/dev", "/bin/true"]
            rt.variants.append(Variant("bwrap", fixed(argv), local, notes=[
                shlex.join(argv),
                "user ns maps only 0->0 (size 1) when run as root; also new "
                "pid/net/ipc/uts/cgroup ns"]))

    # systemd-nspawn
    if rt := add("systemd-nspawn"):
        nspawn = shutil.which("systemd-nspawn")
        if nspawn is None:
            rt.status, rt.reason = "skipped", "systemd-nspawn not found in PATH"
        else:
            base = [nspawn, "-q", "-D", str(rootfs), "--register=no", "--keep-unit"]
            for label, extra, note in (
                ("systemd-nspawn -U", ["-U"],
                 "-U = --private-users=pick --private-users-ownership=auto (idmapped "
                 "rootfs mount, tree not chowned); --register=no --keep-unit: no "
                 "system bus / systemd PID 1 here"),
                ("systemd-nspawn (no userns)", [],
                 "-U FAILED here (see stderr above); host user namespace"),
            ):
                argv_n = [*base[:2], *extra, *base[2:], "/bin/true"]
                rt.variants.append(Variant(label, fixed(argv_n), local,
                                           notes=[shlex.join(argv_n), note]))
    return runtimes


# --------------------------------------------------------------------------- benchmark


def verify(rt: Runtime) -> None:
    """Pick the first variant whose verification run succeeds (stdout/stderr captured)."""
    if rt.status != "pending":
        return
    first_err = ""
    for var in rt.variants:
        cid = rt.next_id()
        res = var.executor.run(var.argv(cid), capture=True)
        if res.rc == 0:
            rt.chosen, rt.status = var, "ok"
            log(f"  ok      {var.label}  ({res.ns / 1e6:.1f} ms)")
            return
        if var.cleanup:
            var.cleanup(cid)
        log(f"  FAILED  {var.label}: exit {res.rc}, stderr:\n{indent(res.stderr)}")
        if res.stdout.strip():
            log(f"  stdout:\n{indent(res.stdout)}")
        rt.notes.append(f"{var.label} failed verification (exit {res.rc}): "
                        + (var.notes[0] if var.notes else shlex.join(var.argv(cid))))
        if not first_err:
            first_err = f"exit {res.rc}: " + (res.stderr.strip().splitlines() or [""])[-1]
    rt.status = "failed"
    rt.reason = first_err or "no variant to try"


def run_once(rt: Runtime, record: bool) -> None:
    var = rt.chosen
    assert var is not None
    cid = rt.next_id()
    res = var.executor.run(var.argv(cid), capture=False)
    if res.rc == 0:
        if record:
            rt.samples.append(res.ns)
        return
    # First failure: clean up, re-run once (untimed) to capture stderr, mark failed.
    if var.cleanup:
        var.cleanup(cid)
    cid2 = rt.next_id()
    diag = var.executor.run(var.argv(cid2), capture=True)
    if diag.rc != 0 and var.cleanup:
        var.cleanup(cid2)
    log(f"  FAILED  {var.label} during timed runs: exit {res.rc} (iteration "
        f"{len(rt.samples) + 1}); stderr of an untimed re-run (exit {diag.rc}):\n"
        f"{indent(diag.stderr)}")
    rt.status = "failed"
    rt.reason = f"exit {res.rc} after {len(rt.samples)} good runs"


def benchmark(runtimes: list[Runtime], runs: int, warmup: int, order: str) -> None:
    active = [rt for rt in runtimes if rt.status == "ok"]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if order == "sequential":
            for rt in active:
                for i in range(warmup + runs):
                    if rt.status != "ok":
                        break
                    run_once(rt, record=i >= warmup)
                log(f"  done    {rt.label}")
            return
        total = warmup + runs
        for i in range(total):
            k = i % max(len(active), 1)
            for rt in active[k:] + active[:k]:  # rotate the order every round
                if rt.status == "ok":
                    run_once(rt, record=i >= warmup)
            if (i + 1) % 10 == 0 or i + 1 == total:
                log(f"  round {i + 1}/{total}")
    finally:
        if gc_was_enabled:
            gc.enable()


def stats(samples: list[int]) -> dict[str, float]:
    ms = sorted(s / 1e6 for s in samples)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return {"median_ms": statistics.median(ms), "p90_ms": p90, "min_ms": ms[0],
            "max_ms": ms[-1], "mean_ms": statistics.fmean(ms),
            "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0}


def results(runtimes: list[Runtime]) -> list[dict[str, Any]]:
    usp = next((rt for rt in runtimes if rt.name == "uspawn"), None)
    usp_median = stats(usp.samples)["median_ms"] if usp and usp.status == "ok" and \
        usp.samples else None
    rows: list[dict[str, Any]] = []
    for rt in runtimes:
        row: dict[str, Any] = {"runtime": rt.name, "label": rt.label, "status": rt.status,
                               "reason": rt.reason, "n": len(rt.samples),
                               "command": rt.chosen.notes if rt.chosen else [],
                               "notes": rt.notes}
        if rt.chosen:
            row["executor"] = rt.chosen.executor.description
        if rt.samples:
            row.update(stats(rt.samples))
            row["ratio_to_uspawn"] = (row["median_ms"] / usp_median) if usp_median else None
            row["samples_ms"] = [round(s / 1e6, 4) for s in rt.samples]
        rows.append(row)
    return rows


def render_table(rows: list[dict[str, Any]], runs: int, warmup: int, out: IO[str]) -> None:
    hdr = ("runtime", "n", "median ms", "p90 ms", "min ms", "vs uspawn")
    lines: list[tuple[str, ...]] = []
    for r in rows:
        if r["status"] == "ok" and r["n"]:
            ratio = f"{r['ratio_to_uspawn']:.2f}x" if r["ratio_to_uspawn"] else "n/a"
            lines.append((r["label"], str(r["n"]), f"{r['median_ms']:.2f}",
                          f"{r['p90_ms']:.2f}", f"{r['min_ms']:.2f}", ratio))
        else:
            word = "skipped" if r["status"] == "skipped" else "FAILED"
            lines.append((r["label"], f"{word}: {r['reason']}"))
    widths = [max(len(hdr[i]), *(len(ln[i]) for ln in lines if len(ln) == len(hdr)))
              for i in range(len(hdr))]

    def fmt(cols: tuple[str, ...]) -> str:
        if len(cols) != len(hdr):
            return f"{cols[0]:<{widths[0]}}  {cols[1]}"
        return "  ".join([f"{cols[0]:<{widths[0]}}",
                          *(f"{c:>{w}}" for c, w in zip(cols[1:], widths[1:], strict=True))])

    print(f"\n/bin/true start-up wall time, {runs} runs after {warmup} warm-up "
          "(ratio = median / uspawn median)", file=out)
    print(fmt(hdr), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for ln in lines:
        print(fmt(ln), file=out)
    print("\ncommands:", file=out)
    for r in rows:
        for i, note in enumerate(r["command"] + r["notes"]):
            print(f"  {r['label'] + ':' if i == 0 else '':<{widths[0] + 1}} {note}", file=out)


# --------------------------------------------------------------------------- main


def cleanup_state(runtimes: list[Runtime], state: Path, created_state: bool) -> None:
    prefix = f"ubench-{os.getpid()}-"
    for rt in runtimes:
        var = rt.variants[0] if rt.variants else None
        if var is None or var.state_cmd is None:
            continue
        root = Path(var.state_cmd[-1])
        if not root.exists():
            continue
        # any leftover container from this run (ids carry our pid) -> delete -f
        res = var.executor.run([*var.state_cmd, "list", "-q"], capture=True)
        for cid in res.stdout.split():
            if cid.startswith(prefix):
                log(f"  removing leftover {rt.name} container {cid}")
                var.executor.run([*var.state_cmd, "delete", "-f", cid], capture=True)
        with contextlib.suppress(OSError):
            if not any(root.iterdir()):
                root.rmdir()
    if created_state:
        with contextlib.suppress(OSError):
            state.rmdir()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=30, help="timed runs per runtime (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument("--uspawn", metavar="CMD", default=None,
                   help=f"uspawn command prefix (shell-split), default {DEFAULT_USPAWN}")
    p.add_argument("--uspawn-also", action="append", default=[], metavar="LABEL=CMD",
                   help="one more uspawn row, run with CMD (e.g. a launcher of the commit "
                        "before a change): before/after in the same run")
    p.add_argument("--runtimes", default=",".join(RUNTIME_NAMES),
                   help="comma-separated subset of: " + ",".join(RUNTIME_NAMES))
    p.add_argument("--no-baseline", action="store_true",
                   help="omit the host /bin/true (harness overhead) row")
    p.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved: round-robin, order rotated each round (default)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"rootfs + OCI bundles (default {DEFAULT_CACHE})")
    p.add_argument("--rootfs", type=Path, default=None,
                   help="use this rootfs instead of CACHE/busybox (must contain /bin/true)")
    p.add_argument("--rebuild-rootfs", action="store_true")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                   help=f"runc/crun --root parent (default {DEFAULT_STATE}); removed after")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write JSON results to FILE, or to stdout (table then goes to stderr)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    unknown = set(args.runtimes.split(",")) - set(RUNTIME_NAMES) - {""}
    if unknown:
        p.error(f"unknown runtime(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == [WORKER_FLAG]:
        return worker_main()
    args = parse_args(argv)
    selected = {n for n in args.runtimes.split(",") if n} | {BASELINE}
    if os.geteuid() != 0:
        log("warning: not running as root; runc/crun/systemd-nspawn will most likely fail")
    cache: Path = args.cache_dir.resolve()
    rootfs: Path = args.rootfs.resolve() if args.rootfs else cache / "busybox"
    if args.rootfs is None:
        ensure_rootfs(rootfs, args.rebuild_rootfs)
    if not (rootfs / "bin" / "true").exists() and not (rootfs / "bin" / "true").is_symlink():
        log(f"error: {rootfs}/bin/true does not exist")
        return 2
    state: Path = args.state_dir
    created_state = not state.exists()
    state.mkdir(parents=True, exist_ok=True)

    executors: list[Executor] = []
    runtimes: list[Runtime] = []
    interrupted = False
    try:
        runtimes = build_runtimes(args, rootfs, cache, state, selected, executors)
        log(f"verifying runtimes on {rootfs} (cgroups: {cgroup_layout()}) ...")
        for rt in runtimes:
            verify(rt)
        log(f"timing: {args.warmup} warm-up + {args.runs} runs each, {args.order} ...")
        benchmark(runtimes, args.runs, args.warmup, args.order)
    except KeyboardInterrupt:
        log("interrupted: cleaning up, no results")
        interrupted = True
    finally:
        cleanup_state(runtimes, state, created_state)
        for ex in executors:
            ex.close()
    if interrupted:
        return 130

    rows = results(runtimes)
    doc = {
        "benchmark": "container start-up: /bin/true",
        "runs": args.runs, "warmup": args.warmup, "order": args.order,
        "rootfs": str(rootfs),
        "host": {"kernel": platform.release(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "cgroups": cgroup_layout(),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "results": rows,
    }
    table_out = sys.stdout
    if args.json == "-":
        table_out = sys.stderr
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    render_table(rows, args.runs, args.warmup, table_out)
    return 0 if all(rt.status != "failed" for rt in runtimes) else 1


if __name__ == "__main__":
    sys.exit(main())
