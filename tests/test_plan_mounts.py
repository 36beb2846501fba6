"""Who mounts what, in which order (engine/plan.py): pure logic, no kernel.

Stage A mounts the spec's mounts in config order (so /proc/self/mountinfo lists
them in that order, as runtimetest checks) and they end up locked; what lies
below a proc or sysfs mount is the init's (the kernel's mount_too_revealing
rule for nested proc/sysfs mounts); a parent directory's mount never goes
after a mount inside it.
"""

from __future__ import annotations

from typing import Any

from uspawn.engine import plan as planmod
from uspawn.engine import spec as S
from uspawn.engine.request import Request
from uspawn.kernel import syscalls as sc
from uspawn.oci.defaults import default_spec


def _plan(edit: Any = None) -> planmod.InitPlan:
    raw = default_spec().to_json()
    raw["root"] = {"path": "/", "readonly": True}
    raw["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    raw["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    if edit is not None:
        edit(raw)
    spec = S.decode(S.Spec, raw, unknown=[])
    S.validate(spec)
    return planmod.build(spec, Request())[1]


def _dests(ops: list[planmod.FsMount | planmod.FdMount]) -> list[str]:
    return [op.dest for op in ops]


def test_default_mounts_all_by_stage_a_in_config_order() -> None:
    raw = default_spec().to_json()
    init = _plan()
    assert _dests(init.host_mounts) == [m["destination"] for m in raw["mounts"]]
    assert init.mounts == []
    labels = {op.dest: op.label for op in init.host_mounts if isinstance(op, planmod.FsMount)}
    assert labels["/proc"] and labels["/dev/pts"] and labels["/dev/mqueue"]
    assert labels.get("/dev/shm", "") == ""  # a tmpfs: stage A makes it itself


def test_below_proc_and_sysfs_is_the_inits_except_sys_fs_cgroup() -> None:
    def edit(raw: dict[str, Any]) -> None:
        raw["mounts"] += [
            {"destination": "/proc/meminfo", "type": "bind", "source": "/etc/hostname",
             "options": ["bind", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"},
            {"destination": "/sys/kernel/x", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/data", "type": "tmpfs", "source": "tmpfs"},
        ]
    init = _plan(edit)
    assert _dests(init.mounts) == ["/proc/meminfo", "/sys/kernel/x"]
    assert "/sys/fs/cgroup" in _dests(init.host_mounts)
    assert _dests(init.host_mounts)[-1] == "/data"


def test_read_only_sysfs_is_made_read_only_by_the_init() -> None:
    """A read-only flag stage A set would be locked: nothing inside could mount a
    writable sysfs in a new network namespace any more."""
    def edit(raw: dict[str, Any]) -> None:
        raw["mounts"] = [m for m in raw["mounts"] if m["destination"] != "/sys"]
        raw["mounts"].append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                              "options": ["nosuid", "ro"]})
    init = _plan(edit)
    sysfs = next(op for op in init.host_mounts if op.dest == "/sys")
    assert isinstance(sysfs, planmod.FsMount)
    assert not sysfs.attrs & sc.MOUNT_ATTR_RDONLY
    assert [d for d, _ in init.readonly_later] == ["/sys"]


def test_a_parent_listed_later_still_goes_first() -> None:
    def edit(raw: dict[str, Any]) -> None:
        dev = next(m for m in raw["mounts"] if m["destination"] == "/dev")
        raw["mounts"].remove(dev)
        raw["mounts"].append(dev)
    dests = _dests(_plan(edit).host_mounts)
    assert dests.index("/dev") < dests.index("/dev/pts") < dests.index("/dev/shm")
    assert dests[0] == "/proc"  # otherwise config order


def test_parents_first_keeps_config_order_of_unrelated_and_stacked_mounts() -> None:
    def op(dest: str) -> planmod.FsMount:
        return planmod.FsMount(dest, "tmpfs", [], 0)
    ops = [op(d) for d in ("/b/c", "/a", "/b", "/x", "/x", "/a/z/y", "/a/z")]
    assert _dests(planmod.parents_first(list(ops))) == [
        "/a", "/b", "/b/c", "/x", "/x", "/a/z", "/a/z/y"]


def test_devpts_ids_become_host_ids_without_an_owner_default() -> None:
    init = _plan()
    pts = next(op for op in init.host_mounts if op.dest == "/dev/pts")
    assert isinstance(pts, planmod.FsMount)
    params = dict(pts.params)
    assert "uid" not in params  # uid= would make every pty belong to one user
    assert params["gid"] == "100005"  # the container's tty group, in host IDs
