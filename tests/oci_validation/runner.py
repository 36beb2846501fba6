"""Run the OCI runtime-tools validation suite against OCI runtimes and score them.

    python tests/oci_validation/runner.py [--runtime CMD]... [--cases a,b] [--json FILE]

The suite (opencontainers/runtime-tools, the conformance tests runc, crun and youki run)
is built from /work/shared/oci-validation, or $USPAWN_OCI_VALIDATION_SRC, into
/var/cache/uspawn-oci-validation/<sha256 of the tarball>/ (rebuilt when missing; Debian's
golang-go). Every case runs as described in that directory's README.md:

- from a work directory holding copies (not symlinks: the suite copies a symlink as a
  symlink, which dangles inside the container) of runtimetest and the rootfs tarball;
- with RUNTIME set to a wrapper script that logs each call and adds `--root`, so each
  runtime keeps its containers in a state root of this run and nobody else's containers
  are touched by the cleanup;
- with TMPDIR under /var/tmp, mode 0755 (linux_uid_mappings' unprivileged root must
  traverse it);
- in its own session, killed after --timeout seconds (120), with this process a child
  subreaper that reaps whatever the runtimes daemonise while the case runs.

After each case the runner deletes what the case left in the state root, kills and
removes the cgroup directories the suite leaves (`cgrouptest`, `testdir`, or named after a
container id the case used) and kills orphans; after each runtime it checks that the
host's /dev nodes kept their owner, mode and device number.

Counting (README): every `ok` point passes, every `not ok` fails; a case that exits
non-zero, times out, bails out or prints fewer points than a plan adds one failure; a
case without points passes once when it exits 0 and no YAML diagnostic carries an
`error` key. A case "passes" when it has no failure.

Exit status: 0 when the run completed (whatever the scores), 2 for usage errors, 3 when a
host /dev node changed. tests/oci_validation/test_validation.py compares the results
with expected.json.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests"))  # waits.py, when run as a script
from fixtures import cached_build  # noqa: E402
from waits import wait_all_gone  # noqa: E402

DEFAULT_SRC = "/work/shared/oci-validation"
CACHE = Path("/var/cache/uspawn-oci-validation")
STATE_BASE = Path("/run/uspawn-oci-validation")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Cgroup names the suite itself uses (runtime-tools cgroups.AbsCgroupPath/RelCgroupPath).
SUITE_CGROUP_NAMES = frozenset({"cgrouptest", "testdir"})
PR_SET_CHILD_SUBREAPER = 36
MNT_DETACH = 2
DEFAULT_TIMEOUT = 120.0
DIAG_LIMIT = 1500


# ---------------------------------------------------------------- the suite build


def suite_src() -> Path:
    return Path(os.environ.get("USPAWN_OCI_VALIDATION_SRC") or DEFAULT_SRC)


def ensure_built(src: Path, cache: Path = CACHE) -> Path:
    """The built suite for src's tarball; built with src/build.sh when missing (~1-2 min)."""
    return cached_build.ensure_built(src, "runtime-tools-*.tar.gz", cache, "oci-validation")


def list_cases(built: Path) -> list[str]:
    return sorted(p.parent.name for p in (built / "validation").glob("*/*.t"))


# ---------------------------------------------------------------- TAP


@dataclass
class Point:
    ok: bool
    text: str
    skip: bool = False
    diagnostic: str = ""


@dataclass
class Tap:
    points: list[Point] = field(default_factory=list)
    streams: int = 0
    broken_plan: bool = False
    bailed: bool = False
    error_diagnostic: bool = False


_POINT = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*)$")
_PLAN = re.compile(r"^1\.\.(\d+)")


def summarize(yaml: str) -> str:
    """A point's diagnostic; when it carries runtimetest's own TAP (the inner stdout of
    RuntimeInsideValidate), just the inner failing points and stderr."""
    body = "\n".join(line.strip() for line in yaml.splitlines()
                     if line.strip() not in ("---", "..."))
    try:
        doc = json.loads(body)
    except ValueError:
        return yaml
    if not isinstance(doc, dict) or "not ok" not in str(doc.get("stdout", "")):
        return body
    inner = [p.text for p in parse_tap(str(doc["stdout"])).points if not p.ok]
    return ("inner: " + "; ".join(f"not ok {t}" for t in inner)
            + (f"; stderr: {doc['stderr']}" if doc.get("stderr") else ""))


def parse_tap(out: str) -> Tap:
    """Parse one or more TAP 13 streams; only column-0 lines are TAP (YAML is indented)."""
    tap = Tap()
    plan: int | None = None
    seen = 0
    diag: list[str] = []
    before = [""]  # the block just before the next point
    provisional = [False]  # the last point's diagnostic may still be replaced

    def end_stream() -> None:
        nonlocal plan, seen
        if (plan is not None and seen < plan) or (plan is None and seen > 0):
            tap.broken_plan = True
        plan, seen = None, 0

    def end_diag() -> None:
        if diag:
            text = "\n".join(diag)
            if re.search(r'^\s*"?error"?\s*:', text, re.M):
                tap.error_diagnostic = True
            block = summarize(text)[:DIAG_LIMIT]
            # tap-go writes a point's YAML after it, but RuntimeInsideValidate writes the
            # inner stdout before its point: a block belongs to the point it follows, or
            # else to the point right after it.
            if tap.points and provisional[0]:
                tap.points[-1].diagnostic = block
                provisional[0] = False
            before[0] = block
            diag.clear()

    for line in out.splitlines():
        if line[:1].isspace():
            diag.append(line)
            continue
        end_diag()
        pending, before[0] = before[0], ""
        if line.startswith("TAP version"):
            if tap.streams:
                end_stream()
            tap.streams += 1
        elif line.startswith("#") and tap.points and provisional[0]:
            # t.Fail(err) of tap-go: the error is a `# ` comment after the point.
            tap.points[-1].diagnostic = line[1:].strip()[:DIAG_LIMIT]
            provisional[0] = False
        elif line.startswith("Bail out!"):
            tap.bailed = True
        elif m := _PLAN.match(line):
            plan = int(m.group(1))
        elif m := _POINT.match(line):
            text = m.group(3)
            tap.points.append(Point(ok=m.group(1) == "ok", text=text,
                                    skip="# skip" in text.lower(), diagnostic=pending))
            provisional[0] = True
            seen += 1
    end_diag()
    end_stream()
    return tap


@dataclass
class CaseResult:
    case: str
    passed: int
    failed: int
    exit: int | None
    seconds: float
    timed_out: bool = False
    reason: str = ""
    failing_points: list[dict[str, str]] = field(default_factory=list)
    skipped: int = 0
    cleanup: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "pass" if self.failed == 0 else "fail"


def score(case: str, out: str, err: str, code: int | None, seconds: float,
          timed_out: bool) -> CaseResult:
    """The README's counting rules for one case's stdout, stderr and exit status."""
    tap = parse_tap(out)
    passed = sum(p.ok for p in tap.points)
    failed = len(tap.points) - passed
    reason = ""
    if timed_out:
        reason = "timed out"
    elif code != 0:
        reason = f"exit status {code}"
    elif tap.bailed:
        reason = "bailed out"
    elif tap.broken_plan:
        reason = "fewer points than the plan"
    elif not tap.points and tap.error_diagnostic:
        reason = "error diagnostic"
    if reason:
        failed += 1
    elif not tap.points:
        passed += 1
    res = CaseResult(case=case, passed=passed, failed=failed, exit=code,
                     seconds=round(seconds, 2), timed_out=timed_out, reason=reason,
                     skipped=sum(p.skip for p in tap.points))
    res.failing_points = [{"point": p.text, "diagnostic": p.diagnostic}
                          for p in tap.points if not p.ok]
    if reason:
        diag = err.strip()[-DIAG_LIMIT:] or out.strip()[-DIAG_LIMIT:]
        res.failing_points.append({"point": f"(case) {reason}", "diagnostic": diag})
    return res


# ---------------------------------------------------------------- host state


def dev_nodes() -> dict[str, tuple[int, int, int, int]]:
    """Owner, group, mode and device number of every top-level /dev entry."""
    nodes = {}
    for name in os.listdir("/dev"):
        try:
            st = os.lstat(f"/dev/{name}")
        except OSError:
            continue
        nodes[name] = (st.st_uid, st.st_gid, st.st_mode, st.st_rdev)
    return nodes


def dev_changes(before: dict[str, tuple[int, int, int, int]]) -> list[str]:
    after = dev_nodes()
    return [f"/dev/{n}: {before[n]} -> {after[n]}" for n in sorted(before)
            if n in after and after[n] != before[n]]


def cgroup_dirs() -> set[str]:
    dirs: set[str] = set()
    for top, subdirs, _ in os.walk(CGROUP_ROOT):
        dirs.update(os.path.join(top, d) for d in subdirs)
    return dirs


def kill_cgroup(path: str) -> list[int]:
    """SIGKILL every process in the cgroup directory path; their pids."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except OSError:
        return []
    return sigkill(pids)


def sigkill(pids: list[int]) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def remove_cgroups(paths: list[str]) -> list[str]:
    """rmdir paths deepest first, killing their processes (the case's containers) first.

    The killed processes are waited for by pidfd (wait_all_gone asks cgroup.procs again,
    killing what it lists, until no process is left running), the ones that were our
    children reaped, then the directory removed: a process that exited has left its
    cgroup, so the rmdir is not retried; a failure is reported."""
    problems = []
    for path in sorted(paths, key=lambda p: p.count("/"), reverse=True):
        try:
            wait_all_gone(functools.partial(kill_cgroup, path), 10, f"processes in {path}")
        except AssertionError as exc:
            problems.append(f"cannot remove cgroup {path}: {exc}")
            continue
        reap_orphans(None)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove cgroup {path}: {exc}")
    return problems


# ---------------------------------------------------------------- processes


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans(keep: int | None) -> None:
    """Reap every exited child except `keep` (the case, which Popen waits for)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == keep:
            return
        try:
            os.waitpid(info.si_pid, 0)
        except ChildProcessError:
            pass


def children() -> list[int]:
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            out.append(int(d))
    return out


def kill_orphans() -> list[str]:
    """Kill processes the case daemonised that outlived the cleanup (our children now).

    Each is waited for by pidfd (asking again for our children, and killing them, until
    none is left running), then reaped."""
    left = children()

    def kill_children() -> list[int]:
        return sigkill(children())

    notes = [f"killed orphan pid {p}" for p in left]
    try:
        wait_all_gone(kill_children, 5, "orphans")
    except AssertionError as exc:
        notes.append(str(exc))
    reap_orphans(None)
    return notes


# ---------------------------------------------------------------- runtimes


@dataclass
class Runtime:
    label: str
    command: list[str]


def resolve_runtime(spec: str) -> Runtime:
    """uspawn-runc (default): the repo's venv script; anything else: a path or a PATH name."""
    if spec == "uspawn-runc":
        script = REPO / ".venv" / "bin" / "uspawn-runc"
        if os.access(script, os.X_OK):
            return Runtime("uspawn-runc", [str(script)])
        py = REPO / ".venv" / "bin" / "python"
        return Runtime("uspawn-runc", [str(py if py.exists() else sys.executable), "-c",
                                       "from uspawn.oci.cli import entry; entry()"])
    path = shutil.which(spec)
    if path is None:
        raise FileNotFoundError(f"runtime {spec!r} not found (a path or a command on PATH)")
    return Runtime(Path(spec).name, [path])


def write_wrapper(rt: Runtime, rundir: Path, state: Path) -> tuple[Path, Path]:
    """RUNTIME must be one executable: a script that logs each call and adds --root."""
    wrapper = rundir / f"runtime-{rt.label}"
    log = rundir / f"calls-{rt.label}.log"
    cmd = " ".join(shlex.quote(c) for c in rt.command)
    wrapper.write_text("#!/bin/sh\n"
                       f"printf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n"
                       f"exec {cmd} --root {shlex.quote(str(state))} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper, log


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def clean_state(wrapper: Path, state: Path) -> list[str]:
    """Delete every container the case left in this run's state root."""
    notes: list[str] = []
    if not state.is_dir():
        return notes
    for cid in sorted(os.listdir(state)):
        if not (state / cid).is_dir():
            continue
        subprocess.run([str(wrapper), "kill", cid, "KILL"], capture_output=True, timeout=30)
        subprocess.run([str(wrapper), "delete", "--force", cid], capture_output=True,
                       timeout=30)
        if (state / cid).exists():
            shutil.rmtree(state / cid, ignore_errors=True)
            notes.append(f"state of {cid} removed by hand (delete --force left it)")
        else:
            notes.append(f"container {cid} left behind, deleted")
    return notes


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    # mountinfo escapes blanks as \040; the suite's bundle paths have none.
    return [p for p in points if p.startswith(prefix)]


def unmount_under(path: Path) -> list[str]:
    """Detach mounts a case left in its bundles (a config without a mount namespace
    mounts proc, /dev, ... in the host's: linux_ns_itype with runc)."""
    libc = ctypes.CDLL(None, use_errno=True)
    points = mounts_under(path)
    for point in sorted(points, key=len, reverse=True):
        if libc.umount2(point.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err != errno.EINVAL:  # EINVAL: gone with its parent already
                return [f"umount {point}: {os.strerror(err)}; kept {path}"]
    return [f"{len(points)} mounts left under {path}, unmounted"] if points else []


def run_case(built: Path, case: str, wrapper: Path, calls: Path, state: Path, work: Path,
             logdir: Path, timeout: float) -> CaseResult:
    tmp = work / "tmp" / case
    tmp.mkdir(parents=True)
    tmp.chmod(0o755)
    cgroups_before = cgroup_dirs()
    calls_start = calls.stat().st_size if calls.exists() else 0
    env = dict(os.environ, RUNTIME=str(wrapper), TMPDIR=str(tmp))
    out_path, err_path = logdir / f"{case}.out", logdir / f"{case}.err"
    start = time.monotonic()
    timed_out = False
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([str(built / "validation" / case / f"{case}.t")], cwd=work,
                                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        # Wait for SIGCHLD (blocked, so one that comes between a check and the wait stays
        # pending): the case exited, or an orphan reparented to us (the subreaper) did and
        # is reaped at once. Blocked only after the Popen, so the case does not inherit it;
        # a child that exited before is found by the first check.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            while True:
                reap_orphans(proc.pid)
                if proc.poll() is not None:
                    break
                left = start + timeout - time.monotonic()
                if left <= 0:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
                signal.sigtimedwait({signal.SIGCHLD}, left)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    seconds = time.monotonic() - start
    res = score(case, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                None if timed_out else proc.returncode, seconds, timed_out)
    res.cleanup = cleanup_after_case(wrapper, calls, calls_start, state, cgroups_before, tmp)
    return res


def cleanup_after_case(wrapper: Path, calls: Path, calls_start: int, state: Path,
                       cgroups_before: set[str], tmp: Path) -> list[str]:
    notes = clean_state(wrapper, state)
    ids: set[str] = set()
    if calls.exists():
        with open(calls) as f:
            f.seek(calls_start)
            ids = set(_UUID.findall(f.read()))
    new = [d for d in cgroup_dirs() - cgroups_before
           if set(d.split("/")) & SUITE_CGROUP_NAMES or any(i in d for i in ids)]
    if new:
        notes += [f"cgroup {d} left behind, removed" for d in sorted(new)]
        notes += remove_cgroups(new)
    notes += kill_orphans()
    notes += unmount_under(tmp)
    if not mounts_under(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    return notes


# ---------------------------------------------------------------- the run


@dataclass
class Run:
    runtime: str
    command: list[str]
    results: list[CaseResult]
    dev_changed: list[str]
    logs: str

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.results)

    @property
    def cases_passed(self) -> int:
        return sum(r.result == "pass" for r in self.results)

    def to_json(self) -> dict[str, object]:
        return {"runtime": self.runtime, "command": self.command, "passed": self.passed,
                "failed": self.failed, "cases_passed": self.cases_passed,
                "cases": {r.case: {**asdict(r), "result": r.result} for r in self.results},
                "dev_changed": self.dev_changed, "logs": self.logs}


def run_runtime(built: Path, rt: Runtime, cases: list[str], rundir: Path, timeout: float,
                progress: bool = True) -> Run:
    state = STATE_BASE / f"{rt.label}-{rundir.name}"
    state.mkdir(parents=True, exist_ok=True)
    wrapper, calls = write_wrapper(rt, rundir, state)
    work = rundir / f"work-{rt.label}"
    work.mkdir()
    work.chmod(0o755)
    for name in ("runtimetest", "rootfs-amd64.tar.gz"):
        shutil.copy2(built / name, work / name)
    logdir = rundir / f"logs-{rt.label}"
    logdir.mkdir()
    nodes = dev_nodes()
    results = []
    for case in cases:
        res = run_case(built, case, wrapper, calls, state, work, logdir, timeout)
        results.append(res)
        if progress:
            print(f"  {rt.label:12} {case:40} {res.result:4} {res.passed:4} {res.failed:4}"
                  f" {res.seconds:6.1f}s {res.reason}", file=sys.stderr, flush=True)
    changed = dev_changes(nodes)
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    return Run(rt.label, rt.command, results, changed, str(logdir))


def table(runs: list[Run]) -> str:
    head = f"{'case':40}" + "".join(f" {r.runtime:>18}" for r in runs)
    lines = [head, "-" * len(head)]
    by_case = [{c.case: c for c in r.results} for r in runs]
    for case in (c.case for c in runs[0].results):
        row = f"{case:40}"
        for cases in by_case:
            c = cases[case]
            row += f" {c.result:>5} {c.passed:5}/{c.failed:<5}"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'passed/failed points':40}" + "".join(
        f" {r.passed:>11}/{r.failed:<6}" for r in runs))
    lines.append(f"{'cases passed':40}" + "".join(
        f" {r.cases_passed:>11}/{len(r.results):<6}" for r in runs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--runtime", action="append", default=[], metavar="CMD",
                    help="runtime to score: uspawn-runc (default), runc, or a path; repeatable")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--json", default="", metavar="FILE", help="write the results here")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per case")
    ap.add_argument("--quiet", action="store_true", help="no per-case progress on stderr")
    ns = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("runner: needs root (the suite creates containers and cgroups)", file=sys.stderr)
        return 2
    try:
        built = ensure_built(suite_src())
        runtimes = [resolve_runtime(r) for r in ns.runtime or ["uspawn-runc"]]
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"runner: {exc}", file=sys.stderr)
        return 2
    all_cases = list_cases(built)
    cases = [c for c in ns.cases.split(",") if c] or all_cases
    unknown = sorted(set(cases) - set(all_cases))
    if unknown:
        print(f"runner: unknown cases {', '.join(unknown)} (see {built}/validation)",
              file=sys.stderr)
        return 2
    become_subreaper()
    rundir = Path(tempfile.mkdtemp(prefix="uspawn-oci-validation-", dir="/var/tmp"))
    rundir.chmod(0o755)
    runs = [run_runtime(built, rt, cases, rundir, ns.timeout, not ns.quiet) for rt in runtimes]
    print(table(runs))
    for r in runs:
        print(f"{r.runtime}: {r.passed} passed, {r.failed} failed, "
              f"{r.cases_passed}/{len(cases)} cases green; logs in {r.logs}")
    result = {"suite": str(built), "runs": [r.to_json() for r in runs]}
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=1)
    changed = [c for r in runs for c in r.dev_changed]
    if changed:
        print("runner: HOST /dev NODES CHANGED: " + "; ".join(changed), file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
