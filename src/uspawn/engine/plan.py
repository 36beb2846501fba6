"""Turn a validated Spec into flat, typed plans: host-side mounts and init steps.

Plan first, then execute (mkosi's FSOperation list, bubblewrap's SetupOp):
every decision is made here in the parent, before the first fork, so the
child only executes and `--debug` can print each step's description.

Two plans come out:
  HostPlan  what the parent builds as real root on the host: the rootfs
            mount (idmapped or plain), the /dev tmpfs with its nodes, the
            bind-mount sources; each becomes a labelled detached-mount fd.
  InitPlan  what the container init does inside the namespaces.
"""

from __future__ import annotations

import os

from uspawn.base.errors import SpecError
from uspawn.engine import spec as S
from uspawn.engine.request import START_AUTO, START_FIFO, Request
from uspawn.kernel import caps, devices, mounts
from uspawn.kernel import syscalls as sc

NS_FLAGS = {
    "mount": sc.CLONE_NEWNS, "uts": sc.CLONE_NEWUTS, "ipc": sc.CLONE_NEWIPC,
    "network": sc.CLONE_NEWNET, "cgroup": sc.CLONE_NEWCGROUP, "pid": sc.CLONE_NEWPID,
}
_FS_DEFAULT_ATTRS = {
    "proc": sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC,
    "sysfs": sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC,
    "mqueue": sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC,
    "devpts": sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC,
}
SUPPORTED_FS = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "bind",
                "none", "overlay")
# Filesystems tied to the container's namespaces (proc of its pid namespace,
# sysfs of its network namespace, mqueue of its IPC namespace, cgroup2 of its
# cgroup namespace): stage A gets them from a short-lived helper that joins
# those namespaces (engine/init.py), then attaches them in config order like
# every other mount, so they are locked as well. devpts is made the same way
# (a new instance; its uid=/gid= options name host IDs, as for a tmpfs).
NS_BOUND_FS = ("proc", "sysfs", "mqueue", "devpts", "cgroup2")
# A proc or sysfs can be mounted again inside the container (nested
# containers, systemd's ProtectProc=) only while no locked mount covers a file
# of the visible one (mount_too_revealing): whatever lies below them is mounted
# by the init, unlocked, as runc and systemd-nspawn do.
VISIBILITY_CHECKED_FS = ("proc", "sysfs")


# Namespaces that cannot be joined by path, and why (said in the error).
_UNJOINABLE = {
    "user": "the container's user namespace is made with its ID maps and owns the others",
}


# Kernel numbers (asm-generic/resource.h); Python's resource module lacks some names.
RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3,
    "RLIMIT_CORE": 4, "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7,
    "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11,
    "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}


class FsMount:
    """Mount a new filesystem instance at dest (inside the userns)."""

    def __init__(self, dest: str, fstype: str, params: list[tuple[str, str | None]],
                 attrs: int, source: str | None = None) -> None:
        self.dest = dest
        self.fstype = fstype
        self.params = params
        self.attrs = attrs
        self.source = source
        # Set for NS_BOUND_FS: the fd label under which stage A's helper hands
        # over the instance it made in the container's namespaces.
        self.label = ""

    def make(self) -> int:
        """The new instance as a detached mount fd (made by whoever runs this)."""
        return mounts.make_fs(self.fstype, self.params, self.attrs, self.source)

    def describe(self) -> str:
        opts = ",".join(k if v is None else f"{k}={v}" for k, v in self.params)
        return f"{self.fstype} on {self.dest}" + (f" ({opts})" if opts else "")

    def execute(self, rootfd: int, fds: dict[str, int],
                remount: dict[str, int] | None = None) -> None:
        target = mounts.ensure_in_root(rootfd, self.dest, "dir")
        try:
            mnt = fds.pop(self.label) if self.label else self.make()
            try:
                mounts.attach(mnt, target)
            finally:
                os.close(mnt)
        finally:
            os.close(target)


class FdMount:
    """Attach a detached mount the parent made on the host (label -> fd)."""

    def __init__(self, dest: str, label: str, is_dir: bool) -> None:
        self.dest = dest
        self.label = label
        self.is_dir = is_dir

    def describe(self) -> str:
        return f"host-made mount [{self.label}] on {self.dest}"

    def execute(self, rootfd: int, fds: dict[str, int],
                remount: dict[str, int] | None = None) -> None:
        target = mounts.ensure_in_root(rootfd, self.dest, "dir" if self.is_dir else "file")
        try:
            mounts.attach(fds[self.label], target)
            if remount and self.label in remount:
                mounts.remount_attached(fds[self.label], remount[self.label])
        finally:
            os.close(target)
            os.close(fds.pop(self.label))


class HostBind:
    """A bind-mount source opened by the parent (optionally idmapped / read-only)."""

    def __init__(self, label: str, source: str, recursive: bool, attr_set: int,
                 attr_clr: int, idmap: str, propagation: int = 0) -> None:
        self.label = label
        # MS_PRIVATE unless the mount asks for (r)slave or (r)shared.
        self.propagation = propagation or sc.MS_PRIVATE
        self.source = source
        self.recursive = recursive
        self.attr_set = attr_set
        self.attr_clr = attr_clr
        self.idmap = idmap  # "no" | "yes" (required) | "auto" (when the fs allows)


class HostPlan:
    def __init__(self) -> None:
        self.rootfs = ""
        self.rootfs_readonly = False
        self.ownership = "off"  # "map" | "chown" | "off" | "auto"
        self.dev_nodes: list[devices.DeviceNode] = []
        self.host_dev = False  # build /dev on the host (user-namespaced containers)
        # The spec's own /dev tmpfs options (size=, mode=, ro, ...), host IDs.
        self.dev_params: list[tuple[str, str | None]] = []
        self.dev_attrs = 0
        self.dev_source: str | None = None
        self.console = False
        self.binds: list[HostBind] = []


class InitPlan:
    """What the two container processes do.

    Stage A stays real root in the host user namespace, in a mount namespace
    of its own (owned by the host user namespace): it attaches the rootfs and
    every mount of the spec there, in config order (`host_mounts`; the
    namespace-bound filesystems come from a helper in the container's
    namespaces), sysctls, masks and read-only paths included, then exits. The
    init, cloned into the new user namespace, unshares its mount namespace: the
    kernel copies A's mounts into a namespace owned by the container's user
    namespace and locks them: their read-only/nosuid/nodev/noexec flags cannot
    be changed and they cannot be unmounted by container root (systemd-nspawn's
    split), and /proc/self/mountinfo lists them in config order (runtimetest
    checks it).
    """

    def __init__(self) -> None:
        self.parent_pid = 0
        self.userns = False
        self.mount_ns = True
        self.unshare_flags = 0
        self.root_path = ""
        self.root_propagation = sc.MS_SLAVE
        self.rootfs_readonly = False
        self.time_ns = False  # a new time namespace (stage A unshares it for the init)
        # Host IDs of container root: stage A creates mount targets as them.
        self.root_ids = (0, 0)
        self.host_mounts: list[FsMount | FdMount] = []
        # Below a proc or sysfs mount: by the init (see VISIBILITY_CHECKED_FS).
        self.mounts: list[FsMount | FdMount] = []
        # proc/sysfs mounts stage A attaches writable and the init makes
        # read-only: a read-only flag set by stage A would be locked, and a
        # locked read-only sysfs lets nothing inside mount a writable one.
        self.readonly_later: list[tuple[str, int]] = []  # (dest, its other MOUNT_ATTR_*)
        self.sysctl: dict[str, str] = {}
        self.masked_paths: list[str] = []
        self.readonly_paths: list[str] = []
        self.hostname: str | None = None
        self.domainname: str | None = None
        self.loopback = False
        self.verify_devices: list[devices.DeviceNode] = []
        self.verify_ptmx = False
        self.terminal = False
        self.console_size: tuple[int, int] | None = None
        self.rlimits: list[tuple[str, int, int]] = []
        self.args: list[str] = []
        self.env: list[str] = []
        self.cwd = "/"
        self.uid = 0
        self.gid = 0
        self.additional_gids: list[int] = []
        self.umask: int | None = None
        self.caps_bounding = 0
        self.caps_effective = 0
        self.caps_permitted = 0
        self.caps_inheritable = 0
        self.caps_ambient = 0
        self.no_new_privileges = False
        self.seccomp_bpf: bytes | None = None
        self.preserve_fds = 0
        self.auto_start = False
        # Foreground containers die with their runtime (PR_SET_PDEATHSIG); an
        # OCI `create`d one outlives the `create` process.
        self.die_with_parent = True
        # OCI: wait on the exec FIFO (fd label "fifo") instead of START.
        self.start_fifo = False
        self.join_namespaces: list[tuple[str, str]] = []
        # >= 0: an existing user namespace (Request.join_userns_fd) the init is
        # cloned into, its other new namespaces then owned by it (stage A).
        self.join_userns_fd = -1
        self.new_keyring = True
        self.start_hooks: list[tuple[str, list[str], list[str], int | None]] = []
        # createContainer: run by the init in its mount namespace, before pivot_root.
        self.container_hooks: list[tuple[str, list[str], list[str], int | None]] = []

    def describe(self) -> list[str]:
        return ([f"{op.describe()} (by stage A, locked)" for op in self.host_mounts]
                + [f"{op.describe()} (by the init)" for op in self.mounts]
                + [f"mask {p} (by the init)" for p in self.masked_paths]
                + [f"read-only {p} (by the init)" for p in self.readonly_paths])


def _caps(names: list[str], field: str) -> int:
    try:
        return caps.mask(names)
    except caps.CapabilityError as exc:
        raise SpecError(f"process.capabilities.{field}: {exc}") from None


def build(spec: S.Spec, req: Request) -> tuple[HostPlan, InitPlan]:
    """Plan a validated spec and its engine request: the complete plans, never
    edited afterwards (what the children learn at run time comes over the channel)."""
    assert spec.root is not None and spec.process is not None
    linux = spec.linux or S.Linux()
    proc = spec.process
    host = HostPlan()
    init = InitPlan()
    ns = {n.type for n in linux.namespaces if not n.path}
    for i, n in enumerate(linux.namespaces):
        if not n.path:
            continue
        if n.type in _UNJOINABLE:
            raise SpecError(f"linux.namespaces[{i}].path: joining an existing {n.type} "
                            f"namespace is not supported: {_UNJOINABLE[n.type]}",
                            "let uspawn create it")
        # O_PATH first, nsfs checked: a FIFO or device node there is never opened.
        from uspawn.kernel import nsfs

        try:
            nsfs.check_ns_path(n.path, n.type)
        except nsfs.NsPathError as exc:
            raise SpecError(f"linux.namespaces[{i}].path: {exc}") from None
        except OSError as exc:
            raise SpecError(f"linux.namespaces[{i}].path: {n.path}: {exc.strerror}") from None
        # Joined by stage A while still real root (the namespace belongs to the host).
        init.join_namespaces.append((n.type, n.path))
    init.userns = "user" in ns
    init.mount_ns = "mount" in ns
    if req.join_userns_fd >= 0:
        # The front's own choice (a pod's user namespace), never config.json's.
        if not init.userns:
            raise SpecError("linux.namespaces: joining the pod's user namespace needs a "
                            "\"user\" entry (without a path) and the pod's ID maps")
        init.join_userns_fd = req.join_userns_fd
    # The other namespace paths are resolved before the mount namespace is joined.
    init.join_namespaces.sort(key=lambda j: j[0] == "mount")
    if not init.mount_ns and init.userns:
        # Locked mounts need a mount namespace of the container's own (stage
        # B's unshare), and container root cannot mount in one it does not own.
        raise SpecError("linux.namespaces: a user namespace needs a mount namespace of its "
                        "own (the host's or a joined one cannot take the container's mounts)",
                        "add {\"type\": \"mount\"} without a path")
    for name, flag in NS_FLAGS.items():
        if name in ns:
            init.unshare_flags |= flag
    init.time_ns = "time" in ns
    init.root_path = spec.root.path
    host.rootfs = spec.root.path
    host.rootfs_readonly = spec.root.readonly
    init.rootfs_readonly = spec.root.readonly
    if init.userns:
        init.root_ids = (_to_host(0, linux.uid_mappings, "linux.uidMappings"),
                         _to_host(0, linux.gid_mappings, "linux.gidMappings"))
    host.ownership = req.ownership if init.userns else "off"
    # Also without a user namespace: one path, and nodes are verified the same way.
    host.host_dev = True
    prop = linux.rootfs_propagation or "rslave"
    init.root_propagation = {"private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE,
                             "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE,
                             "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED,
                             "unbindable": sc.MS_UNBINDABLE,
                             "runbindable": sc.MS_UNBINDABLE}.get(prop, 0)
    if not init.root_propagation:
        raise SpecError(f"linux.rootfsPropagation: unknown value {prop!r}")

    # Devices: the defaults (always allowed, as runc appends them after the
    # rules) plus linux.devices, limited by linux.resources.devices.
    rules = _device_rules(linux.resources.devices if linux.resources else [])
    nodes = list(devices.DEFAULT_DEVICES)
    for i, d in enumerate(linux.devices):
        if d.type not in ("c", "b", "u", "p"):
            raise SpecError(f"linux.devices[{i}].type: {d.type!r} is not c, b, u or p")
        if not d.path.startswith("/dev/"):
            raise SpecError(f"linux.devices[{i}].path: {d.path!r} is not under /dev")
        rel = os.path.normpath(d.path[5:])
        if rel.startswith(".."):
            raise SpecError(f"linux.devices[{i}].path: {d.path!r} escapes /dev")
        nodes = [n for n in nodes if n.path != rel]
        nodes.append(devices.DeviceNode(rel, d.type, d.major, d.minor,
                                        d.file_mode if d.file_mode is not None else 0o666,
                                        d.uid or 0, d.gid or 0,
                                        device_access(rules, d.type, d.major, d.minor)))
    host.dev_nodes = nodes
    host.console = proc.terminal
    # Opened read-write before START: the standard nodes the rules let be opened so
    # (they show whether nodes on this /dev open at all). Never a configured host
    # device: opening one acts (/dev/watchdog arms the timer, a tape rewinds) or fails
    # by itself (/dev/hwrng without a source: EINVAL, which failed privileged CRI pods).
    standard = {n.path for n in devices.DEFAULT_DEVICES}
    init.verify_devices = [n for n in nodes
                           if n.path in standard and "r" in n.access and "w" in n.access]

    if (init.userns and "cgroup" not in ns and not any(t == "cgroup" for t, _ in
                                                     init.join_namespaces)
            and any(m.type in ("cgroup", "cgroup2") for m in spec.mounts)):
        # cgroupfs can only be mounted by the owner of the cgroup namespace: a
        # user-namespaced container that mounts one gets a private cgroup
        # namespace (podman's default on cgroup v2; runc would show the host's
        # whole tree through a bind mount instead).
        init.unshare_flags |= sc.CLONE_NEWCGROUP
    for i, m in enumerate(spec.mounts):
        _plan_mount(i, m, host, init, linux)
    _finish_mounts(init, linux)

    init.sysctl = dict(linux.sysctl)
    init.masked_paths = list(linux.masked_paths)
    init.readonly_paths = list(linux.readonly_paths)
    init.hostname = spec.hostname
    init.domainname = spec.domainname
    init.loopback = "network" in ns
    init.terminal = proc.terminal
    if proc.console_size:
        init.console_size = (proc.console_size.height, proc.console_size.width)
    for i, r in enumerate(proc.rlimits):
        if r.type not in RLIMITS:
            raise SpecError(f"process.rlimits[{i}].type: unknown rlimit {r.type!r}")
        # OCI writes "unlimited" as 2**64-1; setrlimit takes RLIM_INFINITY (-1).
        init.rlimits.append((r.type, _rlim(r.soft), _rlim(r.hard)))
    init.args = list(proc.args)
    init.env = list(proc.env)
    init.cwd = proc.cwd
    user = proc.user or S.User()
    init.uid, init.gid = user.uid, user.gid
    init.additional_gids = list(user.additional_gids)
    init.umask = user.umask
    c = proc.capabilities or S.Capabilities()
    init.caps_bounding = _caps(c.bounding, "bounding")
    init.caps_effective = _caps(c.effective, "effective")
    init.caps_permitted = _caps(c.permitted, "permitted")
    init.caps_inheritable = _caps(c.inheritable, "inheritable")
    init.caps_ambient = _caps(c.ambient, "ambient")
    init.no_new_privileges = proc.no_new_privileges
    # From the request: how the container starts and what it keeps.
    init.parent_pid = os.getpid()
    init.seccomp_bpf = req.seccomp_bpf
    init.auto_start = req.start == START_AUTO
    init.start_fifo = req.start == START_FIFO and req.exec_fifo is not None
    init.die_with_parent = not req.detached
    init.preserve_fds = req.preserve_fds
    init.new_keyring = req.new_keyring
    init.start_hooks = list(req.start_hooks)
    init.container_hooks = list(req.container_hooks)
    return host, init


def _device_rules(rules: list[S.DeviceRule]) -> list[S.DeviceRule]:
    for i, r in enumerate(rules):
        field = f"linux.resources.devices[{i}]"
        if r.type not in (None, "a", "c", "b", "u"):
            raise SpecError(f"{field}.type: {r.type!r} is not a, c or b")
        if r.access is not None and set(r.access) - set("rwm"):
            raise SpecError(f"{field}.access: {r.access!r} is not a combination of r, w, m")
    return rules


def device_access(rules: list[S.DeviceRule], kind: str, major: int, minor: int) -> str:
    """What linux.resources.devices lets the container do with one node ("rwm"
    letters): per letter, the last matching rule decides, none = denied; no
    rules at all = everything (the node list itself is the policy)."""
    if kind == "p" or not rules:
        return "rwm"  # a FIFO is no device: the device cgroup never sees it
    kind = "c" if kind == "u" else kind
    allowed = {c: False for c in "rwm"}
    for r in rules:
        if r.type not in (None, "a") and ("c" if r.type == "u" else r.type) != kind:
            continue
        if r.major not in (None, -1) and r.major != major:
            continue
        if r.minor not in (None, -1) and r.minor != minor:
            continue
        for c in r.access or "rwm":
            allowed[c] = r.allow
    return "".join(c for c in "rwm" if allowed[c])


def _rlim(value: int) -> int:
    return -1 if value >= 1 << 63 else value


def _to_host(cid: int, maps: list[S.IDMapping], field: str) -> int:
    for m in maps:
        if m.container_id <= cid < m.container_id + m.size:
            return m.host_id + cid - m.container_id
    raise SpecError(f"{field}: container ID {cid} is not mapped",
                    "map container root (0) to a host range")


def _norm(dest: str) -> str:
    # "/" + "/sys" would keep POSIX's special leading "//".
    return os.path.normpath("/" + dest.lstrip("/"))


def _under(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top + "/")


def _finish_mounts(init: InitPlan, linux: S.Linux) -> None:
    """Stage A mounts everything but what lies below a proc or sysfs mount, in
    the host user namespace: a tmpfs or devpts made there names its owner in
    host IDs; the namespace-bound filesystems get the label their helper-made
    fd arrives under."""
    ops = parents_first(init.host_mounts)
    init.host_mounts = []
    checked: list[tuple[str, str]] = []
    for i, op in enumerate(ops):
        dest = _norm(op.dest)
        if _below_checked(dest, checked):
            init.mounts.append(op)
            continue
        init.host_mounts.append(op)
        if not isinstance(op, FsMount):
            continue
        if op.fstype in VISIBILITY_CHECKED_FS:
            checked.append((dest, op.fstype))
            if op.attrs & sc.MOUNT_ATTR_RDONLY:
                op.attrs &= ~sc.MOUNT_ATTR_RDONLY
                init.readonly_later.append((dest, op.attrs))
        if op.fstype in NS_BOUND_FS:
            op.label = f"fs{i}"
        if init.userns and op.fstype in ("tmpfs", "devpts"):
            # devpts: only the IDs given (a default uid= would own every pty).
            op.params = _host_tmpfs_params(op.params, linux, f"mount {op.dest}",
                                           defaults=op.fstype == "tmpfs")


def _below_checked(dest: str, checked: list[tuple[str, str]]) -> bool:
    """At or below a proc/sysfs mount, except sysfs's fs/cgroup: a permanently
    empty directory there, which the kernel lets a locked mount cover (so
    /sys/fs/cgroup keeps its config position in mountinfo)."""
    for top, fstype in checked:
        if _under(dest, top) and not (fstype == "sysfs"
                                      and _under(dest, os.path.join(top, "fs/cgroup"))):
            return True
    return False


def parents_first(ops: list[FsMount | FdMount]) -> list[FsMount | FdMount]:
    """Config order, except that a mount never goes before one listed later at
    a parent directory, which would cover it (a /dev listed after /dev/pts);
    systemd-nspawn sorts its mounts by path for the same reason."""
    todo = list(ops)
    out: list[FsMount | FdMount] = []
    while todo:
        dests = [_norm(op.dest) for op in todo]
        for i, dest in enumerate(dests):
            if not any(d != dest and _under(dest, d) for d in dests):
                out.append(todo.pop(i))
                break
    return out


def _host_tmpfs_params(params: list[tuple[str, str | None]], linux: S.Linux,
                       field: str, defaults: bool = True) -> list[tuple[str, str | None]]:
    """A tmpfs made in the host user namespace names its owner in host IDs."""
    out: list[tuple[str, str | None]] = []
    ids = {"uid": "0", "gid": "0"} if defaults else {}
    for k, v in params:
        if k in ("uid", "gid"):
            ids[k] = v or ""
        else:
            out.append((k, v))
    for key, maps, name in (("uid", linux.uid_mappings, "linux.uidMappings"),
                            ("gid", linux.gid_mappings, "linux.gidMappings")):
        if key not in ids:
            continue
        value = ids[key]
        if not value.isascii() or not value.isdigit():
            raise SpecError(f"{field}.options: {key}={value} is not a number")
        out.append((key, str(_to_host(int(value), maps, name))))
    return out


def _plan_mount(i: int, m: S.Mount, host: HostPlan, init: InitPlan, linux: S.Linux) -> None:
    field = f"mounts[{i}]"
    opts = mounts.parse_options(m.options)
    fstype = m.type or ("bind" if opts.bind else None)
    if fstype is None:
        raise SpecError(f"{field}.type: missing (and no bind option)")
    if fstype not in SUPPORTED_FS:
        raise SpecError(f"{field}.type: filesystem {fstype!r} is not supported",
                        f"supported: {', '.join(SUPPORTED_FS)}")
    if opts.bind or fstype in ("bind", "none"):
        if not m.source:
            raise SpecError(f"{field}.source: a bind mount needs a source")
        if not os.path.isabs(m.source):
            raise SpecError(f"{field}.source: {m.source!r} is not absolute")
        try:
            is_dir = os.path.isdir(m.source)
            os.lstat(m.source)
        except OSError as exc:
            raise SpecError(f"{field}.source: {m.source}: {exc.strerror}") from None
        except ValueError:  # NUL or an unencodable character
            raise SpecError(f"{field}.source: {m.source!r} is not a valid path") from None
        label = f"bind{i}"
        idmap = "yes" if opts.idmap else ("auto" if "x-uspawn-idmap-auto" in
                                          [k for k, _ in opts.fs_params] else "no")
        if idmap == "yes" and not init.userns:
            raise SpecError(f"{field}.options: idmap needs a user namespace")
        host.binds.append(HostBind(label, m.source, opts.recursive, opts.attr_set,
                                   opts.attr_clr, idmap, opts.propagation))
        init.host_mounts.append(FdMount(m.destination, label, is_dir))
        return
    if fstype == "overlay":
        raise SpecError(f"{field}.type: overlay mounts are not supported yet",
                        "prepare the overlay outside and pass it as root.path or a bind")
    if fstype == "cgroup":
        fstype = "cgroup2"
    attrs = (_FS_DEFAULT_ATTRS.get(fstype, 0) | opts.attr_set) & ~opts.attr_clr
    params = [(k, v) for k, v in opts.fs_params if not k.startswith("x-")]
    if os.path.normpath(m.destination) == "/dev" and fstype == "tmpfs" and host.host_dev:
        # Nodes must live on a host-owned superblock: the parent makes this one,
        # with the spec's options (uid=/gid= in host IDs, as for any host-made tmpfs).
        host.dev_params = (_host_tmpfs_params(params, linux, f"{field}") if init.userns
                           else params)
        host.dev_attrs = (opts.attr_set | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC
                          ) & ~opts.attr_clr
        host.dev_source = m.source
        init.host_mounts.append(FdMount("/dev", "dev", True))
        return
    if fstype == "tmpfs" and init.userns and not opts.attr_clr & sc.MOUNT_ATTR_NODEV:
        # Made on the host side (see _finish_mounts), so not SB_I_NODEV as one
        # made inside the user namespace is: nodev unless asked for.
        attrs |= sc.MOUNT_ATTR_NODEV
    if fstype == "devpts":
        keys = {k for k, _ in params}
        if "newinstance" not in keys:
            params.append(("newinstance", None))
        if "ptmxmode" not in keys:
            params.append(("ptmxmode", "0666"))
        init.verify_ptmx = True
    # The source names the instance in /proc/mounts ("proc", "shm", ...); every
    # filesystem takes it (fs_context's generic "source" parameter).
    init.host_mounts.append(FsMount(m.destination, fstype, params, attrs, m.source or None))
