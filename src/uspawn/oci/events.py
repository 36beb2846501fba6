"""`uspawn-runc events`: a container's resource usage and OOM events, as runc prints them.

`--stats` prints one `{"type":"stats","id":ID,"data":{...}}` line and exits;
without it, a stats line every `--interval` (default 5s) and an
`{"type":"oom","id":ID}` line whenever the kernel OOM-kills in the container's
memory cgroup, until the container stops. Field names follow runc's
libcontainer/cgroups stats (types.Stats): cpu.usage.{total,percpu,kernel,user}
and cpu.throttling in nanoseconds, memory.{usage,swap}.{usage,max,limit,failcnt},
memory.cache and memory.raw (memory.stat), pids.{current,limit}; a value the
host does not keep is left out, as runc's omitempty does.

Read from the container's own cgroup directories only (cgroup2 and the v1
hierarchies it joined): a controller it is not in has no numbers of its own.
On a hybrid host without a v1 pids hierarchy, pids.current is counted from
the cgroup2 directory's cgroup.threads.
"""

from __future__ import annotations

import os
import time

from uspawn.kernel import cgroups
from uspawn.oci import lifecycle as oci
from uspawn.state.store import dumps

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable

U64_MAX = 2**64 - 1  # runc reports "max" (no limit) as the largest uint64


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return U64_MAX
    try:
        return int(text)
    except ValueError:
        return None


def _keyed(path: str) -> dict[str, int]:
    """A flat keyed file (cpu.stat, memory.stat, memory.events): name -> value."""
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _put(d: dict[str, object], key: str, value: object) -> None:
    if value is not None:
        d[key] = value


def _v1_dir(cg: cgroups.Cgroup, ctrl: str) -> str | None:
    return cg.v1_dir(ctrl)


def _cpu(cg: cgroups.Cgroup) -> dict[str, object]:
    usage: dict[str, object] = {}
    throttling: dict[str, object] = {}
    v1 = _v1_dir(cg, "cpu")
    acct = _v1_dir(cg, "cpuacct")
    if acct is None and v1 is not None and os.path.exists(os.path.join(v1, "cpuacct.usage")):
        acct = v1  # cpu,cpuacct mounted together
    if acct is not None:
        _put(usage, "total", _int(os.path.join(acct, "cpuacct.usage")))
        percpu = (_read(os.path.join(acct, "cpuacct.usage_percpu")) or "").split()
        if percpu:
            usage["percpu"] = [int(x) for x in percpu]
        ticks = _keyed(os.path.join(acct, "cpuacct.stat"))
        hz = os.sysconf("SC_CLK_TCK")
        if "system" in ticks:
            usage["kernel"] = ticks["system"] * 1_000_000_000 // hz
            usage["user"] = ticks["user"] * 1_000_000_000 // hz
    elif cg.v2_dir is not None:
        st = _keyed(os.path.join(cg.v2_dir, "cpu.stat"))
        if "usage_usec" in st:
            usage["total"] = st["usage_usec"] * 1000
            usage["kernel"] = st.get("system_usec", 0) * 1000
            usage["user"] = st.get("user_usec", 0) * 1000
    if v1 is not None and os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")):
        st = _keyed(os.path.join(v1, "cpu.stat"))
        throttling = {"periods": st.get("nr_periods", 0),
                      "throttled_periods": st.get("nr_throttled", 0),
                      "throttled_time": st.get("throttled_time", 0)}
    elif cg.v2_dir is not None:
        st = _keyed(os.path.join(cg.v2_dir, "cpu.stat"))
        if "nr_periods" in st:
            throttling = {"periods": st["nr_periods"], "throttled_periods": st["nr_throttled"],
                          "throttled_time": st.get("throttled_usec", 0) * 1000}
    out: dict[str, object] = {}
    if usage:
        out["usage"] = usage
    if throttling:
        out["throttling"] = throttling
    return out


def _joiner(d: str) -> Callable[[str], str]:
    return lambda name: os.path.join(d, name)


def _memory(cg: cgroups.Cgroup) -> dict[str, object]:
    out: dict[str, object] = {}
    v1 = _v1_dir(cg, "memory")
    v2 = cg.v2_dir
    if v1 is not None:
        f = _joiner(v1)
        usage: dict[str, object] = {"limit": _int(f("memory.limit_in_bytes")) or 0,
                                    "failcnt": _int(f("memory.failcnt")) or 0}
        _put(usage, "usage", _int(f("memory.usage_in_bytes")))
        _put(usage, "max", _int(f("memory.max_usage_in_bytes")))
        out["usage"] = usage
        if os.path.exists(f("memory.memsw.usage_in_bytes")):
            swap: dict[str, object] = {"limit": _int(f("memory.memsw.limit_in_bytes")) or 0,
                                       "failcnt": _int(f("memory.memsw.failcnt")) or 0}
            _put(swap, "usage", _int(f("memory.memsw.usage_in_bytes")))
            _put(swap, "max", _int(f("memory.memsw.max_usage_in_bytes")))
            out["swap"] = swap
        raw = _keyed(f("memory.stat"))
    elif v2 is not None and os.path.exists(os.path.join(v2, "memory.current")):
        f = _joiner(v2)
        events = _keyed(f("memory.events"))
        usage = {"limit": _int(f("memory.max")) or 0, "failcnt": events.get("max", 0)}
        _put(usage, "usage", _int(f("memory.current")))
        _put(usage, "max", _int(f("memory.peak")))
        out["usage"] = usage
        if os.path.exists(f("memory.swap.current")):
            swap = {"limit": _int(f("memory.swap.max")) or 0,
                    "failcnt": _keyed(f("memory.swap.events")).get("max", 0)}
            _put(swap, "usage", _int(f("memory.swap.current")))
            out["swap"] = swap
        raw = _keyed(f("memory.stat"))
    else:
        return out
    if raw:
        out["raw"] = raw
        cache = raw.get("cache", raw.get("file"))
        if cache:
            out["cache"] = cache
    return out


def _pids(cg: cgroups.Cgroup) -> dict[str, object]:
    out: dict[str, object] = {}
    v1 = _v1_dir(cg, "pids")
    v2 = cg.v2_dir
    for d in (v1, v2):
        if d is not None and os.path.exists(os.path.join(d, "pids.current")):
            _put(out, "current", _int(os.path.join(d, "pids.current")))
            limit = _int(os.path.join(d, "pids.max"))
            if limit is not None and limit != U64_MAX:
                out["limit"] = limit  # runc: 0 (left out) when unlimited
            return out
    if v2 is not None:
        count = 0
        for top, _dirs, files in os.walk(v2):
            if "cgroup.threads" in files:
                count += len((_read(os.path.join(top, "cgroup.threads")) or "").split())
        if count:
            out["current"] = count
    return out


def stats(cg: cgroups.Cgroup) -> dict[str, object]:
    return {"cpu": _cpu(cg), "memory": _memory(cg), "pids": _pids(cg),
            "blkio": {}, "hugetlb": {}}


def oom_kills(cg: cgroups.Cgroup) -> int:
    """The kernel's OOM-kill counter of the container's memory cgroup (0 without one)."""
    v1 = _v1_dir(cg, "memory")
    if v1 is not None:
        return _keyed(os.path.join(v1, "memory.oom_control")).get("oom_kill", 0)
    if cg.v2_dir is not None:
        return _keyed(os.path.join(cg.v2_dir, "memory.events")).get("oom_kill", 0)
    return 0


def _emit(kind: str, cid: str, data: dict[str, object] | None = None) -> None:
    ev: dict[str, object] = {"type": kind, "id": cid}
    if data is not None:
        ev["data"] = data
    print(dumps(ev), flush=True)


_UNIT_SECONDS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("", 1.0))


def interval(value: str) -> float:
    """runc's --interval is a Go duration ("5s", "500ms", "1m"); a plain number is seconds."""
    from uspawn.base.cmdline import duration

    for suffix, scale in _UNIT_SECONDS:
        if value.endswith(suffix):
            secs = duration(value[: len(value) - len(suffix)], "events --interval",
                            positive=True) * scale
            break
    return max(secs, 0.01)


def events_command(root: str, ns: types.SimpleNamespace) -> int:
    every = interval(ns.interval)
    rec = oci.Record(root, oci.check_id(ns.id))
    if rec.status() == "stopped":
        raise oci.OciError(f"events {ns.id}: container not running")
    cg = rec.cgroup()
    if cg is None:
        raise oci.OciError(f"events {ns.id}: the container has no cgroup")
    if ns.stats:
        _emit("stats", ns.id, stats(cg))
        return 0
    ooms = oom_kills(cg)
    next_stats = time.monotonic()
    # OOM counters are polled at most every 0.2 s: a notifier (eventfd on v1,
    # inotify on memory.events) would be exact but costs a ctypes path for a
    # counter containerd only logs.
    while rec.alive():
        now = time.monotonic()
        if now >= next_stats:
            _emit("stats", ns.id, stats(cg))
            next_stats = now + every
        n = oom_kills(cg)
        if n > ooms:
            for _ in range(n - ooms):
                _emit("oom", ns.id)
            ooms = n
        time.sleep(min(0.2, max(0.0, next_stats - time.monotonic())) or 0.01)
    # A last look: an OOM kill that ended the container (its init) falls between
    # the final poll and the exit. The cgroup may be gone already (deleted).
    try:
        n = oom_kills(cg)
    except OSError:
        n = ooms
    for _ in range(max(0, n - ooms)):
        _emit("oom", ns.id)
    return 0
