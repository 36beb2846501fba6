"""Unit tier: UID range leases and name claims (real files and flocks, no root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from uspawn.base.errors import StateError
from uspawn.state import store as state


def test_pick_skips_held_ranges(tmp_path: Path) -> None:
    alloc = state.RangeAllocator(str(tmp_path))
    b1, l1 = alloc.pick()
    b2, l2 = alloc.pick()
    assert b1 != b2
    assert b1 % state.RANGE_SIZE == 0 and b2 % state.RANGE_SIZE == 0
    assert b1 >= state.PICK_FIRST
    l1.release()
    b3, l3 = alloc.pick()
    assert b3 == b1  # released ranges are reused
    l2.release()
    l3.release()


def test_prefer_is_taken_when_free(tmp_path: Path) -> None:
    alloc = state.RangeAllocator(str(tmp_path))
    base, lease = alloc.pick(prefer=0x40000000)
    assert base == 0x40000000
    lease.release()


def test_explicit_range_conflicts(tmp_path: Path) -> None:
    alloc = state.RangeAllocator(str(tmp_path))
    lease = alloc.lease(0x50000000)
    with pytest.raises(StateError, match="already used"):
        alloc.lease(0x50000000)
    # an overlapping range of another size is refused too
    with pytest.raises(StateError):
        alloc.lease(0x50000000 + 100, 10)
    lease.release()
    alloc.lease(0x50000000).release()


def test_lease_dies_with_its_holder(tmp_path: Path) -> None:
    """A holder killed with SIGKILL frees its range: the flock goes with it."""
    code = (
        "import signal, sys; from uspawn.state import store as state;"
        f"a = state.RangeAllocator({str(tmp_path)!r}); l = a.lease(0x60000000);"
        "print('held', flush=True); signal.pause()"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    alloc = state.RangeAllocator(str(tmp_path))
    with pytest.raises(StateError):
        alloc.lease(0x60000000)
    p.kill()
    p.wait()
    alloc.lease(0x60000000).release()


def test_recorded_live_owner_keeps_the_claim(tmp_path: Path) -> None:
    """A claim handed over to a live process (detached containers) stays taken."""
    alloc = state.RangeAllocator(str(tmp_path))
    lease = alloc.lease(0x61000000)
    lease.record(pid=os.getpid(), starttime=state.proc_starttime(os.getpid()))
    os.close(lease.fd)  # drop the flock, keep the record
    with pytest.raises(StateError):
        alloc.lease(0x61000000)
    # a record naming a dead process does not hold anything
    with open(lease.path, "w") as f:
        f.write('{"pid": 999999999, "starttime": 1}')
    alloc.lease(0x61000000).release()


def test_a_shared_range_stays_taken_while_any_holder_lives(tmp_path: Path) -> None:
    """A CRI pod's containers co-own their sandbox's range (state.share): whichever
    holder dies first, nobody picks or leases the range until the last one is gone."""
    alloc = state.RangeAllocator(str(tmp_path))
    base, sandbox = alloc.pick()
    ctr = alloc.share(base, state.RANGE_SIZE, "ctr-1")
    assert os.path.basename(ctr.path) == f"{base}-{state.RANGE_SIZE}@ctr-1.lock"
    sandbox.release()  # the sandbox's init died first
    other, lease = alloc.pick()
    assert other != base
    with pytest.raises(StateError, match="already used"):
        alloc.lease(base)
    with pytest.raises(StateError):  # overlapping, another size
        alloc.lease(base + 10, 10)
    with pytest.raises(StateError, match="already held"):
        alloc.share(base, state.RANGE_SIZE, "ctr-1")  # the same id twice
    ctr.release()
    again, lease2 = alloc.pick()
    assert again == base
    # An id that is no plain file name (OCI allows 255 characters and a leading dot)
    # becomes its hash; the range is held all the same.
    odd = alloc.share(base, state.RANGE_SIZE, "." + "x" * 254)
    assert os.path.basename(odd.path).count("@") == 1 and len(os.path.basename(odd.path)) < 100
    for held in (lease, lease2, odd):
        held.release()


def test_a_stale_co_owner_file_holds_nothing(tmp_path: Path) -> None:
    """A co-owner killed without its delete leaves its file; no flock and no live
    recorded owner: the next pick takes the range and removes the file."""
    alloc = state.RangeAllocator(str(tmp_path))
    stale = tmp_path / f"{state.PICK_FIRST}-{state.RANGE_SIZE}@gone.lock"
    stale.write_text('{"pid": 999999999, "starttime": 1}')
    base, lease = alloc.pick()
    assert base == state.PICK_FIRST and not stale.exists()
    lease.release()


def test_name_claims(tmp_path: Path) -> None:
    c = state.claim_name(str(tmp_path), "web")
    assert c is not None
    assert state.claim_name(str(tmp_path), "web") is None
    c.write_state({"name": "web", "pid": 1})
    assert [s["name"] for s in state.read_states(str(tmp_path))] == ["web"]
    c.release()
    assert state.read_states(str(tmp_path)) == []
    assert not (tmp_path / "containers" / "web").exists()


def test_host_ranges_are_avoided(tmp_path: Path) -> None:
    used = state._host_id_ranges()
    alloc = state.RangeAllocator(str(tmp_path))
    base, lease = alloc.pick()
    assert not state._overlaps(base, state.RANGE_SIZE, used)
    lease.release()


def test_a_corrupted_cgroup_record_names_no_host_directory() -> None:
    """delete and the guardian kill what a record's cgroup directories hold and remove
    them: only the record's own path strictly below a cgroup hierarchy survives."""
    from uspawn.kernel.cgroups import Cgroup, detect_layout

    _layout, unified = detect_layout()
    hier = unified or "/sys/fs/cgroup"
    for dirs, rel in (([hier], ""), ([hier], "."), (["/etc"], "etc"),
                      ([f"{hier}/x/../.."], "x/../.."), ([f"{hier}/system.slice"], "uspawn/a")):
        assert Cgroup.from_json({"name": "a", "layout": "unified", "dirs": dirs, "rel": rel,
                                 "made": [hier, "/etc"]}).dirs == []
    ok = Cgroup.from_json({"name": "a", "layout": "unified", "dirs": [f"{hier}/uspawn/a"],
                           "rel": "uspawn/a", "made": [hier, f"{hier}/uspawn"]})
    assert ok.dirs == [f"{hier}/uspawn/a"] and ok.made == [f"{hier}/uspawn"]
