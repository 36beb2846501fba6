"""OCI runtime-spec model: typed classes, JSON decoding with field-named errors.

Every front end produces a Spec; the engine executes only Specs.

Why not msgspec or dataclasses: this module is on every container start, and
measured on our VMs `import msgspec` costs ~20 ms and `import dataclasses` ~7 ms
(typing, inspect, re), against ~8 ms for the whole interpreter start and ~43 ms
for a complete `runc run`. So the model is plain classes whose annotations
drive a small decoder; annotations are strings (PEP 563) evaluated only when a
config.json is decoded, never on the `uspawn run` path.
"""

from __future__ import annotations

import os
import sys
import types

from uspawn.base.errors import SpecError

# `typing` costs ~7 ms to import; only the type checker needs it here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, TypeVar

    M = TypeVar("M", bound="Model")

OCI_VERSION = "1.2.0"


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


class Model:
    """Base of the spec classes: keyword construction, defaults, JSON in/out.

    A field is an annotated class attribute; its class-level value is the
    default (lists/dicts are copied per instance). `_rename` overrides the
    camelCase JSON name where the OCI spec spells it differently.
    """

    _rename: dict[str, str] = {}
    # Inclusive (low, high) of int fields (each item of a list[int]): values a hostile
    # config.json may carry that the kernel or Python's C conversions cannot take.
    _bounds: dict[str, tuple[int, int]] = {}
    _fields_cache: dict[type, tuple[str, ...]] = {}

    def __init__(self, **kw: Any) -> None:
        fields = self.fields()
        for key in kw:
            if key not in fields:
                raise TypeError(f"{type(self).__name__} has no field {key!r}")
        for name in fields:
            if name in kw:
                value = kw[name]
            else:
                value = getattr(type(self), name, None)
                if isinstance(value, list | dict):
                    value = type(value)(value)
            setattr(self, name, value)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        cached = Model._fields_cache.get(cls)
        if cached is None:
            names: list[str] = []
            for klass in reversed(cls.__mro__):
                # not inspect.get_annotations: `inspect` costs ~4 ms to import
                for name in klass.__dict__.get("__annotations__", {}):  # noqa: RUF063
                    if not name.startswith("_") and name not in names:
                        names.append(name)
            cached = Model._fields_cache[cls] = tuple(names)
        return cached

    @classmethod
    def json_name(cls, field: str) -> str:
        return cls._rename.get(field) or _camel(field)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.fields():
            value = getattr(self, name)
            if value is None or value == [] or value == {}:
                continue
            out[self.json_name(name)] = _encode(value)
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.fields())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n in self.fields()
        )

    __hash__ = None  # type: ignore[assignment]


def _encode(value: Any) -> Any:
    if isinstance(value, Model):
        return value.to_json()
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


# --- decoding -------------------------------------------------------------

_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type[Model]) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = {}
        for klass in reversed(cls.__mro__):
            ns = vars(sys.modules[klass.__module__])
            anns = klass.__dict__.get("__annotations__", {})  # noqa: RUF063
            for name, ann in anns.items():
                if not name.startswith("_"):
                    hints[name] = eval(ann, ns) if isinstance(ann, str) else ann
        _hints_cache[cls] = hints
    return hints


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _decode(tp: Any, value: Any, path: str, unknown: list[str]) -> Any:
    if isinstance(tp, types.UnionType):
        args = tp.__args__
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _decode(non_none[0], value, path, unknown)
        raise SpecError(f"{path}: unsupported union type in model")
    if isinstance(tp, types.GenericAlias):
        origin = tp.__origin__
        if origin is list:
            if not isinstance(value, list):
                raise SpecError(f"{path}: expected a list, got {type(value).__name__}")
            (item_tp,) = tp.__args__
            return [_decode(item_tp, v, f"{path}[{i}]", unknown) for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise SpecError(f"{path}: expected an object, got {type(value).__name__}")
            _, val_tp = tp.__args__
            for k in value:
                _check_str(str(k), f"{path}: key")
            return {str(k): _decode(val_tp, v, f"{path}.{k}", unknown) for k, v in value.items()}
        raise SpecError(f"{path}: unsupported generic in model")
    if tp is object:  # raw JSON passed through (e.g. linux.seccomp)
        return value
    if isinstance(tp, type) and issubclass(tp, Model):
        return decode(tp, value, path, unknown)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(f"{path}: expected a number, got {value!r}")
        return value
    if tp is str or tp is bool:
        if type(value) is not tp:
            raise SpecError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        if isinstance(value, str):
            _check_str(value, path)
        return value
    raise SpecError(f"{path}: unsupported type {_type_name(tp)} in model")


def _check_str(value: str, where: str) -> None:
    """Strings end up as syscall arguments (paths, argv, env): no NUL, no unpaired
    surrogate (JSON can spell both; the kernel and os.fsencode cannot take them)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise SpecError(f"{where}: {value!r}: unpaired surrogates are not allowed") from None
    if "\x00" in value:
        raise SpecError(f"{where}: {value!r}: NUL characters are not allowed")


def decode(
    cls: type[M], obj: Any, path: str = "", unknown: list[str] | None = None
) -> M:
    """Build cls from parsed JSON; errors name the field like `process.args[0]`.

    Unknown keys are collected in `unknown` (as dotted paths) so the caller can
    decide: the OCI spec lets runtimes ignore unknown fields, but uspawn reports
    them instead of silently dropping them.
    """
    if unknown is None:
        unknown = []
    if not isinstance(obj, dict):
        raise SpecError(f"{path or 'config'}: expected an object, got {type(obj).__name__}")
    hints = _hints(cls)
    by_json = {cls.json_name(f): f for f in cls.fields()}
    kw: dict[str, Any] = {}
    for key, value in obj.items():
        field = by_json.get(key)
        sub = f"{path}.{key}" if path else key
        if field is None:
            unknown.append(sub)
            continue
        kw[field] = _decode(hints[field], value, sub, unknown)
        bound = cls._bounds.get(field)
        if bound is not None:
            _check_bounds(kw[field], bound, sub)
    return cls(**kw)


def _check_bounds(value: Any, bound: tuple[int, int], path: str) -> None:
    low, high = bound
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_bounds(item, bound, f"{path}[{i}]")
    elif isinstance(value, int) and not low <= value <= high:
        raise SpecError(f"{path}: {value} is out of range {low}..{high}")


# Ranges shared by several fields.
U32 = 2**32 - 1
ID_RANGE = (0, U32 - 1)  # uid_t/gid_t; (uid_t)-1 means "no change" to the kernel
I64 = (-1, 2**63 - 1)  # cgroup values; -1 = unlimited (runc)


# --- the OCI runtime spec (the parts uspawn implements) ---------------------


class IDMapping(Model):
    _rename = {"container_id": "containerID", "host_id": "hostID"}
    _bounds = {"container_id": ID_RANGE, "host_id": ID_RANGE, "size": (1, U32)}
    container_id: int = 0
    host_id: int = 0
    size: int = 0


class User(Model):
    _bounds = {"uid": ID_RANGE, "gid": ID_RANGE, "additional_gids": ID_RANGE,
               "umask": (0, 0o777)}
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] = []
    username: str | None = None


class Capabilities(Model):
    bounding: list[str] = []
    effective: list[str] = []
    inheritable: list[str] = []
    permitted: list[str] = []
    ambient: list[str] = []


class Rlimit(Model):
    # rlim_t; 2**64-1 is RLIM_INFINITY
    _bounds = {"hard": (0, 2**64 - 1), "soft": (0, 2**64 - 1)}
    type: str = ""
    hard: int = 0
    soft: int = 0


class ConsoleSize(Model):
    _bounds = {"height": (0, 0xFFFF), "width": (0, 0xFFFF)}  # struct winsize: unsigned short
    height: int = 0
    width: int = 0


class Process(Model):
    _bounds = {"oom_score_adj": (-1000, 1000)}  # OOM_SCORE_ADJ_MIN..MAX
    terminal: bool = False
    console_size: ConsoleSize | None = None
    user: User | None = None
    args: list[str] = []
    env: list[str] = []
    cwd: str = "/"
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = []
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    apparmor_profile: str | None = None
    selinux_label: str | None = None


class Root(Model):
    path: str = ""
    readonly: bool = False


class Mount(Model):
    destination: str = ""
    type: str | None = None
    source: str | None = None
    options: list[str] = []
    uid_mappings: list[IDMapping] = []
    gid_mappings: list[IDMapping] = []


class Namespace(Model):
    type: str = ""
    path: str | None = None


class Device(Model):
    # The kernel's dev_t: 12-bit major, 20-bit minor (MINORBITS); mode bits only.
    _bounds = {"major": (0, 2**12 - 1), "minor": (0, 2**20 - 1), "file_mode": (0, 0o7777),
               "uid": ID_RANGE, "gid": ID_RANGE}
    type: str = ""
    path: str = ""
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


class MemoryResources(Model):
    _bounds = {"limit": I64, "reservation": I64, "swap": I64, "swappiness": (0, 100)}
    _rename = {"disable_oom_killer": "disableOOMKiller"}
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    swappiness: int | None = None
    disable_oom_killer: bool | None = None


class CPUResources(Model):
    # period: the kernel's 1 ms..1 s (cpu.max, cpu.cfs_period_us)
    _bounds = {"shares": (0, 2**64 - 1), "quota": I64, "period": (1000, 1_000_000)}
    shares: int | None = None
    quota: int | None = None
    period: int | None = None
    cpus: str | None = None
    mems: str | None = None


class PidsResources(Model):
    _bounds = {"limit": I64}
    limit: int | None = None


class DeviceRule(Model):
    """linux.resources.devices[]: the device cgroup's allow/deny list (runc order:
    the last matching rule decides; major/minor absent or -1 = any)."""
    _bounds = {"major": (-1, 2**12 - 1), "minor": (-1, 2**20 - 1)}
    allow: bool = False
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    access: str | None = None


class HugepageLimit(Model):
    """linux.resources.hugepageLimits[]: bytes of huge pages of one size (kubelet
    sends every size the host has, limited to 0 unless the pod asks)."""
    _bounds = {"limit": (0, 2**64 - 1)}
    page_size: str = ""
    limit: int = 0


class Resources(Model):
    memory: MemoryResources | None = None
    cpu: CPUResources | None = None
    pids: PidsResources | None = None
    devices: list[DeviceRule] = []
    hugepage_limits: list[HugepageLimit] = []


class Linux(Model):
    namespaces: list[Namespace] = []
    uid_mappings: list[IDMapping] = []
    gid_mappings: list[IDMapping] = []
    devices: list[Device] = []
    cgroups_path: str | None = None
    resources: Resources | None = None
    sysctl: dict[str, str] = {}
    seccomp: dict[str, object] | None = None
    rootfs_propagation: str | None = None
    masked_paths: list[str] = []
    readonly_paths: list[str] = []
    mount_label: str | None = None


class Hook(Model):
    _bounds = {"timeout": (1, 2**31 - 1)}  # seconds; > 0 (runtime-spec)
    path: str = ""
    args: list[str] = []
    env: list[str] = []
    timeout: int | None = None


class Hooks(Model):
    prestart: list[Hook] = []
    create_runtime: list[Hook] = []
    create_container: list[Hook] = []
    start_container: list[Hook] = []
    poststart: list[Hook] = []
    poststop: list[Hook] = []


class Spec(Model):
    oci_version: str = OCI_VERSION
    process: Process | None = None
    root: Root | None = None
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] = []
    hooks: Hooks | None = None
    annotations: dict[str, str] = {}
    linux: Linux | None = None

    def namespace_types(self) -> set[str]:
        return {ns.type for ns in (self.linux.namespaces if self.linux else [])}

    def iter_mounts(self) -> Iterator[Mount]:
        return iter(self.mounts)


NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")


def resolve_bind_sources(spec: Spec, bundle: str) -> None:
    """Relative bind sources name paths in the bundle directory (runtime-spec
    config.md: "a relative path ... relative to the bundle"); other
    filesystems' sources are names ("proc", "tmpfs") and stay as they are."""
    for m in spec.mounts:
        is_bind = m.type == "bind" or any(o in ("bind", "rbind") for o in m.options)
        if is_bind and m.source and not m.source.startswith("/"):
            m.source = os.path.join(os.path.abspath(bundle), m.source)


def validate(spec: Spec) -> None:
    """Checks that need more than types; run before the first clone/unshare."""
    if spec.root is None or not spec.root.path:
        raise SpecError("root.path: missing", "point root.path at the container's rootfs")
    proc = spec.process
    if proc is None or not proc.args:
        raise SpecError("process.args: missing or empty", "give the command to run")
    if not proc.cwd.startswith("/"):
        raise SpecError(f"process.cwd: {proc.cwd!r} is not absolute")
    for i, env in enumerate(proc.env):
        if "=" not in env:
            raise SpecError(f"process.env[{i}]: {env!r} is not KEY=VALUE")
    linux = spec.linux or Linux()
    seen: set[str] = set()
    for i, ns in enumerate(linux.namespaces):
        if ns.type not in NAMESPACE_TYPES:
            raise SpecError(f"linux.namespaces[{i}].type: unknown namespace {ns.type!r}")
        if ns.type in seen:
            raise SpecError(f"linux.namespaces[{i}].type: {ns.type!r} listed twice")
        seen.add(ns.type)
    if "user" in seen:
        for field in ("uid_mappings", "gid_mappings"):
            maps: list[IDMapping] = getattr(linux, field)
            name = Linux.json_name(field)
            if not maps:
                raise SpecError(f"linux.{name}: a user namespace needs ID mappings")
            for j, m in enumerate(maps):
                _check_mapping(m, f"linux.{name}[{j}]")
    for i, r in enumerate(proc.rlimits):
        if r.soft > r.hard:
            raise SpecError(f"process.rlimits[{i}].soft: {r.soft} is above hard ({r.hard})")
    if spec.hostname and "uts" not in seen:
        raise SpecError("hostname: setting a hostname needs a uts namespace")
    for i, mnt in enumerate(spec.mounts):
        if not mnt.destination.startswith("/"):
            raise SpecError(f"mounts[{i}].destination: {mnt.destination!r} is not absolute")


def _check_mapping(m: IDMapping, where: str) -> None:
    """One uid/gid map line as the kernel takes it, and never host root.

    Host ID 0 inside the range makes some container ID host root: the user
    namespace would then protect nothing (after `umount /proc/sys` the host's
    sysctls open for writing). The CLI refuses `-U 0` for the same reason.
    """
    if m.size <= 0 or m.container_id < 0 or m.host_id < 0:
        raise SpecError(f"{where}: size must be > 0 and IDs >= 0")
    # The kernel refuses ranges that wrap (map_write: first + count <= first).
    if m.host_id + m.size > U32:
        raise SpecError(f"{where}.size: hostID + size exceeds 32-bit IDs")
    if m.container_id + m.size > U32:
        raise SpecError(f"{where}.size: containerID + size exceeds 32-bit IDs")
    if m.host_id <= 0 < m.host_id + m.size:
        raise SpecError(f"{where}.hostID: the range maps host root (ID 0) into the container",
                        "map to an unprivileged host range, e.g. hostID 524288 as "
                        "`uspawn-runc spec` writes")
