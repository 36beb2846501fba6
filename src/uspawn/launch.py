"""`uspawn run` and `uspawn boot`: resolve the command line into Spec + Options, run it.

Decisions made here, before anything is created:
  - the container name (claimed in the state directory; `boot` names must be
    free, `run` derives a free one from the directory name),
  - the UID range (picked or checked, and leased for the container's life),
  - the ownership mode (map / chown / off; `auto` prefers an idmapped mount
    and keeps a tree that an earlier chown already shifted on that base),
  - the seccomp program (compiled once, then read from the cache).
"""

from __future__ import annotations

import os

from . import presets, runtime, state
from .errors import SpecError, StateError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable

    from .boot import Machine
    from .console import StdioRelay


def _split_caps(values: list[str]) -> list[str]:
    return [c for v in values for c in v.split(",") if c]


def check_name(name: str) -> None:
    """A name becomes <state>/containers/NAME and <cgroup>/uspawn/NAME: no `/`, no
    `.`/`..`, only the characters machine_name() produces (runc checks ids alike)."""
    if not name or presets.machine_name(name) != name:
        raise UsageError(f"-M/--machine: invalid container name {name!r}",
                         "use letters, digits, '_', '.' and '-' (at most 64, not "
                         "starting with '.' or '-')")


def claim_container_name(root: str, requested: str | None, default: str,
                         exact: bool = False) -> state.NameClaim:
    """Claim a name in the state directory whose cgroup is free too (another
    state directory, e.g. a second installation or --root, shares the cgroup tree)."""
    from .linux.cgroups import name_busy

    if requested or exact:
        name = requested or default
        check_name(name)
        claim = state.claim_name(root, name)
        if claim is None or name_busy(name):
            if claim is not None:
                claim.release()
            raise StateError(f"container name {name!r} is already in use",
                             "choose another --machine name")
        return claim
    for i in range(1, 1000):
        name = default if i == 1 else f"{default}-{i}"
        claim = state.claim_name(root, name)
        if claim is not None:
            if not name_busy(name):
                return claim
            claim.release()
    raise StateError(f"no free container name derived from {default!r}")


class Launch:
    """Everything decided for one container before it is created."""

    def __init__(self, rootfs: str, claim: state.NameClaim, lease: state.Lease | None,
                 base: int, size: int, userns: bool, ownership: str) -> None:
        self.rootfs = rootfs
        self.claim = claim
        self.lease = lease
        self.base = base
        self.size = size
        self.userns = userns
        self.ownership = ownership

    def release(self) -> None:
        self.claim.release()
        if self.lease is not None:
            self.lease.release()

    def record(self, c: runtime.Container, **extra: object) -> None:
        if c.opts.claim is None:
            return
        import time

        c.opts.claim.write_state({
            "name": c.opts.name, "pid": c.init_pid,
            "pid_start": state.proc_starttime(c.init_pid), "status": "running",
            "rootfs": self.rootfs, "uid_base": self.base if self.userns else None,
            "uid_size": self.size if self.userns else None, "ownership": c.ownership_used,
            "started": time.time(), "runtime_pid": os.getpid(), **extra,
        })


def reachable_by_others(path: str) -> bool:
    """Can an unprivileged host user walk to path (every ancestor o+x)?"""
    import stat

    p = path
    while True:
        try:
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(p)
        if parent == p:
            return True
        p = parent


def prepare(ns: types.SimpleNamespace, exact_name: bool = False,
            log: Callable[[str], None] | None = None) -> Launch:
    """Claim the name and the UID range; decide the ownership mode."""
    rootfs = presets.check_rootfs(ns.directory)
    mode, base, size = presets.parse_private_users(ns.private_users)
    userns = mode != "no"
    ownership = ns.private_users_ownership if userns else "off"
    root = state.state_root(ns.root)
    claim = claim_container_name(root, ns.name, presets.machine_name(rootfs), exact_name)
    lease: state.Lease | None = None
    try:
        if userns:
            from .linux import idshift

            shifted = idshift.current_base(rootfs, size)
            if ownership == "map" and shifted:
                raise SpecError(
                    f"rootfs {rootfs}: its files were shifted to UID base {shifted} by an "
                    "earlier chown; an idmapped mount would shift them twice",
                    "use --private-users-ownership=chown (or auto)")
            if ownership == "auto" and shifted:
                ownership = "chown"
            if ownership in ("map", "auto") and log is not None and reachable_by_others(rootfs):
                # With an idmapped mount, a setuid file made by container root
                # is owned by host root on disk (issue 6 / docs/SECURITY.md).
                log(f"warning: {rootfs} is reachable by unprivileged host users; setuid "
                    "files created inside the container are host-root-owned on disk. Keep "
                    "container trees under a 0700 directory such as /var/lib/machines")
            allocator = state.RangeAllocator()
            if mode == "pick":
                base, lease = allocator.pick(size, prefer=shifted or None)
            else:
                lease = allocator.lease(base, size)
            lease.record(name=claim.name, pid=os.getpid(),
                         starttime=state.proc_starttime(os.getpid()))
    except BaseException:
        claim.release()
        raise
    return Launch(rootfs, claim, lease, base, size, userns, ownership)


def _options(ns: types.SimpleNamespace, la: Launch, log: Callable[[str], None],
             **kw: object) -> runtime.Options:
    from .linux import seccomp

    bpf = seccomp.policy_bpf(seccomp.default_policy(userns=la.userns))
    return runtime.Options(la.claim.name, claim=la.claim, range_lease=la.lease,
                           ownership=la.ownership, seccomp_bpf=bpf,
                           verbose=ns.verbose or ns.debug, debug=ns.debug, log=log,
                           auto_start=True, **kw)  # type: ignore[arg-type]


class NetworkChoice:
    """--network / --port, parsed before anything is claimed."""

    def __init__(self, value: str, ports: list[str]) -> None:
        from .errors import UsageError

        self.mode, _, self.arg = value.partition(":")
        if self.mode not in ("private", "host", "veth", "bridge", "netns"):
            raise UsageError(f"--network: unknown mode {value!r}",
                             "use private, host, veth, bridge:BRIDGE or netns:PATH")
        if self.mode in ("bridge", "netns") and not self.arg:
            raise UsageError(f"--network={self.mode}: needs a value ({self.mode}:...)")
        if self.mode == "netns" and not os.path.exists(self.arg):
            raise SpecError(f"--network=netns:{self.arg}: no such namespace file")
        self.ports: list[tuple[str, int, int]] = []
        if ports:
            if self.mode not in ("veth", "bridge"):
                raise UsageError("--port needs --network=veth or --network=bridge:BR")
            from .netpool import parse_port

            self.ports = [parse_port(p) for p in ports]

    @property
    def host(self) -> bool:
        return self.mode == "host"

    @property
    def netns_path(self) -> str | None:
        return self.arg if self.mode == "netns" else None

    def wire(self, name: str, opts: runtime.Options) -> None:
        """Lease addresses/ports now; set the veth up once the init exists."""
        if self.mode not in ("veth", "bridge"):
            return
        from . import netpool

        if os.path.isdir(netpool.NET_DIR):
            netpool.cleanup_stale()  # what a container killed with -9 left behind
        pool = netpool.NetPool()
        lease = (pool.allocate(name, owner_pid=os.getpid()) if self.mode == "veth"
                 else pool.allocate_on_bridge(name, self.arg, owner_pid=os.getpid()))
        try:
            port_leases = pool.reserve_ports(name, self.ports, owner_pid=os.getpid())
        except BaseException:
            lease.release()
            raise
        opts.cleanups.append(lease.release)
        for pl in port_leases:
            opts.cleanups.append(pl.release)
        bridge = self.arg if self.mode == "bridge" else None
        ports = self.ports

        def setup(pid: int) -> None:
            from .linux import netsetup

            veth = netsetup.setup_veth(pid, name, lease.host_addr, lease.cont_addr,
                                       lease.prefixlen, bridge)
            opts.cleanups.append(veth.teardown)
            if ports:
                rules = netsetup.publish_ports(name, lease.cont_addr, ports, veth.host_ifname)
                opts.cleanups.append(rules.teardown)
            if opts.verbose:
                opts.log(f"network: {veth.host_ifname} <-> host0 {lease.cont_addr}/"
                         f"{lease.prefixlen}" + "".join(f", {p}/{h}->{c}" for p, h, c in ports))

        opts.network_setup = setup


def _binds(ns: types.SimpleNamespace, log: Callable[[str], None] | None = None,
           ) -> list[tuple[str, str, list[str]]]:
    binds = [presets.parse_bind(b, False, "--bind", log) for b in ns.bind]
    return binds + [presets.parse_bind(b, True, "--bind-ro", log) for b in ns.bind_ro]


def _console_size() -> tuple[int, int] | None:
    try:
        sz = os.get_terminal_size(0)
    except OSError:
        return None
    return (sz.lines, sz.columns)


def run_command(ns: types.SimpleNamespace, log: Callable[[str], None]) -> int:
    binds = _binds(ns, log)
    net = NetworkChoice(ns.network, ns.port)
    la = prepare(ns, log=log)
    try:
        spec = presets.run_spec(
            la.rootfs, list(ns.cmd), hostname=ns.hostname, base=la.base, size=la.size,
            userns=la.userns, network_host=net.host, netns_path=net.netns_path, user=ns.user,
            chdir=ns.chdir, setenv=ns.setenv, add_caps=_split_caps(ns.capability),
            drop_caps=_split_caps(ns.drop_capability),
            no_new_privileges=ns.no_new_privileges, tty=ns.tty, binds=binds,
            console_size=_console_size() if ns.tty else None, read_only=ns.read_only,
            tmpfs=ns.tmpfs,
        )
        opts = _options(ns, la, log)
        net.wire(la.claim.name, opts)
        relay = None if ns.tty else _stdio_relay(opts)
    except BaseException:
        la.release()
        raise
    # From here on the container owns (and releases) the claim and the lease.
    if relay is None:
        return runtime.run(spec, opts, on_start=la.record)
    from .console import ConsoleIO

    try:
        return runtime.run(spec, opts, on_start=la.record, io=ConsoleIO(relay=relay))
    finally:
        relay.finish()  # after a failed start: what the child wrote, then close


def _stdio_relay(opts: runtime.Options) -> StdioRelay | None:
    """Pipes for the payload's stdio where ours are host files (console.StdioRelay)."""
    from .console import StdioRelay

    relay = StdioRelay.setup()
    if relay is not None:
        opts.stdio = (relay.child[0], relay.child[1], relay.child[2])
        opts.close_in_child += relay.fds()
    return relay


def boot_command(ns: types.SimpleNamespace, log: Callable[[str], None]) -> int:
    from . import boot

    binds = _binds(ns, log)
    NetworkChoice(ns.network, ns.port)  # bad --network/--port: fail before forking
    if ns.detach:
        return boot.detach(ns, log, lambda: _boot_machine(ns, log, binds))
    machine = _boot_machine(ns, log, binds)
    return machine.run_foreground()


def _boot_machine(ns: types.SimpleNamespace, log: Callable[[str], None],
                  binds: list[tuple[str, str, list[str]]]) -> Machine:
    from . import boot

    net = NetworkChoice(ns.network, ns.port)
    la = prepare(ns, exact_name=True, log=log)
    try:
        init = presets.find_init(la.rootfs)
        notify = boot.NotifyListener(la.claim.dir, la.base if la.userns else 0)
        host_dir = boot.make_host_dir(la.claim.dir, la.base if la.userns else 0, notify)
        machine_uuid = boot.new_uuid()
        spec = presets.run_spec(
            la.rootfs, [init], hostname=ns.hostname or la.claim.name, base=la.base,
            size=la.size, userns=la.userns, network_host=net.host, netns_path=net.netns_path,
            add_caps=_split_caps(ns.capability), drop_caps=_split_caps(ns.drop_capability),
            binds=binds, boot=True, host_dir=host_dir, machine_uuid=machine_uuid,
            console_size=_console_size(), tmpfs=ns.tmpfs,
        )
        spec.process.terminal = True  # type: ignore[union-attr]  # the console is a pty
        opts = _options(ns, la, log, delegate_cgroup=True)
        net.wire(la.claim.name, opts)
    except BaseException:
        la.release()
        raise
    return boot.Machine(spec, opts, la, notify, machine_uuid, ns)
