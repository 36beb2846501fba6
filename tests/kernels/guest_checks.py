"""The checks of the kernel matrix, run on the kernel under test.

Runs inside a qemu guest (as a child of the guest's init script) or directly on
the host (the "host" row). Stdlib only: the guest has no test tools and no
network. Every check is a bounded subprocess of the `uspawn` CLI; each result is
one JSON line written (and flushed) to --out as soon as it is known, so a guest
that dies half-way still reports what it got to:

    {"check": NAME, "status": "pass"|"fail"|"skip", "detail": TEXT, "seconds": S}

and finally {"done": true}. The expectations (ownership path, doctor verdicts)
come from the host in --plan (JSON), never from this kernel's own opinion.

Phases:
  main         selftest, doctor, run checks (non-root /dev/null, mknod EPERM,
               ownership path)
  shift-kill   start a chown shift of a large tree, wait (inotify) until it has
               re-owned a quarter of it, `sync`, report "shift-started" and wait:
               the host kills the VM
  shift-resume after the kill: the tree must show an unfinished shift, the next
               `uspawn run` must finish it, and the tree must then be consistent
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

JOURNAL_XATTR = "trusted.uspawn.shift"
RANGE = 65536


class Reporter:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def emit(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, sort_keys=True) + "\n")
        self.out.flush()
        try:
            os.fsync(self.out.fileno())
        except OSError:
            pass

    def check(self, name: str, fn: Callable[[], tuple[str, str]]) -> str:
        t0 = time.monotonic()
        try:
            status, detail = fn()
        except subprocess.TimeoutExpired as exc:
            status, detail = "fail", f"timed out after {exc.timeout:.0f} s: {exc.cmd}"
        except Exception as exc:
            status, detail = "fail", f"{type(exc).__name__}: {exc}"
        self.emit({"check": name, "status": status, "detail": detail,
                   "seconds": round(time.monotonic() - t0, 2)})
        return status


class Ctx:
    def __init__(self, uspawn: list[str], trees: str, plan: dict[str, Any],
                 timeout: float) -> None:
        self.uspawn = uspawn
        self.trees = trees
        self.plan = plan
        self.timeout = timeout

    def run(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.uspawn, *args], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout or self.timeout)


def _tail(text: str, n: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def _describe(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}; stdout: {_tail(r.stdout)!r}; stderr: {_tail(r.stderr)!r}"


# ------------------------------------------------------------------ main phase


def check_selftest(ctx: Ctx) -> tuple[str, str]:
    r = ctx.run("selftest", "--json")
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return "fail", "selftest --json printed no JSON: " + _describe(r)
    bad = [f"{c['name']}: {c.get('reason')}" for c in data.get("canaries", [])
           if not c.get("passed")]
    summary = f"{data.get('passed')} passed, {data.get('failed')} failed"
    if r.returncode != 0 or bad or not data.get("canaries"):
        return "fail", f"{summary} (exit {r.returncode}); " + "; ".join(bad)
    return "pass", summary


def check_doctor(ctx: Ctx) -> tuple[str, str]:
    r = ctx.run("doctor", "--json", "--path", ctx.trees)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return "fail", "doctor --json printed no JSON: " + _describe(r)
    rows = {c["name"]: c for c in data.get("checks", [])}
    want: dict[str, str] = dict(ctx.plan.get("doctor", {}))
    problems = []
    seen = []
    for name, verdict in want.items():
        key = name.replace("{trees}", ctx.trees)
        row = rows.get(key)
        if row is None:
            problems.append(f"row {key!r} missing")
            continue
        seen.append(f"{key}={row['verdict']}")
        if row["verdict"] != verdict:
            problems.append(f"{key}: {row['verdict']} (expected {verdict}; "
                            f"{row.get('meaning', '')} [{row.get('detail', '')}])")
    for name, text in dict(ctx.plan.get("doctor_meaning", {})).items():
        row = rows.get(name)
        if row is None or text not in row.get("meaning", ""):
            problems.append(f"{name}: meaning does not say {text!r}: "
                            f"{row.get('meaning') if row else 'row missing'}")
        else:
            seen.append(f"{name}: {text}")
    broken = [f"{n}: {c.get('meaning', '')} [{c.get('detail', '')}]"
              for n, c in rows.items() if c["verdict"] == "broken"]
    if broken:
        problems.append("broken rows: " + "; ".join(broken))
    if r.returncode != 0:
        problems.append(f"exit code {r.returncode}")
    summary = data.get("summary", {})
    counts = f"ok {summary.get('ok')}, degraded {summary.get('degraded')}, " \
             f"broken {summary.get('broken')}"
    if problems:
        return "fail", "; ".join(problems) + f" ({counts})"
    return "pass", ", ".join(seen) + f" ({counts})"


def _run_tree(ctx: Ctx) -> str:
    return os.path.join(ctx.trees, "busybox")


def check_devnull_nonroot(ctx: Ctx, state: dict[str, str]) -> tuple[str, str]:
    script = "id -u; echo x > /dev/null && echo devnull-ok; head -c 8 /dev/zero | wc -c"
    r = ctx.run("run", "-v", "-D", _run_tree(ctx), "--user", "user", "--", "sh", "-c", script)
    m = re.search(r"rootfs ownership: (\w+)", r.stderr)
    state["ownership"] = m.group(1) if m else ""
    state["ownership_line"] = next((ln for ln in r.stderr.splitlines()
                                    if "rootfs ownership:" in ln), "")
    lines = r.stdout.split()
    if r.returncode != 0 or lines != ["1000", "devnull-ok", "8"]:
        return "fail", _describe(r)
    return "pass", "uid 1000 wrote /dev/null and read /dev/zero"


def check_mknod(ctx: Ctx) -> tuple[str, str]:
    script = ("mknod /tmp/n c 1 3; echo rc=$?; mknod /tmp/b b 7 0; echo rc=$?; "
              "mkfifo /tmp/f && echo fifo-ok; ls /tmp")
    r = ctx.run("run", "-D", _run_tree(ctx), "--", "sh", "-c", script)
    out = r.stdout.split()
    eperm = r.stderr.count("Operation not permitted")
    if r.returncode != 0 or out[:3] != ["rc=1", "rc=1", "fifo-ok"] or eperm != 2 \
            or "n" in out[3:] or "b" in out[3:]:
        return "fail", _describe(r)
    return "pass", "container root: mknod c and b -> EPERM, nothing left; mkfifo works"


def check_ownership(ctx: Ctx, state: dict[str, str]) -> tuple[str, str]:
    want = ctx.plan.get("ownership", "")
    got = state.get("ownership", "")
    if not got:
        return "fail", "`uspawn run -v` printed no 'rootfs ownership:' line"
    tree = _run_tree(ctx)
    st = os.stat(tree)
    on_disk = f"tree root owned by host uid {st.st_uid}"
    if got != want:
        return "fail", f"{state['ownership_line']!r}, expected {want}; {on_disk}"
    if got == "chown" and (st.st_uid == 0 or st.st_uid % RANGE):
        return "fail", f"chown reported but {on_disk}"
    if got == "map" and st.st_uid != 0:
        return "fail", f"map reported but {on_disk} (the tree was shifted)"
    return "pass", f"{state['ownership_line'].strip()}; {on_disk}"


def check_limits(ctx: Ctx) -> tuple[str, str]:
    """--memory/--pids/--cpus (docs/LIMITS.md): a memory hog is OOM-killed inside
    while the init goes on, a fork bomb stops below TasksMax, `uspawn set` changes a
    running container; on cgroup2 also the files the container sees and MemoryHigh."""
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    script = ("dd if=/dev/zero of=/dev/null bs=100M count=1 2>/dev/null; echo hog=$?; "
              "(n=0; while [ $n -lt 100 ]; do sleep 3 & n=$((n+1)); echo $n > /tmp/n; done)"
              " 2>/dev/null; read n < /tmp/n; echo bomb=$n")
    extra: list[str] = []
    if v2:
        extra = ["--property", "MemoryHigh=48M"]
        script += ("; read a < /sys/fs/cgroup/memory.max; read b < /sys/fs/cgroup/pids.max; "
                   "read c < /sys/fs/cgroup/cpu.max; read d < /sys/fs/cgroup/memory.high; "
                   "echo files=$a,$b,$c,$d")
    r = ctx.run("run", "-D", _run_tree(ctx), "--memory", "64M", "--pids", "50", "--cpus", "1",
                *extra, "--", "sh", "-c", script)
    out = dict(ln.split("=", 1) for ln in r.stdout.splitlines() if "=" in ln)
    problems = []
    if out.get("hog") != "137":
        problems.append("the memory hog was not OOM-killed")
    bomb = int(out.get("bomb", "0") or 0)
    if not 30 <= bomb < 50:
        problems.append(f"fork bomb: {bomb} background tasks (limit 50)")
    if v2 and out.get("files") != "67108864,50,100000 100000,50331648":
        problems.append(f"cgroup files: {out.get('files')}")
    if problems:
        return "fail", "; ".join(problems) + "; " + _describe(r)
    # The container's state directory, made first (claim_name accepts an existing one)
    # so that inotify can watch it for state.json.
    cdir = os.path.join(os.environ.get("USPAWN_STATE_DIR") or "/run/uspawn", "containers",
                        "limset")
    os.makedirs(cdir, mode=0o700, exist_ok=True)
    p = subprocess.Popen([*ctx.uspawn, "run", "-D", _run_tree(ctx), "-M", "limset",
                          "--memory", "64M", "--pids", "40", "--", "sleep", "60"],
                         stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Started once its state.json is written (after the payload's execve).
        got = _wait_file(cdir, "state.json", 30, p.pid)
        if got is None or not got or ctx.run("status", "limset").returncode != 0:
            why = ("no state.json within 30 s" if got is None else
                   "uspawn exited without a state.json" if not got else "status failed")
            p.kill()
            return "fail", f"limset did not start ({why}): {p.communicate()[1]!r}"
        r = ctx.run("set", "limset", "MemoryMax=96M", "TasksMax=80")
        st = ctx.run("status", "limset").stdout
        if r.returncode != 0 or "of 96.0M" not in st or "of 80" not in st:
            return "fail", f"uspawn set: {_describe(r)}; status: {st!r}"
    finally:
        ctx.run("stop", "limset", "--timeout", "2")
        p.wait(timeout=30)
    return "pass", (f"OOM kill inside (hog=137), fork bomb stopped at {bomb} of 50, "
                    "uspawn set live" + (", cgroup2 files and MemoryHigh" if v2 else
                                         " (v1 hierarchies: files not checked inside)"))


def _cgroup_value(pid: int, ctrl: str, v2_name: str, v1_name: str) -> str:
    """A cgroup file of pid as the host sees it: its v1 hierarchy of ctrl, else cgroup2."""
    with open(f"/proc/{pid}/cgroup") as f:
        rows = [ln.rstrip("\n").split(":", 2) for ln in f]
    for _, ctrls, path in rows:
        if ctrl in ctrls.split(","):
            with open(f"/sys/fs/cgroup/{ctrl}{path}/{v1_name}") as f:
                return f.read().strip()
    for _, ctrls, path in rows:
        if ctrls == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            with open(f"/sys/fs/cgroup{path}/{v2_name}") as f:
                return f.read().strip()
    raise LookupError(f"no {ctrl} cgroup for {pid}")


def check_oci_cgroups(ctx: Ctx) -> tuple[str, str]:
    """uspawn-runc applies linux.resources for every cgroupsPath shape (absolute,
    relative, slice:prefix:name): pids.max and the memory limit of the container's
    cgroup, and the cgroup gone after delete (issue 13)."""
    import tempfile

    runc = [ctx.uspawn[0], "-c", "from uspawn.oci.cli import entry; entry()"]
    shapes = {"absolute": "/uspawn-matrix-abs", "relative": "uspawn-matrix/rel",
              "slice": "uspawnmatrix.slice:uspawn:sl"}
    seen = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        state = os.path.join(tmp, "state")

        def oci(*args: str) -> subprocess.CompletedProcess[str]:
            # Files, not pipes: a created container keeps the runtime's stdio open.
            with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
                p = subprocess.run([*runc, "--root", state, *args], stdout=out, stderr=err,
                                   stdin=subprocess.DEVNULL, timeout=ctx.timeout)
                out.seek(0)
                err.seek(0)
                return subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())

        r = oci("spec", "--bundle", tmp)
        if r.returncode != 0:
            return "fail", f"uspawn-runc spec: {_describe(r)}"
        cfg_path = os.path.join(tmp, "config.json")
        with open(cfg_path) as f:
            base = json.load(f)
        for shape, path in shapes.items():
            cfg = json.loads(json.dumps(base))
            cfg["root"] = {"path": _run_tree(ctx), "readonly": True}
            cfg["process"]["args"] = ["sleep", "60"]
            cfg["process"]["terminal"] = False
            cfg["linux"]["cgroupsPath"] = path
            cfg["linux"]["resources"] = {"memory": {"limit": 48 << 20},
                                         "pids": {"limit": 21}}
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)
            cid = f"cg-{shape}"
            r = oci("create", "-b", tmp, cid)
            if r.returncode != 0:
                return "fail", f"{shape} cgroupsPath {path!r}: create: {_describe(r)}"
            try:
                pid = int(json.loads(oci("state", cid).stdout)["pid"])
                with open(f"/proc/{pid}/cgroup") as f:
                    where = f.read()
                got = (_cgroup_value(pid, "pids", "pids.max", "pids.max"),
                       _cgroup_value(pid, "memory", "memory.max", "memory.limit_in_bytes"))
            finally:
                d = oci("delete", "--force", cid)
            if got != ("21", str(48 << 20)):
                return "fail", f"{shape} cgroupsPath {path!r}: pids/memory {got}; {where!r}"
            if d.returncode != 0:
                return "fail", f"{shape}: delete: {_describe(d)}"
            last = path.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
            left = [ln for ln in where.splitlines() if ln.endswith(last) or
                    ln.endswith(f"-{last}.scope")]
            gone = all(not os.path.isdir("/sys/fs/cgroup/" + (ln.split(":", 2)[1].split(",")[0]
                                         if ln.split(":", 2)[1] else "") + ln.split(":", 2)[2])
                       for ln in left)
            if not left or not gone:
                return "fail", f"{shape}: cgroup {path!r} not found or left after delete: {where!r}"
            seen.append(shape)
    return "pass", f"pids.max 21 and memory 48M for {', '.join(seen)} cgroupsPath; none left"


def phase_main(ctx: Ctx, rep: Reporter) -> None:
    state: dict[str, str] = {}
    rep.check("selftest", lambda: check_selftest(ctx))
    rep.check("doctor", lambda: check_doctor(ctx))
    rep.check("run-devnull-nonroot", lambda: check_devnull_nonroot(ctx, state))
    rep.check("run-mknod-eperm", lambda: check_mknod(ctx))
    rep.check("ownership-path", lambda: check_ownership(ctx, state))
    rep.check("limits", lambda: check_limits(ctx))
    rep.check("oci-cgroups", lambda: check_oci_cgroups(ctx))


# ------------------------------------------------------------------ shift phases


IN_ATTRIB, IN_CREATE, IN_MOVED_TO, IN_CLOSE_WRITE = 0x04, 0x100, 0x80, 0x08


class _Inotify:
    """inotify by ctypes (the guest has the stdlib only, not tests/waits.py)."""

    def __init__(self, paths: list[str], mask: int) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd: int = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for p in paths:
            if self._libc.inotify_add_watch(self.fd, os.fsencode(p), mask) < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, os.strerror(err), p)

    def events(self) -> list[tuple[int, str]]:
        """(watch descriptor, entry name) of every queued event."""
        out = []
        while select.select([self.fd], [], [], 0)[0]:
            buf = os.read(self.fd, 1 << 16)
            off = 0
            while off < len(buf):
                wd, _, _, n = struct.unpack_from("iIII", buf, off)
                out.append((wd, buf[off + 16:off + 16 + n].rstrip(b"\0").decode(
                    errors="replace")))
                off += 16 + n
        return out

    def wait(self, cond: Callable[[list[tuple[int, str]]], bool], timeout: float,
             pid: int = 0) -> bool | None:
        """True once cond(new events) is true (asked first with none, then after each
        batch of events); False if process pid exited first (cond asked once more);
        None at the timeout, which only bounds a failure."""
        pidfd = os.pidfd_open(pid) if pid else -1
        try:
            deadline = time.monotonic() + timeout
            events: list[tuple[int, str]] = []
            while not cond(events):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                ready = select.select([self.fd] + ([pidfd] if pidfd >= 0 else []), [], [],
                                      left)[0]
                events = self.events()
                if pidfd in ready:
                    return bool(cond(events + self.events()))
            return True
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> _Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_file(directory: str, name: str, timeout: float, pid: int = 0) -> bool | None:
    """directory/name exists (created, written or renamed in): True; False if process
    pid exited first without it; None at the timeout bound."""
    path = os.path.join(directory, name)
    with _Inotify([directory], IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE) as ino:
        return ino.wait(lambda _: os.path.exists(path), timeout, pid)


def _big_tree(ctx: Ctx) -> str:
    return os.path.join(ctx.trees, "big")


def _journal(path: str) -> bytes | None:
    try:
        return os.getxattr(path, JOURNAL_XATTR, follow_symlinks=False)
    except OSError:
        return None


def _owner_ranges(path: str) -> dict[int, int]:
    """{range base: inode count} over the tree (lstat, one filesystem)."""
    ranges: dict[int, int] = {}
    dev = os.lstat(path).st_dev
    stack = [path]
    while stack:
        d = stack.pop()
        st = os.lstat(d)
        ranges[st.st_uid - st.st_uid % RANGE] = ranges.get(st.st_uid - st.st_uid % RANGE, 0) + 1
        with os.scandir(d) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if e.stat(follow_symlinks=False).st_dev == dev:
                        stack.append(e.path)
                    continue
                u = e.stat(follow_symlinks=False).st_uid
                ranges[u - u % RANGE] = ranges.get(u - u % RANGE, 0) + 1
    return ranges


def phase_shift_kill(ctx: Ctx, rep: Reporter) -> None:
    tree = _big_tree(ctx)

    def start() -> tuple[str, str]:
        # The shift writes its journal (an xattr: IN_ATTRIB on the root) first, then
        # chowns inode after inode (IN_ATTRIB on the filler directories for their
        # entries). Watched before uspawn starts, so no event is missed; the kill
        # lands once a share of the filler (plan "shift_share", default a quarter)
        # has changed owners: mid-shift by what the shift did, not by a time.
        filler = os.path.join(tree, "usr/share/filler")
        dirs = sorted(e.path for e in os.scandir(filler) if e.is_dir(follow_symlinks=False))
        total = sum(len(os.listdir(d)) for d in dirs)
        want = max(1, int(total * float(ctx.plan.get("shift_share", 0.25))))
        with _Inotify([tree, *dirs], IN_ATTRIB) as ino:
            argv = [*ctx.uspawn, "run", "-v", "--private-users-ownership=chown", "-D", tree,
                    "--", "true"]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            changed: set[tuple[int, str]] = set()

            def mid_shift(events: list[tuple[int, str]]) -> bool:
                changed.update((wd, name) for wd, name in events if name)
                return _journal(tree) is not None and len(changed) >= want

            got = ino.wait(mid_shift, ctx.timeout, proc.pid)
        if got is None:
            proc.kill()
            proc.wait()
            return "fail", (f"no shift progress within {ctx.timeout:.0f} s: journal="
                            f"{'yes' if _journal(tree) else 'no'}, {len(changed)} of "
                            f"{want} filler inodes changed")
        if not got:
            return "fail", (f"uspawn exited ({proc.wait()}) before the shift was mid-way: "
                            f"journal={'yes' if _journal(tree) else 'no'}, {len(changed)} "
                            f"of {want} filler inodes changed")
        os.sync()  # what the shift did so far is on disk; the rest dies with the VM
        if _journal(tree) is None or proc.poll() is not None:
            return "fail", "the shift finished before the kill: enlarge the tree"
        ranges = _owner_ranges(tree)
        return "pass", (f"mid-shift at kill ({len(changed)} of {total} filler inodes seen "
                        f"changing owner): inodes per range {sorted(ranges.items())}")

    if rep.check("shift-started", start) == "pass":
        while True:
            signal.pause()  # the host kills the VM now


def phase_shift_resume(ctx: Ctx, rep: Reporter) -> None:
    tree = _big_tree(ctx)

    def before() -> tuple[str, str]:
        ranges = _owner_ranges(tree)
        journal = _journal(tree)
        r = ctx.run("check", "--json", tree)
        try:
            rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        except (ValueError, KeyError):
            return "fail", "check --json printed no JSON: " + _describe(r)
        half = rows.get("half-shift", {})
        detail = (f"after the kill: journal={'yes' if journal else 'no'}, inodes per range "
                  f"{sorted(ranges.items())}, check half-shift={half.get('verdict')}")
        if journal is None or len(ranges) < 2:
            return "fail", detail + " (expected an unfinished shift)"
        if half.get("verdict") != "degraded":
            return "fail", detail + f" ({half.get('meaning')})"
        return "pass", detail

    def resume() -> tuple[str, str]:
        r = ctx.run("run", "-v", "-D", tree, "--user", "user", "--", "sh", "-c",
                    "id -u; stat -c %u /bin/busybox /home/user; stat -c '%u %a' "
                    "/usr/share/filler/suid; echo x > /dev/null && echo ok")
        ranges = _owner_ranges(tree)
        # the setuid bit survives the shift (chown clears it; idshift restores it)
        if r.returncode != 0 or r.stdout.split() != ["1000", "0", "1000", "0", "4755", "ok"]:
            return "fail", _describe(r)
        if _journal(tree) is not None or len(ranges) != 1:
            return "fail", f"journal left or mixed ranges {sorted(ranges.items())}"
        line = next((ln for ln in r.stderr.splitlines() if "ownership" in ln), "")
        return "pass", f"{line.strip()}; one range {sorted(ranges.items())}"

    def after() -> tuple[str, str]:
        r = ctx.run("check", "--json", tree)
        try:
            rows = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        except (ValueError, KeyError):
            return "fail", "check --json printed no JSON: " + _describe(r)
        bad = {n: rows[n]["verdict"] for n in ("ownership", "half-shift")
               if rows.get(n, {}).get("verdict") != "ok"}
        if bad:
            return "fail", f"uspawn check after resume: {bad}"
        return "pass", "uspawn check: ownership ok, half-shift ok"

    ok = rep.check("shift-unfinished-after-kill", before) == "pass"
    ok = rep.check("shift-resumed", resume) == "pass" and ok
    rep.check("shift-consistent", after)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--uspawn", required=True, help="command line of the uspawn CLI")
    p.add_argument("--trees", required=True)
    p.add_argument("--plan", required=True, help="JSON file or inline JSON")
    p.add_argument("--phase", default="main",
                   choices=("main", "shift-kill", "shift-resume"))
    p.add_argument("--out", default="-")
    p.add_argument("--timeout", type=float, default=300)
    ns = p.parse_args(argv)
    plan = json.loads(ns.plan) if ns.plan.lstrip().startswith("{") else \
        json.load(open(ns.plan))
    out = sys.stdout if ns.out == "-" else open(ns.out, "w")
    rep = Reporter(out)
    ctx = Ctx(shlex.split(ns.uspawn), ns.trees, plan, ns.timeout)
    rep.emit({"kernel": os.uname().release, "phase": ns.phase})
    {"main": phase_main, "shift-kill": phase_shift_kill,
     "shift-resume": phase_shift_resume}[ns.phase](ctx, rep)
    rep.emit({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
