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

from uspawn.base import cmdline, timing
from uspawn.base.errors import SpecError, UsageError, UspawnError
from uspawn.engine import console
from uspawn.engine.request import START_AUTO, Request
from uspawn.kernel import sig
from uspawn.machine import limits, presets, settings
from uspawn.machine.claims import Launch, prepare

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable

    from uspawn.engine.console import StdioRelay
    from uspawn.engine.request import Undo
    from uspawn.engine.runtime import Container
    from uspawn.machine.boot import Machine


def _split_caps(values: list[str]) -> list[str]:
    return [c for v in values for c in v.split(",") if c]


def _request(ns: types.SimpleNamespace, la: Launch, net: NetworkChoice,
             log: Callable[[str], None], lim: limits.Limits, **kw: object) -> Request:
    """The engine request of `run` and `boot`: complete here, read-only afterwards."""
    from uspawn.kernel import seccomp

    bpf = seccomp.policy_bpf(seccomp.default_policy(userns=la.userns))
    timing.mark("seccomp program (cache)")
    verbose = bool(ns.verbose or ns.debug)
    if getattr(ns, "stop_timeout", None) is not None:  # `run` only; boot keeps signal_map
        kw["stop_timeout"] = cmdline.duration(ns.stop_timeout, "--stop-timeout")
    if getattr(ns, "kill_signal", None) is not None:
        try:
            kw["kill_signal"] = sig.parse_signal(ns.kill_signal)
        except UsageError as exc:
            raise UsageError(f"--kill-signal: {exc}", "a name (TERM, USR1, RTMIN+3) "
                             "or a number 1-64") from None
    undo, setup = net.wire(la.claim.name, verbose, log)
    return Request(name=la.claim.name, claim=la.claim, range_lease=la.lease,
                   ownership=la.ownership, seccomp_bpf=bpf, start=START_AUTO,
                   verbose=verbose, debug=bool(ns.debug), log=log, undo=undo,
                   network_setup=setup, cgroup_limits=tuple(lim.cgroup_limits().items()), **kw)


class NetworkChoice:
    """--network / --port, parsed before anything is claimed."""

    def __init__(self, value: str, ports: list[str]) -> None:

        self.mode, _, self.arg = value.partition(":")
        # A reboot's lease (boot.keep_identity): the veth subnet of the previous
        # boot, asked for again instead of the first free one.
        self.keep: str | None = None
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
            from uspawn.net.pool import parse_port

            self.ports = [parse_port(p) for p in ports]

    @property
    def host(self) -> bool:
        return self.mode == "host"

    @property
    def netns_path(self) -> str | None:
        return self.arg if self.mode == "netns" else None

    def wire(self, name: str, verbose: bool, log: Callable[[str], None],
             ) -> tuple[tuple[Undo, ...], Callable[[int, list[Undo]], None] | None]:
        """Lease addresses/ports now (their release, to undo); the veth is set up
        once the init exists (the returned setup)."""
        if self.mode not in ("veth", "bridge"):
            return (), None
        from uspawn.net import pool as netpool

        if os.path.isdir(netpool.NET_DIR):
            netpool.cleanup_stale()  # what a container killed with -9 left behind
        pool = netpool.NetPool()
        lease = (pool.allocate(name, self.keep, owner_pid=os.getpid()) if self.mode == "veth"
                 else pool.allocate_on_bridge(name, self.arg, owner_pid=os.getpid()))
        try:
            port_leases = pool.reserve_ports(name, self.ports, owner_pid=os.getpid())
        except BaseException:
            lease.release()
            raise
        bridge = self.arg if self.mode == "bridge" else None
        ports = self.ports

        def setup(pid: int, undo: list[Undo]) -> None:
            from uspawn.net import links as netsetup

            veth = netsetup.setup_veth(pid, name, lease.host_addr, lease.cont_addr,
                                       lease.prefixlen, bridge)
            undo.append(veth.teardown)
            if ports:
                rules = netsetup.publish_ports(name, lease.cont_addr, ports, veth.host_ifname)
                undo.append(rules.teardown)
            if verbose:
                log(f"network: {veth.host_ifname} <-> host0 {lease.cont_addr}/"
                    f"{lease.prefixlen}" + "".join(f", {p}/{h}->{c}" for p, h, c in ports))

        return (lease.release, *(pl.release for pl in port_leases)), setup


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


def _limits(ns: types.SimpleNamespace) -> limits.Limits:
    """--memory/--cpus/--pids/--property and a settings file's limit keys
    (ns.resource_properties: systemd property -> value, from ns.settings_file),
    validated and checked against the host before anything is claimed."""
    given = limits.from_flags(getattr(ns, "memory", None), getattr(ns, "cpus", None),
                              getattr(ns, "pids", None), getattr(ns, "property", None) or (),
                              getattr(ns, "resource_properties", None),
                              str(getattr(ns, "settings_file", None) or "settings file"))
    return limits.parse(given)


def _proc_views(ns: types.SimpleNamespace, boot: bool, log: Callable[[str], None],
                ) -> list[tuple[str, str]]:
    """lxcfs's files for the container (--lxcfs, default yes for boot, no for run);
    without lxcfs a warning says what the machine loses, and it starts anyway."""
    mode = getattr(ns, "lxcfs", None) or ("yes" if boot else "no")
    if mode not in ("yes", "no"):
        raise UsageError(f"--lxcfs={mode}: not yes or no")
    if mode == "no":
        return []
    from uspawn.kernel import lxcfs

    try:
        mnt, started = lxcfs.find_or_start()
    except lxcfs.LxcfsError as exc:
        log(f"warning: lxcfs: {exc}; free, top, uptime, nproc and /proc/cpuinfo inside show "
            "the host's memory, CPUs and uptime, not the machine's limits (--lxcfs=no "
            "silences this)")
        return []
    if started and (ns.verbose or ns.debug):
        log(f"lxcfs: started on {mnt} (left running for other machines)")
    return lxcfs.files(mnt)


def run_command(ns: types.SimpleNamespace, log: Callable[[str], None]) -> int:
    """`uspawn run`: the Spec and the engine request, built here, then the engine."""
    binds = _binds(ns, log)
    net = NetworkChoice(ns.network, ns.port)
    lim = _limits(ns)
    timing.mark("options (binds, network, limits)")
    la = prepare(ns, log=log)
    timing.mark("claims (name, UID range lease, ownership)")
    relay: StdioRelay | None = None
    try:
        views = _proc_views(ns, False, log)  # after the tree checks: a refused run starts none
        spec = presets.run_spec(
            la.rootfs, list(ns.cmd), hostname=ns.hostname, base=la.base, size=la.size,
            userns=la.userns, network_host=net.host, netns_path=net.netns_path, user=ns.user,
            chdir=ns.chdir, setenv=ns.setenv, add_caps=_split_caps(ns.capability),
            drop_caps=_split_caps(ns.drop_capability),
            no_new_privileges=ns.no_new_privileges, tty=ns.tty, binds=binds,
            console_size=_console_size() if ns.tty else None, read_only=ns.read_only,
            tmpfs=ns.tmpfs, proc_views=views,
            resources=limits.for_lxcfs(lim.resources()) if views else lim.resources(),
        )
        settings.add_rlimits(spec, ns)  # Limit*= of NAME.nspawn
        timing.mark("spec build")
        if not ns.tty:
            from uspawn.engine.console import StdioRelay

            # Pipes for the payload's stdio where ours are host files.
            relay = StdioRelay.setup()
        stdio = {} if relay is None else {
            "stdio": (relay.child[0], relay.child[1], relay.child[2]),
            "close_in_child": tuple(relay.fds())}
        req = _request(ns, la, net, log, lim, **stdio)
        timing.mark("request")
    except BaseException:
        la.release()
        if relay is not None:
            relay.finish()
        raise
    # From here on the container owns (and releases) the claim and the lease.
    def record(c: Container) -> None:  # `uspawn stop` uses the same first signal and grace
        la.record(c, kill_signal=req.kill_signal or sig.SIGTERM, stop_timeout=req.stop_timeout)

    try:
        if relay is None:
            return console.run(spec, req, on_start=record)
        from uspawn.engine.console import ConsoleIO

        try:
            return console.run(spec, req, on_start=record, io=ConsoleIO(relay=relay))
        finally:
            relay.finish()  # after a failed start: what the child wrote, then close
    except UspawnError as exc:
        raise limits.renamed(exc, lim) from None


def boot_command(ns: types.SimpleNamespace, log: Callable[[str], None]) -> int:
    from uspawn.machine import boot

    if getattr(ns, "keep_unit", False):
        from uspawn.machine import machined

        ns.cgroup_rel = machined.keep_unit()  # before any fork: all of it in `supervisor`
    make_machine, lim = machine_factory(ns, log)
    if ns.detach:
        return boot.detach(ns, log, make_machine)
    machine = make_machine()
    if not os.isatty(0):  # no console to forward (the systemd unit): the C monitor's job
        from uspawn.machine import monitor

        machine.handover = lambda c: monitor.hand_over(monitor.Foreground(), machine, c)
    try:
        return machine.run_foreground()
    except UspawnError as exc:
        raise limits.renamed(exc, lim) from None


def machine_factory(ns: types.SimpleNamespace, log: Callable[[str], None],
                    ) -> tuple[Callable[[], Machine], limits.Limits]:
    """What boots the machine ns describes (each call: a new boot of it), and its
    limits; bad --bind, --network, --port or limits fail here, before any fork."""
    binds = _binds(ns, log)
    NetworkChoice(ns.network, ns.port)
    lim = _limits(ns)
    return (lambda: _boot_machine(ns, log, binds, lim)), lim


def _own_scope(ns: types.SimpleNamespace, name: str, log: Callable[[str], None]) -> None:
    """A detached machine on a systemd host gets a scope of its own, as nspawn's
    machine-NAME.scope, so that machined can register it (machine/machined.py).
    Runs in the supervisor, once (a reboot keeps ns.cgroup_rel)."""
    from uspawn.machine import machined

    if not machined.machined_present():
        return
    why = machined.enter_scope(name)
    if why is not None:
        log(f"warning: machine {name} stays outside systemd's units and is not registered "
            f"with systemd-machined: {why}")
        ns.cgroup_rel = ""  # not asked again at a reboot
        return
    ns.cgroup_rel = machined.keep_unit()


def _boot_machine(ns: types.SimpleNamespace, log: Callable[[str], None],
                  binds: list[tuple[str, str, list[str]]], lim: limits.Limits) -> Machine:
    from uspawn.machine import boot

    net = NetworkChoice(ns.network, ns.port)
    net.keep = getattr(ns, "keep_network", None)  # a reboot keeps its address (boot.py)
    la = prepare(ns, exact_name=True, log=log)
    try:
        if getattr(ns, "detach", False) and getattr(ns, "cgroup_rel", None) is None:
            _own_scope(ns, la.claim.name, log)
        init = presets.find_init(la.rootfs)
        # After the tree is known good: a refused boot starts no lxcfs.
        views = _proc_views(ns, True, log)
        notify = boot.NotifyListener(la.claim.dir, la.base if la.userns else 0)
        host_dir = boot.make_host_dir(la.claim.dir, la.base if la.userns else 0, notify)
        machine_uuid = getattr(ns, "machine_uuid", None) or boot.new_uuid()  # reboot: same
        spec = presets.run_spec(
            la.rootfs, [init, *getattr(ns, "parameters", [])],  # Parameters= of NAME.nspawn
            hostname=ns.hostname or la.claim.name, base=la.base,
            size=la.size, userns=la.userns, network_host=net.host, netns_path=net.netns_path,
            add_caps=_split_caps(ns.capability), drop_caps=_split_caps(ns.drop_capability),
            binds=binds, boot=True, host_dir=host_dir, machine_uuid=machine_uuid,
            tty=True, console_size=_console_size(), tmpfs=ns.tmpfs,  # the console is a pty
            resources=limits.for_lxcfs(limits.boot_defaults(lim.resources())) if views
            else limits.boot_defaults(lim.resources()), proc_views=views,
            # NAME.nspawn's Environment=, NoNewPrivileges=, ReadOnly= (machine/settings.py)
            setenv=getattr(ns, "setenv", None), read_only=bool(getattr(ns, "read_only", False)),
            no_new_privileges=bool(getattr(ns, "no_new_privileges", False)),
        )
        settings.add_rlimits(spec, ns)
        # INT/TERM to uspawn mean "power the machine off cleanly", as for nspawn.
        req = _request(ns, la, net, log, lim, delegate_cgroup=True,
                       cgroup_path=getattr(ns, "cgroup_rel", None) or None,  # a unit's
                       signal_map={sig.SIGINT: boot.SIGRTMIN_3, sig.SIGTERM: boot.SIGRTMIN_3})
    except BaseException:
        la.release()
        raise
    return boot.Machine(spec, req, la, notify, machine_uuid, ns)
