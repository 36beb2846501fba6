"""System containers: the Debian bookworm fixture booted with real systemd as pid 1.

One machine is booted (detached) for the module and examined by the tests in
file order; the last ones stop it and check that nothing is left. The tree is
a fresh copy of the cached fixture (tests/fixtures/debian_tree.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, drain_pty, mounts_under, skip_or_fail

NAME = "bookworm"


@pytest.fixture(scope="module")
def debian_copy(tmp_path_factory: pytest.TempPathFactory, need_root: None) -> Path:
    try:
        from fixtures.debian_tree import copy_debian_tree
    except ImportError as exc:
        skip_or_fail(f"fixture module missing: {exc}")
        raise
    dest = tmp_path_factory.mktemp("machines") / NAME
    try:
        copy_debian_tree(dest)
    except Exception as exc:  # debootstrap needs the Debian mirror
        skip_or_fail(f"cannot build the Debian fixture: {exc}")
    return dest


@pytest.fixture(scope="module")
def machine(debian_copy: Path, tmp_path_factory: pytest.TempPathFactory,
            ) -> Iterator[Runner]:
    runner = Runner(tmp_path_factory.mktemp("state"))
    t0 = time.monotonic()
    r = runner.run("boot", "-D", str(debian_copy), "-M", NAME, "--detach", timeout=150)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == NAME
    runner.boot_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    runner.tree = debian_copy  # type: ignore[attr-defined]
    yield runner
    runner.run("stop", NAME, "--timeout", "5", timeout=60)


def sh(m: Runner, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return m.run("exec", NAME, "--", *cmd, timeout=timeout)


def test_reaches_running_with_no_failed_units(machine: Runner) -> None:
    r = sh(machine, "systemctl", "is-system-running", "--wait", timeout=120)
    failed = sh(machine, "systemctl", "--failed", "--no-legend", "--plain").stdout
    assert r.stdout.strip() == "running", failed
    assert failed.strip() == ""


def test_services_work(machine: Runner) -> None:
    assert sh(machine, "curl", "-s", "http://127.0.0.1:80/").stdout.strip() == "uspawn-nginx-ok"
    r = sh(machine, "su", "postgres", "-c", "psql -tAc 'select 1'")
    assert r.stdout.strip() == "1", r.stderr
    r = sh(machine, "su", "postgres", "-s", "/bin/sh", "-c", "echo x > /dev/null && echo ok")
    assert r.stdout.strip() == "ok", r.stderr
    assert sh(machine, "systemctl", "is-active", "uspawn-privdev").stdout.strip() == "active"
    assert sh(machine, "test", "-e", "/run/privdev-ok").returncode == 0


def test_mknod_refused_and_no_unmapped_files(machine: Runner) -> None:
    r = sh(machine, "sh", "-c", "mknod /tmp/x c 1 3 2>&1; echo rc=$?")
    assert "Operation not permitted" in r.stdout and "rc=1" in r.stdout
    # The tree (one filesystem from /); /proc and /sys are kernel mount points on it.
    r = sh(machine, "find", "/", "-xdev", "(", "-path", "/proc", "-o", "-path", "/sys", ")",
           "-prune", "-o", "(", "-nouser", "-o", "-nogroup", "-o", "-uid", "65534",
           "-o", "-gid", "65534", ")", "-print")
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout[:2000]


def test_container_interface(machine: Runner) -> None:
    assert sh(machine, "cat", "/run/host/container-manager").stdout.strip() == "uspawn"
    assert sh(machine, "systemd-detect-virt").stdout.strip() == "container-other"
    mid = sh(machine, "cat", "/etc/machine-id").stdout.strip()
    assert len(mid) == 32
    assert sh(machine, "hostname").stdout.strip() == NAME
    ro = sh(machine, "sh", "-c", "touch /proc/sys/kernel/x /sys/x 2>&1; echo rc=$?").stdout
    assert "Read-only file system" in ro


def test_list_status_logs(machine: Runner) -> None:
    import json

    rows = json.loads(machine.run("list", "--json").stdout)
    row = next(r for r in rows if r["name"] == NAME)
    assert row["state"] == "running" and row["machine"] is True
    assert row["uid_size"] == 65536 and row["uid_base"] >= 0x80000
    assert row["pid"] > 0 and row["rootfs"].endswith(NAME)
    assert "Status:" in machine.run("status", NAME).stdout
    logs = machine.run("logs", NAME).stdout
    assert "Welcome to" in logs


def test_shell_through_a_pty(machine: Runner) -> None:
    import pty

    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(machine.argv()[0], machine.argv("shell", NAME))
        finally:
            os._exit(127)
    os.write(fd, b"echo shell-$((6*7)); tty; exit\n")
    text, code = drain_pty(fd, pid)
    assert "shell-42" in text
    assert "/dev/pts/" in text
    assert code == 0


def test_stop_is_a_clean_poweroff(machine: Runner) -> None:
    cg = cgroup_dirs(NAME)
    assert cg
    t0 = time.monotonic()
    r = machine.run("stop", NAME, "--timeout", "10", timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed < 10
    logs = machine.run("logs", NAME).stdout
    # SIGRTMIN+3 is systemd's halt.target; in a container halt and power-off are one.
    assert "shutdown.target" in logs and ("Halting system" in logs or "Powering off" in logs)
    assert cgroup_dirs(NAME) == []
    assert machine.run("list", "--json").stdout.strip() == "[]"
    assert mounts_under(machine.tree) == []  # type: ignore[attr-defined]
    containers = machine.state / "containers"
    assert not containers.exists() or list(containers.iterdir()) == []


def test_foreground_boot_and_sigterm_poweroff(debian_copy: Path, tmp_path: Path) -> None:
    runner = Runner(tmp_path)
    p = runner.popen("boot", "-D", str(debian_copy), "-M", "fg", "-v",
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    deadline = time.monotonic() + 120
    seen = ""
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        seen += line
        if "is ready" in line:
            break
    assert "machine fg is ready" in seen, seen[-2000:]
    # The console reaches stdout (the unit's journal) from the first line on, also
    # through uspawn-monitor: systemd closes its stdio early and opens /dev/console
    # again later; in between, a master nobody else held read EIO and the monitor
    # lost the console for good.
    assert "Welcome to" in seen, seen[-2000:]
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=60)
    assert p.returncode == 0, rest[-2000:]
    assert cgroup_dirs("fg") == []


def test_unit_file_verifies() -> None:
    unit = Path(__file__).resolve().parent.parent / "dist" / "systemd" / "uspawn@.service"
    sa = shutil.which("systemd-analyze")
    if sa is None:
        skip_or_fail("systemd-analyze missing (apt-get install systemd)")
        return
    if not os.path.exists("/usr/local/bin/uspawn"):
        skip_or_fail("/usr/local/bin/uspawn missing (scripts/setup.sh links it)")
    tmp = Path("/tmp/uspawn-unit-verify")
    tmp.mkdir(exist_ok=True)
    inst = tmp / "uspawn@demo.service"
    inst.write_text(unit.read_text())
    r = subprocess.run([sa, "verify", "--man=no", str(inst)], capture_output=True, text=True)
    # RequiresMountsFor= on a missing path is only informational.
    errors = [ln for ln in r.stderr.splitlines() if "var/lib/machines" not in ln and ln.strip()]
    assert r.returncode == 0 and errors == [], r.stderr


# --- the console log of a detached machine (boot.ConsoleLog) -----------------------


def test_console_log_rotates_at_the_cap(tmp_path: Path) -> None:
    from uspawn.machine.boot import ConsoleLog

    path = tmp_path / "m.console.log"
    log = ConsoleLog(str(path), 10_000)
    for i in range(100):
        log.write(bytes([97 + i % 26]) * 999)
    log.close()
    rotated = Path(f"{path}.1")
    assert path.stat().st_size <= 10_000 and rotated.stat().st_size == 10_000
    assert path.read_bytes() and path.read_bytes()[-1:] == bytes([97 + 99 % 26])
    assert log.rotations == 9 and log.dropped == 0
    # Reopened (a new boot of the same machine): the existing size counts.
    log = ConsoleLog(str(path), 10_000)
    log.write(b"x" * 10_000)
    log.close()
    assert path.stat().st_size <= 10_000 and rotated.stat().st_size == 10_000


def test_console_log_drops_and_counts_when_writes_fail(tmp_path: Path) -> None:
    """A full disk (here RLIMIT_FSIZE: EFBIG, the same path as ENOSPC/EDQUOT) must
    never raise into the console pump or block it: the bytes are dropped, counted,
    and the count is noted once writing works again."""
    import resource

    path = tmp_path / "m.console.log"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            from uspawn.machine.boot import ConsoleLog

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
            log = ConsoleLog(str(path), 1 << 20)
            t0 = time.monotonic()
            for _ in range(100):
                log.write(b"y" * 1000)
            ok = log.dropped == 100 * 1000 - 4096 and time.monotonic() - t0 < 5
            # Space again (the log rotated away by hand): the drop is reported.
            os.rename(path, f"{path}.old")
            log.close()
            log = ConsoleLog(str(path), 1 << 20)
            log.dropped = 1234
            log.write(b"after\n")
            code = 0 if ok and log.dropped == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert Path(f"{path}.old").stat().st_size == 4096
    text = path.read_text()
    assert "1234 bytes of console output dropped" in text and text.endswith("after\n")
