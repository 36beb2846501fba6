"""podman's default bridge network with a published port, on the runtime under test.

`podman run -d --network bridge -p 127.0.0.1:PORT:80` (issue 13): podman makes the
network namespace and netavark (Debian 12's podman 4.3) the bridge podman0, a veth and
iptables DNAT rules; the runtime only joins the namespace podman names in config.json.
busybox httpd in the container serves a file that the host fetches through the
published port. After `stop` and `rm`: no container (podman's or the runtime's), no
cgroup, no network namespace, no port rule.

The session's containers.conf says `netns = "none"`; this module alone asks for the
bridge, and puts back what podman and netavark change on the host and leave behind when
the last container goes: netavark's iptables chains, the podman0 bridge,
net.ipv4.ip_forward, the IPAM database, podman's /run/netns bind mount.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail
from waits import wait_until

from .podman_env import IMAGE, PodmanEnv
from .test_podman import calls_of, cid_of, inspect, one_call, runtime_list, wait_deleted

BRIDGE = "podman0"  # netavark's bridge for podman's default network
FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TABLES = ("nat", "filter")
NETNS_DIR = Path("/run/netns")
IPAM_DB = Path("/run/containers/networks/ipam.db")  # netavark's, outside podman's runroot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _iptables_save(table: str) -> list[str]:
    r = subprocess.run(["iptables-save", "-t", table], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if ln.startswith((":", "-A "))]


def _netavark_rules() -> list[str]:
    return [f"{t} {ln}" for t in TABLES for ln in _iptables_save(t) if "NETAVARK" in ln]


def _remove_netavark_rules() -> None:
    """Delete netavark's jumps from the built-in chains, then its own chains."""
    for table in TABLES:
        lines = _iptables_save(table)
        chains = [ln[1:].split()[0] for ln in lines if ln.startswith(":NETAVARK")]
        for ln in lines:
            chain = ln.split()[1] if ln.startswith("-A ") else ""
            if chain and not chain.startswith("NETAVARK") and "NETAVARK" in ln:
                subprocess.run(["iptables", "-t", table, "-D", *shlex.split(ln)[1:]],
                               capture_output=True, timeout=30)
        for flag in ("-F", "-X"):
            for chain in chains:
                subprocess.run(["iptables", "-t", table, flag, chain], capture_output=True,
                               timeout=30)


def _link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _is_mount_point(path: Path) -> bool:
    """From mountinfo: a bind of a directory onto itself keeps st_dev (is_mount misses it)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _cgroups_of(cid: str) -> list[str]:
    """Directories named after the container in any cgroup hierarchy (podman's
    cgroupfs manager: libpod_parent/libpod-CID)."""
    found = []
    for top in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        for ctl in [top, *(os.path.join(top, d) for d in os.listdir(top))]:
            parent = os.path.join(ctl, "libpod_parent")
            if os.path.isdir(parent):
                found += [os.path.join(parent, d) for d in os.listdir(parent) if cid in d]
    return found


@pytest.fixture
def host_network() -> Iterator[None]:
    """Needs iptables (netavark 1.4 programs the port with it); restores the host."""
    if shutil.which("iptables") is None or shutil.which("iptables-save") is None:
        skip_or_fail("iptables missing: netavark publishes ports with it "
                     "(apt-get install iptables; scripts/setup.sh installs it)")
    if _link_exists(BRIDGE) or _netavark_rules():
        skip_or_fail(f"{BRIDGE} or netavark's iptables chains exist already: "
                     "another podman uses the bridge network on this host")
    forward = FORWARD.read_text()
    had_netns_dir, had_ipam = NETNS_DIR.exists(), IPAM_DB.exists()
    try:
        yield
    finally:
        _remove_netavark_rules()
        if _link_exists(BRIDGE):
            subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, timeout=30)
        FORWARD.write_text(forward)
        if not had_ipam:
            IPAM_DB.unlink(missing_ok=True)
        if not had_netns_dir and NETNS_DIR.is_dir() and not _netns():
            # podman made /run/netns a shared bind mount of itself, as `ip netns` does.
            while _is_mount_point(NETNS_DIR):
                subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, timeout=30,
                               check=True)
            NETNS_DIR.rmdir()


SERVE = ("mkdir -p /www && echo bridge-ok > /www/index.html && "
         # Without -f, busybox httpd listens before it daemonizes: "up" means it answers.
         "httpd -p 80 -h /www && echo up; exec sleep 1000")


def test_bridge_network_published_port(penv: PodmanEnv, host_network: None) -> None:
    port = _free_port()
    netns_before = _netns()
    since = penv.call_count()
    res = penv.ok("run", "-d", "--network", "bridge", "-p", f"127.0.0.1:{port}:80",
                  "--name", "uspawn-t-bridge", IMAGE, "sh", "-c", SERVE, timeout=120)
    cid = cid_of(res)
    try:
        # podman made the namespace; the runtime was told to join it, not make one.
        config = one_call(res, "create").record["config"]
        [netns] = [ns for ns in config["linux"]["namespaces"] if ns["type"] == "network"]
        assert netns.get("path", "").startswith("/run/netns/"), config["linux"]["namespaces"]
        assert calls_of(res, "start"), res.explain()
        log = Path(inspect(penv, cid, "{{.HostConfig.LogConfig.Path}}"))
        wait_until(lambda: b" up\n" in log.read_bytes() if log.exists() else False,
                   [log.parent], "httpd up in the container's log",
                   mask=0x02 | 0x08 | 0x80 | 0x100)  # modify, close-write, moved, create
        assert _link_exists(BRIDGE) and _netavark_rules(), "netavark set nothing up"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert r.read() == b"bridge-ok\n"
        pid = int(inspect(penv, cid, "{{.State.Pid}}"))
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert _cgroups_of(cid), "the container's cgroup should exist while it runs"
    finally:
        stop = penv.podman("stop", "-t", "0", cid, timeout=60)
        rm = penv.podman("rm", "-f", cid, timeout=60)
    assert stop.returncode == 0, stop.explain()
    assert rm.returncode == 0, rm.explain()
    assert penv.podman("container", "exists", cid).returncode == 1
    wait_deleted(penv, cid, since)
    assert cid not in runtime_list(penv)
    assert _cgroups_of(cid) == []
    assert _netns() == netns_before, "podman's network namespace is left"
    assert not [r for r in _netavark_rules() if str(port) in r], _netavark_rules()
    with pytest.raises(OSError):  # nobody answers on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
