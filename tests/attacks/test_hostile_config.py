"""Hostile or careless configuration: the `uspawn run` command line as another tool
may generate it (names, ranges, the shared host network), and a bundle's config.json
for `uspawn-runc` (cgroupsPath, ID mappings, device numbers, namespace paths, and
the `spec` template itself).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import select
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import Runner, cgroup_dirs

from .conftest import REFUSED, TIMEOUT, assert_clean_error, assert_no_traceback, results

if TYPE_CHECKING:
    from .conftest import Attacker, HostGuard


@pytest.mark.parametrize("args", [
    ("--hostname", "h" * 200),
    ("--user", "65536"),
    ("--user", "root:nogroup-here"),
    ("--private-users", "0:65536"),
    ("--private-users", "1:4294967295"),
    ("--bind", "relative/src:/mnt/x"),
    ("--bind", "/etc:relative/dst"),
    ("--bind", "/etc:/mnt/x:rw,exec"),
    ("--bind", "/etc:/mnt/x:ro:extra"),
    ("--setenv", "NO_EQUALS_SIGN"),
    ("--drop-capability", "CAP_NOPE"),
], ids=lambda a: "=".join(a)[:40])
def test_bad_values_one_line_errors(attack: Attacker, host: HostGuard,
                                    args: tuple[str, ...]) -> None:
    r = attack.run("true", extra=args)
    assert_clean_error(r)
    host.assert_untouched()


@pytest.mark.parametrize("shape", ["dotdot", "slash"])
def test_machine_name_cannot_traverse(host: HostGuard, tmp_path: Path, uspawn: Runner,
                                      tree: Path, shape: str) -> None:
    tag = f"atk-{uuid.uuid4().hex[:8]}"
    target = tmp_path / tag
    name = "../" * 12 + str(target).lstrip("/") if shape == "dotdot" else f"{tag}/x"
    try:
        r = uspawn.run("run", "-D", str(tree), "-M", name, "--", "true", timeout=TIMEOUT,
                       input="")
        assert_clean_error(r, "name")
        assert not target.exists()
        assert cgroup_dirs(tag) == []
        host.assert_untouched()
    finally:
        for d in sorted(cgroup_dirs(tag) + cgroup_dirs(f"{tag}/x"), reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass


def test_state_directories_do_not_share_uid_ranges(uspawn: Runner, tree: Path,
                                                   host: HostGuard, tmp_path: Path) -> None:
    other_state = tmp_path / "state-other"
    other_state.mkdir()
    other = Runner(other_state)
    a = uspawn.popen("run", "-D", str(tree), "-M", host.machine(), "--", "sh", "-c",
                     "cat /proc/self/uid_map; read x || :", stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert a.stdout is not None
        map_a = a.stdout.readline()  # A runs (its ID map is written) before B starts
        b = other.run("run", "-D", str(tree), "-M", host.machine(), "--",
                      "cat", "/proc/self/uid_map", timeout=TIMEOUT, input="")
        _, err_a = a.communicate(timeout=TIMEOUT)  # EOF on A's stdin: A ends after B
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 0 and b.returncode == 0, (err_a, b.stderr)
    base_a, base_b = int(map_a.split()[1]), int(b.stdout.split()[1])
    assert abs(base_a - base_b) >= 65536, f"both containers map root to host uid {base_a}"
    host.assert_untouched()


def test_host_network_is_not_the_hosts_to_change(attack: Attacker, host: HostGuard) -> None:
    """--network=host shares the host's network namespace (owned by the host's user
    namespace): container root may look, not touch. /sys is the host's, bind-mounted
    read-only; remounting it read-write leaves the kernel's ownership checks."""
    before_addrs = Path("/proc/net/if_inet6").read_text()
    rep = results(attack.sh(
        "echo \"w1: $(attackprobe write /proc/sys/net/ipv4/ip_forward 1)\"; "
        "umount /proc/sys; "
        "echo \"w2: $(attackprobe write /proc/sys/net/ipv4/ip_forward 1)\"; "
        "echo \"w3: $(attackprobe write /proc/sys/net/ipv4/ping_group_range '0 1')\"; "
        "mount -o remount,bind,rw /sys 2>/dev/null; "
        "echo \"mtu: $(attackprobe write /sys/class/net/lo/mtu 1280)\"; "
        "echo \"release_agent: $(attackprobe write /sys/fs/cgroup/systemd/release_agent /x)\"; "
        "echo \"rcu: $(attackprobe write /sys/kernel/rcu_expedited 1)\"; "
        "ip link set lo mtu 1280 2>/dev/null; echo \"iplink: $?\"; "
        "ip addr add 10.254.254.254/32 dev lo 2>/dev/null; echo \"ipaddr: $?\"",
        extra=("--network", "host")))
    for k in ("w1", "w2", "w3", "mtu", "rcu"):
        assert rep[k] in REFUSED, (k, rep[k])
    assert rep["release_agent"] in REFUSED
    assert rep["iplink"] != "0" and rep["ipaddr"] != "0"
    assert Path("/proc/net/if_inet6").read_text() == before_addrs
    assert "10.254.254.254" not in subprocess.run(["ip", "-o", "addr"], capture_output=True,
                                                 text=True, timeout=10).stdout
    host.assert_untouched()


# --- config.json for uspawn-runc ----------------------------------------------------------


def _runc_cmd() -> list[str]:
    rt = os.environ.get("USPAWN_OCI_RUNTIME")
    return rt.split() if rt else [sys.executable, "-c",
                                  "from uspawn.oci.cli import entry; entry()"]


class Bundle:
    """A bundle around the attack tree, from the `uspawn-runc spec` template."""

    def __init__(self, tmp_path: Path, tree: Path, host: HostGuard) -> None:
        self.dir = tmp_path / "bundle"
        self.dir.mkdir()
        self.state = tmp_path / "oci-state"
        self.host = host
        spec = subprocess.run([*_runc_cmd(), "spec", "--bundle", str(self.dir)],
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert spec.returncode == 0, spec.stderr
        self.config = json.loads((self.dir / "config.json").read_text())
        self.config["root"] = {"path": str(tree), "readonly": False}
        self.config["process"]["terminal"] = False
        self.config["process"]["args"] = ["true"]

    def run(self, *args: str, timeout: float = TIMEOUT,
            preexec_fn: Callable[[], object] | None = None) -> subprocess.CompletedProcess[str]:
        """`uspawn-runc run` (create, start, wait, delete) of the current config."""
        self.config["process"]["args"] = list(args) or self.config["process"]["args"]
        (self.dir / "config.json").write_text(json.dumps(self.config))
        cid = self.host.machine()
        r = subprocess.run([*_runc_cmd(), "--root", str(self.state), "run", "--bundle",
                            str(self.dir), cid], capture_output=True, text=True, input="",
                           timeout=timeout, preexec_fn=preexec_fn)
        assert_no_traceback(r)
        assert not self.state.exists() or list(self.state.iterdir()) == [], "OCI state left"
        return r


def assert_refused(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """uspawn-runc refused: exit 1 (runc's) and exactly one `uspawn-runc: ` line."""
    assert_no_traceback(r)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uspawn-runc: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def bundle(tmp_path: Path, tree: Path, host: HostGuard) -> Bundle:
    return Bundle(tmp_path, tree, host)


def _cgroup2_root() -> str:
    from uspawn.kernel.cgroups import detect_layout

    _layout, unified = detect_layout()
    return unified or "/sys/fs/cgroup/pids"


@pytest.mark.parametrize("shape", ["slice", "slice-prefix", "slice-name", "plain", "plain-mid"])
def test_cgroups_path_cannot_leave_the_hierarchy(bundle: Bundle, host: HostGuard,
                                                 tmp_path: Path, shape: str) -> None:
    """Before: "../../../../var/tmp/x:rt:x" made host root mkdir and write memory.max,
    pids.max, cpu.max into /var/tmp/x (the slice form was never normalised)."""
    target = tmp_path / "cg-target"
    up = os.path.relpath(target, _cgroup2_root())  # ../../../<tmp_path>/cg-target
    path = {"slice": f"{up}:rt:x", "slice-prefix": f"machine.slice:{up}:x",
            "slice-name": f"machine.slice:rt:{up}", "plain": "/" + up,
            "plain-mid": f"/uspawn/../{up}"}[shape]
    bundle.config["linux"]["cgroupsPath"] = path
    bundle.config["linux"]["resources"] = {"memory": {"limit": 1 << 28}, "pids": {"limit": 64},
                                           "cpu": {"quota": 50000, "period": 100000}}
    r = bundle.run("true")
    assert_refused(r, "linux.cgroupsPath")
    assert not target.exists() and not (tmp_path / "rt-x.scope").exists()
    assert not any(p.name.endswith(".scope") for p in tmp_path.rglob("*"))
    host.assert_untouched()


def test_cgroups_path_leaves_no_directories(bundle: Bundle, host: HostGuard) -> None:
    """A legitimate nested path runs, and the parents it needed are gone afterwards."""
    top = f"atk-{uuid.uuid4().hex[:8]}.slice"
    bundle.config["linux"]["cgroupsPath"] = f"{top}:rt:x"
    try:
        r = bundle.run("true")
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(os.path.join(_cgroup2_root(), top))
    finally:
        for d in (os.path.join(_cgroup2_root(), top, "rt-x.scope"),
                  os.path.join(_cgroup2_root(), top)):
            if os.path.isdir(d):
                os.rmdir(d)
    host.assert_untouched()


@pytest.mark.parametrize(("field", "maps"), [
    ("uidMappings", [{"containerID": 0, "hostID": 0, "size": 65536}]),
    ("uidMappings", [{"containerID": 0, "hostID": 0, "size": 1}]),
    ("gidMappings", [{"containerID": 0, "hostID": 600000, "size": 65536},
                     {"containerID": 65536, "hostID": 0, "size": 1}]),
], ids=["root-range", "root-only", "root-extra-line"])
def test_mapping_host_root_refused(bundle: Bundle, host: HostGuard, tree: Path, field: str,
                                   maps: list[dict[str, int]]) -> None:
    """Before: hostID 0 was accepted and container root was host root (host sysctls
    writable once /proc/sys was unmounted)."""
    bundle.config["linux"][field] = maps
    index = next(i for i, m in enumerate(maps) if m["hostID"] == 0)
    r = bundle.run("sh", "-c", "umount /proc/sys; echo 1 > /proc/sys/kernel/sysrq; "
                   "touch /proof")
    assert_refused(r, f"linux.{field}[{index}].hostID")
    assert not (tree / "proof").exists()
    host.assert_untouched()


@pytest.mark.parametrize(("key", "value"), [
    ("uid", 4294967295), ("gid", -1), ("major", 99999999999), ("major", -1),
    ("minor", 1 << 20), ("fileMode", 0o777777),
])
def test_device_numbers_out_of_range(bundle: Bundle, host: HostGuard, key: str,
                                     value: int) -> None:
    """Before: tracebacks (OverflowError in os.makedev/os.chown)."""
    dev = {"type": "c", "path": "/dev/atk", "major": 1, "minor": 3, "fileMode": 0o666,
           "uid": 0, "gid": 0}
    dev[key] = value
    bundle.config["linux"]["devices"] = [dev]
    r = bundle.run("true")
    assert_refused(r, f"linux.devices[0].{key}", "out of range")
    host.assert_untouched()


_IN_OPEN, _IN_ACCESS, _IN_NONBLOCK = 0x20, 0x01, 0o4000


def _watch_opens(path: Path) -> int:
    """An inotify fd reporting every open/read of path (O_PATH opens do not count)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0
    assert libc.inotify_add_watch(fd, bytes(path), _IN_OPEN | _IN_ACCESS) >= 0
    return int(fd)


def _events(fd: int) -> list[int]:
    masks = []
    while select.select([fd], [], [], 0)[0]:
        buf = os.read(fd, 4096)
        off = 0
        while off < len(buf):
            _wd, mask, _cookie, n = struct.unpack_from("iIII", buf, off)
            masks.append(mask)
            off += 16 + n
    return masks


@pytest.mark.parametrize("kind", ["fifo", "chardev", "regular", "other-type"])
def test_namespace_path_must_be_nsfs(bundle: Bundle, host: HostGuard, tmp_path: Path,
                                     kind: str) -> None:
    """Before: a FIFO as linux.namespaces[].path blocked host root for 120 s; a device
    node there would have been opened by host root. Now: refused at once, never opened."""
    target = tmp_path / f"ns-{kind}"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "chardev":
        os.mknod(target, 0o600 | 0o020000, os.makedev(1, 3))  # a null device, not the host's
    elif kind == "regular":
        target.write_text("not a namespace\n")
    else:
        target = Path("/proc/self/ns/uts")  # a namespace, of the wrong type
    watch = _watch_opens(target) if kind != "other-type" else -1
    nss = bundle.config["linux"]["namespaces"]
    index = next(i for i, n in enumerate(nss) if n["type"] == "network")
    nss[index]["path"] = str(target)
    try:
        t0 = time.monotonic()
        r = bundle.run("true", timeout=20)
        took = time.monotonic() - t0
        line = assert_refused(r, f"linux.namespaces[{index}].path")
        assert took < 10, took
        want = {"fifo": "a FIFO", "chardev": "a character device", "regular": "a regular file",
                "other-type": "a uts namespace, not network"}[kind]
        assert want in line
        if watch >= 0:
            assert _events(watch) == [], "host root opened the namespace path"
    finally:
        if watch >= 0:
            os.close(watch)
    host.assert_untouched()


_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
_SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217}
_KEY_SPEC_USER_KEYRING = -4


@pytest.mark.parametrize("seccomp", [True, False], ids=["template", "template-no-seccomp"])
def test_spec_template_cannot_reach_host_root_keyrings(bundle: Bundle, host: HostGuard,
                                                       seccomp: bool) -> None:
    """Before: the `uspawn-runc spec` template had no user namespace and no seccomp, so
    container root was host root and used host root's user keyring. Now the template
    refuses keyctl & co (seccomp) and, even without its seccomp profile, container
    root is another user: another user keyring, host root's keys not visible."""
    arch = platform.machine()
    if arch not in _SYS_KEYCTL:
        pytest.skip(f"syscall numbers for {arch} not listed")
    libc = ctypes.CDLL(None, use_errno=True)
    desc = f"uspawn-attack-{uuid.uuid4().hex[:8]}"
    host_user_ring = libc.syscall(_SYS_KEYCTL[arch], 0, _KEY_SPEC_USER_KEYRING, 1)
    assert host_user_ring > 0
    key = libc.syscall(_SYS_ADD_KEY[arch], b"user", desc.encode(), b"topsecret", 9,
                       _KEY_SPEC_USER_KEYRING)
    assert key > 0, ctypes.get_errno()
    if not seccomp:
        del bundle.config["linux"]["seccomp"]
    try:
        r = bundle.run("sh", "-c",
                       "echo \"user: $(attackprobe keyctl-user)\"; "
                       "echo \"session: $(attackprobe keyctl-session)\"; "
                       f"echo \"add: $(attackprobe add-key {desc}-2)\"; "
                       f"echo \"request: $(attackprobe request-key {desc})\"; "
                       "umount /proc/keys 2>/dev/null; cat /proc/keys /proc/key-users; "
                       "cat /proc/self/uid_map")
    finally:
        libc.syscall(_SYS_KEYCTL[arch], 9, key, _KEY_SPEC_USER_KEYRING)  # KEYCTL_UNLINK
    assert r.returncode == 0, r.stderr
    rep = results(r.stdout)
    assert desc not in r.stdout and "topsecret" not in r.stdout
    if seccomp:
        for k in ("user", "session", "add", "request"):
            assert rep[k] == "EPERM", (k, rep[k])
    else:
        assert rep["user"].startswith("ok ") and rep["user"] != f"ok {host_user_ring}"
        assert rep["request"] in REFUSED | {"ENOKEY"}, rep["request"]
    assert r.stdout.splitlines()[-1].split()[:2] == ["0", str(0x6FFE0000)]
    host.assert_untouched()
