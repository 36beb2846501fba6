"""cgroup layout detection and per-container cgroups on v2, hybrid and v1 hosts.

Layouts:
  unified  /sys/fs/cgroup is cgroup2 (what most hosts run now)
  hybrid   v1 controllers under /sys/fs/cgroup/<ctrl>, cgroup2 at .../unified
  legacy   v1 only

A container gets `<hierarchy>/uspawn/<name>` in the cgroup2 hierarchy (when
there is one) and, on hybrid/legacy hosts, in each v1 hierarchy whose
controller it has limits for, so the limits work on either kind of host.
A directory that already holds processes is never taken over: that cgroup
belongs to someone else.
"""

from __future__ import annotations

import errno
import os
import time

from uspawn.base import read_text as _read

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP2_SUPER_MAGIC = 0x63677270
PARENT = "uspawn"
V1_CONTROLLERS = ("memory", "pids", "cpu")


class CgroupError(Exception):
    pass


def _mounts_of(fstypes: tuple[str, ...]) -> set[str]:
    """Mount points of filesystems of these types, from one read of mountinfo."""
    found = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] in fstypes:
                    found.add(fields[4])
    except (OSError, ValueError):
        pass
    return found


def _cgroup2_mounts() -> set[str]:
    return _mounts_of(("cgroup2",))


def detect_layout(cgroup2: set[str] | None = None) -> tuple[str, str | None]:
    """Return (layout, cgroup2 mount point or None)."""
    if cgroup2 is None:
        cgroup2 = _cgroup2_mounts()
    if CGROUP_ROOT in cgroup2:
        return "unified", CGROUP_ROOT
    unified = os.path.join(CGROUP_ROOT, "unified")
    if unified in cgroup2:
        return "hybrid", unified
    return "legacy", None


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _v2_value(value: int) -> str:
    """OCI's -1 (unlimited, as runc takes it) is "max" in cgroup2 files (and pids.max)."""
    return "max" if value < 0 else str(value)


# set_limits keys beyond OCI's linux.resources fields (systemd's MemoryHigh and
# IOWeight): "memory.high" is cgroup2's memory.high, "io.weight" 1..10000 is
# cgroup2's io.weight (or io.bfq.weight) and v1's blkio.weight / blkio.bfq.weight.
V1_NAMES = {"io": "blkio"}


def controller_of(key: str) -> str:
    """The cgroup2 controller name of a set_limits key ("cpu.cpus" -> "cpuset")."""
    return "cpuset" if key in ("cpu.cpus", "cpu.mems") else key.split(".")[0]


class Cgroup:
    """The cgroup directories of one container (one per hierarchy)."""

    def __init__(self, name: str, layout: str, unified: str | None, dirs: list[str],
                 rel: str | None = None, made: list[str] | None = None) -> None:
        self.name = name
        self.layout = layout
        self.unified = unified
        self.dirs = dirs
        self.rel = rel or f"{PARENT}/{name}"  # path below each hierarchy's root
        # Parents create() had to make for an OCI cgroupsPath (deepest last): removed
        # again by destroy() when empty, so a config's path leaves nothing behind.
        self.made = made if made is not None else []

    @property
    def v2_dir(self) -> str | None:
        if self.unified is None:
            return None
        return os.path.join(self.unified, self.rel)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "layout": self.layout, "unified": self.unified,
                "dirs": self.dirs, "rel": self.rel, "made": self.made}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Cgroup:
        dirs = data.get("dirs")
        unified = data.get("unified")
        rel = data.get("rel")
        made = data.get("made")
        rel = rel if isinstance(rel, str) else None
        # A record is read back by delete/guardian cleanups that kill what the
        # directories hold and remove them: keep only directories that are the
        # record's own path strictly below a cgroup hierarchy (a corrupted record
        # must not name a hierarchy's root or any other host directory).
        keep = [d for d in dirs if isinstance(d, str) and _plausible(d, rel)] \
            if isinstance(dirs, list) else []
        return cls(str(data.get("name")), str(data.get("layout")),
                   unified if isinstance(unified, str) else None, keep, rel,
                   [d for d in made if isinstance(d, str) and _plausible_parent(d, keep)]
                   if isinstance(made, list) else [])

    def add(self, pid: int, skip_v2: bool = False) -> None:
        v2 = self.v2_dir
        for d in self.dirs:
            if not (skip_v2 and d == v2):
                _write(os.path.join(d, "cgroup.procs"), str(pid))

    def set_limits(self, limits: dict[str, int | str | bool]) -> list[str]:
        """Write linux.resources (keys as OCI names: "memory.limit", "cpu.shares",
        ...) to cgroup2 where the unified hierarchy has the controller, else to
        its v1 hierarchy. A limit with nowhere to go raises CgroupError naming
        the field; never silently dropped. Returns warnings (none yet)."""
        for key, value in limits.items():
            ctrl = controller_of(key)
            v2 = self.v2_dir
            try:
                if v2 is not None and ctrl in _controllers_of(v2):
                    _set_v2(v2, key, value, limits)
                    continue
                d = self.v1_dir(V1_NAMES.get(ctrl, ctrl))
                if d is None:
                    raise CgroupError(f"linux.resources.{key}: no {ctrl} controller for this "
                                      "container (neither cgroup2 nor a v1 hierarchy has it)")
                _set_v1(d, key, value, limits)
            except OSError as exc:
                raise CgroupError(f"linux.resources.{key}: the kernel refuses {value!r}: "
                                  f"{exc.strerror}") from None
        return []

    def dir_for(self, key: str) -> str | None:
        """The directory a set_limits key is written to (as set_limits picks), or None.
        A controller cgroup2 offers but the directory lacks is enabled for it first."""
        ctrl = controller_of(key)
        v2 = self.v2_dir
        if v2 is not None and self.unified is not None and ctrl not in _controllers_of(v2) \
                and ctrl in _controllers(self.unified):
            enable_v2(self.unified, v2, [ctrl])
        if v2 is not None and ctrl in _controllers_of(v2):
            return v2
        return self.v1_dir(V1_NAMES.get(ctrl, ctrl))

    def v1_dir(self, ctrl: str) -> str | None:
        """This container's directory in the v1 hierarchy of ctrl (whatever depth
        an OCI cgroupsPath gives rel: d is <hierarchy>/<rel>)."""
        rel = self.rel.strip("/")
        for d in self.dirs:
            if d == self.v2_dir or not d.endswith("/" + rel):
                continue
            if ctrl in os.path.basename(d[: len(d) - len(rel) - 1]).split(","):
                return d
        return None

    def delegate(self, uid: int, gid: int) -> None:
        """Give the cgroup2 directory to the container's root (cgroup-v2.rst
        "Delegation Containment": the directory and its procs/threads/
        subtree_control files). Only our own, freshly made directory."""
        d = self.v2_dir
        if d is None:
            return
        os.chown(d, uid, gid)
        for name in ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                os.chown(path, uid, gid)

    def processes(self) -> list[int]:
        seen: list[int] = []
        for d in self.dirs:
            for pid in _procs(d):
                if pid not in seen:
                    seen.append(pid)
        return seen

    def destroy(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove the directories (bounded wait)."""
        deadline = time.monotonic() + timeout
        for d in self.dirs:
            while True:
                kill_file = os.path.join(d, "cgroup.kill")
                pids = _procs(d)
                if pids:
                    if os.path.exists(kill_file):
                        try:
                            _write(kill_file, "1")
                        except OSError:
                            pass
                    else:
                        for pid in pids:
                            try:
                                os.kill(pid, 9)
                            except ProcessLookupError:
                                pass
                try:
                    _remove_children(d)
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {d}: {exc.strerror}") from None
                    time.sleep(0.01)
        for parent in reversed(self.made):
            try:
                os.rmdir(parent)
            except OSError:
                pass  # another container's cgroup lives there now, or it is gone


def name_busy(name: str, rel: str | None = None) -> bool:
    """Does a cgroup of this container name hold processes already?"""
    _layout, unified = detect_layout()
    roots = [unified] if unified else [os.path.join(CGROUP_ROOT, "pids")]
    path = rel or f"{PARENT}/{name}"
    for hier in roots:
        d = under(hier, path)
        if not os.path.isdir(d):
            continue
        try:
            with open(os.path.join(d, "cgroup.events")) as f:
                if "populated 1" in f.read():
                    return True
        except FileNotFoundError:
            if _procs(d):
                return True
    return False


def _controllers_of(v2_dir: str) -> set[str]:
    """Controllers enabled for a cgroup2 directory (its parent's subtree_control)."""
    return _controllers(v2_dir)


def _limit_value(limits: dict[str, int | str | bool], key: str) -> int | None:
    v = limits.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def cpu_weight(shares: int) -> int:
    """cpu.shares (2..262144) as cgroup2 cpu.weight (1..10000), runc's conversion."""
    if shares == 0:
        return 0
    return 1 + ((max(2, min(shares, 262144)) - 2) * 9999) // 262142


def swap_v2(swap: int, limit: int | None) -> str:
    """OCI memory.swap is memory+swap; cgroup2's memory.swap.max is swap alone."""
    if swap < 0:
        return "max"
    if limit is None or limit < 0:
        raise CgroupError("linux.resources.memory.swap: needs memory.limit on cgroup v2 "
                          "(the kernel limits swap alone there)")
    if swap < limit:
        raise CgroupError(f"linux.resources.memory.swap: {swap} is below memory.limit "
                          f"{limit} (swap counts memory plus swap)")
    return str(swap - limit)


def _set_v2(d: str, key: str, value: int | str | bool,
            limits: dict[str, int | str | bool]) -> None:
    if key == "memory.limit":
        _write(os.path.join(d, "memory.max"), _v2_value(int(value)))
    elif key == "memory.reservation":
        _write(os.path.join(d, "memory.low"), _v2_value(int(value)))
    elif key == "memory.swap":
        _write(os.path.join(d, "memory.swap.max"),
               swap_v2(int(value), _limit_value(limits, "memory.limit")))
    elif key in ("memory.swappiness", "memory.disableOOMKiller"):
        if value is not False:
            raise CgroupError(f"linux.resources.{key}: cgroup v2 has no such setting "
                              "(v1 memory controller only)")
    elif key == "pids.limit":
        _write(os.path.join(d, "pids.max"), _v2_value(int(value)))
    elif key == "cpu.shares":
        if int(value):
            _write(os.path.join(d, "cpu.weight"), str(cpu_weight(int(value))))
    elif key == "cpu.quota" or (key == "cpu.period" and "cpu.quota" not in limits):
        quota = _limit_value(limits, "cpu.quota")
        period = _limit_value(limits, "cpu.period")
        text = "max" if quota is None or quota < 0 else str(quota)
        _write(os.path.join(d, "cpu.max"), text + (f" {period}" if period else ""))
    elif key in ("cpu.cpus", "cpu.mems"):
        _write(os.path.join(d, "cpuset." + key[4:]), str(value))
    elif key == "memory.high":
        _write(os.path.join(d, "memory.high"), _v2_value(int(value)))
    elif key == "io.weight":
        _set_io_weight(d, int(value))
    elif key.startswith("hugetlb."):
        _write(os.path.join(d, key + ".max"), str(int(value)))


def hugepage_size_known(size: str) -> bool:
    """"2MB", "1GB" (runtime-spec's pageSize, as the hugetlb files name them) for a
    size this kernel has (/sys/kernel/mm/hugepages/hugepages-<kB>kB)."""
    units = {"KB": 1, "MB": 1 << 10, "GB": 1 << 20}
    num, unit = size[:-2], size[-2:]
    if unit not in units or not num.isascii() or not num.isdigit() or len(num) > 7:
        return False
    return os.path.isdir(f"/sys/kernel/mm/hugepages/hugepages-{int(num) * units[unit]}kB")


def _set_io_weight(d: str, weight: int) -> None:
    """cgroup2 io.weight (blk-iocost) or, with the BFQ scheduler, io.bfq.weight."""
    for name, text in (("io.weight", f"default {weight}"), ("io.bfq.weight", str(weight))):
        if os.path.exists(os.path.join(d, name)):
            _write(os.path.join(d, name), text)
            return
    raise CgroupError("linux.resources.io.weight: the kernel offers neither io.weight nor "
                      "io.bfq.weight here (no blk-iocost, no BFQ I/O scheduler)")


def _set_v1(d: str, key: str, value: int | str | bool,
            limits: dict[str, int | str | bool]) -> None:
    files = {"memory.limit": "memory.limit_in_bytes",
             "memory.reservation": "memory.soft_limit_in_bytes",
             "memory.swap": "memory.memsw.limit_in_bytes",
             "memory.swappiness": "memory.swappiness",
             "memory.disableOOMKiller": "memory.oom_control",
             "pids.limit": "pids.max", "cpu.shares": "cpu.shares",
             "cpu.period": "cpu.cfs_period_us", "cpu.quota": "cpu.cfs_quota_us",
             "cpu.cpus": "cpuset.cpus", "cpu.mems": "cpuset.mems"}
    if key == "memory.high":
        raise CgroupError("linux.resources.memory.high: cgroup v1 has no memory.high "
                          "(the memory controller is a v1 hierarchy on this host)")
    if key == "io.weight":
        # v1 blkio weights are 10..1000; systemd scales IOWeight's 1..10000 the same way.
        for name in ("blkio.weight", "blkio.bfq.weight"):
            if os.path.exists(os.path.join(d, name)):
                _write(os.path.join(d, name), str(min(max(int(value) // 10, 10), 1000)))
                return
        raise CgroupError("linux.resources.io.weight: the v1 blkio hierarchy has neither "
                          "blkio.weight nor blkio.bfq.weight (no BFQ I/O scheduler)")
    if key.startswith("hugetlb."):
        files[key] = key + ".limit_in_bytes"
    path = os.path.join(d, files[key])
    if key == "pids.limit":
        text = _v2_value(int(value))
    elif isinstance(value, bool):
        text = "1" if value else "0"
    else:
        text = str(value)
    if key == "cpu.shares" and not value:
        return
    if not os.path.exists(path):
        raise CgroupError(f"linux.resources.{key}: {path} does not exist "
                          "(the kernel lacks it: swap accounting off, or no CFS bandwidth)")
    _write(path, text)


def _remove_children(d: str) -> None:
    """rmdir the sub-cgroups a delegated payload (systemd) made, deepest first."""
    for top, dirs, _files in os.walk(d, topdown=False):
        for sub in dirs:
            try:
                os.rmdir(os.path.join(top, sub))
            except FileNotFoundError:
                pass


class CgroupPathError(CgroupError):
    """An OCI cgroupsPath that would leave the hierarchy (the caller names the field)."""


def oci_cgroup_path(cgroups_path: str, container_id: str) -> str:
    """OCI linux.cgroupsPath -> a path below the hierarchy roots.

    cgroupfs style "/a/b" is taken as is (relative to the root); systemd style
    "slice:prefix:name" (`--systemd-cgroup`, no systemd to ask here) becomes
    "<slice>/<prefix>-<name>.scope", the path systemd itself would use.
    Host root mkdirs and writes limits there, so nothing may lead out of the
    hierarchy: slice-form parts hold no "/", and no component is "." or "..";
    refused, not normalised, so the container gets the cgroup the config names.
    """
    if ":" in cgroups_path and not cgroups_path.startswith("/"):
        parts = cgroups_path.split(":")
        if len(parts) > 3:
            raise CgroupPathError(f"{cgroups_path!r} is not slice:prefix:name")
        slice_, prefix, name = [*parts, "", ""][:3]
        for part in (slice_, prefix, name):
            if "/" in part or part in (".", ".."):
                raise CgroupPathError(f"{cgroups_path!r}: part {part!r} is not a plain name")
        rel = f"{slice_ or 'system.slice'}/{prefix}-{name or container_id}.scope"
    else:
        components = [c for c in cgroups_path.split("/") if c]
        if any(c in (".", "..") for c in components):
            raise CgroupPathError(f"{cgroups_path!r}: \".\" and \"..\" are not allowed")
        rel = "/".join(components) or f"{PARENT}/{container_id}"
    under("/", rel)  # the rule create() enforces, checked before anything exists
    return rel


def _hierarchies() -> set[str]:
    """Mount points of every cgroup filesystem (v1 and v2)."""
    return _mounts_of(("cgroup", "cgroup2"))


def _plausible(d: str, rel: str | None) -> bool:
    if not rel or not d.endswith("/" + rel.strip("/")):
        return False
    hier = d[: len(d) - len(rel.strip("/")) - 1]
    try:
        # realpath: /sys/fs/cgroup/cpu is often a symlink to the cpu,cpuacct mount.
        return (os.path.realpath(hier) in _hierarchies()
                and under(hier, rel.strip("/")) == d)
    except CgroupPathError:
        return False


def _plausible_parent(d: str, dirs: list[str]) -> bool:
    """A parent created for an OCI path: strictly between a hierarchy and one of dirs."""
    real = os.path.realpath(d)
    return any(x.startswith(d.rstrip("/") + "/") for x in dirs) and any(
        real.startswith(h.rstrip("/") + "/") for h in _hierarchies())


def under(hier: str, rel: str) -> str:
    """hier/rel, refused unless it is strictly below hier (no "..", no absolute rel)."""
    d = os.path.normpath(os.path.join(hier, rel))
    root = os.path.normpath(hier)
    if os.path.isabs(rel) or d == root or not d.startswith(root.rstrip("/") + "/"):
        raise CgroupPathError(f"{rel!r} is not below {hier}")
    if d != os.path.join(hier, rel).rstrip("/"):
        raise CgroupPathError(f"{rel!r} is not a plain path below {hier}")
    return d


def create(name: str, controllers_v1: tuple[str, ...] = (), rel: str | None = None) -> Cgroup:
    """Create the container's cgroups. v1 hierarchies are used only on legacy
    hosts, or on hybrid hosts for controllers cgroup2 lacks there (limits)."""
    cgroup2 = _cgroup2_mounts()
    layout, unified = detect_layout(cgroup2)
    targets: list[str] = []
    if unified is not None:
        targets.append(unified)
    if layout == "legacy" and not controllers_v1:
        controllers_v1 = ("pids",)  # some hierarchy must track the processes
    v2_has = _controllers(unified) if unified else set()
    if layout != "unified":
        for ctrl in controllers_v1:
            if ctrl in v2_has:
                continue
            base = os.path.join(CGROUP_ROOT, ctrl)
            if os.path.isdir(base) and base not in cgroup2:
                targets.append(base)
    if not targets:
        raise CgroupError("no usable cgroup hierarchy found under /sys/fs/cgroup")
    dirs: list[str] = []
    cg = Cgroup(name, layout, unified, dirs, rel)
    try:
        for hier in targets:
            d = under(hier, cg.rel)  # never outside the hierarchy, whatever rel says
            parent = os.path.dirname(d)
            if not os.path.isdir(parent):
                for new in _makedirs(hier, parent, cg.made):
                    if hier == unified:  # top-down: each level delegates to the next
                        _enable_controllers(hier, new)
            if hier == unified and controllers_v1:
                enable_v2(unified, d, controllers_v1)  # the limits' controllers reach d
            try:
                os.mkdir(d)
                _cpuset_inherit(hier, d)
            except FileExistsError:
                # Only an empty leaf (our own leftover) is reused: a cgroup with
                # processes or sub-cgroups belongs to someone else (an OCI
                # cgroupsPath of "/system.slice" must not take over the host's).
                if _procs(d) or any(e.is_dir() for e in os.scandir(d)):
                    raise CgroupError(f"cgroup {d} already holds processes or sub-cgroups;"
                                      " it belongs to someone else") from None
            dirs.append(d)
    except BaseException:
        cg.destroy()
        raise
    return cg


def enable_v2(unified: str, d: str, ctrls: tuple[str, ...] | list[str]) -> None:
    """Make the cgroup2 controllers ctrls (those the root offers) available in d:
    "+ctrl" in cgroup.subtree_control of every level from the root down to d's
    parent, as runc does. Without it a host whose root enables nothing (no
    systemd) gives the container's directory no memory/pids/cpu files at all."""
    offered = _controllers(unified)
    want = [c for c in dict.fromkeys(ctrls) if c in offered]
    if not want:
        return
    parent = os.path.dirname(d)
    levels = [unified]
    for part in os.path.relpath(parent, unified).split("/"):
        if part not in (".", ""):
            levels.append(os.path.join(levels[-1], part))
    for level in levels:
        try:
            with open(os.path.join(level, "cgroup.subtree_control")) as f:
                have = f.read().split()
            missing = [c for c in want if c not in have]
            if missing:
                _write(os.path.join(level, "cgroup.subtree_control"),
                       " ".join("+" + c for c in missing))
        except OSError as exc:
            raise CgroupError(f"enable the cgroup2 {'/'.join(want)} controller in {level}: "
                              f"{exc.strerror}") from None


def _makedirs(hier: str, parent: str, made: list[str]) -> list[str]:
    """mkdir -p parent below hier; returns the directories it made, top first,
    and records those to remove again in `made`."""
    missing: list[str] = []
    d = parent
    while d != hier and not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    new: list[str] = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        new.append(d)
        _cpuset_inherit(hier, d)
        if d != os.path.join(hier, PARENT):  # shared by every `uspawn run`: kept
            made.append(d)
    return new


def _cpuset_inherit(hier: str, d: str) -> None:
    """A new v1 cpuset cgroup starts with no CPUs and no memory nodes, and
    nothing can join it (ENOSPC): give it its parent's, as systemd and runc do.
    cgroup2's cpuset inherits by itself."""
    if "cpuset" not in os.path.basename(hier).split(",") or hier in _cgroup2_mounts():
        return
    parent = os.path.dirname(d)
    for name in ("cpuset.cpus", "cpuset.mems"):
        with open(os.path.join(parent, name)) as f:
            value = f.read().strip()
        if value:
            _write(os.path.join(d, name), value)


def _controllers(hier: str) -> set[str]:
    try:
        with open(os.path.join(hier, "cgroup.controllers")) as f:
            return set(f.read().split())
    except OSError:
        return set()


def _enable_controllers(hier: str, parent: str) -> None:
    """Delegate the controllers the root offers to our subtree (best effort)."""
    try:
        with open(os.path.join(hier, "cgroup.subtree_control")) as f:
            enabled = f.read().split()
    except OSError:
        return
    want = [c for c in ("cpu", "memory", "pids", "io") if c in enabled]
    if want:
        try:
            _write(os.path.join(parent, "cgroup.subtree_control"),
                   " ".join("+" + c for c in want))
        except OSError:
            pass


def current_cgroup_v2() -> str | None:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def join_v1(cg: Cgroup, controllers: list[str]) -> list[str]:
    """Move a container's processes into the v1 hierarchies of `controllers` it is not
    in yet, so a limit set later (`uspawn-runc update`) reaches them: create() joins
    only the hierarchies the config had limits for. Hybrid and legacy hosts only;
    a controller that cgroup2 offers needs nothing. Returns the directories added to
    cg.dirs (and records new directories in cg.made, as create() does)."""
    if cg.layout == "unified":
        return []
    cgroup2 = _cgroup2_mounts()
    v2_has = _controllers(cg.v2_dir) if cg.v2_dir else set()
    added: list[str] = []
    for ctrl in controllers:
        if ctrl in v2_has or cg.v1_dir(ctrl) is not None:
            continue
        base = os.path.join(CGROUP_ROOT, ctrl)
        if not os.path.isdir(base) or base in cgroup2:
            raise CgroupError(f"no cgroup v1 {ctrl} hierarchy at {base}")
        d = under(base, cg.rel)
        if not os.path.isdir(d):
            _makedirs(base, d, cg.made)  # the v1 cpuset's cpus/mems inherited
        elif set(_procs(d)) - set(cg.processes()) or any(e.is_dir() for e in os.scandir(d)):
            raise CgroupError(f"cgroup {d} already holds other processes or sub-cgroups;"
                              " it belongs to someone else")
        cg.dirs.append(d)
        added.append(d)
        _move_all(cg, d)
    return added


def _move_all(cg: Cgroup, d: str) -> None:
    """Every process of the container into d; repeated while forks add new ones."""
    for _ in range(20):
        there = set(_procs(d))
        missing = [p for p in cg.processes() if p not in there]
        if not missing:
            return
        for pid in missing:
            try:
                _write(os.path.join(d, "cgroup.procs"), str(pid))
            except ProcessLookupError:
                pass  # exited meanwhile
    raise CgroupError(f"{d}: the container's processes kept forking; not all moved")


def placement(key: str) -> tuple[str, str] | None:
    """Where a set_limits key would go on this host, before any cgroup exists:
    ("v2", controller) when cgroup2 offers the controller, ("v1", hierarchy
    path) when a v1 hierarchy has it, None when neither does."""
    ctrl = controller_of(key)
    layout, unified = detect_layout()
    if unified is not None and ctrl in _controllers(unified):
        return ("v2", ctrl)
    if layout != "unified":
        base = os.path.join(CGROUP_ROOT, V1_NAMES.get(ctrl, ctrl))
        if os.path.isdir(base) and base not in _cgroup2_mounts():
            return ("v1", base)
    return None


# systemd's resource-control properties (systemd.resource-control(5)) -> the
# set_limits key each one becomes (machine/limits.py converts the values).
SYSTEMD_KEYS = {"MemoryMax": "memory.limit", "MemoryHigh": "memory.high",
                "MemorySwapMax": "memory.swap", "CPUQuota": "cpu.quota",
                "CPUWeight": "cpu.shares", "AllowedCPUs": "cpu.cpus", "TasksMax": "pids.limit",
                "IOWeight": "io.weight"}
# v1 files that exist only with a kernel option (swap accounting, CFS bandwidth).
_V1_OPTIONAL = {"memory.swap": "memory.memsw.limit_in_bytes", "cpu.quota": "cpu.cfs_quota_us"}


def why_not(key: str) -> str | None:
    """Why this host cannot apply a set_limits key (None: it can), checked on the
    hierarchy roots before any cgroup exists."""
    where = placement(key)
    ctrl = controller_of(key)
    if where is None:
        return f"no cgroup {ctrl} controller on this host (neither cgroup2 nor a v1 hierarchy)"
    kind, path = where
    if kind == "v1" and key == "memory.high":
        return "memory is a cgroup v1 hierarchy on this host and v1 has no memory.high"
    if kind == "v1" and key == "io.weight" and not any(
            os.path.exists(os.path.join(path, n)) for n in ("blkio.weight", "blkio.bfq.weight")):
        return ("the v1 blkio hierarchy has neither blkio.weight nor blkio.bfq.weight "
                "(no BFQ I/O scheduler)")
    need = _V1_OPTIONAL.get(key)
    if kind == "v1" and need and not os.path.exists(os.path.join(path, need)):
        return f"{path}/{need} does not exist (swap accounting off, or no CFS bandwidth control)"
    return None


def leftover(name: str) -> Cgroup | None:
    """The directories uspawn/NAME in every cgroup hierarchy, if any exist: what a
    machine whose runtime and guardian were both killed leaves (the guardian
    removes them otherwise). Machines always live at uspawn/NAME."""
    layout, unified = detect_layout()
    rel = f"{PARENT}/{name}"
    dirs = []
    for hier in sorted(_hierarchies()):
        try:
            d = under(hier, rel)
        except CgroupPathError:
            continue
        if os.path.isdir(d) and not os.path.islink(d):
            dirs.append(d)
    if not dirs:
        return None
    return Cgroup(name, layout, unified if unified and any(
        d.startswith(unified + "/") for d in dirs) else None, dirs, rel)


def of_process(pid: int, rel: str) -> Cgroup:
    """The cgroup rel of a running container, in every hierarchy where pid (its
    init) is at rel or below it (a booted systemd moves itself into
    rel/init.scope on cgroup2). /proc/PID/cgroup read from the host's cgroup
    namespace is the proof that the directories are the container's."""
    layout, unified = detect_layout()
    rel = rel.strip("/")
    v1 = {os.path.basename(m): m for m in _mounts_of(("cgroup",))}
    dirs: list[str] = []
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CgroupError(f"/proc/{pid}/cgroup: {exc.strerror}") from None
    for line in lines:
        _hid, ctrls, path = line.split(":", 2)
        if path.strip("/") != rel and not path.startswith("/" + rel + "/"):
            continue
        hier = unified if not ctrls else v1.get(ctrls)
        if hier is None and ctrls:
            # A v1 hierarchy's mount point carries its controllers in its name
            # (/sys/fs/cgroup/cpu,cpuacct; name=systemd: /sys/fs/cgroup/systemd).
            hier = v1.get(ctrls.removeprefix("name="))
        if hier is not None:
            dirs.append(under(hier, rel))
    if not dirs:
        raise CgroupError(f"process {pid} is not in a cgroup {rel}")
    return Cgroup(os.path.basename(rel), layout, unified if any(
        unified and d.startswith(unified + "/") for d in dirs) else None, dirs, rel)


def _number(text: str | None, unlimited_above: int = 2**62) -> int | None:
    """A cgroup file's number; "max" and v1's huge "unlimited" values are -1."""
    if text is None:
        return None
    if text == "max":
        return -1
    try:
        n = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return -1 if n >= unlimited_above else n


def usage(cg: Cgroup) -> dict[str, tuple[int | None, int | None]]:
    """Current use and limit per resource, from whichever hierarchy holds it:
    "memory" (bytes), "tasks" (count), "cpu" (CPU time in microseconds; the
    limit is the quota per period as microseconds per second). -1 = no limit;
    None = unknown (no hierarchy to read it from)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    v2 = cg.v2_dir if cg.v2_dir and os.path.isdir(cg.v2_dir) else None
    have = _controllers_of(v2) if v2 else set()

    def pick(ctrl: str, v2_files: tuple[str, str], v1_files: tuple[str, str],
             ) -> tuple[int | None, int | None]:
        if v2 is not None and ctrl in have:
            return (_number(_read(os.path.join(v2, v2_files[0]))),
                    _number(_read(os.path.join(v2, v2_files[1]))))
        d = cg.v1_dir(ctrl)
        if d is None:
            return (None, None)
        return (_number(_read(os.path.join(d, v1_files[0]))),
                _number(_read(os.path.join(d, v1_files[1]))))

    out["memory"] = pick("memory", ("memory.current", "memory.max"),
                         ("memory.usage_in_bytes", "memory.limit_in_bytes"))
    out["tasks"] = pick("pids", ("pids.current", "pids.max"), ("pids.current", "pids.max"))
    out["cpu"] = (_cpu_time(cg, v2), _cpu_limit(cg, v2, "cpu" in have))
    return out


def _cpu_time(cg: Cgroup, v2: str | None) -> int | None:
    """cgroup2's cpu.stat usage_usec (there without the cpu controller too), else
    v1 cpuacct.usage (ns) when the container is in that hierarchy."""
    if v2 is not None:
        for line in (_read(os.path.join(v2, "cpu.stat")) or "").splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1])
    d = cg.v1_dir("cpuacct")
    ns = _number(_read(os.path.join(d, "cpuacct.usage"))) if d else None
    return ns // 1000 if ns is not None and ns >= 0 else None


def _cpu_limit(cg: Cgroup, v2: str | None, on_v2: bool) -> int | None:
    if v2 is not None and on_v2:
        text = _read(os.path.join(v2, "cpu.max"))
        if text is None:
            return None
        quota, _, period = text.partition(" ")
        if quota == "max":
            return -1
        return int(quota) * 1_000_000 // int(period or "100000")
    d = cg.v1_dir("cpu")
    if d is None:
        return None
    quota_n = _number(_read(os.path.join(d, "cpu.cfs_quota_us")))
    period_n = _number(_read(os.path.join(d, "cpu.cfs_period_us")))
    if quota_n is None or period_n is None:
        return None
    return -1 if quota_n < 0 else quota_n * 1_000_000 // max(period_n, 1)


def apply_in_order(cg: Cgroup, limits: dict[str, int | str | bool]) -> None:
    """Live changes (`uspawn set`): one set_limits call per controller, in the
    order the kernel needs (a new memory limit before memory+swap). Where
    cgroup2 limits swap alone, memory.swap without memory.limit takes the
    current memory.max as the base (as `uspawn-runc update` does)."""
    groups: dict[str, dict[str, int | str | bool]] = {}
    for key, value in limits.items():
        groups.setdefault(controller_of(key), {})[key] = value
    mem = groups.get("memory", {})
    if "memory.swap" in mem and "memory.limit" not in mem:
        v2 = cg.v2_dir
        if v2 is not None and "memory" in _controllers_of(v2):
            current = _number(_read(os.path.join(v2, "memory.max")))
            if current is not None:
                groups["memory"] = {"memory.limit": current, **mem}
    for ctrl in ("memory", "cpu", "cpuset", "pids", "io"):
        if ctrl in groups:
            cg.set_limits(groups[ctrl])
