"""veth/bridge networking and published ports (issue 7), on the real kernel.

Network safety: everything here touches only loopback and objects the tests
create: network namespaces of "container" processes (children that
unshare(CLONE_NEWNET) and serve "hello NAME" on :80), veths named ve-usp*, the
bridge usptestbr0 and rules tagged uspawn:usp* in the nft table `ip uspawn`.
Traffic goes to 127.0.0.1 and to addresses inside those namespaces; every
connect has a timeout. A finalizer removes everything, also after a failure.
"""

from __future__ import annotations

import ipaddress
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import skip_or_fail

from uspawn.base.errors import SpecError, StateError, UsageError
from uspawn.net import links as netsetup
from uspawn.net import pool as netpool

BRIDGE = "usptestbr0"
NAMES = ("usp-web", "usp-b1", "usp-b2", "usp-lone", "usp-kill", "usp-fail", "usp-x")

# A "container": a process in its own network namespace serving "hello NAME" on :80.
SERVE = r"""
import signal, socket, sys, time
from uspawn.kernel import syscalls
syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
userns = syscalls.CLONE_NEWUSER if sys.argv[2] == "userns" else 0
syscalls.unshare(userns | syscalls.CLONE_NEWNET)  # a netns owned by the container's userns
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(8)
s.settimeout(0.2)
print("ready", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        c, _ = s.accept()
    except TimeoutError:
        continue
    c.sendall(b"hello " + sys.argv[1].encode())
    c.close()
"""

CONNECT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
except OSError as e:
    print("ERR", type(e).__name__, e.errno)
    sys.exit()
try:
    print(s.recv(100).decode())
except TimeoutError:
    print("connected")  # a server that does not talk first
"""


def connect(addr: str, port: int, timeout: float = 2.0) -> str:
    try:
        with socket.create_connection((addr, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(100).decode()
    except OSError as e:
        return f"ERR {type(e).__name__} {e.errno}"


def in_netns(pid: int, code: str, *args: str, timeout: float = 15) -> str:
    r = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-c", code,
                        *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def connect_from(pid: int, addr: str, port: int, timeout: float = 2.0) -> str:
    return in_netns(pid, CONNECT, addr, str(port), str(timeout))


def links() -> dict[str, str | None]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return {str(link.get("ifname")): link.get("ifalias") for link in ipr.get_links()}


def tagged_rules(name: str) -> list[dict[str, object]]:
    return [r for r in netsetup.list_rules() if r.get("comment") == f"uspawn:{name}"]


def route_localnet(ifname: str) -> str:
    return Path(f"/proc/sys/net/ipv4/conf/{ifname}/route_localnet").read_text().strip()


def lease_files(net_dir: Path) -> list[str]:
    return sorted(p.name for p in net_dir.rglob("*.lock"))


def free_test_net() -> ipaddress.IPv4Network:
    """A /24 in 10.253.0.0/16 that no host route or address overlaps."""
    host = [n for n, _ in netpool.host_networks()]
    for net in ipaddress.IPv4Network("10.253.0.0/16").subnets(new_prefix=24):
        if not any(n.overlaps(net) for n in host):
            return net
    raise AssertionError("no free /24 for the test bridge")


# --- unit tier (no root) ---


def test_veth_name_fits_and_never_collides_with_a_literal() -> None:
    assert netsetup.veth_name("web") == "ve-web"
    assert netsetup.veth_name("abcdefghijkl") == "ve-abcdefghijkl"  # 15 bytes: literal
    long_a = netsetup.veth_name("a-very-long-container-name")
    long_b = netsetup.veth_name("a-very-long-container-namf")
    assert long_a != long_b and len(long_a) == len(long_b) == 15
    assert long_a.startswith("ve-a-very-l-")
    assert netsetup.veth_name("a-very-long-container-name") == long_a  # deterministic
    # a 12-character name of the shortened shape is shortened too, so no literal
    # name can equal another container's shortened name
    shaped = netsetup.veth_name("abcdefgh-xyz")
    assert shaped != "ve-abcdefgh-xyz" and len(shaped) == 15
    for bad in ("", "a/b", "a b", "a:b", "x" * 65):
        with pytest.raises(SpecError):
            netsetup.veth_name(bad)


def test_parse_port() -> None:
    assert netpool.parse_port("8080:80") == ("tcp", 8080, 80)
    assert netpool.parse_port("udp:5353:53") == ("udp", 5353, 53)
    assert netpool.parse_port("tcp:443") == ("tcp", 443, 443)
    for bad in ("", "80:", "sctp:1:2", "0:80", "1:2:3", "70000:80", "a:b"):
        with pytest.raises(UsageError):
            netpool.parse_port(bad)


def test_pool_leases_distinct_subnets_and_refuses_collisions(tmp_path: Path) -> None:
    pool = netpool.NetPool(str(tmp_path))
    a = pool.allocate("usp-a")
    b = pool.allocate("usp-b")
    assert a.network != b.network and a.network.prefixlen == 30
    assert (a.host_addr, a.cont_addr) == (str(a.network[1]), str(a.network[2]))
    with pytest.raises(StateError, match="already used by container usp-a"):
        pool.allocate("usp-c", subnet=str(a.network))
    with pytest.raises(StateError, match=r"already used by container usp-[ab]"):
        pool.allocate("usp-c", subnet=str(a.network.supernet(new_prefix=29)))
    # the host's own routes are never handed out
    with pytest.raises(StateError, match=r"overlaps the host's route 127\.0\.0\.0/8"):
        pool.allocate("usp-c", subnet="127.0.0.0/30")
    with pytest.raises(StateError, match="no free /30"):
        netpool.NetPool(str(tmp_path), pool="127.0.0.0/29").allocate("usp-c")
    with pytest.raises(SpecError):
        netpool.NetPool(str(tmp_path), pool="10.0.0.0/30", prefixlen=29)
    assert netpool.addresses(str(tmp_path)) == {"usp-a": [f"{a.cont_addr}/30"],
                                                 "usp-b": [f"{b.cont_addr}/30"]}
    a.release()
    again = pool.allocate("usp-c")
    assert again.network == a.network  # released subnets are reused
    again.release()
    b.release()
    assert lease_files(tmp_path) == []


def test_port_reservation_collisions_leave_nothing(tmp_path: Path) -> None:
    pool = netpool.NetPool(str(tmp_path))
    held = pool.reserve_ports("usp-a", [("tcp", 18080, 80), ("udp", 18080, 53)])
    with pytest.raises(StateError, match="port tcp/18080 is already published by container "
                       "usp-a") as exc:
        pool.reserve_ports("usp-b", [("tcp", 18081, 81), ("tcp", 18080, 80)])
    assert exc.value.hint
    # all or nothing: 18081 was not kept
    assert lease_files(tmp_path) == ["tcp-18080.lock", "udp-18080.lock"]
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    busy = listener.getsockname()[1]
    try:
        with pytest.raises(StateError, match=f"port tcp/{busy} is in use on the host"):
            pool.reserve_ports("usp-b", [("tcp", busy, 80)])
    finally:
        listener.close()
    for pl in held:
        pl.release()
    assert lease_files(tmp_path) == []


def test_lease_of_a_killed_owner_is_reclaimed(tmp_path: Path) -> None:
    code = ("import signal, sys; from uspawn.net import pool as netpool;"
            f"p = netpool.NetPool({str(tmp_path)!r});"
            "a = p.allocate('usp-dead', subnet='10.252.254.0/30');"
            "p.reserve_ports('usp-dead', [('tcp', 18089, 80)]);"
            "print('held', flush=True); signal.pause()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        pool = netpool.NetPool(str(tmp_path))
        with pytest.raises(StateError, match="published by container usp-dead"):
            pool.reserve_ports("usp-new", [("tcp", 18089, 80)])
        assert netpool.cleanup_stale(str(tmp_path)) == []  # the owner lives
    finally:
        proc.kill()
        proc.wait()
    removed = netpool.cleanup_stale(str(tmp_path))
    assert sorted(removed) == ["lease 10.252.254.0-30.lock of usp-dead",
                               "lease tcp-18089.lock of usp-dead"]
    assert lease_files(tmp_path) == []


# --- kernel tier (root): real namespaces, veths, a bridge and nft rules ---


class Container:
    def __init__(self, name: str, proc: subprocess.Popen[str]) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid


@pytest.fixture
def net_env(need_root: None) -> Iterator[None]:
    """Root, nft and nsenter; removes every object the test may have made."""
    if shutil.which("nft") is None:
        skip_or_fail("nft (nftables) is not installed")
    if shutil.which("nsenter") is None:
        skip_or_fail("nsenter (util-linux) is not installed")
    try:
        yield
    finally:
        from pyroute2 import IPRoute

        for name in NAMES:
            netsetup.delete_veth(name)
            netsetup.remove_rules(name)
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=BRIDGE):
                ipr.link("del", index=index)
        if not netsetup.list_rules():
            subprocess.run(["nft", "delete", "table", "ip", "uspawn"], capture_output=True,
                           timeout=10, check=False)


@pytest.fixture
def spawn(net_env: None) -> Iterator[Callable[..., Container]]:
    procs: list[subprocess.Popen[str]] = []

    def start(name: str, userns: bool = False) -> Container:
        """A container process; with userns, its netns belongs to a new user
        namespace, as a real container's does."""
        proc = subprocess.Popen([sys.executable, "-c", SERVE, name,
                                 "userns" if userns else "-"], stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return Container(name, proc)

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture
def bridge(net_env: None) -> Iterator[ipaddress.IPv4Interface]:
    from pyroute2 import IPRoute

    net = free_test_net()
    iface = ipaddress.IPv4Interface(f"{net[1]}/{net.prefixlen}")
    with IPRoute() as ipr:
        ipr.link("add", ifname=BRIDGE, kind="bridge")
        index = ipr.link_lookup(ifname=BRIDGE)[0]
        ipr.addr("add", index=index, address=str(iface.ip), prefixlen=net.prefixlen)
        ipr.link("set", index=index, state="up")
    yield iface  # net_env's finalizer deletes it


def test_veth_container_with_published_port(spawn: Callable[..., Container],
                                            tmp_path: Path) -> None:
    web = spawn("usp-web", userns=True)
    pool = netpool.NetPool(str(tmp_path))
    addr = pool.allocate(web.name)
    ports = pool.reserve_ports(web.name, [("tcp", 18080, 80)])
    veth = netsetup.setup_veth(web.pid, web.name, addr.host_addr, addr.cont_addr,
                               addr.prefixlen)
    assert veth.host_ifname == "ve-usp-web"
    assert links()["ve-usp-web"] == "uspawn:usp-web"
    assert veth.addresses == [f"{addr.cont_addr}/30"]
    # the container is reachable at its address, and it reaches the host side
    assert connect(addr.cont_addr, 80) == "hello usp-web"
    routes = in_netns(web.pid, "print(open('/proc/net/route').read())")
    assert "00000000" in routes  # a default route
    rules = netsetup.publish_ports(web.name, addr.cont_addr, [("tcp", 18080, 80)],
                                   veth.host_ifname)
    assert len(tagged_rules(web.name)) == 3  # prerouting, output, postrouting
    assert route_localnet("ve-usp-web") == "1"
    assert connect("127.0.0.1", 18080) == "hello usp-web"
    assert connect(addr.cont_addr, 80) == "hello usp-web"

    rules.teardown()
    rules.teardown()  # idempotent
    assert tagged_rules(web.name) == []
    assert netsetup.list_rules() == []  # the guard went with the last user
    assert connect("127.0.0.1", 18080, timeout=1).startswith("ERR")
    veth.teardown()
    veth.teardown()
    assert "ve-usp-web" not in links()
    for p in ports:
        p.release()
    addr.release()
    assert lease_files(tmp_path) == []


HOST_LOCALHOST_ATTACK = r"""
import subprocess, sys
# As a hostile container root: route 127.0.0.1 to the host over host0.
for cmd in ("sysctl -qw net.ipv4.conf.host0.route_localnet=1 net.ipv4.conf.all.route_localnet=1",
            "ip route flush table local",
            f"ip route add local {sys.argv[1]} dev host0 table local",
            f"ip route add 127.0.0.1/32 via {sys.argv[2]} dev host0"):
    subprocess.run(cmd.split(), check=True)
"""


def test_route_localnet_does_not_expose_host_loopback(spawn: Callable[..., Container],
                                                      tmp_path: Path) -> None:
    """route_localnet=1 on the veth must not let the container reach the host's
    127.0.0.1 services (CVE-2020-8558 in kube-proxy): the guard rule drops them."""
    web = spawn("usp-web")
    pool = netpool.NetPool(str(tmp_path))
    addr = pool.allocate(web.name)
    veth = netsetup.setup_veth(web.pid, web.name, addr.host_addr, addr.cont_addr,
                               addr.prefixlen)
    rules = netsetup.publish_ports(web.name, addr.cont_addr, [("tcp", 18080, 80)])
    assert rules.host_ifname == veth.host_ifname  # found by route lookup
    secret = socket.socket()
    secret.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    secret.bind(("127.0.0.1", 0))
    secret.listen(4)
    port = secret.getsockname()[1]
    try:
        in_netns(web.pid, HOST_LOCALHOST_ATTACK, addr.cont_addr, str(addr.host_addr))
        assert connect_from(web.pid, "127.0.0.1", port, timeout=1) == "ERR TimeoutError None"
        # control: without the guard the same attempt reaches the host's loopback
        guard = [r for r in netsetup.list_rules() if r["chain"] == "localnet_guard"]
        assert len(guard) == 1
        subprocess.run(["nft", "delete", "rule", "ip", "uspawn", "localnet_guard", "handle",
                        str(guard[0]["handle"])], check=True, timeout=10)
        assert connect_from(web.pid, "127.0.0.1", port, timeout=2) == "connected"
    finally:
        secret.close()
        rules.teardown()
        veth.teardown()
        addr.release()


def test_bridge_containers_reach_each_other_and_a_private_one_nothing(
        spawn: Callable[..., Container], bridge: ipaddress.IPv4Interface,
        tmp_path: Path) -> None:
    b1, b2, lone = spawn("usp-b1"), spawn("usp-b2"), spawn("usp-lone")
    pool = netpool.NetPool(str(tmp_path))
    made: list[netsetup.Veth] = []
    leases: list[netpool.AddressLease] = []
    for c in (b1, b2):
        al = pool.allocate_on_bridge(c.name, BRIDGE)
        leases.append(al)
        assert al.host_addr == str(bridge.ip) and al.prefixlen == bridge.network.prefixlen
        assert ipaddress.IPv4Address(al.cont_addr) in bridge.network
        made.append(netsetup.setup_veth(c.pid, c.name, al.host_addr, al.cont_addr,
                                        al.prefixlen, bridge=BRIDGE))
    a1, a2 = leases[0].cont_addr, leases[1].cont_addr
    assert a1 != a2
    # an explicit address already taken by a container is refused
    with pytest.raises(StateError, match="already used by container usp-b1"):
        pool.allocate_on_bridge("usp-x", BRIDGE, address=a1)
    assert connect_from(b1.pid, a2, 80) == "hello usp-b2"
    assert connect_from(b2.pid, a1, 80) == "hello usp-b1"
    assert connect(a1, 80) == "hello usp-b1"  # the host reaches them over the bridge
    # loopback only: no route anywhere, refused at once
    assert connect_from(lone.pid, a1, 80) == "ERR OSError 101"  # ENETUNREACH
    assert connect_from(lone.pid, str(bridge.ip), 80) == "ERR OSError 101"
    # a published port on a bridge sets route_localnet on the bridge, and restores it
    assert route_localnet(BRIDGE) == "0"
    rules = netsetup.publish_ports(b1.name, a1, [("tcp", 18081, 80)])
    assert rules.host_ifname == BRIDGE
    assert route_localnet(BRIDGE) == "1"
    assert connect("127.0.0.1", 18081) == "hello usp-b1"
    rules.teardown()
    assert route_localnet(BRIDGE) == "0"
    assert netsetup.list_rules() == []
    for v in made:
        v.teardown()
    for al in leases:
        al.release()
    assert not any(n.startswith("ve-usp-b") for n in links())
    assert lease_files(tmp_path) == []


def test_setup_failures_leave_nothing(spawn: Callable[..., Container],
                                      monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    c = spawn("usp-fail")
    before = links()
    with pytest.raises(SpecError, match="usptestbr9 does not exist"):
        netsetup.setup_veth(c.pid, c.name, "10.252.255.1", "10.252.255.2", 30,
                            bridge="usptestbr9")
    with pytest.raises(SpecError, match="not a bridge"):
        netsetup.setup_veth(c.pid, c.name, "10.252.255.1", "10.252.255.2", 30, bridge="lo")

    def broken(*args: object) -> None:
        raise OSError(5, "injected")

    monkeypatch.setattr(netsetup, "_setup_container_side", broken)
    with pytest.raises(OSError, match="injected"):
        netsetup.setup_veth(c.pid, c.name, "10.252.255.1", "10.252.255.2", 30)
    assert links() == before  # the half-made veth was deleted
    monkeypatch.undo()
    # a link of that name that is not ours is reported and left alone
    veth = netsetup.setup_veth(c.pid, c.name, "10.252.255.1", "10.252.255.2", 30)
    with pytest.raises(StateError, match="ve-usp-fail already exists"):
        netsetup.setup_veth(c.pid, c.name, "10.252.255.5", "10.252.255.6", 30)
    assert connect("10.252.255.2", 80) == "hello usp-fail"
    # a port already published by another container: clear error, nothing added
    pool = netpool.NetPool(str(tmp_path))
    held = pool.reserve_ports("usp-web", [("tcp", 18082, 80)])
    with pytest.raises(StateError, match="tcp/18082 is already published by container usp-web"):
        pool.reserve_ports(c.name, [("tcp", 18082, 80)])
    assert netsetup.list_rules() == []
    held[0].release()
    veth.teardown()
    assert links() == before


OWNER = r"""
import signal, sys
from uspawn.net import pool as netpool
from uspawn.net import links as netsetup
net_dir, name, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
pool = netpool.NetPool(net_dir)
al = pool.allocate(name)
pool.reserve_ports(name, [("tcp", 18083, 80)])
v = netsetup.setup_veth(pid, name, al.host_addr, al.cont_addr, al.prefixlen)
netsetup.publish_ports(name, al.cont_addr, [("tcp", 18083, 80)], v.host_ifname)
print(al.cont_addr, v.host_ifname, flush=True)
signal.pause()  # until the test kills it
"""


def test_cleanup_stale_after_sigkill_of_the_owner(spawn: Callable[..., Container],
                                                  tmp_path: Path) -> None:
    c = spawn("usp-kill", userns=True)
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path), c.name, str(c.pid)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline().split()
        assert len(line) == 2, "the owner failed to set up"
        cont_addr, ifname = line
        assert connect("127.0.0.1", 18083) == "hello usp-kill"
        assert connect(cont_addr, 80) == "hello usp-kill"
        assert netpool.cleanup_stale(str(tmp_path)) == []  # a live owner keeps everything
        assert ifname in links()
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    # the container process (its netns, so the veth) outlives the owner
    assert ifname in links() and len(tagged_rules(c.name)) == 3
    t = time.monotonic()
    removed = netpool.cleanup_stale(str(tmp_path))
    assert time.monotonic() - t < 5
    assert f"link {ifname}" in removed
    assert any(r.startswith("lease tcp-18083.lock") for r in removed)
    assert ifname not in links()
    assert tagged_rules(c.name) == []
    assert netsetup.list_rules() == []
    assert lease_files(tmp_path) == []
    assert connect("127.0.0.1", 18083, timeout=1).startswith("ERR")
    assert netpool.cleanup_stale(str(tmp_path)) == []
