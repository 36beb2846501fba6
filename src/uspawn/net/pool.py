"""Address and port reservations for --network=veth|bridge:BR and --port.

Host-wide, like the UID ranges (state.RangeAllocator): every uspawn, whatever
its --root state directory, leases from one directory, because the pool, the
host's routes, the published ports and the nft table are host-wide too. Two
instances with different state roots must never hand out the same subnet or
port. Layout (NET_DIR, $USPAWN_NET_DIR overrides it; see docs/NETWORK.md):

    /run/uspawn/net/                          flock'ed (exclusively) around every
                                              allocation and every cleanup
    /run/uspawn/net/addr/<ip>-<prefixlen>.lock  one subnet of the pool (veth: a /30)
                                              or one address in a bridge's network (/32)
    /run/uspawn/net/ports/<proto>-<port>.lock   one published host port (tcp-8080.lock)

Each file is a state.Lease, exactly like the UID ranges: held by an flock (so
kill -9 of its holder frees it) and by its recorded owner while that process
lives (name + pid + starttime, for detached machines). The record also keeps
what cleanup needs (the container's address), so the next uspawn command can
remove the veth and nft rules of a container whose owner died (cleanup_stale).

A pool candidate is skipped when it overlaps a route (other than a default
route) or an address of the host, or another container's lease. The pool and
the subnet size are arguments (NetPool(pool=..., prefixlen=...)).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from uspawn.base.errors import SpecError, StateError, UsageError
from uspawn.kernel.flock import flock_exclusive
from uspawn.state import store as state

NET_DIR = "/run/uspawn/net"
DEFAULT_POOL = "10.252.0.0/16"
# A /30 per veth container: network, host side (.1), container (.2), broadcast.
# 16384 containers in the default pool; a /31 (RFC 3021) would double that but
# confuses tools that expect a broadcast address.
DEFAULT_PREFIXLEN = 30
LOCK_TIMEOUT = 10.0
OWNER_EXIT_TIMEOUT = 5.0  # s: from an owner's exit to its flocks' release (normally µs)


def parse_port(spec: str) -> tuple[str, int, int]:
    """`[tcp|udp:]HOSTPORT:CONTAINERPORT` (or a single PORT for both) -> (proto, host, cont)."""
    parts = spec.split(":")
    proto = "tcp"
    if parts and parts[0] in ("tcp", "udp"):
        proto = parts.pop(0)
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise UsageError(f"--port {spec}: expected [tcp|udp:]HOSTPORT:CONTAINERPORT")
    host, cont = int(parts[0]), int(parts[1])
    if not (0 < host < 65536 and 0 < cont < 65536):
        raise UsageError(f"--port {spec}: ports are 1..65535")
    return proto, host, cont


def host_networks() -> list[tuple[ipaddress.IPv4Network, str]]:
    """IPv4 routes (default routes excepted) and addresses of the host's namespace."""
    from pyroute2 import IPRoute

    out: list[tuple[ipaddress.IPv4Network, str]] = []
    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get("ifname")) for link in ipr.get_links()}
        for r in ipr.get_routes(family=socket.AF_INET):
            if r["dst_len"] == 0 or r.get("dst") is None:
                continue
            dev = names.get(r.get("oif") or -1, "?")
            net = ipaddress.IPv4Network(f"{r.get('dst')}/{r['dst_len']}", strict=False)
            out.append((net, f"route {net} dev {dev}"))
        for a in ipr.get_addr(family=socket.AF_INET):
            ip = ipaddress.IPv4Network(f"{a.get('address')}/32")
            out.append((ip, f"address {a.get('address')} on {names.get(a['index'], '?')}"))
    return out


class AddressLease:
    """A container's subnet (veth) or address (bridge), held until release()."""

    def __init__(self, lease: state.Lease, container: str, network: ipaddress.IPv4Network,
                 host_addr: str | None, cont_addr: str, prefixlen: int,
                 bridge: str | None) -> None:
        self.lease = lease
        self.container = container
        self.network = network  # what the lease file covers
        self.host_addr = host_addr  # host side of the veth, or the bridge's address
        self.cont_addr = cont_addr
        self.prefixlen = prefixlen  # of the container's address
        self.bridge = bridge

    def info(self) -> dict[str, object]:
        return {"kind": "bridge" if self.bridge else "veth", "network": str(self.network),
                "host_addr": self.host_addr, "cont_addr": self.cont_addr,
                "prefixlen": self.prefixlen, "bridge": self.bridge}

    def record_owner(self, pid: int) -> None:
        """Hand the lease to pid (a detached supervisor): it stays taken while pid lives."""
        self.lease.record(name=self.container, pid=pid, starttime=state.proc_starttime(pid),
                          **self.info())

    def release(self) -> None:
        self.lease.release(remove=True)


class PortLease:
    def __init__(self, lease: state.Lease, container: str, proto: str, port: int) -> None:
        self.lease = lease
        self.container = container
        self.proto = proto
        self.port = port

    def record_owner(self, pid: int) -> None:
        self.lease.record(name=self.container, pid=pid, starttime=state.proc_starttime(pid),
                          proto=self.proto, port=self.port)

    def release(self) -> None:
        self.lease.release(remove=True)


def _read_record(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            raw = f.read(4096)
        record = state.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _try_lock_after_owner(path: str) -> state.Lease | None:
    """state.try_lock, but a lease whose recorded owner is dying is waited for.

    Whoever observes an owner's death (its guardian, the next start asking for the
    port) takes the lease, without racing the kernel: a killed owner is marked
    exiting before its fds close, and its flocks drop before it turns into a zombie,
    which is when its pidfd polls readable. So once the owner exits (state.owner_alive
    is false) but the flock is still held, wait on its pidfd, then lock again. The
    wait is bounded: a holder that still runs after OWNER_EXIT_TIMEOUT (a thread of
    an owner whose main thread is gone) keeps the lease.
    """
    lease = state.try_lock(path)
    if lease is not None:
        return lease
    record = _read_record(path)
    pid = record.get("pid")
    if (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0
            or state.proc_starttime(pid) != record.get("starttime") or state.owner_alive(record)):
        return None  # alive, or long gone with the flock held elsewhere: not ours to judge
    from uspawn.kernel.pidwait import wait_gone

    wait_gone(pid, OWNER_EXIT_TIMEOUT)
    return state.try_lock(path)


def _lease_network(filename: str) -> ipaddress.IPv4Network | None:
    if not filename.endswith(".lock"):
        return None
    addr, _, plen = filename[:-5].partition("-")
    try:
        return ipaddress.IPv4Network(f"{addr}/{plen}")
    except ValueError:
        return None


class NetPool:
    """Leases for addresses and published ports, host-wide (NET_DIR)."""

    def __init__(self, net_dir: str | None = None, pool: str = DEFAULT_POOL,
                 prefixlen: int = DEFAULT_PREFIXLEN) -> None:
        try:
            self.pool = ipaddress.IPv4Network(pool)
        except ValueError as exc:
            raise SpecError(f"address pool {pool!r}: {exc}") from exc
        if not self.pool.prefixlen <= prefixlen <= 30:
            raise SpecError(f"subnet size /{prefixlen} does not fit the pool {self.pool}",
                            f"use /{self.pool.prefixlen}../30")
        self.prefixlen = prefixlen
        self.dir = net_dir or os.environ.get("USPAWN_NET_DIR") or NET_DIR
        self.addr_dir = os.path.join(self.dir, "addr")
        self.port_dir = os.path.join(self.dir, "ports")

    # --- locking and scanning ---

    @contextmanager
    def _locked(self) -> Iterator[None]:
        for d in (self.dir, self.addr_dir, self.port_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not flock_exclusive(fd, LOCK_TIMEOUT):
                raise StateError(f"timed out waiting for the lock on {self.dir}",
                                 "another uspawn is allocating addresses")
            yield
        finally:
            os.close(fd)

    def _files(self) -> list[str]:
        out = []
        for d in (self.addr_dir, self.port_dir):
            try:
                out += [os.path.join(d, n) for n in sorted(os.listdir(d)) if n.endswith(".lock")]
            except FileNotFoundError:
                pass
        return out

    def _reap_locked(self) -> list[str]:
        """Release leases whose holder and recorded owner are gone, after removing
        the veth and nft rules they stood for. Caller holds the directory lock."""
        stale: list[tuple[state.Lease, dict[str, object]]] = []
        live: set[str] = set()
        for path in self._files():
            lease = _try_lock_after_owner(path)
            if lease is None:
                name = _read_record(path).get("name")
                if isinstance(name, str):
                    live.add(name)
                continue
            raw = os.pread(lease.fd, 4096, 0)
            try:
                record = state.loads(raw) if raw else {}
            except ValueError:
                record = {}
            stale.append((lease, record if isinstance(record, dict) else {}))
        removed: list[str] = []
        for lease, record in stale:
            name, addr = record.get("name"), record.get("cont_addr")
            if isinstance(name, str) and isinstance(addr, str):
                from uspawn.net import links as netsetup

                try:
                    # A live container of the same name (another state root, or a
                    # restart) keeps its link; the dead one's rules are told apart
                    # by address.
                    if name not in live:
                        removed += netsetup.delete_veth(name)
                    removed += netsetup.remove_rules(name, addr)
                except Exception as exc:  # UspawnError, OSError, a netlink error
                    # Keep the lease, so the next command tries again and the
                    # address is not handed out while its objects remain; and go
                    # on: one lease's trouble never leaves the others behind.
                    lease.release(remove=False)
                    removed.append(f"kept lease {os.path.basename(lease.path)}: {exc}")
                    continue
            lease.release(remove=True)
            removed.append(f"lease {os.path.basename(lease.path)}"
                           + (f" of {name}" if isinstance(name, str) else ""))
        return removed

    def _holder(self, path: str) -> str:
        name = _read_record(path).get("name")
        return str(name) if name else "(unknown)"

    def _claim_net(self, net: ipaddress.IPv4Network) -> state.Lease | str:
        """Lease net, or return the name of the container whose lease overlaps it."""
        # Stale files were reaped under the same lock: a file still there is
        # live (or kept because its objects could not be removed).
        for name in os.listdir(self.addr_dir):
            other = _lease_network(name)
            if other is not None and other.overlaps(net):
                return self._holder(os.path.join(self.addr_dir, name))
        path = os.path.join(self.addr_dir, f"{net.network_address}-{net.prefixlen}.lock")
        lease = _try_lock_after_owner(path)
        return lease if lease is not None else self._holder(path)

    def _record(self, lease: state.Lease, container: str, owner_pid: int | None,
                **info: object) -> None:
        pid = os.getpid() if owner_pid is None else owner_pid
        lease.record(name=container, pid=pid, starttime=state.proc_starttime(pid), **info)

    # --- addresses ---

    def allocate(self, container: str, subnet: str | None = None,
                 owner_pid: int | None = None) -> AddressLease:
        """A subnet for a veth container: the first free one of the pool, or `subnet`.

        Host side = first address, container = second.
        """
        with self._locked():
            self._reap_locked()
            host = host_networks()
            if subnet is not None:
                try:
                    net = ipaddress.IPv4Network(subnet)
                except ValueError as exc:
                    raise SpecError(f"subnet {subnet!r}: {exc}") from exc
                if net.prefixlen > 30:
                    raise SpecError(f"subnet {net} is too small for a veth pair", "use /30")
                for other, what in host:
                    if other.overlaps(net):
                        raise StateError(f"subnet {net} overlaps the host's {what}",
                                         "pick a subnet that is not in use on the host")
                got = self._claim_net(net)
                if isinstance(got, str):
                    raise StateError(f"subnet {net} is already used by container {got}",
                                     "pick another subnet or let uspawn choose one")
                return self._address_lease(got, container, net, owner_pid)
            for net in self.pool.subnets(new_prefix=self.prefixlen):
                if any(other.overlaps(net) for other, _ in host):
                    continue
                got = self._claim_net(net)
                if not isinstance(got, str):
                    return self._address_lease(got, container, net, owner_pid)
        raise StateError(f"no free /{self.prefixlen} left in the address pool {self.pool}",
                         "stop some containers or configure a larger pool")

    def _address_lease(self, lease: state.Lease, container: str, net: ipaddress.IPv4Network,
                       owner_pid: int | None) -> AddressLease:
        hosts = net.hosts()
        host_addr, cont_addr = str(next(hosts)), str(next(hosts))
        al = AddressLease(lease, container, net, host_addr, cont_addr, net.prefixlen, None)
        self._record(lease, container, owner_pid, **al.info())
        return al

    def allocate_on_bridge(self, container: str, bridge: str, address: str | None = None,
                           owner_pid: int | None = None) -> AddressLease:
        """An address in the network of `bridge`'s first IPv4 address (the gateway).

        Skipped: the bridge's and the host's own addresses, neighbours the host
        has seen on the bridge (read from its neighbour table: nothing is sent),
        and other containers' leases.
        """
        iface, used = _bridge_network(bridge)
        gateway, net = str(iface.ip), iface.network
        with self._locked():
            self._reap_locked()
            used |= {n.network_address for n, _ in host_networks() if n.prefixlen == 32}
            if address is not None:
                try:
                    ip = ipaddress.IPv4Address(address)
                except ValueError as exc:
                    raise SpecError(f"address {address!r}: {exc}") from exc
                if ip not in net or ip in (net.network_address, net.broadcast_address):
                    raise SpecError(f"address {ip} is not a host address of {bridge}'s "
                                    f"network {net}")
                if ip in used:
                    raise StateError(f"address {ip} is already in use on the host or on "
                                     f"bridge {bridge}", "pick another address")
                got = self._claim_net(ipaddress.IPv4Network(f"{ip}/32"))
                if isinstance(got, str):
                    raise StateError(f"address {ip} is already used by container {got}",
                                     "pick another address or let uspawn choose one")
                return self._bridge_lease(got, container, ip, gateway, net, bridge, owner_pid)
            for ip in net.hosts():
                if ip in used:
                    continue
                got = self._claim_net(ipaddress.IPv4Network(f"{ip}/32"))
                if not isinstance(got, str):
                    return self._bridge_lease(got, container, ip, gateway, net, bridge,
                                              owner_pid)
        raise StateError(f"no free address left in {net} on bridge {bridge}")

    def _bridge_lease(self, lease: state.Lease, container: str, ip: ipaddress.IPv4Address,
                      gateway: str, net: ipaddress.IPv4Network, bridge: str,
                      owner_pid: int | None) -> AddressLease:
        al = AddressLease(lease, container, ipaddress.IPv4Network(f"{ip}/32"), gateway,
                          str(ip), net.prefixlen, bridge)
        self._record(lease, container, owner_pid, **al.info())
        return al

    # --- ports ---

    def reserve_ports(self, container: str, ports: Sequence[tuple[str, int, int]],
                      owner_pid: int | None = None) -> list[PortLease]:
        """Reserve the host side of each (proto, host_port, container_port); all or nothing."""
        taken: list[PortLease] = []
        try:
            with self._locked():
                self._reap_locked()
                for proto, port in dict.fromkeys((p, h) for p, h, _ in ports):
                    if proto not in ("tcp", "udp") or not 0 < port < 65536:
                        raise SpecError(f"bad published port {proto}/{port}")
                    path = os.path.join(self.port_dir, f"{proto}-{port}.lock")
                    lease = _try_lock_after_owner(path)
                    if lease is None:
                        raise StateError(
                            f"port {proto}/{port} is already published by container "
                            f"{self._holder(path)}",
                            "choose another host port (--port HOSTPORT:CONTAINERPORT)")
                    pl = PortLease(lease, container, proto, port)
                    taken.append(pl)
                    self._record(lease, container, owner_pid, proto=proto, port=port)
                    _check_host_port(proto, port)
        except BaseException:
            for pl in taken:
                pl.release()
            raise
        return taken

    # --- reading and cleanup ---

    def leases(self) -> list[dict[str, object]]:
        """Records of the live leases (addresses and ports), for `uspawn list`."""
        out: list[dict[str, object]] = []
        if not os.path.isdir(self.dir):
            return out
        with self._locked():
            for path in self._files():
                lease = state.try_lock(path)
                if lease is not None:  # stale: not ours to report
                    lease.release(remove=False)
                    continue
                record = _read_record(path)
                if record:
                    out.append(record)
        return out

    def cleanup_stale(self) -> list[str]:
        with self._locked():
            return self._reap_locked()


def _bridge_network(bridge: str) -> tuple[ipaddress.IPv4Interface, set[ipaddress.IPv4Address]]:
    """The bridge's first IPv4 address (with prefix) and the addresses seen on it."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=bridge)
        if not found:
            raise SpecError(f"--network=bridge:{bridge}: {bridge} does not exist",
                            f"create it first: ip link add {bridge} type bridge")
        index = found[0]
        addrs = ipr.get_addr(family=socket.AF_INET, index=index)
        used = {ipaddress.IPv4Address(a.get("address")) for a in addrs}
        for n in ipr.get_neighbours(family=socket.AF_INET, ifindex=index):
            if n.get("dst"):
                used.add(ipaddress.IPv4Address(n.get("dst")))
    if not addrs:
        raise SpecError(f"bridge {bridge} has no IPv4 address, so containers on it have no "
                        "network to take addresses from",
                        f"give it one, e.g. ip addr add 10.253.0.1/24 dev {bridge}")
    first = addrs[0]
    return ipaddress.IPv4Interface(f"{first.get('address')}/{first['prefixlen']}"), used


def _check_host_port(proto: str, port: int) -> None:
    """A host process bound to the port would be shadowed by the DNAT: refuse."""
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, kind | socket.SOCK_CLOEXEC)
    try:
        if proto == "tcp":  # ignore TIME_WAIT leftovers, not listeners
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
    except OSError as exc:
        raise StateError(f"port {proto}/{port} is in use on the host ({exc.strerror})",
                         f"see `ss -lnp '( sport = :{port} )'`; choose another host port") from None
    finally:
        s.close()


def cleanup_stale(net_dir: str | None = None) -> list[str]:
    """Remove the veths, nft rules and leases of containers whose owner is dead,
    and uspawn rules that point at no existing network; return what was removed.

    Called by the next uspawn command (cheap when nothing is stale: pyroute2 and
    nft are only loaded when a stale lease names an address).
    """
    removed = NetPool(net_dir).cleanup_stale()
    if removed:
        from uspawn.net import links as netsetup

        removed += netsetup.remove_orphan_rules()
    return removed


def addresses(net_dir: str | None = None) -> dict[str, list[str]]:
    """Container name -> its addresses (CIDR), from live leases."""
    out: dict[str, list[str]] = {}
    for r in NetPool(net_dir).leases():
        name, addr, plen = r.get("name"), r.get("cont_addr"), r.get("prefixlen")
        if isinstance(name, str) and isinstance(addr, str):
            out.setdefault(name, []).append(f"{addr}/{plen}")
    return out
