"""`uspawn boot --keep-unit`: the machine below the calling unit's own cgroup.

What uspawn@.service runs (Delegate=yes): uspawn moves itself into
<unit>/supervisor and puts the machine into <unit>/payload, as systemd-nspawn
--keep-unit does, so that systemd-machined can register it for the unit. This
host has no systemd as init: a "unit" here is a cgroup named like one, made by
the test in the cgroup2 hierarchy, which is all uspawn looks at. Registration
with machined itself is checked under a real systemd (tests/kernels/
systemd_guest_checks.py: machinectl list/status/shell, journalctl -M).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, mounts_under, skip_or_fail
from fixtures.busybox_machine import BootFifo
from test_reboot import _shutdown, notify_binary, tree  # noqa: F401 (fixtures)
from waits import wait_exit, wait_until

from uspawn.kernel import cgroups
from uspawn.machine import machined, monitor

SLICE = "uspawn-test.slice"


def test_unit_of_names_services_and_scopes_only() -> None:
    assert machined.unit_of("/machine.slice/uspawn@web.service") == "uspawn@web.service"
    assert machined.unit_of("/user.slice/session-3.scope/") == "session-3.scope"
    for not_a_unit in ("/", "", "/system.slice", "/uspawn/web", "/a/.service"):
        assert machined.unit_of(not_a_unit) is None, not_a_unit


def _v2() -> str:
    unified = cgroups.detect_layout()[1]
    if unified is None:
        skip_or_fail("no cgroup2 hierarchy")
    assert unified is not None
    return unified


@pytest.fixture
def unit(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A cgroup shaped like a systemd service's: <v2>/uspawn-test.slice/NAME.service."""
    d = Path(_v2(), SLICE, f"keep-{request.node.name[5:30]}.service")
    d.mkdir(parents=True, exist_ok=True)
    yield d
    # A failed test may have killed uspawn: its guard removes payload/ meanwhile.
    wait_until(lambda: not (d / "payload").exists(), [d], "the machine's cgroup removed")
    for sub in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
        if sub.is_dir():
            sub.rmdir()
    d.rmdir()
    try:
        d.parent.rmdir()
    except OSError:
        pass  # another test's unit still there


def _in(cg: Path, uspawn: Runner, *args: str, **kw: object) -> subprocess.Popen[str]:
    """Start `uspawn ARGS` as the process of cgroup cg (systemd's ExecStart=)."""
    script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    p: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        ["sh", "-c", script, str(cg), *uspawn.argv(*args)], text=True, **kw)
    return p


def _cgroup_v2_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def _boot(uspawn: Runner, tree: tuple[Path, BootFifo], unit: Path,  # noqa: F811
          name: str) -> tuple[subprocess.Popen[str], int]:
    rootfs, fifo = tree
    # No terminal on stdin: the unit's way, so the C monitor takes over once it runs.
    p = _in(unit, uspawn, "boot", "--keep-unit", "-D", str(rootfs), "-M", name,
            "--lxcfs=no", "--memory=200M", stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fifo.wait_boot()
    except BaseException:
        p.kill()
        p.communicate()
        raise
    st = json.loads((uspawn.state / "containers" / name / "state.json").read_text())
    return p, int(st["pid"])


def test_the_machine_lives_in_the_units_payload_cgroup(
        uspawn: Runner, tree: tuple[Path, BootFifo], unit: Path) -> None:  # noqa: F811
    name = "keepunit"
    rel = "/" + str(unit.relative_to(_v2()))
    p, init = _boot(uspawn, tree, unit, name)
    try:
        assert _cgroup_v2_of(init) == f"{rel}/payload"
        assert _cgroup_v2_of(p.pid) == f"{rel}/supervisor"  # uspawn, now its monitor
        if monitor.binary() is not None:
            assert os.readlink(f"/proc/{p.pid}/exe") == monitor.binary()
        # Nothing at uspawn's own place, and the unit's root holds no process (cgroup2
        # lets only a cgroup without processes hand controllers to its children).
        assert cgroup_dirs(name) == []
        assert (unit / "cgroup.procs").read_text() == ""
        st = json.loads(uspawn.run("list", "--json").stdout)
        row = next(r for r in st if r["name"] == name)
        # status/list find the cgroup through the record's path, proven by the init.
        mem = row["resources"]["memory"]
        assert mem["limit_bytes"] == 200 * 1024 * 1024 and mem["current_bytes"] > 0, mem
        r = uspawn.run("set", name, "MemoryMax=300M")
        assert r.returncode == 0, r.stderr
        r = uspawn.run("status", name)
        assert r.returncode == 0 and "300.0M" in r.stdout, r.stdout + r.stderr
        _shutdown(uspawn, name, "poweroff")
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    _, err = p.communicate()
    assert p.returncode == 0, err
    assert not (unit / "payload").exists()
    assert sorted(x.name for x in unit.iterdir() if x.is_dir()) == ["supervisor"]
    # v1 hierarchies (hybrid hosts): the unit's path made for the limits is gone too.
    for ctrl in ("memory", "pids", "cpu"):
        assert not Path("/sys/fs/cgroup", ctrl, SLICE, unit.name).exists(), ctrl
    assert not (uspawn.state / "containers" / name).exists()
    assert mounts_under(tree[0]) == []


def test_kill9_of_uspawn_in_the_unit_leaves_no_payload(
        uspawn: Runner, tree: tuple[Path, BootFifo], unit: Path) -> None:  # noqa: F811
    """systemd would clean the unit's cgroup up as well; uspawn's guard does not wait
    for it."""
    name = "keepkill"
    p, init = _boot(uspawn, tree, unit, name)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate()
    wait_exit([init], what="the machine's init")
    wait_until(lambda: not (unit / "payload").exists(), [unit], "payload removed by the guard")
    wait_until(lambda: not (uspawn.state / "containers" / name).exists(),
               [uspawn.state], "the record removed by the guard")
    assert uspawn.run("list", "--json").stdout.strip() == "[]"


def test_keep_unit_outside_a_unit_is_refused(
        uspawn: Runner, tree: tuple[Path, BootFifo], unit: Path) -> None:  # noqa: F811
    rootfs = tree[0]
    # The slice above the "unit" is no service: the same refusal as at the root.
    p = _in(unit.parent, uspawn, "boot", "--keep-unit", "-D", str(rootfs), "-M", "nounit",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"uspawn: --keep-unit: this process's cgroup /{SLICE} is not a systemd service's or "
        "scope's (hint: "), err
    assert "Delegate=yes" in lines[0], err
    assert "Traceback" not in err and not (uspawn.state / "containers" / "nounit").exists()
    assert not (unit.parent / "supervisor").exists()


def test_keep_unit_and_detach_exclude_each_other(uspawn: Runner, rootfs: Path) -> None:
    r = uspawn.run("boot", "--keep-unit", "--detach", "-D", str(rootfs), "-M", "both")
    assert r.returncode == 2, r.stderr
    assert "--keep-unit and --detach exclude each other" in r.stderr
