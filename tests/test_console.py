"""Unit tier for uspawn.engine.console's stdio relay: which fds are relayed, and the copying.

No root and no container: a plain child process stands in for the payload, set up
exactly as the runtime and `exec` do (StdioRelay.setup, in_child, after_fork, pump).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waits import tty_pending

from uspawn.engine.console import _host_file


def test_pipes_sockets_and_dev_null_pass_through(tmp_path: Path) -> None:
    r, w = os.pipe()
    a, b = socket.socketpair()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        for fd in (r, w, a.fileno(), null):
            assert _host_file(fd) is None, fd
    finally:
        for fd in (r, w, null):
            os.close(fd)
        a.close()
        b.close()
    assert _host_file(999) is None  # closed: nothing to hand over


def test_host_files_are_relayed(tmp_path: Path) -> None:
    master, slave = os.openpty()
    f = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    zero = os.open("/dev/zero", os.O_RDONLY)
    try:
        for fd in (slave, master, f, d, zero):
            st = os.fstat(fd)
            assert _host_file(fd) == (st.st_dev, st.st_ino), fd
    finally:
        for fd in (master, slave, f, d, zero):
            os.close(fd)


# The stand-in runtime: relay our stdio to a child running `sh -c SCRIPT`, print
# the relay's shape on the fd named by argv[2] and exit with the child's status.
RUNTIME = r"""
import os, sys
from uspawn.engine.console import ConsoleIO, StdioRelay, pump
relay = StdioRelay.setup()
shape = "none" if relay is None else " ".join(
    "ours" if relay.child[i] == i else "pipe" for i in range(3))
if relay is not None and relay.child[1] == relay.child[2] != 1:
    shape += " shared"
os.write(int(sys.argv[2]), shape.encode())
os.close(int(sys.argv[2]))
pid = os.fork()
if pid == 0:
    if relay is not None:
        relay.in_child()
    os.execv("/bin/sh", ["sh", "-c", sys.argv[1]])
if relay is None:
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
pidfd = os.pidfd_open(pid)
wait = lambda: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
sys.exit(pump(pidfd, -1, ConsoleIO(relay=relay), wait))
"""


def relay_run(script: str, stdin: int, stdout: int, stderr: int,
              timeout: float = 20) -> tuple[int, str, float]:
    """(exit code, relay shape, seconds) of RUNTIME with these fds as its stdio."""
    r, w = os.pipe()
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", RUNTIME, script, str(w)], stdin=stdin,
                         stdout=stdout, stderr=stderr, pass_fds=(w,))
    os.close(w)
    try:
        code = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    elapsed = time.monotonic() - t0
    with os.fdopen(r) as f:
        return code, f.read(), elapsed


def test_files_are_copied_and_the_exit_code_kept(tmp_path: Path) -> None:
    src, out, err = tmp_path / "in", tmp_path / "out", tmp_path / "err"
    src.write_bytes(os.urandom(1 << 20))  # more than a pipe holds
    with open(src, "rb") as i, open(out, "wb") as o, open(err, "wb") as e:
        code, shape, _ = relay_run("cat; echo done >&2; exit 5", i.fileno(), o.fileno(),
                                   e.fileno())
    assert (code, shape) == (5, "pipe pipe pipe")
    assert out.read_bytes() == src.read_bytes()
    assert err.read_text() == "done\n"


def test_nothing_to_relay_costs_nothing(tmp_path: Path) -> None:
    code, shape, _ = relay_run("exit 3", subprocess.DEVNULL, subprocess.PIPE, subprocess.PIPE)
    assert (code, shape) == (3, "none")


def test_one_file_on_stdout_and_stderr_shares_one_pipe(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with open(log, "wb") as f:
        code, shape, _ = relay_run("for i in 1 2 3; do echo o$i; echo e$i >&2; done",
                                   subprocess.DEVNULL, f.fileno(), f.fileno())
    assert (code, shape) == (0, "ours pipe pipe shared")
    assert log.read_text() == "o1\ne1\no2\ne2\no3\ne3\n"


def test_stdin_eof_reaches_the_payload(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    src.write_text("one line\n")
    with open(src, "rb") as i, open(out, "wb") as o:
        code, _, _ = relay_run("wc -l; echo eof", i.fileno(), o.fileno(), subprocess.DEVNULL)
    assert code == 0 and out.read_text().split() == ["1", "eof"]


@pytest.mark.parametrize("reads", [False, True])
def test_a_payload_that_leaves_a_daemon_behind_does_not_hold_us(tmp_path: Path,
                                                                reads: bool) -> None:
    """The daemon keeps the output pipe (and maybe stdin) open: we return within the
    drain bound, its stdin is at EOF, and our stdin is left alone."""
    master, slave = os.openpty()
    out = tmp_path / "out"
    daemon = "cat <&3 > /dev/null" if reads else "sleep 20"
    pid = 0
    try:
        with open(out, "wb") as o:
            code, shape, elapsed = relay_run(f"exec 3<&0; {daemon} & echo started $!; exit 4",
                                             slave, o.fileno(), o.fileno())
        word, pid_text = out.read_text().split()
        pid = int(pid_text)
        assert (code, shape, word) == (4, "pipe pipe pipe shared", "started")
        assert elapsed < 10, elapsed  # the daemon still holds stdout: bounded drain
        # The daemon (if still there: `cat` ends at EOF) holds pipes, not our tty, else
        # it could read what comes next ...
        assert _tty_holders(pid, os.fstat(slave).st_rdev) == []
        os.write(master, b"after\n")
        # ... and the line is there for us (a non-blocking tty read flushes the pty's
        # buffer work first: no time window decides).
        assert tty_pending(slave) == b"after\n"  # nobody else took it
    finally:
        os.close(master)
        os.close(slave)
        if pid:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _tty_holders(pid: int, rdev: int) -> list[str]:
    """pid's fds that are the tty rdev ([] once pid is gone)."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return []
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev:
            found.append(fd)
    return found


def test_a_payload_that_never_reads_a_big_stdin(tmp_path: Path) -> None:
    zero = os.open("/dev/zero", os.O_RDONLY)
    try:
        code, shape, elapsed = relay_run("sleep 0.1; exit 0", zero, subprocess.PIPE,
                                         subprocess.PIPE)
    finally:
        os.close(zero)
    assert (code, shape) == (0, "pipe ours ours") and elapsed < 10
