"""Reboot inside a machine (issue 17): exit 133 in the foreground, a restart under --detach.

reboot(2) in a pid namespace kills its init with SIGHUP (restart) or SIGINT
(power-off, halt). `uspawn boot` exits 133 on a reboot request, as
systemd-nspawn does (uspawn@.service restarts on it: RestartForceExitStatus=133);
the --detach supervisor boots the machine again itself, as the same machine
(name, UID range, subnet, limits, UUID), and counts the restarts.

The machines run busybox init (tests/fixtures/busybox_machine.py): its sysinit
sends READY=1 and writes a line to /booted, a FIFO the test waits on, so every
wait is on a FIFO, a pidfd or inotify.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, mounts_under, skip_or_fail
from fixtures.busybox_machine import BootFifo, build_notify, make_bootable
from waits import wait_exit, wait_until

from uspawn.machine.boot import EXIT_REBOOT, reboot_code

UNIT = Path(__file__).resolve().parent.parent / "dist" / "systemd" / "uspawn@.service"


@pytest.fixture(scope="session")
def notify_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("notify") / "sd-notify"
    try:
        build_notify(dest)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        skip_or_fail(f"cannot build the sd-notify helper: {exc}")
    return dest


@pytest.fixture
def tree(rootfs: Path, notify_binary: Path) -> Iterator[tuple[Path, BootFifo]]:
    make_bootable(rootfs, notify_binary)
    fifo = BootFifo(rootfs)
    yield rootfs, fifo
    fifo.close()


def _record(uspawn: Runner, name: str) -> dict[str, object]:
    rows = json.loads(uspawn.run("list", "--json").stdout)
    mine = [r for r in rows if r["name"] == name]
    assert len(mine) == 1, rows
    row = mine[0]
    assert isinstance(row, dict)
    return row


def _state_file(uspawn: Runner, name: str) -> dict[str, object]:
    data = json.loads((uspawn.state / "containers" / name / "state.json").read_text())
    assert isinstance(data, dict)
    return data


def _wait_record(uspawn: Runner, name: str, cond: Callable[[dict[str, object]], bool],
                 what: str, timeout: float = 30) -> None:
    """Until the machine's state.json (rewritten on each change) satisfies cond."""
    def check() -> bool:
        try:
            return cond(_state_file(uspawn, name))
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    wait_until(check, [uspawn.state / "containers" / name], what, timeout=timeout)


def _ready_again(st: dict[str, object]) -> bool:
    return st.get("ready") is True and st.get("restarts") == 1


def _nothing_left(uspawn: Runner, name: str, rootfs: Path) -> None:
    assert cgroup_dirs(name) == []
    # Before `list`: it would reclaim a record a dead owner left (machine/reclaim.py).
    assert not (uspawn.state / "containers" / name).exists()
    assert uspawn.run("list", "--json").stdout.strip() == "[]"
    assert mounts_under(rootfs) == []


def _shutdown(uspawn: Runner, name: str, command: str) -> None:
    """busybox `reboot`/`poweroff` inside: they signal init and exit 0, but the
    shutdown's SIGTERM/SIGKILL to every process may reach them first."""
    r = uspawn.run("exec", name, "--", command)
    assert r.returncode in (0, 128 + signal.SIGTERM, 128 + signal.SIGKILL), r.stderr


# --- pure logic -------------------------------------------------------------------


def test_reboot_code_maps_the_kernels_signals() -> None:
    said: list[str] = []
    assert reboot_code(128 + signal.SIGINT, "m", said.append) == 0  # power-off, halt
    assert said == []
    assert reboot_code(128 + signal.SIGHUP, "m", said.append) == EXIT_REBOOT == 133
    assert "reboot" in said[0]
    assert reboot_code(128 + signal.SIGKILL, "m", said.append) == 128 + signal.SIGKILL
    assert reboot_code(3, "m", said.append) == 3


def test_unit_restarts_on_133() -> None:
    service = {}
    for line in UNIT.read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            service[key.strip()] = value.split()
    assert "133" in service["RestartForceExitStatus"]
    assert "133" in service["SuccessExitStatus"]


# --- foreground -------------------------------------------------------------------


def _foreground(uspawn: Runner, tree: tuple[Path, BootFifo], name: str,
                inside: str) -> subprocess.Popen[str]:
    rootfs, fifo = tree
    p = uspawn.popen("boot", "-D", str(rootfs), "-M", name, "--lxcfs=no",
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        fifo.wait_boot()
        _shutdown(uspawn, name, inside)
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p


def test_foreground_reboot_exits_133(uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:
    p = _foreground(uspawn, tree, "fgreboot", "reboot")
    _, err = p.communicate()
    assert p.returncode == 133, err
    assert "machine fgreboot asked for a reboot: exit 133" in err
    _nothing_left(uspawn, "fgreboot", tree[0])


def test_foreground_poweroff_exits_0(uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:
    p = _foreground(uspawn, tree, "fgoff", "poweroff")
    _, err = p.communicate()
    assert p.returncode == 0, err
    assert "reboot" not in err
    _nothing_left(uspawn, "fgoff", tree[0])


# --- detached: the supervisor boots it again ---------------------------------------


def _memory_max(name: str) -> str:
    for d in cgroup_dirs(name):
        for f in ("memory.limit_in_bytes", "memory.max"):
            p = os.path.join(d, f)
            if os.path.exists(p):
                return Path(p).read_text().strip()
    raise AssertionError(f"no memory limit file for {name}")


def test_detached_reboot_is_the_same_machine(uspawn: Runner,
                                             tree: tuple[Path, BootFifo]) -> None:
    rootfs, fifo = tree
    name = "rebooter"
    r = uspawn.run("boot", "-D", str(rootfs), "-M", name, "--detach", "--lxcfs=no",
                   "--network=veth", "--memory", "200M", timeout=90)
    assert r.returncode == 0, r.stderr
    try:
        fifo.wait_boot()
        before = _record(uspawn, name)
        assert before["ready"] is True and before["restarts"] == 0
        resources = before["resources"]  # `list --json`: limits and use, as `status`
        assert isinstance(resources, dict)
        assert resources["memory"]["limit_bytes"] == 200 << 20
        assert 0 < resources["memory"]["current_bytes"] < 200 << 20
        assert resources["tasks"]["current"] >= 1 and resources["cpu"]["usage_usec"] > 0
        supervisor = _state_file(uspawn, name)["runtime_pid"]
        assert isinstance(supervisor, int)
        assert _memory_max(name) == str(200 << 20)

        _shutdown(uspawn, name, "reboot")
        wait_exit([int(str(before["pid"]))], what="the first init")
        try:
            fifo.wait_boot()  # booted again: its sysinit ran
        except AssertionError:  # say why: the supervisor logs a failed reboot
            raise AssertionError(_log_tail(name)) from None
        # The new boot's state directory exists (its init ran sysinit): watch it.
        _wait_record(uspawn, name, _ready_again, "the rebooted machine to be ready")
        after = _record(uspawn, name)
        assert after["pid"] != before["pid"]
        for key in ("name", "uid_base", "uid_size", "uuid", "addresses", "rootfs"):
            assert after[key] == before[key], key
        assert before["addresses"]  # a veth lease, kept
        assert _state_file(uspawn, name)["runtime_pid"] == supervisor
        assert _memory_max(name) == str(200 << 20)
        assert re.search(r"^Restarts: +1$", uspawn.run("status", name).stdout, re.M)
        assert "rebooting (restart 1)" in uspawn.run("logs", name).stdout

        _shutdown(uspawn, name, "poweroff")
        wait_exit([supervisor], what="the supervisor after poweroff")
    finally:
        if uspawn.run("status", name).returncode == 0:
            uspawn.run("stop", name, "--timeout", "3")
    _nothing_left(uspawn, name, rootfs)
    r2 = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True)
    assert name not in r2.stdout
    _drop_console_log(name)


def test_uptime_counts_from_the_start_not_the_last_notify_message(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:
    """A machine's record is rewritten on every sd_notify message (STATUS= from a
    booted systemd comes often); its start time must not move with it."""
    rootfs, fifo = tree
    name = "uptimer"
    r = uspawn.run("boot", "-D", str(rootfs), "-M", name, "--detach", "--lxcfs=no", timeout=90)
    assert r.returncode == 0, r.stderr
    try:
        fifo.wait_boot()
        first = _state_file(uspawn, name)
        assert first["ready"] is True
        supervisor = first["runtime_pid"]
        assert isinstance(supervisor, int)
        r = uspawn.run("exec", name, "--", "env", "NOTIFY_SOCKET=/run/host/notify",
                       "/bin/sd-notify", "STATUS=still here")
        assert r.returncode == 0, r.stderr
        _wait_record(uspawn, name, lambda st: st.get("status_text") == "still here",
                     "the STATUS= message in the record")
        assert _state_file(uspawn, name)["started"] == first["started"]
    finally:
        uspawn.run("stop", name, "--timeout", "3")
    # `stop` returns once the record's lock is gone; the supervisor still removes
    # the directory after that.
    wait_exit([supervisor], what="the supervisor after stop")
    _nothing_left(uspawn, name, rootfs)
    _drop_console_log(name)


def _log_tail(name: str) -> str:
    from uspawn.machine.boot import console_log_path

    try:
        return "console log: " + Path(console_log_path(name)).read_text()[-1500:]
    except OSError as exc:
        return f"no console log: {exc}"


def _drop_console_log(name: str) -> None:
    from uspawn.machine.boot import console_log_path

    for suffix in ("", ".1"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(console_log_path(name) + suffix)


# --- the Debian fixture: systemd's `systemctl reboot` --------------------------------


BOOTED_UNIT = """\
[Unit]
Description=tell the test this boot reached multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo up > /booted'
[Install]
WantedBy=multi-user.target
"""


def test_systemctl_reboot_in_debian(tmp_path: Path, need_root: None) -> None:
    try:
        from fixtures.debian_tree import copy_debian_tree
    except ImportError as exc:
        skip_or_fail(f"fixture module missing: {exc}")
        return
    tree = tmp_path / "deb"
    try:
        copy_debian_tree(tree)
    except Exception as exc:  # debootstrap needs the Debian mirror
        skip_or_fail(f"cannot build the Debian fixture: {exc}")
    (tree / "etc/systemd/system/uspawn-booted.service").write_text(BOOTED_UNIT)
    os.symlink("/etc/systemd/system/uspawn-booted.service",
               tree / "etc/systemd/system/multi-user.target.wants/uspawn-booted.service")
    os.mkfifo(tree / "booted", 0o666)
    os.chmod(tree / "booted", 0o666)
    fifo = BootFifo(tree)
    uspawn = Runner(tmp_path / "state")
    name = "debreboot"
    try:
        r = uspawn.run("boot", "-D", str(tree), "-M", name, "--detach", timeout=150)
        assert r.returncode == 0, r.stderr
        fifo.wait_boot(120)
        before = _record(uspawn, name)
        uspawn.run("exec", name, "--", "systemctl", "reboot", timeout=60)
        wait_exit([int(str(before["pid"]))], timeout=90, what="the first systemd")
        try:
            fifo.wait_boot(120)
        except AssertionError:
            raise AssertionError(_log_tail(name)) from None
        _wait_record(uspawn, name, _ready_again, "the rebooted machine to be ready", 60)
        after = _record(uspawn, name)
        assert after["uuid"] == before["uuid"] and after["uid_base"] == before["uid_base"]
        r = uspawn.run("stop", name, "--timeout", "20", timeout=90)
        assert r.returncode == 0, r.stderr
    finally:
        fifo.close()
        if uspawn.run("status", name).returncode == 0:
            uspawn.run("stop", name, "--timeout", "5", timeout=60)
    _nothing_left(uspawn, name, tree)
    _drop_console_log(name)
    shutil.rmtree(tree, ignore_errors=True)


# --- the supervisor's loop (no kernel involved: a stand-in machine) -----------------


class _RebootingMachine:
    """Stands in for boot.Machine: ready at once, then asks for a reboot."""

    def __init__(self, name: str, boots: list[int]) -> None:
        from types import SimpleNamespace

        self.name, self.uuid = name, "u"
        self.la = SimpleNamespace(userns=False)
        self.console_log: str | None = None
        self.console_sink = None
        self.restarts = 0
        self.on_ready = None
        self.container = None  # no engine: no guardian to reap
        self.boots = boots

    def run_foreground(self, out_fd: int, interactive: bool) -> int:
        self.boots.append(self.restarts)
        if self.on_ready is not None:
            self.on_ready()
        return EXIT_REBOOT if len(self.boots) < 20 else 0  # bounded without a limit


def test_supervisor_stops_a_reboot_loop(need_root: None) -> None:
    """A machine that reboots more than 5 times in 10 s is not booted again
    (systemd's default start limit), and says so in its console log."""
    from types import SimpleNamespace

    from uspawn.machine import boot

    name = f"rebootloop{os.getpid()}"
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # _supervise takes over fds 0-2, as in the detached supervisor
        boots: list[int] = []
        try:
            os.close(rfd)
            boot._supervise(wfd, print, lambda: _RebootingMachine(name, boots),  # type: ignore
                            ns=SimpleNamespace(network="private"))
            os.write(2, f"boots {boots}\n".encode())
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        with os.fdopen(rfd, "rb") as r:
            first = r.readline()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert first == f"ready {name}\n".encode()  # only the first boot reports
        log = Path(boot.console_log_path(name)).read_text()
        assert "boots [0, 1, 2, 3, 4, 5]" in log  # 1 boot + 5 restarts, counted
        assert f"machine {name} rebooted 6 times in 10s: not booting it again" in log
    finally:
        for suffix in ("", ".1"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(boot.console_log_path(name) + suffix)
