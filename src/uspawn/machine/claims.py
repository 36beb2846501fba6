"""What `run` and `boot` decide and claim before a container is created.

  - the container name (claimed in the state directory; `boot` names must be
    free, `run` derives a free one from the directory name),
  - the UID range (picked or checked, and leased for the container's life),
  - the ownership mode (map / chown / off; `auto` prefers an idmapped mount
    and keeps a tree that an earlier chown already shifted on that base).
"""

from __future__ import annotations

import os

from uspawn.base.errors import SpecError, StateError, UsageError
from uspawn.engine import runtime
from uspawn.machine import presets
from uspawn.state import store as state

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable


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
    from uspawn.kernel.cgroups import name_busy
    from uspawn.machine.reclaim import reclaim_stale

    reclaim_stale(root)
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
        if c.claim is not None:
            c.claim.write_state(self.record_fields(c, **extra))

    def record_fields(self, c: runtime.Container, **extra: object) -> dict[str, object]:
        import time

        return {
            "name": c.req.name, "pid": c.init_pid,
            "pid_start": state.proc_starttime(c.init_pid), "status": "running",
            "rootfs": self.rootfs, "uid_base": self.base if self.userns else None,
            "uid_size": self.size if self.userns else None, "ownership": c.ownership_used,
            # When the container started, not when this record was (re)written: a
            # machine's record is rewritten on every sd_notify message.
            "started": c.started_at or time.time(), "runtime_pid": os.getpid(),
            # uspawn/NAME, or the unit's cgroup with --keep-unit (status and set read it)
            "cgroup_rel": c.cgroup.rel if c.cgroup is not None else None, **extra,
        }


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
            from uspawn.kernel import idshift

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
