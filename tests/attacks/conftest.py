"""Shared pieces of the attack suite: the attack probe, host guards and bounded runs.

Every attack test builds a hostile tree, config or payload, runs `uspawn` with a
bounded timeout, and then proves two things:

- the host kept its state (HostGuard): a marker directory *outside* the rootfs
  (content, mode, owner, mtime), a few host files, sysctls and sysfs values, the
  host's mount table (/proc/self/mountinfo compared entry by entry, not only by
  line count; mounts that other users of a shared machine make meanwhile under
  someone else's /tmp/... or /run/netns are ignored), and no state directory,
  lease or cgroup left behind;
- an error, if any, is one clear line (`uspawn: ...`) and never a traceback.

The fixtures of tests/conftest.py (`rootfs`, `uspawn`, `need_root`, ...) apply here
too. This directory is a package so that this module is `attacks.conftest` and does
not shadow tests/conftest.py, which other test modules import as `conftest`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, skip_or_fail

HERE = Path(__file__).resolve().parent
ATTACKPROBE_SRC = HERE / "attackprobe.c"
SECRET = "host secret: must never be seen or changed by a container\n"
TIMEOUT = 30  # seconds, for every uspawn invocation of this suite

# Host files a hostile tree may point symlinks at, and host sysctls a hostile
# payload may try to write. Compared before/after; put back if an attack changed them.
HOST_FILES = ("/etc/hostname", "/etc/resolv.conf", "/etc/passwd", "/etc/hosts")
HOST_SYSCTLS = ("kernel/hostname", "kernel/domainname", "kernel/core_pattern", "kernel/sysrq",
                "net/ipv4/ip_forward", "net/ipv4/ping_group_range")
HOST_SYSFS = ("/sys/kernel/rcu_expedited", "/sys/module/printk/parameters/ignore_loglevel",
              "/sys/fs/cgroup/systemd/release_agent", "/sys/fs/cgroup/memory/release_agent",
              "/sys/fs/cgroup/systemd/notify_on_release")


@pytest.fixture(scope="session")
def attackprobe(tmp_path_factory: pytest.TempPathFactory, need_root: None) -> Path:
    """tests/attacks/attackprobe.c, compiled static once per session."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        skip_or_fail("no C compiler for the attack probe (apt-get install gcc libc6-dev)")
    out = tmp_path_factory.mktemp("attackprobe") / "attackprobe"
    subprocess.run([str(cc), "-static", "-O2", "-o", str(out), str(ATTACKPROBE_SRC)],
                   check=True, timeout=120)
    return out


@pytest.fixture
def tree(rootfs: Path, attackprobe: Path) -> Path:
    """A fresh busybox tree (with /bin/probe) plus /bin/attackprobe."""
    shutil.copy2(attackprobe, rootfs / "bin" / "attackprobe")
    return rootfs


# --- the host side ---------------------------------------------------------------


def _digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.errno}"


def snapshot_dir(top: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below (and including) top: type, mode, owner, size, mtime, content."""
    out: dict[str, tuple[object, ...]] = {}
    for p in [top, *sorted(top.rglob("*"))]:
        st = p.lstat()
        content: object = None
        if stat.S_ISREG(st.st_mode):
            content = _digest(p)
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(p)
        out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                        st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, content)
    return out


def _file_state(path: str) -> tuple[object, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_uid, st.st_mode, _digest(Path(path)))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def remove_deep(path: Path) -> None:
    """Remove a deeply nested test tree now: pytest's own cleanup of old tmp dirs
    (shutil.rmtree, one Python frame per level) dies of RecursionError on it."""
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], timeout=60, check=False)


def host_mounts() -> Counter[tuple[str, str, str, str]]:
    """The host's mount table as a multiset of (mount point, root, fstype, source)."""
    out: Counter[tuple[str, str, str, str]] = Counter()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out[(fields[4], fields[3], fields[sep + 1], fields[sep + 2])] += 1
    return out


def mounts_mentioning(*paths: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.strip() for ln in f if any(str(p) in ln for p in paths)]


class HostGuard:
    """What a container must never change on the host, captured before the attack.

    `marker` is a directory outside the rootfs, next to it in the test's tmp_path,
    holding a secret file; hostile trees point symlinks at it.
    """

    def __init__(self, tmp_path: Path, runner: Runner) -> None:
        self.runner = runner
        self.marker = tmp_path / "host-marker"
        self.marker.mkdir()
        (self.marker / "secret.txt").write_text(SECRET)
        (self.marker / "sub").mkdir()
        (self.marker / "sub" / "inner.txt").write_text("inner\n")
        # A fixed, old mtime: any write into the directory would move it.
        for p in (self.marker / "sub" / "inner.txt", self.marker / "sub",
                  self.marker / "secret.txt", self.marker):
            os.utime(p, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
        self.tmp_path = tmp_path
        self.before_marker = snapshot_dir(self.marker)
        self.before_files = {p: _file_state(p) for p in HOST_FILES}
        self.before_sysctl = {k: _read(f"/proc/sys/{k}") for k in HOST_SYSCTLS}
        self.before_sysfs = {p: _read(p) for p in HOST_SYSFS}
        self.before_mounts = host_mounts()
        self.names: list[str] = []  # container names used, to check their cgroups

    def machine(self) -> str:
        """A fresh container name. Names are claimed per state directory but cgroups
        (uspawn/<name>) are host-wide: other suites running at the same time with the
        default name (the tree's directory name, "rootfs") would collide."""
        name = f"atk-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        return name

    @property
    def secret(self) -> Path:
        return self.marker / "secret.txt"

    def relative_from(self, rootfs: Path, link_dir: str) -> str:
        """The `../..` symlink target that leads from rootfs/link_dir to the marker
        when resolved on the host (just out of the tree and back in to the marker)."""
        return os.path.relpath(self.marker, rootfs / link_dir.strip("/"))

    def deep_relative(self) -> str:
        """`../` far past any root, then the marker's absolute path."""
        return "../" * 40 + str(self.marker).lstrip("/")

    def assert_untouched(self, names: tuple[str, ...] = ()) -> None:
        assert snapshot_dir(self.marker) == self.before_marker, "host marker directory changed"
        assert {p: _file_state(p) for p in HOST_FILES} == self.before_files
        assert {k: _read(f"/proc/sys/{k}") for k in HOST_SYSCTLS} == self.before_sysctl
        assert {p: _read(p) for p in HOST_SYSFS} == self.before_sysfs
        assert mounts_mentioning(self.tmp_path) == [], "a mount under the test dir is left"
        now = host_mounts()
        changed = [m for m in (now - self.before_mounts) + (self.before_mounts - now)
                   if not self._foreign(m[0])]
        assert changed == [], f"the host mount table changed: {changed}"
        for sub in ("containers", "ranges"):
            d = self.runner.state / sub
            assert not d.exists() or list(d.iterdir()) == [], f"state/{sub} left behind"
        for name in (*self.names, *names):
            assert cgroup_dirs(name) == [], f"cgroup of {name} left behind"

    def _foreign(self, mount_point: str) -> bool:
        """Mounts other users of this machine make and drop meanwhile (their podman
        storage under /tmp, network namespaces): not ours, never a container's doing.
        Everything else counts, the test's own directory included."""
        if mount_point.startswith(str(self.tmp_path)):
            return False
        return mount_point.startswith(("/tmp/", "/run/netns/", "/run/user/",
                                       "/var/lib/containers/", "/run/containers/"))

    def restore(self) -> None:
        """Put back host sysctl/sysfs values an attack managed to change (the test
        has failed by then; this only keeps the host usable for the next one)."""
        for path, value in [*((f"/proc/sys/{k}", v) for k, v in self.before_sysctl.items()),
                            *self.before_sysfs.items()]:
            if value is not None and _read(path) != value:
                try:
                    with open(path, "w") as f:
                        f.write(value)
                except OSError:
                    pass


@pytest.fixture
def host(tmp_path: Path, uspawn: Runner) -> Iterator[HostGuard]:
    guard = HostGuard(tmp_path, uspawn)
    try:
        yield guard
    finally:
        guard.restore()


# --- running attacks ---------------------------------------------------------------


def assert_no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr


def assert_clean_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """uspawn refused: a non-zero uspawn exit code and exactly one `uspawn: ` line."""
    assert_no_traceback(r)
    assert r.returncode in (2, 125, 126, 127), (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uspawn: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


class Attacker:
    """Runs `uspawn run -D TREE -M NAME [extra] -- CMD`, stdio on pipes, with a timeout."""

    def __init__(self, runner: Runner, tree: Path, host: HostGuard) -> None:
        self.runner = runner
        self.tree = tree
        self.host = host

    def run(self, *cmd: str, extra: tuple[str, ...] = (), tree: Path | str | None = None,
            timeout: float = TIMEOUT, input: str = "") -> subprocess.CompletedProcess[str]:
        r = self.runner.run("run", "-D", str(tree or self.tree), "-M", self.host.machine(),
                            *extra, "--", *cmd, timeout=timeout, input=input)
        assert_no_traceback(r)
        return r

    def ok(self, *cmd: str, **kw: object) -> str:
        r = self.run(*cmd, **kw)  # type: ignore[arg-type]
        assert r.returncode == 0, f"rc={r.returncode} stdout={r.stdout!r} stderr={r.stderr!r}"
        return r.stdout

    def sh(self, script: str, **kw: object) -> str:
        return self.ok("sh", "-c", script, **kw)

    def script(self, text: str, *args: str, **kw: object) -> str:
        """Ship a shell script in the tree (/attack.sh) and run it: no quoting games."""
        path = self.tree / "attack.sh"
        path.write_text(text)
        path.chmod(0o755)
        return self.ok("sh", "/attack.sh", *args, **kw)


@pytest.fixture
def attack(uspawn: Runner, tree: Path, host: HostGuard) -> Attacker:
    return Attacker(uspawn, tree, host)


def results(out: str) -> dict[str, str]:
    """`key: value` lines of a payload's output -> dict (the payload's report).
    USPAWN_ATTACK_DEBUG=1 prints each report (run pytest with -s)."""
    if os.environ.get("USPAWN_ATTACK_DEBUG") == "1":
        print(f"--- payload report ---\n{out}")
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            found[key] = value.strip()
    return found


REFUSED = {"EPERM", "EACCES", "EROFS", "ENOENT", "ESRCH", "EINVAL", "ENODEV", "ENOTDIR",
           "ENOSYS", "ENXIO", "ELOOP", "EBADF", "ENOTBLK", "EOPNOTSUPP"}
