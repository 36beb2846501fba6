"""uspawn-monitor: a detached machine's steady state in C (issue 17, host cost).

The supervisor execs the monitor once the machine's init runs; the monitor pumps
the console, records sd_notify messages, forwards signals, and execs Python again
to tear down or reboot. Its guard child cleans up when the monitor is killed.
What the monitor shares with Python (the STATUS= escaping) is checked against
textsafe.printable; the rest against the real kernel: which processes a machine
keeps on the host, and what a kill -9 of the monitor leaves (nothing, without any
later uspawn command).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, mounts_under, skip_or_fail
from fixtures.busybox_machine import BootFifo
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reboot import notify_binary, tree  # noqa: F401 (fixtures)
from waits import wait_exit

from uspawn.base.textsafe import STATUS_LIMIT, printable
from uspawn.machine import monitor
from uspawn.net import links as netsetup

MONITOR = monitor.binary()


@pytest.fixture(autouse=True)
def _needs_monitor(request: pytest.FixtureRequest) -> None:
    """Every test here but the fallback's needs the built monitor (under
    USPAWN_MUST_WORK=1 a missing one fails, as a missing tool does elsewhere)."""
    if MONITOR is None and request.node.name != "test_without_the_monitor_python_supervises" \
            and "[python]" not in request.node.name:
        skip_or_fail("uspawn-monitor not built (scripts/setup.sh builds it)")


def _escape(text: bytes) -> str:
    assert MONITOR is not None
    out = subprocess.run([MONITOR, "--escape-status", text], capture_output=True, check=True)
    return out.stdout.decode().removesuffix("\n")


@settings(max_examples=150, deadline=None)
@given(st.text(st.characters(max_codepoint=0xFF, blacklist_characters="\0"), max_size=400))
def test_status_escaping_is_textsafes_below_u0100(text: str) -> None:
    """What the monitor stores is what the Python supervisor stored."""
    assert _escape(text.encode()) == printable(text, STATUS_LIMIT)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600).filter(lambda b: b"\0" not in b))
def test_status_escaping_of_any_bytes_is_safe(raw: bytes) -> None:
    """Above U+00FF the monitor escapes every code point (textsafe keeps the
    printable ones): stricter, never laxer, and as long at most."""
    shown = _escape(raw)
    assert len(shown) <= STATUS_LIMIT
    assert all(0x20 <= ord(ch) < 0x7F or (0xA1 <= ord(ch) <= 0xFF and ch != "\xad")
               for ch in shown), shown
    text = raw.decode(errors="replace")
    if all(ord(ch) < 0x100 for ch in text):
        assert shown == printable(text, STATUS_LIMIT)


def test_bidi_and_c1_are_escaped() -> None:
    assert _escape("a\u202eb\u009bc\u2028d\u00e9".encode()) == "a\\u{202e}b\\x9bc\\u{2028}d\u00e9"
    assert _escape(b"x" * 300) == "x" * 253 + "..."


def test_a_status_from_before_the_hand_over_is_not_escaped_twice() -> None:
    """Python's NotifyListener stored it through textsafe.printable already."""
    assert MONITOR is not None
    shown = printable("caf\u00e9 \u4e2d \x1b[31m", STATUS_LIMIT)  # 'café 中 \x1b[31m'
    out = subprocess.run([MONITOR, "--keep-status", shown], capture_output=True, check=True)
    assert out.stdout.decode().removesuffix("\n") == shown


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _exe(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def _exe_or(pid: int) -> str:
    try:
        return _exe(pid)
    except OSError:
        return ""  # a zombie or gone


def _guards(sup: int, init: int) -> list[int]:
    """The monitor's children but its init, once the Python guardian of the set-up
    phase (dismissed by the monitor, exiting on its own) is gone."""
    assert init in _children(sup)
    wait_exit([k for k in _children(sup) if k != init and _exe_or(k) != MONITOR],
              what="the dismissed Python guardian")
    return [k for k in _children(sup) if k != init and _exe_or(k)]  # not a zombie


def _record(uspawn: Runner, name: str) -> dict[str, object]:
    import json

    data = json.loads((uspawn.state / "containers" / name / "state.json").read_text())
    assert isinstance(data, dict)
    return data


def _boot(uspawn: Runner, tree: tuple[Path, BootFifo], name: str,  # noqa: F811
          *extra: str) -> tuple[int, int, int]:
    """Boot a detached busybox machine; (monitor, init, guard) once it runs."""
    rootfs, fifo = tree
    r = uspawn.run("boot", "-D", str(rootfs), "-M", name, "--detach", "--lxcfs=no",
                   "--network=veth", *extra, timeout=90)
    assert r.returncode == 0, r.stderr
    try:
        fifo.wait_boot()
        rec = _record(uspawn, name)
        sup, init = rec["runtime_pid"], rec["pid"]
        assert isinstance(sup, int) and isinstance(init, int)
        assert _exe(sup) == MONITOR
        guards = _guards(sup, init)
        assert len(guards) == 1 and _exe(guards[0]) == MONITOR, guards
    except BaseException:
        uspawn.run("stop", name, "--timeout", "5", timeout=60)
        raise
    return sup, init, guards[0]


def test_a_detached_machine_keeps_no_python_process(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:  # noqa: F811
    """Supervisor and guard are the monitor binary; the supervisor is still the
    record's runtime_pid, the init's parent, and the holder of every lease."""
    name = "monitored"
    sup, _, guard = _boot(uspawn, tree, name)
    try:
        held = {os.readlink(f"/proc/{sup}/fd/{fd}") for fd in os.listdir(f"/proc/{sup}/fd")}
        assert str(uspawn.state / "containers" / name / "lock") in held
        assert any(p.startswith("/run/uspawn/ranges/") for p in held)
        assert any(p.startswith("/run/uspawn/net/addr/") for p in held)
        # The guard holds no lease: the monitor's death must release them.
        guard_fds = {os.readlink(f"/proc/{guard}/fd/{fd}")
                     for fd in os.listdir(f"/proc/{guard}/fd")}
        assert not [p for p in guard_fds if p.endswith("lock")], guard_fds
        # sd_notify still reaches the record through the monitor.
        r = uspawn.run("exec", name, "--", "env", "NOTIFY_SOCKET=/run/host/notify",
                       "/bin/sd-notify", "STATUS=via the monitor")
        assert r.returncode == 0, r.stderr
        from test_reboot import _wait_record

        _wait_record(uspawn, name, lambda s: s.get("status_text") == "via the monitor",
                     "the STATUS= message in the record")
    finally:
        r = uspawn.run("stop", name, "--timeout", "5", timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (uspawn.state / "containers" / name).exists() and cgroup_dirs(name) == []


def test_kill9_of_the_monitor_is_cleaned_up_by_its_guard(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:  # noqa: F811
    """No later uspawn command needed: the guard removes record, cgroups, nft rules
    and leases itself (tests/test_kill9.py kills the guard too)."""
    rootfs = tree[0]
    name = "monkilled"
    from test_kill9 import _free_port

    sup, init, guard = _boot(uspawn, tree, name, "-p", f"tcp:{_free_port()}:80")
    rules = [r for r in netsetup.list_rules() if r.get("comment") == f"uspawn:{name}"]
    assert rules
    os.kill(sup, signal.SIGKILL)
    wait_exit([sup, init, guard], what="the monitor, the init and the guard")
    assert not (uspawn.state / "containers" / name).exists()
    assert cgroup_dirs(name) == []
    assert [r for r in netsetup.list_rules() if r.get("comment") == f"uspawn:{name}"] == []
    for d in ("addr", "ports"):
        leases = Path("/run/uspawn/net", d)
        for lease in leases.iterdir() if leases.exists() else []:
            assert f'"name": "{name}"' not in lease.read_text(), lease
    assert mounts_under(rootfs) == [] and mounts_under(uspawn.state) == []


def test_a_killed_guard_does_not_stop_the_teardown(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:  # noqa: F811
    """The guard only matters if the monitor dies: without it the machine runs on,
    and stops and reboots as before (resume's "done" to the gone guard is EPIPE)."""
    fifo = tree[1]
    name = "guardkilled"
    sup, init, guard = _boot(uspawn, tree, name)
    try:
        os.kill(guard, signal.SIGKILL)
        wait_exit([guard], what="the guard")
        from test_reboot import _shutdown, _wait_record

        _shutdown(uspawn, name, "reboot")
        wait_exit([init], what="the first init")
        fifo.wait_boot()  # booted again by the same supervisor, after its teardown
        _wait_record(uspawn, name, lambda s: s.get("restarts") == 1 and s.get("pid") != init,
                     "the rebooted machine's record")
        assert _record(uspawn, name)["runtime_pid"] == sup
    finally:
        r = uspawn.run("stop", name, "--timeout", "5", timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (uspawn.state / "containers" / name).exists() and cgroup_dirs(name) == []


def test_the_monitor_caps_and_rotates_the_console_log(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:  # noqa: F811
    """As boot.ConsoleLog (tests/test_boot.py checks that one): NAME.console.log at
    most --console-log-size, the previous part in NAME.console.log.1."""
    from waits import IN_MODIFY, wait_until

    from uspawn.machine.boot import console_log_path

    name, cap = "monrotate", 8192
    log = Path(console_log_path(name))
    for p in (log, Path(f"{log}.1")):
        p.unlink(missing_ok=True)
    _boot(uspawn, tree, name, "--console-log-size", str(cap))
    try:
        script = "i=0; while [ $i -lt 600 ]; do echo line-$i-................................" \
                 "; i=$((i+1)); done > /dev/console"
        r = uspawn.run("exec", name, "--", "sh", "-c", script)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: "line-599-" in log.read_text(errors="replace"), [log.parent],
                   "the last console line in the log", mask=IN_MODIFY)
        assert log.stat().st_size <= cap
        old = Path(f"{log}.1").read_text(errors="replace")
        assert 0 < len(old) <= cap and "line-" in old
    finally:
        r = uspawn.run("stop", name, "--timeout", "5", timeout=60)
    assert r.returncode == 0, r.stderr
    for p in (log, Path(f"{log}.1")):
        p.unlink(missing_ok=True)


LATE_CONSOLE_INIT = """#!/bin/sh
exec </dev/null >/dev/null 2>/dev/null
echo closed > /booted
read go < /go
echo late-console-line > /dev/console
/bin/sd-notify READY=1
while :; do read x < /go; done
"""


@pytest.mark.parametrize("supervisor", ["monitor", "python"])
def test_console_output_after_a_time_without_any_writer_is_kept(
        uspawn: Runner, tree: tuple[Path, BootFifo], supervisor: str) -> None:  # noqa: F811
    """systemd closes its stdio at start and opens /dev/console again later. While
    no process of the machine holds the console, its pty master reads EIO: the
    monitor once stopped reading it there for good, and the journal of
    uspawn@.service got none of the machine's boot messages. Here an init closes
    its stdio, waits until the monitor runs (the Python guardian it dismisses has
    exited), then writes to /dev/console: the line must reach the log."""
    from waits import IN_MODIFY, wait_until

    from uspawn.machine.boot import console_log_path

    rootfs, fifo = tree
    name = "monlatecons"
    init = rootfs / "sbin" / "init"
    init.unlink()
    init.write_text(LATE_CONSOLE_INIT)
    init.chmod(0o755)
    os.mkfifo(rootfs / "go", 0o666)
    log = Path(console_log_path(name))
    log.unlink(missing_ok=True)
    p = uspawn.popen("boot", "-D", str(rootfs), "-M", name, "--detach", "--lxcfs=no",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     env={**os.environ, "USPAWN_MONITOR": "on" if supervisor == "monitor"
                          else "off"})
    try:
        fifo.wait_boot()  # "closed": the machine holds no console fd now
        cdir = uspawn.state / "containers" / name
        wait_until(lambda: (cdir / "state.json").exists(), [cdir], "the machine's record")
        rec = _record(uspawn, name)
        sup, pid1 = rec["runtime_pid"], rec["pid"]
        assert isinstance(sup, int) and isinstance(pid1, int)
        if supervisor == "monitor":
            _guards(sup, pid1)  # the Python guardian is gone: the monitor's loop runs
            assert _exe(sup) == MONITOR
        with open(rootfs / "go", "w") as go:
            go.write("go\n")
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        wait_until(lambda: "late-console-line" in log.read_text(errors="replace"),
                   [log.parent], "the console line written after the gap", timeout=10,
                   mask=IN_MODIFY)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        r = uspawn.run("stop", name, "--timeout", "3", timeout=60)
        log.unlink(missing_ok=True)
    assert r.returncode == 0, r.stderr


def test_without_the_monitor_python_supervises(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:  # noqa: F811
    """USPAWN_MONITOR=off (and a host where it was not built): as before."""
    rootfs, fifo = tree
    name = "pysupervised"
    p = subprocess.run(uspawn.argv("boot", "-D", str(rootfs), "-M", name, "--detach",
                                   "--lxcfs=no"), capture_output=True, text=True, timeout=90,
                       env={**os.environ, "USPAWN_MONITOR": "off"})
    assert p.returncode == 0, p.stderr
    try:
        fifo.wait_boot()
        sup = _record(uspawn, name)["runtime_pid"]
        assert isinstance(sup, int) and "python" in _exe(sup)
    finally:
        r = uspawn.run("stop", name, "--timeout", "5", timeout=60)
    assert r.returncode == 0, r.stderr
    assert not (uspawn.state / "containers" / name).exists()
