"""Shared fixtures: the busybox rootfs with the probe, and a runner for the CLI.

Kernel-tier and end-to-end tests need root. Locally they skip without it;
CI sets USPAWN_MUST_WORK=1, which turns every skip into a failure
(bubblewrap's BWRAP_MUST_WORK).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from uspawn.tree.busybox import build_busybox_rootfs

if TYPE_CHECKING:
    from test_oci import Oci

REPO = Path(__file__).resolve().parent.parent
PROBE_SRC = REPO / "tests" / "probe" / "probe.c"
MUST_WORK = os.environ.get("USPAWN_MUST_WORK") == "1"


def skip_or_fail(reason: str) -> None:
    if MUST_WORK:
        pytest.fail(f"USPAWN_MUST_WORK=1 but: {reason}")
    pytest.skip(reason)


HOST_NODES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")


def _node_owners() -> list[tuple[str, int, int, int]]:
    out = []
    for p in HOST_NODES:
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((p, st.st_uid, st.st_gid, st.st_mode))
    return out


@pytest.fixture(autouse=True)
def host_device_nodes_untouched() -> Iterator[None]:
    """No test may change the host's device nodes (owner, group or mode)."""
    before = _node_owners()
    yield
    assert _node_owners() == before, "a host device node was changed"


@pytest.fixture(scope="session")
def need_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root")


def build_probe(dest: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        skip_or_fail("no C compiler for the probe binary (apt-get install gcc libc6-dev)")
        return
    subprocess.run([cc, "-static", "-O2", "-o", str(dest), str(PROBE_SRC)], check=True)


@pytest.fixture(scope="session")
def rootfs_template(tmp_path_factory: pytest.TempPathFactory, need_root: None) -> Path:
    root = tmp_path_factory.mktemp("template") / "busybox"
    try:
        build_busybox_rootfs(str(root))
    except Exception as exc:
        skip_or_fail(f"cannot build busybox rootfs: {exc}")
    build_probe(root / "bin" / "probe")
    return root


@pytest.fixture
def rootfs(rootfs_template: Path, tmp_path: Path) -> Path:
    """A fresh copy per test (tests may chown or write into it)."""
    dest = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", str(rootfs_template), str(dest)], check=True)
    return dest


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


def uspawn_cmd() -> list[str]:
    exe = os.environ.get("USPAWN")
    if exe:
        return exe.split()
    return [sys.executable, "-m", "uspawn"]


class Runner:
    def __init__(self, state: Path) -> None:
        self.state = state

    def argv(self, *args: str) -> list[str]:
        return [*uspawn_cmd(), "--root", str(self.state), *args]

    def run(self, *args: str, timeout: float = 60, input: str | None = None,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, input=input)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), text=True, **kw)


@pytest.fixture
def uspawn(state_dir: Path, need_root: None) -> Iterator[Runner]:
    yield Runner(state_dir)


@pytest.fixture
def oci(tmp_path: Path, need_root: None) -> Iterator[Oci]:
    """uspawn-runc with a state root of the test's own; what it left is deleted."""
    from test_oci import Oci

    o = Oci(tmp_path / "oci-state")
    yield o
    for line in o("list", "-q", check=False).stdout.split():
        o("delete", "--force", line, check=False)


def host_mount_count() -> int:
    with open("/proc/self/mountinfo") as f:
        return sum(1 for _ in f)


def drain_pty(fd: int, pid: int, timeout: float = 30) -> tuple[str, int]:
    """Read a pty master until the child closes it (bounded); reap the child.

    Returns (output with \r removed, exit code)."""
    import select
    import time

    out = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break  # the bound: the caller's assertions on the output say what is missing
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the slave side is closed
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return out.decode(errors="replace").replace("\r", ""), os.waitstatus_to_exitcode(status)


def mounts_under(path: object) -> list[str]:
    """Host mount points at or below path (leak check that ignores unrelated mounts)."""
    prefix = str(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def processes_in_cgroups(match: Callable[[str], bool]) -> list[int]:
    """Host pids with a cgroup path (any hierarchy, as /proc/PID/cgroup shows it)
    that match says yes to."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cgroup") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        if any(match(line.split(":", 2)[2]) for line in lines if line.count(":") >= 2):
            found.append(int(entry))
    return found


def processes_in_cgroup_named(name: str) -> list[int]:
    """Host pids whose cgroup (any hierarchy) is NAME or below it."""
    return processes_in_cgroups(lambda path: path.endswith(f"/{name}") or f"/{name}/" in path)


def cgroup_dirs(name: str) -> list[str]:
    found = []
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory",
                 "/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu"):
        d = os.path.join(base, "uspawn", name)
        if os.path.isdir(d):
            found.append(d)
    return found
