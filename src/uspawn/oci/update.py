"""`uspawn-runc update`: new resource limits for a running container (runc's flags).

containerd's CRI calls it for UpdateContainerResources. The limits come from
`-r FILE` (runtime-spec linux.resources JSON, `-` = stdin) and/or runc's flags
(a flag wins over the same field of the file; runc ignores flags when -r is
given, uspawn applies both). They are written through kernel/cgroups.py's
Cgroup.set_limits, the code that applies a config's linux.resources at create,
one group at a time (memory, cpu, cpuset, pids) so an error names its flags.

On hybrid and v1 hosts a container only joins the v1 hierarchies its config
had limits for; a limit for another controller first moves the container's
processes into that hierarchy (cgroups.join_v1), and the state records the new
directory so `delete` removes it.
"""

from __future__ import annotations

import os
import sys

from uspawn.base.errors import SpecError, UsageError
from uspawn.engine import spec as S
from uspawn.kernel import cgroups
from uspawn.oci import lifecycle as oci
from uspawn.state.store import dumps, loads, write_atomic

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types

# runc's update flags that take a size ("64m", "1g", -1 = unlimited).
SIZE_FLAGS = {"memory": ("memory", "limit"), "memory_reservation": ("memory", "reservation"),
              "memory_swap": ("memory", "swap")}
# runc's numeric flags.
NUMBER_FLAGS = {"cpu_period": ("cpu", "period"), "cpu_quota": ("cpu", "quota"),
                "cpu_share": ("cpu", "shares"), "pids_limit": ("pids", "limit")}
TEXT_FLAGS = {"cpuset_cpus": ("cpu", "cpus"), "cpuset_mems": ("cpu", "mems")}
# runc flags uspawn cannot apply: refused by name, never silently dropped.
UNSUPPORTED = ("blkio_weight", "cpu_rt_period", "cpu_rt_runtime", "kernel_memory",
               "kernel_memory_tcp", "l3_cache_schema", "mem_bw_schema")


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def parse_size(value: str, flag: str) -> int:
    """A size as runc takes it: bytes, or N with k/m/g/t (1024-based); -1 = unlimited."""
    from uspawn.base.cmdline import size

    return -1 if value.strip() == "-1" else size(value.strip(), flag)


def parse_number(value: str, flag: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: not an integer") from None
    if not -1 <= n < 2**63:
        raise UsageError(f"{flag} {value!r}: out of range -1..2^63-1")
    return n


def _read_resources(path: str) -> S.Resources:
    where = "-r " + ("(stdin)" if path == "-" else path)
    try:
        if path == "-":
            raw = loads(sys.stdin.buffer.read())
        else:
            with open(path, "rb") as f:
                raw = loads(f.read())
    except (OSError, ValueError, RecursionError) as exc:
        raise SpecError(f"{where}: {getattr(exc, 'strerror', None) or exc}") from None
    unknown: list[str] = []
    res = S.decode(S.Resources, raw, "linux.resources", unknown)
    # Fields update cannot apply are refused, not dropped (hugepageLimits, blockIO...);
    # empty ones pass: containerd's CRI sends the whole linux.resources of the spec.
    given = [u for u in unknown if _value_at(raw, u) not in (None, [], {}, 0, "")]
    if given:
        raise SpecError(f"{where}: {', '.join(given)}: not supported by uspawn-runc update")
    # devices: fixed at create (the BPF program); runc's update skips them as well
    # (SkipDevices), and containerd always sends the spec's rules back.
    res.devices = []
    return res


def _value_at(raw: object, dotted: str) -> object:
    for key in dotted.split(".")[2:]:  # below "linux.resources"
        if not isinstance(raw, dict):
            return None
        raw = raw.get(key)
    return raw


# The fields update applies, as cgroups.Cgroup.set_limits keys, in the order the
# kernel needs them (memory before memory+swap, the CFS period before the quota),
# and the v1 controller each lives in on a hybrid or v1 host.
FIELDS = {("memory", "limit"): "memory", ("memory", "reservation"): "memory",
          ("memory", "swap"): "memory", ("memory", "swappiness"): "memory",
          ("memory", "disable_oom_killer"): "memory",
          ("cpu", "shares"): "cpu", ("cpu", "period"): "cpu", ("cpu", "quota"): "cpu",
          ("cpu", "cpus"): "cpuset", ("cpu", "mems"): "cpuset", ("pids", "limit"): "pids"}
# Applied in one set_limits call each: their files constrain each other.
GROUPS = ("memory", "cpu", "cpuset", "pids", "hugetlb")


def limit_key(group: str, attr: str) -> str:
    """("memory", "disable_oom_killer") -> "memory.disableOOMKiller" (set_limits' keys)."""
    cls = {"memory": S.MemoryResources, "cpu": S.CPUResources, "pids": S.PidsResources}[group]
    return f"{group}.{cls.json_name(attr)}"


def resources_from(ns: types.SimpleNamespace) -> tuple[S.Resources, dict[tuple[str, str], str]]:
    """The requested resources; the second value names, per field, where it came from."""
    for dest in UNSUPPORTED:
        if getattr(ns, dest, ""):
            raise UsageError(f"update {flag_name(dest)}: not supported by uspawn-runc")
    res = _read_resources(ns.resources) if ns.resources else S.Resources()
    origin: dict[tuple[str, str], str] = {}
    for key in FIELDS:
        part = getattr(res, key[0])
        if part is not None and getattr(part, key[1]) is not None:
            origin[key] = "linux.resources." + limit_key(*key)
    flags: list[tuple[str, tuple[str, str], object]] = []
    for dest, field in SIZE_FLAGS.items():
        if getattr(ns, dest):
            flags.append((dest, field, parse_size(getattr(ns, dest), flag_name(dest))))
    for dest, field in NUMBER_FLAGS.items():
        if getattr(ns, dest):
            flags.append((dest, field, parse_number(getattr(ns, dest), flag_name(dest))))
    for dest, field in TEXT_FLAGS.items():
        if getattr(ns, dest):
            flags.append((dest, field, getattr(ns, dest)))
    for dest, (group, attr), value in flags:
        part = getattr(res, group)
        if part is None:
            part = {"memory": S.MemoryResources, "cpu": S.CPUResources,
                    "pids": S.PidsResources}[group]()
            setattr(res, group, part)
        setattr(part, attr, value)
        origin[(group, attr)] = flag_name(dest)
    for i, h in enumerate(res.hugepage_limits):
        origin[("hugetlb", h.page_size)] = f"linux.resources.hugepageLimits[{i}]"
    if not origin:
        raise UsageError("update: nothing to change", "pass -r FILE or a flag such as --memory")
    _check(res, origin)
    return res, origin


def _check(res: S.Resources, origin: dict[tuple[str, str], str]) -> None:
    """What the kernel would refuse with a bare EINVAL, refused here by name."""
    cpu = res.cpu
    if cpu is not None and cpu.period is not None and not 1000 <= cpu.period <= 1_000_000:
        raise UsageError(f"{origin[('cpu', 'period')]} {cpu.period}: the kernel takes "
                         "1000..1000000 microseconds")
    if cpu is not None and cpu.quota is not None and 0 <= cpu.quota < 1000:
        raise UsageError(f"{origin[('cpu', 'quota')]} {cpu.quota}: at least 1000 "
                         "microseconds, or -1 for unlimited")
    mem = res.memory
    if (mem is not None and mem.limit is not None and mem.swap is not None
            and mem.swap >= 0 and 0 <= mem.limit and mem.swap < mem.limit):
        raise UsageError(f"{origin[('memory', 'swap')]} {mem.swap}: memory+swap must be at "
                         f"least the memory limit ({mem.limit})")


# --- applying ---------------------------------------------------------------------------

def apply(root: str, cid: str, res: S.Resources, origin: dict[tuple[str, str], str]) -> None:
    with oci.IdLock(os.path.join(root, oci.check_id(cid))):
        rec = oci.Record(root, cid)
        if rec.status() == "stopped":
            raise oci.OciError(f"update {cid}: container not running")
        cg = rec.cgroup()
        if cg is None:
            raise oci.OciError(f"update {cid}: the container has no cgroup")
        by_ctrl: dict[str, dict[str, int | str | bool]] = {}
        names: dict[str, str] = {}  # set_limits key -> the flag or field the user gave
        for key, ctrl in FIELDS.items():  # FIELDS' order is the kernel's
            if key not in origin:
                continue
            value = getattr(getattr(res, key[0]), key[1])
            if key == ("pids", "limit") and value == 0:
                continue  # runc: 0 leaves the limit as it is
            by_ctrl.setdefault(ctrl, {})[limit_key(*key)] = value
            names["linux.resources." + limit_key(*key)] = origin[key]
        for i, h in enumerate(res.hugepage_limits):
            if not cgroups.hugepage_size_known(h.page_size):
                raise oci.OciError(f"update {cid}: linux.resources.hugepageLimits[{i}].pageSize:"
                                   f" {h.page_size!r} is not a huge page size of this host")
            by_ctrl.setdefault("hugetlb", {})[f"hugetlb.{h.page_size}"] = h.limit
            names[f"linux.resources.hugetlb.{h.page_size}"] = f"linux.resources.hugepageLimits[{i}]"
        added = _join(cg, list(by_ctrl), cid)
        if added:  # recorded first, so `delete` removes them whatever happens next
            rec.data["cgroup"] = cg.to_json()
            write_atomic(os.path.join(rec.dir, "state.json"), dumps(rec.data))
        mem = by_ctrl.get("memory", {})
        if "memory.swap" in mem and "memory.limit" not in mem:
            limit = _current_v2_limit(cg)
            if limit is not None:  # cgroup2 limits swap alone: swap_v2 needs the limit
                by_ctrl["memory"] = {"memory.limit": limit, **mem}
        for ctrl in GROUPS:
            if ctrl not in by_ctrl:
                continue
            try:
                cg.set_limits(by_ctrl[ctrl])
            except cgroups.CgroupError as exc:
                raise oci.OciError(f"update {cid}: {_by_name(str(exc), names)}") from None
            except OSError as exc:
                given = ", ".join(names.get(f"linux.resources.{k}", k) for k in by_ctrl[ctrl])
                raise oci.OciError(f"update {cid}: {given}: {exc.strerror}") from None


def _current_v2_limit(cg: cgroups.Cgroup) -> int | None:
    """memory.max of the container's cgroup2 directory, when memory lives there."""
    if cg.v2_dir is None:
        return None
    try:
        with open(os.path.join(cg.v2_dir, "memory.max")) as f:
            text = f.read().strip()
    except OSError:
        return None  # memory is a v1 controller here
    return -1 if text == "max" else int(text)


def _by_name(message: str, names: dict[str, str]) -> str:
    """set_limits names the config field; a value from a flag is named as the flag."""
    for field, given in sorted(names.items(), key=lambda kv: -len(kv[0])):
        if message.startswith(field + ":") or message.startswith(field + " "):
            return given + message[len(field):]
    return message


def _join(cg: cgroups.Cgroup, controllers: list[str], cid: str) -> list[str]:
    try:
        return cgroups.join_v1(cg, controllers)
    except (OSError, cgroups.CgroupError) as exc:
        raise oci.OciError(f"update {cid}: join the v1 {'/'.join(controllers)} hierarchy: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def update_command(root: str, ns: types.SimpleNamespace) -> int:
    res, origin = resources_from(ns)
    apply(root, ns.id, res, origin)
    return 0
