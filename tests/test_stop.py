"""Stop semantics of `uspawn run` (issue 15): a stop signal always stops.

A pid-namespace init only gets the signals it handles, so a forwarded SIGTERM
is lost on `httpd -f` (busybox httpd has no handler). SIGTERM/SIGINT to `uspawn
run` forward the signal (or --kill-signal), and SIGKILL follows after
--stop-timeout or at a second stop signal; `uspawn stop` of a `run` container
does the same. Every wait here is on a pipe, inotify or a pidfd, never a sleep.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, mounts_under, processes_in_cgroup_named
from waits import wait_state


def _wait_state(uspawn: Runner, name: str, p: subprocess.Popen[str],
                timeout: float = 30) -> dict[str, object]:
    """The container's state.json, once written (after the payload's execve)."""
    return wait_state(uspawn.state, name, p, timeout)


def _assert_nothing_left(uspawn: Runner, name: str, rootfs: Path,
                         record: dict[str, object]) -> None:
    init = record["pid"]
    assert isinstance(init, int)
    try:
        with open(f"/proc/{init}/stat", "rb") as f:
            start = int(f.read().rsplit(b")", 1)[1].split()[19])
        assert start != record["pid_start"], "the init still runs"
    except FileNotFoundError:
        pass
    assert processes_in_cgroup_named(name) == []
    assert cgroup_dirs(name) == []
    assert not (uspawn.state / "containers" / name).exists()
    assert mounts_under(rootfs) == [] and mounts_under(uspawn.state) == []
    # The UID-range lease (host-wide): gone, or already another container's.
    lease = Path("/run/uspawn/ranges") / f"{record['uid_base']}-{record['uid_size']}.lock"
    if lease.exists():
        text = lease.read_text()
        assert str(record["runtime_pid"]) not in text and str(init) not in text


def _timed_wait(p: subprocess.Popen[str], timeout: float) -> float:
    t0 = time.monotonic()
    p.wait(timeout=timeout)
    return time.monotonic() - t0


def test_sigterm_stops_httpd_within_the_grace_period(uspawn: Runner, rootfs: Path) -> None:
    """httpd ignores the forwarded SIGTERM; SIGKILL comes after --stop-timeout."""
    grace = 2.0
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stophttpd", "--stop-timeout", str(grace),
                     "--", "httpd", "-f", "-p", "80",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        record = _wait_state(uspawn, "stophttpd", p)
        assert record["kill_signal"] == signal.SIGTERM and record["stop_timeout"] == grace
        p.send_signal(signal.SIGTERM)
        took = _timed_wait(p, grace + 20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    _, err = p.communicate()
    assert p.returncode == 128 + signal.SIGKILL, err
    # Not killed before the grace period (httpd got SIGTERM and ignored it), not much later.
    assert grace - 0.1 <= took < grace + 1, took
    _assert_nothing_left(uspawn, "stophttpd", rootfs, record)


def test_default_grace_is_ten_seconds(uspawn: Runner, rootfs: Path) -> None:
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stopdefault", "--",
                     "httpd", "-f", "-p", "80", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        record = _wait_state(uspawn, "stopdefault", p)
        assert record["stop_timeout"] == 10.0
        p.send_signal(signal.SIGTERM)
        took = _timed_wait(p, 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGKILL
    assert 9.9 <= took < 11, took
    _assert_nothing_left(uspawn, "stopdefault", rootfs, record)


_TRAPPER = ("trap 'echo got-term' TERM; trap 'echo got-int' INT; "
            "trap 'echo got-usr1; exit 7' USR1; echo up; "
            "while :; do sleep 1 & wait $!; done")


def test_second_sigterm_kills_at_once(uspawn: Runner, rootfs: Path) -> None:
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stoptwice", "--stop-timeout", "60",
                     "--", "sh", "-c", _TRAPPER, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "up"
        record = _wait_state(uspawn, "stoptwice", p)
        p.send_signal(signal.SIGTERM)
        # The payload handles it and goes on: the first signal is forwarded, not a kill.
        assert p.stdout.readline().strip() == "got-term"
        assert p.poll() is None
        p.send_signal(signal.SIGTERM)
        took = _timed_wait(p, 20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGKILL
    assert took < 5, took  # not the 60 s grace
    _assert_nothing_left(uspawn, "stoptwice", rootfs, record)


def test_sigint_without_a_tty_is_a_stop_signal(uspawn: Runner, rootfs: Path) -> None:
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stopint", "--stop-timeout", "60",
                     "--", "sh", "-c", _TRAPPER, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "up"
        p.send_signal(signal.SIGINT)
        assert p.stdout.readline().strip() == "got-int"
        p.send_signal(signal.SIGTERM)  # the second stop signal, of another kind
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 128 + signal.SIGKILL


def test_kill_signal_is_sent_first(uspawn: Runner, rootfs: Path) -> None:
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stopusr1", "--kill-signal", "USR1",
                     "--", "sh", "-c", _TRAPPER, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "up"
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert out.strip() == "got-usr1"  # USR1 instead of TERM
    assert p.returncode == 7, err


def test_uspawn_stop_of_a_run_container(uspawn: Runner, rootfs: Path) -> None:
    """`uspawn stop` uses the container's --stop-timeout (shorter than its --timeout)."""
    grace = 2.0
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stopcmd", "--stop-timeout", str(grace),
                     "--", "httpd", "-f", "-p", "80",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        record = _wait_state(uspawn, "stopcmd", p)
        t0 = time.monotonic()
        r = uspawn.run("stop", "stopcmd", timeout=30)
        took = time.monotonic() - t0
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert p.wait(timeout=10) == 128 + signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert grace - 0.1 <= took < grace + 1.5, took
    _assert_nothing_left(uspawn, "stopcmd", rootfs, record)


def test_uspawn_stop_returns_after_the_runtime_cleaned_up(uspawn: Runner, rootfs: Path) -> None:
    """`stop` waits for the runtime itself, not for its lock: the lock goes before
    the directory does (the slow-release fault holds that window open for 1 s)."""
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stopwaits", "--stop-timeout", "1",
                     "--", "sleep", "600",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     env={**os.environ, "USPAWN_TEST_FAULT": "slow-release"})
    try:
        record = _wait_state(uspawn, "stopwaits", p)
        r = uspawn.run("stop", "stopwaits", timeout=30)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert not (uspawn.state / "containers" / "stopwaits").exists()
        assert p.poll() is not None, "stop returned while its runtime still ran"
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    _assert_nothing_left(uspawn, "stopwaits", rootfs, record)


def test_uspawn_stop_sends_the_kill_signal(uspawn: Runner, rootfs: Path) -> None:
    p = uspawn.popen("run", "-D", str(rootfs), "-M", "stopcmdusr1", "--kill-signal", "USR1",
                     "--", "sh", "-c", _TRAPPER, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "up"
        _wait_state(uspawn, "stopcmdusr1", p)
        r = uspawn.run("stop", "stopcmdusr1", timeout=30)
        assert r.returncode == 0, r.stderr
        out, _ = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert out.strip() == "got-usr1" and p.returncode == 7


@pytest.mark.parametrize(("option", "value"), [
    ("--stop-timeout", "nan"), ("--stop-timeout", "inf"), ("--stop-timeout", "-1"),
    ("--stop-timeout", "1e3"), ("--stop-timeout", "\u0661"), ("--stop-timeout", ""),
    ("--stop-timeout", "99999999"), ("--kill-signal", "NOPE"), ("--kill-signal", "99"),
])
def test_bad_stop_options_are_one_line(uspawn: Runner, rootfs: Path, option: str,
                                       value: str) -> None:
    r = uspawn.run("run", "-D", str(rootfs), option, value, "--", "true")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"uspawn: {option}: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not (uspawn.state / "containers").exists() or \
        list((uspawn.state / "containers").iterdir()) == []


def _read_until(master: int, want: str, timeout: float = 20) -> str:
    """Read the pty master until want shows up (bounded); the text so far."""
    text = ""
    deadline = time.monotonic() + timeout
    while want not in text:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([master], [], [], left)[0], repr(text)
        text += os.read(master, 4096).decode(errors="replace")
    return text


def test_with_a_tty_ctrl_c_is_for_the_foreground_job(uspawn: Runner, rootfs: Path) -> None:
    """-t: Ctrl-C goes through the container's pty to its foreground job, and a SIGINT
    to uspawn is forwarded without arming the kill; SIGTERM still stops."""
    import pty

    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execvp(uspawn.argv()[0], uspawn.argv(
                "run", "-D", str(rootfs), "-M", "stoptty", "-t", "--stop-timeout", "1", "--",
                "sh", "-c", "trap 'echo got-int' INT; echo up; "
                "while :; do sleep 1000 & wait $!; done"))
        finally:
            os._exit(127)
    try:
        _read_until(master, "up")
        os.write(master, b"\x03")  # Ctrl-C on the terminal: the pty's line discipline
        _read_until(master, "got-int")
        os.kill(pid, signal.SIGINT)
        _read_until(master, "got-int")
        os.kill(pid, signal.SIGINT)  # not a second stop signal: nothing is killed
        _read_until(master, "got-int")
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)  # sh has no TERM trap: the kill after 1 s stops it
        _, status = os.waitpid(pid, 0)
        took = time.monotonic() - t0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGKILL
    assert 0.9 <= took < 2, took
    assert cgroup_dirs("stoptty") == []
