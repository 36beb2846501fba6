"""Issue 15: every error a user can cause is one line and a documented exit code.

One test per case the issue lists (and the states of a state directory it
names), run through the real entry points (`python -m uspawn`, uspawn-runc's
entry()) as subprocesses, so closed and broken stdio are the kernel's own.
A container is never started here; the tests that reach the start path
(`run --root FILE`, `--user`) check that nothing was left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import PIPE
from typing import IO

import pytest
from conftest import mounts_under, uspawn_cmd

from uspawn.state.store import dumps, proc_starttime

RUNC = [sys.executable, "-c", "from uspawn.oci.cli import entry; entry()"]
TIMEOUT = 60


def run(argv: list[str], env: dict[str, str] | None = None, stdout: int | IO[str] = PIPE,
        stderr: int = PIPE) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("USPAWN_DEBUG", None)
    return subprocess.run(argv, stdout=stdout, stderr=stderr, text=True, env=full_env,
                          timeout=TIMEOUT)


def one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """r failed with `code` and exactly one stderr line, no traceback, naming `words`."""
    lines = r.stderr.splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def uspawn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([*uspawn_cmd(), *args], env)


def runc(*args: str) -> subprocess.CompletedProcess[str]:
    return run([*RUNC, *args])


# --- --root: a file, /proc/1/root, unusable, missing -------------------------------------------


def test_root_is_a_file_list() -> None:
    one_line(uspawn("--root", "/etc/passwd", "list"), 125, "/etc/passwd", "not a directory")


def test_root_proc1_root_list() -> None:
    """/proc/1/root: EACCES where pid 1 is in another namespace, else the host's / (no
    containers there): either way one line or a table, never a traceback."""
    r = uspawn("--root", "/proc/1/root", "list")
    if r.returncode == 0:
        assert r.stderr == "" and r.stdout.startswith("NAME")
    else:
        one_line(r, 125, "/proc/1/root")


def test_root_unusable_paths(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to("loop")
    os.mkfifo(tmp_path / "fifo")
    for root, words in [(tmp_path / "loop", ["loop", "symbolic links"]),
                        (tmp_path / "fifo", ["fifo", "not a directory"]),
                        ("/etc/passwd/sub", ["/etc/passwd/sub", "Not a directory"]),
                        ("", ["--root", "empty"]),
                        (tmp_path / ("x" * 300), ["File name too long"])]:
        one_line(uspawn("--root", str(root), "list"), 125, *words)
        one_line(uspawn("--root", str(root), "status", "web"), 125, *words)


def test_root_missing_parent_is_an_empty_list(tmp_path: Path) -> None:
    r = uspawn("--root", str(tmp_path / "no" / "such"), "list")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.startswith("NAME")
    assert not (tmp_path / "no").exists()


def test_runc_root_is_a_file_list() -> None:
    one_line(runc("--root", "/etc/passwd", "list"), 1, "/etc/passwd", "not a directory")
    one_line(runc("--root", "/etc/passwd", "state", "c1"), 1, "/etc/passwd")


def test_state_dir_env(tmp_path: Path) -> None:
    one_line(uspawn("list", env={"USPAWN_STATE_DIR": "/etc/passwd"}), 125, "/etc/passwd")
    one_line(uspawn("list", env={"USPAWN_STATE_DIR": ""}), 125, "USPAWN_STATE_DIR", "empty")


def test_run_root_is_a_file(rootfs: Path, tmp_path: Path) -> None:
    before = mounts_under(rootfs)
    f = tmp_path / "file"
    f.write_text("x")
    r = uspawn("--root", str(f), "run", "-D", str(rootfs), "--", "true")
    one_line(r, 125, str(f), "not a directory")
    assert f.read_text() == "x" and mounts_under(rootfs) == before


# --- --user --------------------------------------------------------------------------------------


def test_user_superscript_digit(rootfs: Path, state_dir: Path) -> None:
    r = uspawn("--root", str(state_dir), "run", "-D", str(rootfs), "--user", "²", "--", "true")
    one_line(r, 125, "--user", "²")
    assert os.listdir(state_dir / "containers") == []
    r = uspawn("--root", str(state_dir), "run", "-D", str(rootfs), "--user", "0:٣", "--",
               "true")
    one_line(r, 125, "--user", "٣")


def test_user_with_non_numeric_uid_in_container_passwd(rootfs: Path, state_dir: Path) -> None:
    with open(rootfs / "etc" / "passwd", "a") as f:
        f.write("bad:x:1²:abc:bad:/:/bin/sh\n")
    r = uspawn("--root", str(state_dir), "run", "-D", str(rootfs), "--user", "bad", "--", "true")
    one_line(r, 125, "--user", "non-numeric")
    assert os.listdir(state_dir / "containers") == []


# --- closed and broken stdio ---------------------------------------------------------------------


def _broken_pipe() -> int:
    """A pipe's write end whose reader is gone: the first write gets EPIPE."""
    rfd, wfd = os.pipe()
    os.close(rfd)
    return wfd


@pytest.mark.parametrize("cli", [uspawn_cmd(), RUNC])
def test_broken_pipe_on_stdout(cli: list[str]) -> None:
    """`uspawn --version | true`: no BrokenPipeError traceback; 141 as a C tool killed by
    SIGPIPE."""
    wfd = _broken_pipe()
    try:
        r = run([*cli, "--version"], stdout=wfd, stderr=PIPE)
    finally:
        os.close(wfd)
    assert r.returncode == 141 and r.stderr == "", r.stderr


@pytest.mark.parametrize("cli", [uspawn_cmd(), RUNC])
def test_closed_stdout_and_stderr(cli: list[str], tmp_path: Path) -> None:
    """`uspawn --version >&-`, `uspawn list 2>&-`: /dev/null stands in; no traceback."""
    code = "import os, sys; os.close(1); os.execv(sys.argv[1], sys.argv[1:])"
    r = run([sys.executable, "-c", code, *cli, "--version"], stderr=PIPE)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    code2 = "import os, sys; os.close(2); os.execv(sys.argv[1], sys.argv[1:])"
    r = run([sys.executable, "-c", code2, *cli, "--root", "/etc/passwd", "list"],
            stdout=PIPE)
    assert r.returncode in (1, 125) and r.stdout == ""
    # With all three closed, the error line still goes nowhere unexpected: not into a
    # state file the command opened (that would become fd 2).
    code3 = ("import os, sys; [os.close(i) for i in (0, 1, 2)]; "
             "os.execv(sys.argv[1], sys.argv[1:])")
    state = tmp_path / "state"
    r = run([sys.executable, "-c", code3, *cli, "--root", str(state), "list"])
    assert r.returncode == 0


def test_full_disk_stdout() -> None:
    with open("/dev/full", "w") as full:
        r = run([*uspawn_cmd(), "--version"], stdout=full, stderr=PIPE)
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "No space left on device" in r.stderr and "bug" not in r.stderr


# --- numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e999", "²"])
def test_stop_timeout_not_finite(value: str, state_dir: Path) -> None:
    one_line(uspawn("--root", str(state_dir), "stop", "web", "--timeout", value), 2,
             "--timeout", value)


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5"])
def test_boot_ready_timeout_not_finite(value: str, state_dir: Path) -> None:
    one_line(uspawn("--root", str(state_dir), "boot", "-D", "/nonexistent", "--detach",
                    "--ready-timeout", value), 2, "--ready-timeout")


# --- `--` is not dropped -------------------------------------------------------------------------


@pytest.fixture
def live_record(state_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A state record of a "container" named web whose init is a sleep we own, held
    live by our flock on its lock (as the runtime holds it)."""
    proc = subprocess.Popen(["sleep", "60"])
    cdir = state_dir / "containers" / "web"
    cdir.mkdir(parents=True)
    fd = os.open(cdir / "lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    (cdir / "state.json").write_text(dumps({
        "name": "web", "pid": proc.pid, "pid_start": proc_starttime(proc.pid),
        "started": time.time(), "rootfs": "/nonexistent"}))
    try:
        yield proc
    finally:
        os.close(fd)
        proc.kill()
        proc.wait()


def test_kill_signal_after_dashdash(live_record: subprocess.Popen[bytes],
                                    state_dir: Path) -> None:
    """`uspawn kill web -- KILL` sends SIGKILL (it sent SIGTERM: KILL was dropped)."""
    r = uspawn("--root", str(state_dir), "kill", "web", "--", "KILL")
    assert r.returncode == 0, r.stderr
    assert live_record.wait(10) == -signal.SIGKILL


def test_stop_option_after_dashdash_is_refused(live_record: subprocess.Popen[bytes],
                                               state_dir: Path) -> None:
    """`uspawn stop web -- --timeout 5` ignored the timeout; now it is a usage error
    and nothing is stopped."""
    one_line(uspawn("--root", str(state_dir), "stop", "web", "--", "--timeout", "5"), 2,
             "unexpected argument '--timeout'")
    assert live_record.poll() is None


# --- state directory contents --------------------------------------------------------------------


def test_state_containers_is_a_file(state_dir: Path) -> None:
    (state_dir / "containers").write_text("x")
    one_line(uspawn("--root", str(state_dir), "list"), 125, "containers", "Not a directory")
    one_line(uspawn("--root", str(state_dir), "stop", "web"), 125, "containers")


def test_corrupted_and_dead_records_are_skipped(state_dir: Path) -> None:
    """Corrupted records (garbage, deep JSON, a FIFO, a directory, wrong types) and
    records of dead containers (lock not held) are skipped, never a traceback; a
    FIFO is never opened for reading (it would block)."""
    held = []
    cont = state_dir / "containers"
    cont.mkdir()
    bad: dict[str, object] = {
        "garbage": b"\xff{", "deep": b"[" * 100_000, "list": b"[1]", "nan": json.dumps(
            {"name": "nan", "pid": 1, "pid_start": -1, "started": float("nan")}).encode(),
        "huge": json.dumps({"name": "huge", "pid": 2**70, "started": 1e308}).encode(),
        "bool": json.dumps({"name": "bool", "pid": True, "uid_base": "x"}).encode(),
    }
    for name, data in bad.items():
        (cont / name).mkdir()
        (cont / name / "state.json").write_bytes(data)  # type: ignore[arg-type]
    (cont / "fifo").mkdir()
    os.mkfifo(cont / "fifo" / "state.json")
    (cont / "dir").mkdir()
    (cont / "dir" / "state.json").mkdir()
    (cont / "file").write_text("x")
    (cont / "dead").mkdir()
    (cont / "dead" / "lock").write_text("")
    (cont / "dead" / "state.json").write_text(dumps({"name": "dead", "pid": 1}))
    for name in [*bad, "fifo", "dir"]:
        fd = os.open(cont / name / "lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
    try:
        r = uspawn("--root", str(state_dir), "list")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        r = uspawn("--root", str(state_dir), "list", "--json")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        names = {row["name"] for row in json.loads(r.stdout)}
        assert names == {"nan", "huge", "bool"}
        for name in ("nan", "huge", "bool", "dead", "fifo"):
            for cmd in (["stop", name], ["kill", name], ["status", name]):
                r = uspawn("--root", str(state_dir), *cmd)
                assert r.returncode in (0, 125) and "Traceback" not in r.stderr, r.stderr
                assert len(r.stderr.splitlines()) <= 1, r.stderr
    finally:
        for fd in held:
            os.close(fd)


# --- config.json ---------------------------------------------------------------------------------


def test_config_json_error_has_line_and_column(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{\n  "ociVersion": "1.2.0",\n  "root" {}\n}\n')
    state = tmp_path / "state"
    line = one_line(runc("--root", str(state), "create", "--bundle", str(bundle), "c1"), 1,
                    "config.json")
    assert "line 3 column 10" in line, line
    assert not state.exists() or os.listdir(state) == []


def test_runc_state_json_fifo_does_not_block(tmp_path: Path) -> None:
    """A FIFO where <root>/<id>/state.json belongs: open() blocked `list` and `state`."""
    (tmp_path / "web").mkdir()
    os.mkfifo(tmp_path / "web" / "state.json")
    r = runc("--root", str(tmp_path), "list")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    one_line(runc("--root", str(tmp_path), "state", "web"), 1, "web", "not a regular file")
