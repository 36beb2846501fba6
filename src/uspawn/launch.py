"""`uspawn run`: resolve the command line into a Spec + Options, then run it.

Decisions made here, before anything is created:
  - the container name (claimed in the state directory),
  - the UID range (picked or checked, and leased for the container's life),
  - the ownership mode (map / chown / off; `auto` prefers an idmapped mount
    and keeps a tree that an earlier chown already shifted on that base),
  - the seccomp program (compiled once, then read from the cache).
"""

from __future__ import annotations

from . import presets, runtime, state
from .errors import SpecError, StateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable


def _split_caps(values: list[str]) -> list[str]:
    return [c for v in values for c in v.split(",") if c]


def claim_container_name(root: str, requested: str | None, default: str) -> state.NameClaim:
    if requested:
        claim = state.claim_name(root, requested)
        if claim is None:
            raise StateError(f"container name {requested!r} is already in use",
                             "choose another --machine name")
        return claim
    for i in range(1, 1000):
        name = default if i == 1 else f"{default}-{i}"
        claim = state.claim_name(root, name)
        if claim is not None:
            return claim
    raise StateError(f"no free container name derived from {default!r}")


def run_command(ns: types.SimpleNamespace, log: Callable[[str], None]) -> int:
    rootfs = presets.check_rootfs(ns.directory)
    mode, base, size = presets.parse_private_users(ns.private_users)
    userns = mode != "no"
    ownership = ns.private_users_ownership if userns else "off"
    binds = [presets.parse_bind(b, False, "--bind") for b in ns.bind]
    binds += [presets.parse_bind(b, True, "--bind-ro") for b in ns.bind_ro]
    cmd = list(ns.cmd)
    console_size = None
    if ns.tty:
        import os

        try:
            sz = os.get_terminal_size(0)
            console_size = (sz.lines, sz.columns)
        except OSError:
            pass

    root = state.state_root(ns.root)
    claim = claim_container_name(root, ns.name, presets.machine_name(rootfs))
    name = claim.name
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
            allocator = state.RangeAllocator(root)
            if mode == "pick":
                base, lease = allocator.pick(size, prefer=shifted or None)
            else:
                lease = allocator.lease(base, size)
            lease.record(name=name, pid=_self_pid(), starttime=_self_start())
        spec = presets.run_spec(
            rootfs, cmd, hostname=ns.hostname, base=base, size=size, userns=userns,
            network_host=ns.network == "host", user=ns.user, chdir=ns.chdir,
            setenv=ns.setenv, add_caps=_split_caps(ns.capability),
            drop_caps=_split_caps(ns.drop_capability),
            no_new_privileges=ns.no_new_privileges, tty=ns.tty, binds=binds,
            console_size=console_size, read_only=ns.read_only,
        )
        from .linux import seccomp

        bpf = seccomp.policy_bpf(seccomp.default_policy(userns=userns))
        opts = runtime.Options(name, claim=claim, range_lease=lease, ownership=ownership,
                               seccomp_bpf=bpf, verbose=ns.verbose or ns.debug,
                               debug=ns.debug, log=log, auto_start=True)
    except BaseException:
        claim.release()
        if lease is not None:
            lease.release()
        raise

    def record_state(c: runtime.Container) -> None:
        if c.opts.claim is not None:
            import time

            c.opts.claim.write_state({
                "name": c.opts.name, "pid": c.init_pid, "status": "running",
                "rootfs": rootfs, "uid_base": base if userns else None,
                "uid_size": size if userns else None, "ownership": c.ownership_used,
                "started": time.time(), "runtime_pid": _self_pid(),
            })

    # From here on the container owns (and releases) the claim and the lease.
    return runtime.run(spec, opts, on_start=record_state)


def _self_pid() -> int:
    import os

    return os.getpid()


def _self_start() -> int | None:
    return state.proc_starttime(_self_pid())
