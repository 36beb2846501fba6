"""Resource limits of `run`/`boot` and `uspawn set`: systemd's resource-control
names (systemd.resource-control(5)) -> the OCI Spec's linux.resources.

One path for every source: `--memory`/`--cpus`/`--pids`, `--property KEY=VALUE`
and the settings file's keys all become a dict of systemd property names ->
strings, which parse() validates (an error names the property and, for a flag,
the flag). The limits the OCI Spec has fields for go into linux.resources, so
the engine applies them when it creates the cgroup, before the init exists,
exactly as for `uspawn-runc create`. MemoryHigh and IOWeight have no
linux.resources field: they go to the engine request's cgroup_limits and are
set with the others, before the first process enters the cgroup.

Units are systemd's: sizes in bytes with K/M/G/T (1024-based) or a percentage
of the host's RAM, "infinity" for none; CPUQuota in percent of one CPU (200% =
two CPUs' time per 100 ms period); CPUWeight and IOWeight 1..10000 (100 is
the default); TasksMax a count, a percentage of kernel.pid_max, or infinity.
"""

from __future__ import annotations

import os

from uspawn.base.errors import SpecError, UsageError, UspawnError
from uspawn.engine import spec as S
from uspawn.kernel import cgroups

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

PROPERTIES = tuple(cgroups.SYSTEMD_KEYS)  # MemoryMax ... IOWeight
# The CFS period systemd uses for CPUQuota= (CPUQuotaPeriodSec= default).
CPU_PERIOD = 100_000
# Which flag sets which property (named in errors about a flag's value).
FLAGS = {"--memory": "MemoryMax", "--cpus": "CPUQuota", "--pids": "TasksMax"}
# cgroups.Cgroup.set_limits key -> the property it came from (errors name the property).
KEYS = {key: prop for prop, key in cgroups.SYSTEMD_KEYS.items()} | {"cpu.period": "CPUQuota"}
# No linux.resources field: passed as the engine request's cgroup_limits.
NO_SPEC_FIELD = ("memory.high", "io.weight")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50,
          "E": 1 << 60}
_UNLIMITED = ("infinity", "max", "-1")


class Limits:
    """Validated limits: set_limits keys -> values, and where each came from."""

    def __init__(self) -> None:
        self.settings: dict[str, int | str | bool] = {}
        self.origin: dict[str, str] = {}  # property -> "--memory" / "--property" / a file

    def __bool__(self) -> bool:
        return bool(self.settings)

    def name(self, key: str) -> str:
        prop = KEYS.get(key, key)
        given = self.origin.get(prop, prop)
        return prop if given == prop else f"{prop} (from {given})"

    def resources(self) -> S.Resources | None:
        """The part the engine applies at create, as OCI linux.resources."""
        s = self.settings
        mem = S.MemoryResources(limit=_int(s.get("memory.limit")),
                                swap=_int(s.get("memory.swap")))
        cpu = S.CPUResources(shares=_int(s.get("cpu.shares")), quota=_int(s.get("cpu.quota")),
                             period=_int(s.get("cpu.period")),
                             cpus=s.get("cpu.cpus") if isinstance(s.get("cpu.cpus"), str)
                             else None)
        pids = S.PidsResources(limit=_int(s.get("pids.limit")))
        res = S.Resources(
            memory=mem if mem.limit is not None or mem.swap is not None else None,
            cpu=cpu if any(v is not None for v in (cpu.shares, cpu.quota, cpu.cpus)) else None,
            pids=pids if pids.limit is not None else None)
        return res if res.memory or res.cpu or res.pids else None

    def cgroup_limits(self) -> dict[str, int | str | bool]:
        return {k: v for k, v in self.settings.items() if k in NO_SPEC_FIELD}


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def from_flags(memory: str | None = None, cpus: str | None = None, pids: str | None = None,
               properties: Iterable[str] = (), file_props: dict[str, str] | None = None,
               file_name: str = "settings file") -> dict[str, tuple[str, str]]:
    """Every source as property -> (value, where it came from). The settings file
    first, then --property, then the short flags: the command line wins, as in nspawn."""
    out: dict[str, tuple[str, str]] = {}
    for key, value in (file_props or {}).items():
        out[key] = (value, file_name)
    for kv in properties:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise UsageError(f"--property {kv!r}: not KEY=VALUE", "--property MemoryMax=1G")
        out[key.strip()] = (value.strip(), "--property")
    if memory is not None:
        out["MemoryMax"] = (memory, "--memory")
    if cpus is not None:
        out["CPUQuota"] = (_cpus_to_quota(cpus), "--cpus")
    if pids is not None:
        out["TasksMax"] = (pids, "--pids")
    return out


def _cpus_to_quota(cpus: str) -> str:
    """--cpus N (docker's flag: N CPUs' worth of time, fractions allowed) -> CPUQuota."""
    if cpus.strip().lower() in _UNLIMITED:
        return "infinity"
    try:
        n = float(cpus)
    except ValueError:
        raise UsageError(f"--cpus {cpus!r}: not a number of CPUs", "--cpus 2 or --cpus 0.5") \
            from None
    if not 0.01 <= n <= 1_000_000 or n != n:
        raise UsageError(f"--cpus {cpus!r}: out of range", "0.01 up to the host's CPU count")
    return f"{round(n * 100, 4):g}%"


def parse(given: dict[str, tuple[str, str]], host_check: bool = True) -> Limits:
    """Property values -> Limits (set_limits keys), each refused by name when it is
    malformed or when this host has no cgroup controller for it."""
    lim = Limits()
    for prop, (value, origin) in given.items():
        lim.origin[prop] = origin
        where = prop if origin == prop else (
            f"{origin} {value!r}" if origin.startswith("--") and origin != "--property"
            else f"{prop}={value} ({origin})")
        if prop not in PROPERTIES:
            raise UsageError(f"{where}: unknown or unsupported resource property {prop!r}",
                             "use " + ", ".join(PROPERTIES))
        try:
            _one(lim.settings, prop, value)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
    swap = lim.settings.get("memory.swap")
    if isinstance(swap, int) and swap >= 0:
        limit = lim.settings.get("memory.limit")
        if not isinstance(limit, int) or limit < 0:
            raise UsageError(f"{lim.name('memory.swap')}: needs MemoryMax (OCI limits memory "
                             "plus swap, counted from the memory limit)",
                             "add --memory SIZE or MemoryMax=SIZE")
        lim.settings["memory.swap"] = limit + swap
    elif swap is not None:
        lim.settings["memory.swap"] = -1
    if host_check:
        check_host(lim)
    return lim


def _one(out: dict[str, int | str | bool], prop: str, value: str) -> None:
    if prop in ("MemoryMax", "MemoryHigh", "MemorySwapMax"):
        key = {"MemoryMax": "memory.limit", "MemoryHigh": "memory.high",
               "MemorySwapMax": "memory.swap"}[prop]
        out[key] = parse_size(value)
    elif prop == "CPUQuota":
        quota = parse_percent(value, allow_over=True)
        if quota is None:
            out["cpu.quota"] = -1
        else:
            us = int(quota * CPU_PERIOD / 100)
            if us < 1000:
                raise ValueError("below 1% of one CPU (the kernel takes at least 1 ms "
                                 "per 100 ms period)")
            out["cpu.quota"] = us
        out["cpu.period"] = CPU_PERIOD
    elif prop == "CPUWeight":
        out["cpu.shares"] = weight_to_shares(parse_weight(value))
    elif prop == "IOWeight":
        out["io.weight"] = parse_weight(value)
    elif prop == "AllowedCPUs":
        out["cpu.cpus"] = parse_cpu_list(value)
    elif prop == "TasksMax":
        out["pids.limit"] = parse_tasks(value)


def _unlimited_or_share(v: str, total: Callable[[], int]) -> int | None:
    """-1 for infinity (or empty), P% of total() for "P%", None for anything else."""
    if v.lower() in _UNLIMITED or v == "":
        return -1
    if v.endswith("%"):
        pct = parse_percent(v, allow_over=False)
        assert pct is not None
        return int(total() * pct / 100)
    return None


def _ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _pid_max() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read())


def parse_size(value: str) -> int:
    """systemd's sizes: BYTES, N[K|M|G|T|P|E] (1024-based), P% of RAM, infinity (-1)."""
    v = value.strip()
    share = _unlimited_or_share(v, _ram)
    if share is not None:
        return share
    u = v.upper().removesuffix("IB").removesuffix("B")
    unit = u[-1:] if u[-1:] in _UNITS and u[-1:] else ""
    digits = u[: len(u) - len(unit)]
    try:
        n = float(digits) if digits.isascii() and digits.replace(".", "", 1).isdigit() \
            else None
    except ValueError:
        n = None
    if n is None:
        raise ValueError(f"{value!r} is not a size (BYTES, N with K/M/G/T, P%, or infinity)")
    size = int(n * _UNITS[unit])
    if not 0 <= size < 2**63:
        raise ValueError(f"{value!r} is out of range")
    return size


def parse_percent(value: str, allow_over: bool) -> float | None:
    """"N%" -> N (None for infinity/empty); above 100 only with allow_over (CPUQuota)."""
    v = value.strip()
    if v.lower() in _UNLIMITED or v == "":
        return None
    body = v.removesuffix("%")
    if body == v or not body.replace(".", "", 1).isdigit() or not body.isascii():
        raise ValueError(f"{value!r} is not a percentage (N%)")
    pct = float(body)
    if pct <= 0 or (not allow_over and pct > 100):
        raise ValueError(f"{value!r} is out of range")
    return pct


def parse_weight(value: str) -> int:
    v = value.strip()
    if not (v.isascii() and v.isdigit()) or not 1 <= int(v) <= 10000:
        raise ValueError(f"{value!r} is not a weight 1..10000 (100 is the default)")
    return int(v)


def weight_to_shares(weight: int) -> int:
    """A cgroup2 weight as OCI cpu.shares. Where cpu is a cgroup2 controller the
    engine converts shares back with runc's formula (cgroups.cpu_weight): the
    smallest shares that gives back exactly this weight. Where it is a v1
    hierarchy: systemd's own v1 conversion (weight 100 = 1024 shares, the v1
    default), so a machine keeps its fair share next to host services."""
    where = cgroups.placement("cpu.shares")
    if where is not None and where[0] == "v1":
        return max(2, min(weight * 1024 // 100, 262144))
    return shares_for_v2_weight(weight)


def shares_for_v2_weight(weight: int) -> int:
    """The smallest cpu.shares that cgroups.cpu_weight turns back into weight."""
    return 2 + -(-(weight - 1) * 262142 // 9999)


def parse_cpu_list(value: str) -> str:
    """AllowedCPUs: "0-3,6" (spaces as separators too, as systemd takes them)."""
    parts = [p for p in value.replace(" ", ",").split(",") if p]
    if not parts:
        raise ValueError("empty CPU list")
    for p in parts:
        lo, dash, hi = p.partition("-")
        if not (lo.isascii() and lo.isdigit()) or (dash and not (hi.isascii() and hi.isdigit())):
            raise ValueError(f"{value!r} is not a CPU list such as 0-1,3")
        if dash and int(hi) < int(lo):
            raise ValueError(f"{p!r}: the range runs backwards")
    return ",".join(parts)


def parse_tasks(value: str) -> int:
    v = value.strip()
    share = _unlimited_or_share(v, _pid_max)
    if share is not None:
        return share if share < 0 else max(1, share)
    if not (v.isascii() and v.isdigit()) or not 0 < int(v) < 2**62:
        raise ValueError(f"{value!r} is not a task count (N, P%, or infinity)")
    return int(v)


def check_host(lim: Limits) -> None:
    """Refuse, before anything is created, a limit this host has no controller or
    file for: never silently dropped, never found out halfway through a start."""
    for key in lim.settings:
        reason = cgroups.why_not(key)
        if reason is not None:
            raise SpecError(f"{lim.name(key)}: {reason}", "see `uspawn doctor`")


def apply(cg: cgroups.Cgroup, settings: dict[str, int | str | bool], lim: Limits) -> None:
    """Write limits to a running container's cgroup; errors name the property."""
    for key in settings:
        ctrl = cgroups.controller_of(key)
        try:
            where = cg.dir_for(key)
        except cgroups.CgroupError as exc:
            raise SpecError(f"{lim.name(key)}: {exc}") from None
        if where is None:
            # cgroups.join_v1 could move it, but the directory it makes would
            # outlive the machine (its runtime removes only what it created).
            raise SpecError(f"{lim.name(key)}: the machine is not in a cgroup v1 "
                            f"{cgroups.V1_NAMES.get(ctrl, ctrl)} hierarchy on this hybrid host",
                            "start it with a limit for that controller (boot always joins "
                            "memory, cpu and pids), then change it with `uspawn set`")
    try:
        cgroups.apply_in_order(cg, settings)
    except cgroups.CgroupError as exc:
        raise SpecError(_named(str(exc), lim)) from None
    except OSError as exc:
        raise SpecError(f"{', '.join(lim.name(k) for k in settings)}: {exc.strerror}") from None


def _named(message: str, lim: Limits) -> str:
    """cgroups names linux.resources fields; the user gave properties."""
    for key in sorted(KEYS, key=len, reverse=True):
        field = f"linux.resources.{key}"
        if message.startswith(field):
            return f"{lim.name(key)} ({field})" + message[len(field):]
    return message


def boot_defaults(res: S.Resources | None) -> S.Resources:
    """A machine joins the v1 memory, cpu and pids hierarchies of a hybrid host
    from the start (explicit "unlimited" values), so `uspawn set` can change
    those limits live without making a directory the runtime would not remove.
    On cgroup2 the values are the kernel's defaults and cost nothing."""
    res = res or S.Resources()
    res.memory = res.memory or S.MemoryResources()
    if res.memory.limit is None:
        res.memory.limit = -1
    res.pids = res.pids or S.PidsResources(limit=-1)
    res.cpu = res.cpu or S.CPUResources()
    if res.cpu.quota is None:
        res.cpu.quota, res.cpu.period = -1, CPU_PERIOD
    return res


def for_lxcfs(res: S.Resources | None) -> S.Resources | None:
    """lxcfs computes a reader's CPU view (cpuinfo, stat, cpu/online) from the CFS
    quota of the reader's *cpuset* cgroup path. On a host where cpuset is a v1
    hierarchy, a container that is not in it reads the root's (no quota): join it
    with the host's whole CPU set (no restriction) when the container has a CPU
    quota or may get one live (a boot's defaults), unless AllowedCPUs is given."""
    if res is None or res.cpu is None or res.cpu.quota is None or res.cpu.cpus:
        return res
    where = cgroups.placement("cpu.cpus")
    if where is None or where[0] != "v1":
        return res
    try:
        with open(os.path.join(where[1], "cpuset.effective_cpus")) as f:
            res.cpu.cpus = f.read().strip() or None
    except OSError:
        pass  # no cpuset view then; the memory and uptime views still work
    return res


def settings_of(given: dict[str, tuple[str, str]]) -> Limits:
    """For `uspawn set`: the same parse and host check as at start."""
    return parse(given)


def renamed(exc: UspawnError, lim: Limits) -> UspawnError:
    """An engine error about a linux.resources field, renamed to the property the
    user gave (the engine names OCI fields)."""
    text = str(exc)
    named = _named(text, lim)
    if named == text:
        return exc
    out = type(exc)(named, exc.hint)
    out.exit_code = exc.exit_code
    return out
