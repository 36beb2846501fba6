"""What a hostile machine can make the host show or store: notify STATUS=, console
logs, and the container's own tmpfs mounts.

- `uspawn status`/`list` print text the machine sent over sd_notify (STATUS=) and
  values from the state directory: terminal escapes (OSC title, clear screen,
  C1 CSI, bidi overrides) must arrive as visible text, lengths capped.
- A detached machine's console log is capped (NAME.console.log + one rotated
  .1); a payload writing 50 MiB leaves at most twice the cap on the host disk.
- /tmp and /run are tmpfs bounded like systemd-nspawn's (10% and 20% of RAM,
  400k and 800k inodes); `--tmpfs PATH:OPTS` replaces a default.

The payloads are a shell /sbin/init in the busybox tree plus a tiny static
sd_notify sender compiled here (tests/attacks/attackprobe.c has none).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import Runner, drain_pty, skip_or_fail
from waits import wait_until

from .conftest import TIMEOUT, assert_clean_error

if TYPE_CHECKING:
    from .conftest import Attacker, HostGuard

LOG_DIR = Path("/var/log/uspawn")

NOTIFY_C = r"""
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
/* notify MESSAGE: one sd_notify datagram to $NOTIFY_SOCKET */
int main(int argc, char **argv) {
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || argc < 2) return 2;
    int s = socket(AF_UNIX, SOCK_DGRAM, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strncpy(a.sun_path, path, sizeof a.sun_path - 1);
    size_t n = strlen(argv[1]);
    return sendto(s, argv[1], n, 0, (struct sockaddr *)&a, sizeof a) == (long)n ? 0 : 1;
}
"""

# OSC 0 (window title) + BEL, clear screen, cursor home, red, C1 CSI (U+009B in
# UTF-8), a right-to-left override (U+202E in UTF-8), a carriage return.
HOSTILE = r"\033]0;pwned\007\033[2J\033[H\033[31mred\302\2332J\342\200\256evil\rforged"
RAW_BAD = ("\x1b", "\x07", "\x9b", "\u202e", "\r")


@pytest.fixture(scope="session")
def notify_bin(tmp_path_factory: pytest.TempPathFactory, need_root: None) -> Path:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        skip_or_fail("no C compiler for the notify payload (apt-get install gcc libc6-dev)")
    d = tmp_path_factory.mktemp("notify")
    (d / "notify.c").write_text(NOTIFY_C)
    subprocess.run([str(cc), "-static", "-O2", "-o", str(d / "notify"), str(d / "notify.c")],
                   check=True, timeout=120)
    return d / "notify"


def _install_init(tree: Path, notify_bin: Path, script: str) -> None:
    shutil.copy2(notify_bin, tree / "bin" / "notify")
    init = tree / "sbin" / "init"
    if init.is_symlink() or init.exists():
        init.unlink()  # a symlink to busybox: never write through it
    init.write_text("#!/bin/sh\n" + script)
    init.chmod(0o755)


class Machine:
    """One detached `uspawn boot` of the tree; stopped and its logs removed after."""

    def __init__(self, runner: Runner, tree: Path, name: str) -> None:
        self.runner, self.tree, self.name = runner, tree, name

    def boot(self, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.runner.run("boot", "-D", str(self.tree), "-M", self.name, "--detach",
                               "--ready-timeout", "90", *extra, timeout=timeout)

    def stop(self) -> None:
        self.runner.run("stop", self.name, "--timeout", "2", timeout=60)

    @property
    def log(self) -> Path:
        return LOG_DIR / f"{self.name}.console.log"

    def remove_logs(self) -> None:
        for p in (self.log, Path(f"{self.log}.1")):
            p.unlink(missing_ok=True)


@pytest.fixture
def machine(uspawn: Runner, tree: Path, host: HostGuard) -> Iterator[Machine]:
    m = Machine(uspawn, tree, host.machine())
    try:
        yield m
    finally:
        m.stop()
        m.remove_logs()


def _assert_no_raw_controls(text: str) -> None:
    for bad in RAW_BAD:
        assert bad not in text, (bad, text)


def test_notify_status_escapes_are_shown_as_text(machine: Machine, notify_bin: Path,
                                                 host: HostGuard, tmp_path: Path) -> None:
    """STATUS= with OSC/CSI/C1/bidi/CR from the machine's pid 1: `status`, `list`,
    `list --json` and `logs` on a terminal never emit them raw; lengths capped."""
    long_status = "A" * 5000
    _install_init(machine.tree, notify_bin, f"""
printf '{HOSTILE}\\033[32mgreen\\033[0m\\n'
/bin/notify "STATUS=$(printf '{HOSTILE}')"
/bin/notify READY=1
exec sleep 600
""")
    # The tree's directory name is shown by `list` and `status` too.
    hostile_dir = tmp_path / "tree\x1b]0;dir\x07\u202e"
    machine.tree.rename(hostile_dir)
    machine.tree = hostile_dir
    r = machine.boot()
    assert r.returncode == 0, r.stderr
    _assert_no_raw_controls(r.stdout + r.stderr)
    # STATUS= came before READY=1 on the one notify socket, whose datagrams the
    # supervisor records in order: ready (boot returned) means recorded.
    status = machine.runner.run("status", machine.name).stdout
    _assert_no_raw_controls(status)
    line = next(ln for ln in status.splitlines() if ln.startswith("Status:"))
    assert "\\x1b]0;pwned\\x07" in line and "\\x9b2J" in line and "\\u{202e}evil" in line
    assert "\\x0dforged" in line
    root_line = next(ln for ln in status.splitlines() if ln.startswith("Root:"))
    assert "\\x1b]0;dir\\x07\\u{202e}" in root_line
    listing = machine.runner.run("list").stdout
    _assert_no_raw_controls(listing)
    assert "\\x1b]0;dir" in listing
    rows = json.loads(machine.runner.run("list", "--json").stdout)
    row = next(x for x in rows if x["name"] == machine.name)
    assert row["status_text"] and len(row["status_text"]) <= 256
    _assert_no_raw_controls(row["status_text"])  # stored escaped in the state file
    # A flood of a status: capped.
    r = machine.runner.run("exec", "-E", "NOTIFY_SOCKET=/run/host/notify", machine.name, "--",
                           "/bin/notify", f"STATUS={long_status}", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    # The supervisor records it in state.json (renamed into place): wait for that.
    wait_until(lambda: "AAAA" in (machine.runner.state / "containers" / machine.name /
                                  "state.json").read_text(),
               [machine.runner.state / "containers" / machine.name], "the long STATUS=")
    status = machine.runner.run("status", machine.name).stdout
    line = next(ln for ln in status.splitlines() if ln.startswith("Status:"))
    assert "AAAA" in line and len(line) <= len("Status:      ") + 256
    # `uspawn logs` on a terminal: colours stay, everything else is escaped.
    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execvp(machine.runner.argv()[0], machine.runner.argv("logs", machine.name))
        finally:
            os._exit(127)
    text, code = drain_pty(fd, pid)
    assert code == 0, text
    assert "\\x1b]0;pwned\\x07" in text and "\x1b[32mgreen\x1b[0m" in text
    assert "\x1b]" not in text and "\x1b[2J" not in text and "\x9b" not in text
    # Into a pipe, `logs` copies the recording as it is (for tools).
    raw = subprocess.run(machine.runner.argv("logs", machine.name), capture_output=True,
                         timeout=TIMEOUT).stdout
    assert b"\x1b]0;pwned\x07" in raw
    machine.stop()
    host.assert_untouched()


def test_console_log_is_capped_and_rotated(machine: Machine, notify_bin: Path,
                                           host: HostGuard) -> None:
    """A machine writing 50 MiB to its console leaves NAME.console.log <= cap and
    one rotated NAME.console.log.1 <= cap; `logs` shows .1 first, then the rest."""
    cap = 1 << 20
    _install_init(machine.tree, notify_bin, """
i=0
while [ $i -lt 50 ]; do
  head -c 1048576 /dev/zero | tr '\\000' "$(printf "\\\\$(printf %o $((97 + i % 26)))")"
  i=$((i + 1))
done
echo; echo flood-done
/bin/notify READY=1
exec sleep 600
""")
    t0 = time.monotonic()
    r = machine.boot("--console-log-size", "1M", timeout=150)
    assert r.returncode == 0, r.stderr
    elapsed = time.monotonic() - t0
    rotated = Path(f"{machine.log}.1")
    assert machine.log.stat().st_size <= cap
    assert rotated.exists() and rotated.stat().st_size <= cap
    assert machine.log.stat().st_mode & 0o777 == 0o640
    out = subprocess.run(machine.runner.argv("logs", machine.name), capture_output=True,
                         timeout=TIMEOUT).stdout
    assert out.endswith(b"flood-done\r\n"), (out[-200:], elapsed)
    assert out.startswith(rotated.read_bytes()[:4096])  # the rotated part first
    assert len(out) <= 2 * cap
    machine.stop()
    host.assert_untouched()


def test_console_log_size_is_validated(uspawn: Runner, tree: Path, host: HostGuard) -> None:
    for value, needle in (("lots", "not a size"), ("1", "out of range"), ("-5M", "not a size")):
        r = uspawn.run("boot", "-D", str(tree), "-M", host.machine(), "--detach",
                       "--console-log-size", value)
        assert_clean_error(r, "--console-log-size", needle)
    r = uspawn.run("boot", "-D", str(tree), "-M", host.machine(), "--console-log-size", "8M")
    assert_clean_error(r, "--console-log-size needs --detach")
    host.assert_untouched()


def _mem_total_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    raise AssertionError("no MemTotal")


def _df(out: str) -> dict[str, tuple[int, int]]:
    """`df -k` / `df -i` lines -> {mount point: (total, used)}."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1].isdigit():
            found[parts[5]] = (int(parts[1]), int(parts[2]))
    return found


def test_tmp_and_run_are_bounded(attack: Attacker, host: HostGuard) -> None:
    """/tmp 10% of RAM and 400k inodes, /run 20% and 800k, /dev/shm 64 MiB."""
    mem = _mem_total_kib()
    out = attack.sh("df -k /tmp /run /dev/shm; echo ---; df -i /tmp /run")
    blocks, inodes = out.split("---")
    size, ino = _df(blocks), _df(inodes)
    # tmpfs rounds size=N% of RAM to whole pages.
    assert abs(size["/tmp"][0] - mem // 10) <= 8, (size, mem)
    assert abs(size["/run"][0] - mem // 5) <= 8, (size, mem)
    assert size["/dev/shm"][0] <= 65536
    assert ino["/tmp"][0] == 400 * 1024 and ino["/run"][0] == 800 * 1024
    host.assert_untouched()


def test_tmpfs_option_replaces_the_default_and_fills_up(attack: Attacker,
                                                       host: HostGuard) -> None:
    """--tmpfs /tmp:size=1M: a payload filling /tmp gets ENOSPC at 1 MiB; an inode
    flood stops at nr_inodes; another --tmpfs path is bounded by default too."""
    out = attack.sh(
        "df -k /tmp /var/cache | tail -n 2; "
        "head -c 4194304 /dev/zero > /tmp/fill 2>/dev/null; echo fill=$?; "
        "ls -l /tmp/fill | awk '{print \"bytes=\" $5}'; "
        "i=0; while [ $i -lt 300 ]; do touch /run/f$i 2>/dev/null || break; i=$((i+1)); done; "
        "echo files=$i",
        extra=("--tmpfs", "/tmp:size=1M", "--tmpfs", "/run:nr_inodes=100",
               "--tmpfs", "/var/cache"))
    lines = out.splitlines()
    size = _df("\n".join(lines[:2]))
    assert size["/tmp"][0] == 1024
    assert abs(size["/var/cache"][0] - _mem_total_kib() // 10) <= 8
    assert "fill=1" in lines
    assert int(next(x for x in lines if x.startswith("bytes="))[6:]) <= 1 << 20
    files = int(next(x for x in lines if x.startswith("files="))[6:])
    assert files < 100
    host.assert_untouched()


@pytest.mark.parametrize(("value", "needle"), [
    ("/dev", "API filesystem"), ("/proc", "API filesystem"), ("relative", "absolute"),
    ("/x:bind", "unknown option"), ("/x:rbind,size=1M", "unknown option"),
])
def test_tmpfs_option_refuses_api_paths_and_bind(attack: Attacker, host: HostGuard,
                                                 value: str, needle: str) -> None:
    r = attack.run("true", extra=("--tmpfs", value))
    assert_clean_error(r, "--tmpfs", needle)
    host.assert_untouched()


def test_check_shows_tree_text_escaped(uspawn: Runner, tree: Path) -> None:
    """`uspawn check` quotes the tree (os-release PRETTY_NAME): escaped on output."""
    release = tree / "etc" / "os-release"
    if release.is_symlink():
        release.unlink()
    release.write_text('NAME=x\nPRETTY_NAME="Evil \x1b]0;pwned\x07\x1b[2J\u202eOS"\n')
    r = uspawn.run("check", str(tree))
    assert "Traceback" not in r.stderr, r.stderr
    _assert_no_raw_controls(r.stdout)
    assert "Evil \\x1b]0;pwned\\x07\\x1b[2J\\u{202e}OS" in r.stdout
    doc = json.loads(uspawn.run("check", "--json", str(tree)).stdout)
    assert any("pwned" in row["meaning"] for row in doc["checks"])  # JSON escapes itself
