"""Hostile or careless configuration: the `uspawn run` command line as another tool
may generate it (names, ranges, the shared host network).

config.json (uspawn-runc) is not attacked here yet: see docs/SECURITY.md, "Pending".
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import Runner, cgroup_dirs

from .conftest import REFUSED, TIMEOUT, assert_clean_error, results

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
                     "cat /proc/self/uid_map; sleep 1.5", stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert a.stdout is not None
        map_a = a.stdout.readline()  # A runs (its ID map is written) before B starts
        b = other.run("run", "-D", str(tree), "-M", host.machine(), "--",
                      "cat", "/proc/self/uid_map", timeout=TIMEOUT, input="")
        _, err_a = a.communicate(timeout=TIMEOUT)
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
