"""Fault injection (issue 6): SIGKILL at every sync point of a container's creation.

The engine's test-only switch USPAWN_TEST_KILL_AT=<point> makes the process that
reaches <point> SIGKILL itself there (linux/devices.py `test_kill_point`):

- parent side (the runtime): parent-cgroup, parent-forked, parent-mapped,
  parent-init-pid, parent-mounts-sent, parent-created;
- child side: child-userns and child-forked (stage A), init-set-up (the
  container init, set up and about to report CREATED).

After each kill, for `uspawn-runc create` followed by `delete --force` and for
`uspawn run`, nothing may be left once the guardian (which cleans up after a
runtime killed with SIGKILL, asynchronously) is done, within CLEANUP_S: no state
directory entry, no cgroup, no process of the container or of uspawn itself, no
mount, no UID-range lease. Every process that descends from the runtime carries
a unique USPAWN_FAULT_TAG in /proc/PID/environ until it execs, which is how
leftover runtime, guardian, stage A and init processes are found.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import cgroup_dirs, mounts_under, processes_in_cgroup_named, uspawn_cmd
from test_oci import make_bundle, runtime_cmd
from waits import running, wait_all_gone, wait_state

PARENT_POINTS = ["parent-cgroup", "parent-forked", "parent-mapped", "parent-init-pid",
                 "parent-mounts-sent", "parent-created"]
CHILD_POINTS = ["child-userns", "child-forked", "init-set-up"]
POINTS = PARENT_POINTS + CHILD_POINTS
CLEANUP_S = 5.0  # the guardian's asynchronous cleanup after a killed runtime
CREATE_TIMEOUT_S = 20.0  # a killed peer must not leave the other side waiting longer


def run_tagged(argv: list[str], point: str, tag: str,
               timeout: float = CREATE_TIMEOUT_S) -> tuple[int | None, str]:
    """Run argv with the kill switch and the tag; (exit code or None if it hung, stderr).

    Output goes through files: a container init inherits the runtime's stdio
    and would hold a pipe open after the runtime died."""
    env = {**os.environ, "USPAWN_TEST_KILL_AT": point, "USPAWN_FAULT_TAG": tag}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        try:
            code: int | None = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()  # a runtime killed from outside: the guardian must clean up
            p.wait()
            code = None
        err.seek(0)
        return code, err.read()


def tagged_processes(tag: str) -> list[str]:
    """Live (non-zombie) processes that descend from a run with this tag and did not exec."""
    needle = f"USPAWN_FAULT_TAG={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append(f"{entry} {stat.split(' ', 1)[1].split(')')[0]})")
    return found


def processes_in(tree: Path) -> list[str]:
    """Live processes whose root or cwd is inside tree, as the host sees it: stage A
    and an init before pivot_root (after it, /proc/PID/root and cwd read "/")."""
    prefix = str(tree)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(f"/proc/{entry}/{link}")
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + "/"):
                found.append(f"{entry} {link}={target}")
                break
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def range_leases_of(name: str) -> list[str]:
    """UID-range lease files (host-wide, state.RangeAllocator) recorded for name."""
    d = os.environ.get("USPAWN_RANGES_DIR") or "/run/uspawn/ranges"
    found = []
    try:
        entries = os.listdir(d)
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            with open(os.path.join(d, entry), "rb") as f:
                data = f.read()
        except OSError:
            continue
        try:
            record = json.loads(data) if data else {}
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("name") == name:
            found.append(entry)
    return found


def _pids(rows: list[str]) -> list[int]:
    """The pids of tagged_processes()/processes_in() rows ("PID ...")."""
    return [int(r.split()[0]) for r in rows]


def leftovers(checks: dict[str, Callable[[], object]], processes: Callable[[], list[int]],
              timeout: float = CLEANUP_S) -> dict[str, object]:
    """What the checks still find once every process of the run has exited.

    The guardian's cleanup is over before it exits, and nothing else is left to
    change anything: wait on the pidfds of every process processes() names (asked
    again until none runs), then look once. The timeout only bounds a failure."""
    wait_all_gone(processes, timeout, "processes of the run")
    return {k: v for k, f in checks.items() if (v := f())}


def live_in_cgroup(name: str) -> list[int]:
    """Processes in the cgroup that still run (an exited one is a zombie until the
    host's pid 1 reaps it: dead, not a leak)."""
    return [p for p in processes_in_cgroup_named(name) if running(p)]


def assert_one_line_error(stderr: str, prog: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert all(line.startswith(f"{prog}: ") for line in lines), stderr
    errors = [line for line in lines if not line.startswith(f"{prog}: warning: ")]
    assert len(errors) == 1, stderr


def check_outcome(point: str, code: int | None, stderr: str, prog: str, error_code: int,
                  ) -> None:
    assert code is not None, f"killed at {point}: the runtime hung (> {CREATE_TIMEOUT_S:.0f}s)"
    if point in PARENT_POINTS:
        assert code in (-9, 137), f"killed at {point}: exit {code}: {stderr}"
    else:
        assert code == error_code, f"killed at {point}: exit {code}, stderr {stderr!r}"
        assert_one_line_error(stderr, prog)


@pytest.mark.parametrize("point", POINTS)
def test_oci_create_killed_then_delete_force(point: str, rootfs: Path, tmp_path: Path,
                                             need_root: None) -> None:
    bundle = make_bundle(tmp_path, rootfs, ["sleep", "100"])
    tree = bundle / "rootfs"
    root = tmp_path / "oci-state"
    cid = f"flt-{uuid.uuid4().hex[:10]}"
    tag = uuid.uuid4().hex
    pid_file = tmp_path / "pid"
    code, stderr = run_tagged([*runtime_cmd(), "--root", str(root), "create", "--bundle",
                               str(bundle), "--pid-file", str(pid_file), cid], point, tag)
    pid = int(pid_file.read_text()) if pid_file.exists() else 0

    d = subprocess.run([*runtime_cmd(), "--root", str(root), "delete", "--force", cid],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    left = leftovers({
        "state dir": lambda: (root / cid).exists(),
        "cgroup dirs": lambda: cgroup_dirs(cid),  # uspawn/<id> in every hierarchy
        "processes in the cgroup": lambda: live_in_cgroup(cid),
        "processes of the run": lambda: tagged_processes(tag),
        "processes in the tree": lambda: processes_in(tree),
        "init": lambda: pid and alive(pid),
        "mounts": lambda: mounts_under(tmp_path),
    }, lambda: (processes_in_cgroup_named(cid) + _pids(tagged_processes(tag))
                + _pids(processes_in(tree)) + ([pid] if pid else [])))
    check_outcome(point, code, stderr, "uspawn-runc", 1)
    assert d.returncode == 0, f"delete --force: {d.stderr}"
    assert "Traceback" not in d.stderr
    assert left == {}, f"killed at {point}, after delete --force and {CLEANUP_S}s: {left}"
    assert not root.exists() or os.listdir(root) == []
    # Nothing is in the way of the same id again (state, cgroup, exec FIFO).
    code, stderr = run_tagged([*runtime_cmd(), "--root", str(root), "create", "--bundle",
                               str(bundle), cid], "none", tag)
    try:
        assert code == 0, f"create {cid} again after the kill at {point}: {stderr}"
    finally:
        subprocess.run([*runtime_cmd(), "--root", str(root), "delete", "--force", cid],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert leftovers({"processes": lambda: tagged_processes(tag) + live_in_cgroup(cid),
                      "cgroup": lambda: cgroup_dirs(cid)},
                     lambda: _pids(tagged_processes(tag)) + processes_in_cgroup_named(cid)) == {}


@pytest.mark.parametrize("point", POINTS)
def test_run_killed(point: str, rootfs: Path, tmp_path: Path, need_root: None) -> None:
    state = tmp_path / "state"
    state.mkdir()
    name = f"flt-{uuid.uuid4().hex[:10]}"
    tag = uuid.uuid4().hex
    code, stderr = run_tagged([*uspawn_cmd(), "--root", str(state), "run", "-D", str(rootfs),
                               "-M", name, "--", "sleep", "100"], point, tag)
    left = leftovers({
        "state entries": lambda: [str(p) for p in (state / "containers").glob("*")]
        if (state / "containers").exists() else [],
        "cgroup dirs": lambda: cgroup_dirs(name),
        "processes in the cgroup": lambda: live_in_cgroup(name),
        "processes of the run": lambda: tagged_processes(tag),
        "processes in the tree": lambda: processes_in(rootfs),
        "UID-range leases": lambda: range_leases_of(name),
        "mounts": lambda: mounts_under(tmp_path),
    }, lambda: (processes_in_cgroup_named(name) + _pids(tagged_processes(tag))
                + _pids(processes_in(rootfs))))
    check_outcome(point, code, stderr, "uspawn", 125)
    assert left == {}, f"killed at {point}, after {CLEANUP_S}s: {left}"
    # The name, its cgroup and a UID range are free again.
    code, stderr = run_tagged([*uspawn_cmd(), "--root", str(state), "run", "-D", str(rootfs),
                               "-M", name, "--", "true"], "none", tag)
    assert code == 0, f"run -M {name} again after the kill at {point}: {stderr}"


def test_kill_switch_off_means_no_kill(rootfs: Path, tmp_path: Path, need_root: None) -> None:
    """The switch fires only at the named point: an unknown point changes nothing,
    and the same leak checks pass after a normal run (they are not vacuous)."""
    state = tmp_path / "state"
    state.mkdir()
    name = f"flt-{uuid.uuid4().hex[:10]}"
    tag = uuid.uuid4().hex
    code, stderr = run_tagged([*uspawn_cmd(), "--root", str(state), "run", "-D", str(rootfs),
                               "-M", name, "--", "sh", "-c", "exit 7"], "no-such-point", tag)
    assert code == 7, stderr
    assert tagged_processes(tag) == [] and cgroup_dirs(name) == []
    assert range_leases_of(name) == []


def test_leak_checks_see_a_live_container(rootfs: Path, tmp_path: Path,
                                         need_root: None) -> None:
    """While a container runs, every probe used above finds it."""
    state = tmp_path / "state"
    state.mkdir()
    name = f"flt-{uuid.uuid4().hex[:10]}"
    tag = uuid.uuid4().hex
    env = {**os.environ, "USPAWN_FAULT_TAG": tag}
    p = subprocess.Popen([*uspawn_cmd(), "--root", str(state), "run", "-D", str(rootfs),
                          "-M", name, "--", "sleep", "30"], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_state(state, name, p)  # written once the payload runs
        assert processes_in_cgroup_named(name)
        assert tagged_processes(tag), "the runtime and its guardian carry the tag"
        assert cgroup_dirs(name)
        assert range_leases_of(name), "a running container holds a UID-range lease"
        assert (state / "containers" / name).exists()
    finally:
        p.kill()
        p.wait()
    # SIGKILL of the runtime mid-run: the same cleanup as at the create sync points.
    left = leftovers({
        "state": lambda: list((state / "containers").glob("*")),
        "cgroup": lambda: cgroup_dirs(name),
        "processes": lambda: tagged_processes(tag) + processes_in(rootfs),
        "leases": lambda: range_leases_of(name),
    }, lambda: (processes_in_cgroup_named(name) + _pids(tagged_processes(tag))
                + _pids(processes_in(rootfs))))
    assert left == {}, left
