"""Reclaim what machines killed together with every uspawn process left behind."""

from __future__ import annotations

import os
import stat

from uspawn.base.errors import StateError
from uspawn.machine import presets
from uspawn.state import store as state


def reclaim_stale(root: str) -> list[str]:
    """Remove what machines killed together with every uspawn process left behind.

    kill -9 of a machine's runtime and its guardian at once leaves no process to
    clean up. The kernel does most of it: the init dies with the runtime
    (PR_SET_PDEATHSIG), its namespaces, veth and processes go with it, and the
    flocks drop, so its name, UID range and network leases are free again. Its
    record, its empty cgroup directories and the nft rules of its published ports
    stay; every `list`, `status`, `stop` and start removes them here. A record is
    stale when nobody holds its lock, and it has a state.json (a claim that is
    still being made has none yet). Returns what was removed."""
    cdir = os.path.join(root, "containers")
    try:
        names = sorted(os.listdir(cdir))
    except OSError:
        return []  # no state yet; a broken state directory is reported by its readers
    removed: list[str] = []
    for name in names:
        if presets.machine_name(name) != name:
            continue  # not a directory uspawn made: left alone
        try:  # only uspawn's own shapes: a real directory holding a regular state.json
            if not (stat.S_ISDIR(os.lstat(os.path.join(cdir, name)).st_mode) and stat.S_ISREG(
                    os.lstat(os.path.join(cdir, name, "state.json")).st_mode)):
                continue
        except OSError:
            continue
        try:
            claim = state.claim_name(root, name)
        except StateError:
            continue
        if claim is None:
            continue  # live
        try:
            from uspawn.kernel import cgroups

            cg = cgroups.leftover(name) if not cgroups.name_busy(name) else None
            if cg is not None:
                cg.destroy()
                removed.append(f"cgroup {cg.rel} of {name}")
        except (OSError, cgroups.CgroupError):
            pass  # reported again next time; the record goes anyway
        try:
            claim.release()
        except OSError:
            continue  # e.g. a mount left on it: reported by the next start of that name
        removed.append(f"record of {name}")
    if removed:
        from uspawn.net import pool as netpool

        if os.path.isdir(netpool.NET_DIR):
            removed += netpool.cleanup_stale()
    return removed
