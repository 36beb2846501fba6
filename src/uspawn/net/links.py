"""Host-side plumbing for --network=veth|bridge:BR: veth pairs and published ports.

What it makes, and how each object is named so it can be found and removed
(docs/NETWORK.md has the whole picture):

- a veth pair per container, created in one netlink request with the peer
  born inside the container's network namespace as `host0` (IFLA_NET_NS_PID on
  the peer: atomic, so no temporary name ever exists on the host and nothing
  has to be renamed); the host side is `veth_name(container)` and carries the
  ifalias `uspawn:<container>`;
- published ports as rules in the nftables table `ip uspawn`, each commented
  `uspawn:<container>`, added and removed in single nft transactions under one
  host-wide flock (NFT_LOCK), because several uspawn processes share the table.

Address and port *reservations* live in uspawn.net.pool (the state side); this
module only acts on the kernel and never imports the rooms above linux/.

Constraints: pyroute2 costs ~150 ms to import, so it is imported inside the
functions that need it (the start path of `--network=private` never pays it);
nft runs with a timeout; every step that fails removes what this call made.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from uspawn.base.errors import SetupError, SpecError, StateError
from uspawn.kernel import syscalls
from uspawn.kernel.flock import flock_exclusive

if TYPE_CHECKING:
    from pyroute2 import IPRoute

IFNAMSIZ = 16  # including the NUL: names have at most 15 bytes (linux/if.h)
CONTAINER_IFNAME = "host0"  # the container side, as systemd-nspawn names it
ALIAS_PREFIX = "uspawn:"
NFT_FAMILY = "ip"
NFT_TABLE = "uspawn"
GUARD_PREFIX = "uspawn-localnet:"
# One lock for the shared nft table and the route_localnet bookkeeping, host-wide
# (not per state root): every uspawn on the host edits the same table.
NFT_LOCK = "/run/lock/uspawn-nft.lock"
NFT_TIMEOUT = 10.0
LOCK_TIMEOUT = 10.0

# Characters allowed in container names (presets.machine_name): safe in an
# interface name (no '/', ':' or whitespace) and inside an nft comment.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"

# The table and its chains. Priorities are numbers (dstnat = -100, srcnat = 100,
# raw = -300): nft 1.0.6 refuses the names for a nat chain on the output hook.
_TABLE_DEF = f"""add table {NFT_FAMILY} {NFT_TABLE}
add chain {NFT_FAMILY} {NFT_TABLE} prerouting {{ type nat hook prerouting priority -100; }}
add chain {NFT_FAMILY} {NFT_TABLE} output {{ type nat hook output priority -100; }}
add chain {NFT_FAMILY} {NFT_TABLE} postrouting {{ type nat hook postrouting priority 100; }}
add chain {NFT_FAMILY} {NFT_TABLE} localnet_guard {{ type filter hook prerouting priority -300; }}
"""


def _check_name(container: str) -> None:
    if not container or len(container) > 64 or not set(container) <= _NAME_CHARS:
        raise SpecError(f"container name {container!r} cannot name network objects",
                        "use letters, digits, '_', '.' and '-' (at most 64)")


def veth_name(container: str) -> str:
    """The host side of the container's veth: `ve-NAME`, at most 15 bytes.

    Names that do not fit (or that look like a shortened name themselves) become
    `ve-` + the first 8 characters + `-` + 3 base32 characters of a SHA-256 of
    the whole name. A literal name never has that shape, so a literal and a
    shortened name cannot collide; two shortened names collide only if they share
    the first 8 characters and the hash (1 in 32768), which setup_veth reports
    as "interface exists" rather than touching the other container's link.
    """
    _check_name(container)
    literal = "ve-" + container
    shaped = len(container) == 12 and container[8] == "-"
    if len(literal) < IFNAMSIZ and not shaped:
        return literal
    import hashlib

    digest = int.from_bytes(hashlib.sha256(container.encode()).digest()[:4], "big")
    tag = "".join(_B32[(digest >> (5 * i)) & 31] for i in range(3))
    return f"ve-{container[:8]}-{tag}"


def _netlink_error(what: str, exc: BaseException) -> SetupError:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        name = errno.errorcode.get(code, "?")
        return SetupError(f"{what}: {os.strerror(code)} ({name})")
    return SetupError(f"{what}: {exc}")


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn a netlink failure into 'what: reason (ERRNO)'."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except NetlinkError as exc:
        raise _netlink_error(what, exc) from exc


def _netns_socket(pid: int) -> int:
    """A NETLINK_ROUTE socket bound to the network namespace of pid.

    A socket keeps the namespace it was created in, so this thread enters the
    namespace, makes the socket and returns at once (setns(CLONE_NEWNET) acts on
    the calling thread only). pyroute2's own netns support forks a helper process
    for the same result.
    """
    path = f"/proc/{pid}/ns/net"
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SetupError(f"open the network namespace of pid {pid}: {exc}") from exc
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        syscalls.setns(target, syscalls.CLONE_NEWNET)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                 0)  # NETLINK_ROUTE
        finally:
            syscalls.setns(home, syscalls.CLONE_NEWNET)
    except OSError as exc:
        raise SetupError(f"enter the network namespace of pid {pid}: {exc}") from exc
    finally:
        os.close(target)
        os.close(home)
    return sock.detach()


def _ifindex(ipr: IPRoute, name: str) -> int | None:
    found: list[int] = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _alias(ipr: IPRoute, index: int) -> str | None:
    """index's ifalias; None if it has none or is gone (ENODEV)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        links = ipr.get_links(index)
    except NetlinkError as exc:
        # A dying container's veth goes away with its network namespace, which the
        # kernel tears down asynchronously: between the lookup and here is enough.
        if exc.code == errno.ENODEV:
            return None
        raise
    value = links[0].get("ifalias") if links else None
    return value if isinstance(value, str) else None


class Veth:
    """A container's veth pair; teardown() deletes the host side (and so both ends)."""

    def __init__(self, container: str, host_ifname: str, host_addr: str | None,
                 cont_addr: str, prefixlen: int, bridge: str | None) -> None:
        self.container = container
        self.host_ifname = host_ifname
        self.host_addr = host_addr  # the container's gateway (the bridge's address on a bridge)
        self.cont_addr = cont_addr
        self.prefixlen = prefixlen
        self.bridge = bridge
        self.addresses = [f"{cont_addr}/{prefixlen}"]  # the container's, for `uspawn list`

    def teardown(self) -> None:
        """Idempotent; never deletes a link that is not this container's."""
        delete_veth(self.container, self.host_ifname)

    def __repr__(self) -> str:
        via = f"bridge {self.bridge}" if self.bridge else f"host {self.host_addr}"
        return f"<Veth {self.host_ifname} -> {self.addresses[0]} via {via}>"


def delete_veth(container: str, host_ifname: str | None = None) -> list[str]:
    """Delete the host side(s) of container's veth, found by name or by alias."""
    from pyroute2 import IPRoute

    alias = ALIAS_PREFIX + container
    removed: list[str] = []
    with IPRoute() as ipr:
        if host_ifname is not None:
            index = _ifindex(ipr, host_ifname)
            candidates = [] if index is None else [(index, host_ifname)]
        else:
            candidates = [(int(link["index"]), str(link.get("ifname")))
                          for link in ipr.get_links() if link.get("ifalias") == alias]
        for index, name in candidates:
            if _alias(ipr, index) != alias:
                continue  # same name, someone else's link: never touch it
            with _step(f"delete link {name}"):
                try:
                    ipr.link("del", index=index)
                except Exception as exc:
                    if getattr(exc, "code", None) != errno.ENODEV:
                        raise
            removed.append(f"link {name}")
    return removed


def setup_veth(pid: int, container: str, host_addr: str | None, cont_addr: str,
               prefixlen: int, bridge: str | None = None) -> Veth:
    """Link the network namespace of pid to the host with a veth pair.

    Host side `veth_name(container)`: with bridge=None it gets host_addr/prefixlen
    and comes up; with a bridge (which must exist) it is enslaved to it and comes
    up without an address. Container side `host0`: cont_addr/prefixlen, up, with
    `lo` up and a default route via host_addr (the bridge's address on a bridge;
    None = no default route). Nothing is left behind on failure.
    """
    import ipaddress

    from pyroute2 import IPRoute

    host_if = veth_name(container)
    try:
        cont_ip = ipaddress.IPv4Address(cont_addr)
        net = ipaddress.IPv4Network(f"{cont_addr}/{prefixlen}", strict=False)
        gw = ipaddress.IPv4Address(host_addr) if host_addr is not None else None
    except ValueError as exc:
        raise SpecError(f"network address for {container}: {exc}") from exc
    if not 8 <= prefixlen <= 30 or cont_ip in (net.network_address, net.broadcast_address):
        raise SpecError(f"{cont_addr}/{prefixlen} is not a usable container address")
    if gw is not None and (gw == cont_ip or gw not in net):
        raise SpecError(f"gateway {host_addr} is not another address of {net}")

    with IPRoute() as ipr:
        bridge_index = None
        if bridge is not None:
            bridge_index = _ifindex(ipr, bridge)
            kind = (ipr.get_links(bridge_index)[0].get(("linkinfo", "kind"))
                    if bridge_index is not None else None)
            if kind != "bridge":
                what = "is not a bridge" if bridge_index is not None else "does not exist"
                raise SpecError(f"--network=bridge:{bridge}: {bridge} {what}",
                                f"create it first: ip link add {bridge} type bridge")
        if _ifindex(ipr, host_if) is not None:
            raise StateError(f"network interface {host_if} already exists",
                             "a container of this name is still running, or a stale one "
                             f"was not cleaned up; remove it with `ip link del {host_if}`")
        # The peer is born in the container's namespace: IFLA_NET_NS_PID in the
        # peer's ifinfomsg (veth_newlink in drivers/net/veth.c).
        with _step(f"create veth {host_if} <-> {CONTAINER_IFNAME} (pid {pid})"):
            ipr.link("add", ifname=host_if, kind="veth",
                     peer={"ifname": CONTAINER_IFNAME, "net_ns_pid": pid})
        try:
            index = _ifindex(ipr, host_if)
            if index is None:
                raise SetupError(f"veth {host_if} vanished right after it was created")
            with _step(f"set the alias of {host_if}"):
                ipr.link("set", index=index, ifalias=ALIAS_PREFIX + container)
            if bridge_index is not None:
                with _step(f"attach {host_if} to bridge {bridge}"):
                    ipr.link("set", index=index, master=bridge_index)
            elif host_addr is not None:
                with _step(f"add {host_addr}/{prefixlen} to {host_if}"):
                    ipr.addr("add", index=index, address=host_addr, prefixlen=prefixlen)
            with _step(f"bring up {host_if}"):
                ipr.link("set", index=index, state="up")
            _setup_container_side(pid, host_addr, cont_addr, prefixlen)
        except BaseException:
            try:
                delete_veth(container, host_if)
            except Exception:
                pass  # the primary error is the one to report
            raise
    return Veth(container, host_if, host_addr, cont_addr, prefixlen, bridge)


def _setup_container_side(pid: int, host_addr: str | None, cont_addr: str,
                          prefixlen: int) -> None:
    from pyroute2 import IPRoute

    with IPRoute(fileno=_netns_socket(pid)) as ns:
        index = _ifindex(ns, CONTAINER_IFNAME)
        lo = _ifindex(ns, "lo")
        if index is None or lo is None:
            raise SetupError(f"{CONTAINER_IFNAME} is missing in the namespace of pid {pid}")
        with _step(f"add {cont_addr}/{prefixlen} to {CONTAINER_IFNAME}"):
            ns.addr("add", index=index, address=cont_addr, prefixlen=prefixlen)
        with _step("bring up lo in the container"):
            ns.link("set", index=lo, state="up")
        with _step(f"bring up {CONTAINER_IFNAME}"):
            ns.link("set", index=index, state="up")
        if host_addr is not None:
            with _step(f"add the default route via {host_addr}"):
                ns.route("add", dst="0.0.0.0/0", gateway=host_addr, oif=index)


# --- published ports (nftables) ---


def _nft_path() -> str | None:
    """The nft binary; /usr/sbin is not on every PATH (cron, some units)."""
    import shutil

    found = shutil.which("nft")
    if found is None:
        found = next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
    return found


def _nft(args: Sequence[str], script: str | None = None) -> str:
    nft = _nft_path()
    if nft is None:
        raise SetupError("publishing ports needs the nft tool, which is not installed",
                         "apt-get install nftables")
    try:
        r = subprocess.run([nft, *args], input=script, capture_output=True, text=True,
                           timeout=NFT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise SetupError(f"nft {' '.join(args)} did not finish in {NFT_TIMEOUT:.0f} s") from None
    if r.returncode != 0:
        # nft prints the error, then the offending statement and a caret line.
        detail = [line.strip() for line in r.stderr.strip().splitlines()]
        what = ": ".join(detail[:2]) if detail else f"exit status {r.returncode}"
        raise SetupError(f"nft {' '.join(args)}: {what}")
    return r.stdout


@contextmanager
def _nft_lock() -> Iterator[None]:
    os.makedirs(os.path.dirname(NFT_LOCK), exist_ok=True)
    fd = os.open(NFT_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not flock_exclusive(fd, LOCK_TIMEOUT):
            raise StateError(f"timed out waiting for {NFT_LOCK}",
                             "another uspawn is editing the nft table")
        yield
    finally:
        os.close(fd)


def list_rules() -> list[dict[str, Any]]:
    """Rules of the uspawn table (nft JSON objects), [] when there is no table."""
    import json

    if _nft_path() is None:
        return []  # without the tool no uspawn rule can have been made
    try:
        out = _nft(["-j", "list", "table", NFT_FAMILY, NFT_TABLE])
    except SetupError as exc:
        if "No such file or directory" in str(exc):  # no table (ENOENT)
            return []
        raise
    items = json.loads(out).get("nftables", [])
    return [item["rule"] for item in items if isinstance(item, dict) and "rule" in item]


def _mentions(rule: dict[str, Any], value: str) -> bool:
    import json

    return json.dumps(value) in json.dumps(rule.get("expr", []))


def _match_value(rule: dict[str, Any], key: str) -> str | None:
    """The right-hand side of `meta <key> == X` in a rule (iifname/oifname)."""
    for stmt in rule.get("expr", []):
        m = stmt.get("match") if isinstance(stmt, dict) else None
        if isinstance(m, dict) and m.get("left") == {"meta": {"key": key}}:
            right = m.get("right")
            return right if isinstance(right, str) else None
    return None


def _route_localnet_path(ifname: str) -> str:
    if "/" in ifname or ifname in (".", ".."):
        raise SpecError(f"bad interface name {ifname!r}")
    return f"/proc/sys/net/ipv4/conf/{ifname}/route_localnet"


def _read_route_localnet(ifname: str) -> str | None:
    try:
        with open(_route_localnet_path(ifname)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _write_route_localnet(ifname: str, value: str) -> None:
    with open(_route_localnet_path(ifname), "w") as f:
        f.write(value)


def _delete_rules_locked(rules_to_delete: list[dict[str, Any]]) -> list[str]:
    """Delete rules (one transaction), drop guards nobody needs, and the empty table.

    Caller holds the nft lock.
    """
    doomed = list(rules_to_delete)
    rules = list_rules()
    handles = {(r["chain"], r["handle"]) for r in doomed}
    keep = [r for r in rules if (r["chain"], r["handle"]) not in handles]
    # A guard (and the route_localnet=1 it protects) stays while a masquerade
    # rule of some container still leaves through its interface.
    users = {_match_value(r, "oifname") for r in keep
             if r["chain"] == "postrouting" and str(r.get("comment", "")).startswith(
                 ALIAS_PREFIX)}
    restore: list[str] = []
    for r in keep:
        comment = str(r.get("comment", ""))
        if r["chain"] == "localnet_guard" and comment.startswith(GUARD_PREFIX):
            ifname = comment[len(GUARD_PREFIX):]
            if ifname not in users:
                doomed.append(r)
                restore.append(ifname)
    handles = {(r["chain"], r["handle"]) for r in doomed}
    if not doomed:
        return []
    left = [r for r in rules if (r["chain"], r["handle"]) not in handles]
    if left:
        script = "".join(f"delete rule {NFT_FAMILY} {NFT_TABLE} {r['chain']} handle "
                         f"{int(r['handle'])}\n" for r in doomed)
    else:
        script = f"delete table {NFT_FAMILY} {NFT_TABLE}\n"
    # Restore route_localnet before the guard goes away (never an unguarded
    # moment), for interfaces that still exist: a deleted veth took its own.
    for ifname in restore:
        try:
            _write_route_localnet(ifname, "0")
        except FileNotFoundError:
            pass
    _nft(["-f", "-"], script)
    removed = [f"nft rule {r['chain']} {r.get('comment', '')}" for r in doomed]
    removed += [f"route_localnet=0 on {name}" for name in restore]
    return removed


def remove_rules(container: str, cont_addr: str | None = None) -> list[str]:
    """Remove the nft rules tagged `uspawn:<container>` (those naming cont_addr, if given)."""
    _check_name(container)
    tag = ALIAS_PREFIX + container
    with _nft_lock():
        doomed = [r for r in list_rules() if r.get("comment") == tag
                  and (cont_addr is None or _mentions(r, cont_addr))]
        return _delete_rules_locked(doomed) if doomed else []


def remove_orphan_rules() -> list[str]:
    """Remove uspawn rules whose container address is on no host interface's network.

    Such rules point nowhere (their veth is gone); they would only shadow the
    host port. Bridge containers' rules stay: the bridge's network still exists.
    """
    import ipaddress

    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        nets = [ipaddress.IPv4Network(f"{a.get('address')}/{a['prefixlen']}", strict=False)
                for a in ipr.get_addr(family=socket.AF_INET)]
    with _nft_lock():
        doomed = []
        for r in list_rules():
            if not str(r.get("comment", "")).startswith(ALIAS_PREFIX):
                continue
            targets = _dnat_targets(r)
            if targets and not any(t in n for t in targets for n in nets):
                doomed.append(r)
        return _delete_rules_locked(doomed) if doomed else []


def _dnat_targets(rule: dict[str, Any]) -> list[Any]:
    import ipaddress

    out = []
    for stmt in rule.get("expr", []):
        if isinstance(stmt, dict) and isinstance(stmt.get("dnat"), dict):
            addr = stmt["dnat"].get("addr")
            if isinstance(addr, str):
                out.append(ipaddress.IPv4Address(addr))
    return out


class PortRules:
    """The nft rules publishing a container's ports; teardown() removes exactly those."""

    def __init__(self, container: str, cont_addr: str,
                 ports: list[tuple[str, int, int]], host_ifname: str | None) -> None:
        self.container = container
        self.cont_addr = cont_addr
        self.ports = ports
        self.host_ifname = host_ifname

    def teardown(self) -> None:
        """Idempotent: rules already gone are not an error."""
        if self.ports:
            remove_rules(self.container, self.cont_addr)

    def __repr__(self) -> str:
        pub = ", ".join(f"{p}/{h}->{c}" for p, h, c in self.ports)
        return f"<PortRules {self.container} {self.cont_addr}: {pub}>"


def _route_oif(cont_addr: str) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        with _step(f"look up the route to {cont_addr}"):
            routes = ipr.route("get", dst=cont_addr)
        oif = routes[0].get("oif") if routes else None
        names = ipr.get_links(oif) if isinstance(oif, int) else []
        name = names[0].get("ifname") if names else None
    if not isinstance(name, str) or name == "lo":
        raise SetupError(f"no interface leads to container address {cont_addr}",
                         "set up the veth (setup_veth) before publishing ports")
    return name


def publish_ports(container: str, cont_addr: str, ports: Sequence[tuple[str, int, int]],
                  host_ifname: str | None = None) -> PortRules:
    """Publish (proto, host_port, container_port) triples at cont_addr.

    Adds, in one nft transaction, per port a DNAT in `prerouting` (traffic from
    other machines; it reaches the container only where the host forwards, which
    uspawn does not turn on) and in `output` (this host's own connections to
    127.0.0.1:HOSTPORT and to its addresses), plus one masquerade in `postrouting`
    for sources in 127.0.0.0/8. The kernel routes a packet with a 127.x source
    out of a non-loopback interface only with route_localnet=1 on that interface
    (ip_route_output_key_hash_rcu); it is set on host_ifname (the container's
    veth or bridge, found by a route lookup when None), with a guard that drops
    127.0.0.0/8 destinations arriving on it, and restored when the last user goes.
    """
    _check_name(container)
    rules: list[tuple[str, int, int]] = []
    for proto, host_port, cont_port in ports:
        if proto not in ("tcp", "udp") or not (0 < host_port < 65536 and 0 < cont_port < 65536):
            raise SpecError(f"bad port mapping {proto}:{host_port}:{cont_port}")
        if (proto, host_port, cont_port) not in rules:
            rules.append((proto, host_port, cont_port))
    import ipaddress

    try:
        ipaddress.IPv4Address(cont_addr)
    except ValueError as exc:
        raise SpecError(f"container address for {container}: {exc}") from exc
    if not rules:
        return PortRules(container, cont_addr, [], None)
    ifname = host_ifname or _route_oif(cont_addr)
    tag = f'comment "{ALIAS_PREFIX}{container}"'
    script = [_TABLE_DEF]
    for proto, host_port, cont_port in rules:
        match = f"fib daddr type local {proto} dport {host_port}"
        target = f"dnat to {cont_addr}:{cont_port}"
        for chain in ("prerouting", "output"):
            script.append(f"add rule {NFT_FAMILY} {NFT_TABLE} {chain} {match} {target} {tag}\n")
    script.append(f'add rule {NFT_FAMILY} {NFT_TABLE} postrouting oifname "{ifname}" '
                  f"ip saddr 127.0.0.0/8 ip daddr {cont_addr} masquerade {tag}\n")
    with _nft_lock():
        guarded = any(r.get("comment") == GUARD_PREFIX + ifname for r in list_rules())
        localnet = _read_route_localnet(ifname)
        if localnet is None:
            raise SetupError(f"interface {ifname} does not exist")
        # route_localnet=1 would also let the container (or anything behind the
        # bridge) reach the host's 127.0.0.1 services (CVE-2020-8558 in
        # kube-proxy): the guard drops such packets before routing. Replies to our
        # masqueraded connections are addressed to the interface's own address
        # there (de-SNAT happens later, at priority -100), so they pass.
        need_flip = localnet == "0"
        if need_flip and not guarded:
            script.append(f'add rule {NFT_FAMILY} {NFT_TABLE} localnet_guard iifname "{ifname}" '
                          f'ip daddr 127.0.0.0/8 drop comment "{GUARD_PREFIX}{ifname}"\n')
        _nft(["-f", "-"], "".join(script))
        if need_flip:
            try:
                _write_route_localnet(ifname, "1")
            except OSError as exc:
                doomed = [r for r in list_rules() if r.get("comment") == ALIAS_PREFIX + container
                          and _mentions(r, cont_addr)]
                _delete_rules_locked(doomed)
                raise SetupError(f"set route_localnet on {ifname}: {exc}") from exc
    return PortRules(container, cont_addr, rules, ifname)


def remove_container_objects(container: str, cont_addr: str | None) -> list[str]:
    """Remove the veth and nft rules of a container whose owner is gone."""
    removed = delete_veth(container)
    removed += remove_rules(container, cont_addr)
    return removed
