"""Specs for the nspawn-style front end (`uspawn run`).

`run` is "build a Spec, then hand it to the one engine": everything a user
says on the command line ends up as spec fields (plus uspawn's own Options
for things the OCI spec has no field for: ownership mode, the UID lease).
"""

from __future__ import annotations

import os

from . import spec as S
from .errors import SpecError, UsageError
from .linux import caps
from .state import RANGE_SIZE

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# runc's defaults (libcontainer/specconv/example.go), plus /proc/sysrq-trigger
# read-only as every runtime does.
MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def machine_name(rootfs: str) -> str:
    """A name from the directory: other characters become '-' (runs collapsed)."""
    base = os.path.basename(rootfs.rstrip("/")) or "container"
    out: list[str] = []
    for ch in base:
        if ch in _NAME_CHARS:
            out.append(ch)
        elif not out or out[-1] != "-":
            out.append("-")
    name = "".join(out).strip("-.") or "container"
    return name[:64]


def check_rootfs(path: str) -> str:
    if not path:
        raise UsageError("-D/--directory: missing", "give the container's root directory")
    try:
        real = os.path.realpath(path)  # readlink of a link it may not read: EACCES
        st = os.stat(real)
    except OSError as exc:
        raise SpecError(f"rootfs {path}: {exc.strerror}", "check the -D path") from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise SpecError(f"rootfs {path}: not a directory", "point -D at a directory tree")
    if real == "/":
        raise SpecError("rootfs /: refusing to use the host's root directory as a container")
    return real


def parse_private_users(value: str) -> tuple[str, int, int]:
    """'pick' | 'no' | 'BASE[:SIZE]' -> (mode, base, size)."""
    if value in ("pick", "yes", "auto", "identity"):
        return ("pick", 0, RANGE_SIZE)
    if value in ("no", "false", "off"):
        return ("no", 0, 0)
    base_s, _, size_s = value.partition(":")
    try:
        base = int(base_s, 0)
        size = int(size_s, 0) if size_s else RANGE_SIZE
    except ValueError:
        raise UsageError(f"--private-users: {value!r} is not pick, no or BASE[:SIZE]") from None
    if base <= 0 or size <= 0 or base + size > 2**32 - 1:
        raise UsageError(f"--private-users: range {base}:{size} out of bounds",
                         "BASE must be > 0 (0 would map container root to host root)")
    return ("fixed", base, size)


def parse_bind(value: str, readonly: bool, field: str) -> tuple[str, str, list[str]]:
    parts = value.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"{field}: {value!r} is not SRC[:DST[:OPTIONS]]")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    opts = parts[2].split(",") if len(parts) > 2 and parts[2] else []
    for o in opts:
        if o not in ("ro", "rw", "rbind", "norbind", "idmap", "noidmap"):
            raise UsageError(f"{field}: unknown option {o!r}", "use ro, rw, rbind, norbind, idmap")
    if not os.path.isabs(src) or not os.path.isabs(dst):
        raise UsageError(f"{field}: {value!r}: paths must be absolute")
    if not os.path.exists(src):
        raise SpecError(f"{field}: source {src} does not exist")
    mopts = ["rbind" if "norbind" not in opts else "bind", "nosuid", "nodev"]
    if readonly or "ro" in opts:
        mopts.append("ro")
    if "idmap" in opts:
        mopts.append("idmap")
    elif "noidmap" not in opts:
        mopts.append("x-uspawn-idmap-auto")
    return os.path.realpath(src), dst, mopts


def _read_in_root(root: str, path: str) -> str:
    import stat

    from .linux import mounts

    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pfd = mounts.open_in_root(rootfd, path, os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return ""
    finally:
        os.close(rootfd)
    try:
        if stat.S_ISLNK(os.fstat(pfd).st_mode):
            return ""  # never followed, as before
        fd = mounts.reopen_regular(pfd)
        if fd is None:
            raise SpecError(f"rootfs {root}: {path} is not a regular file",
                            "a tree's /etc files must be plain files")
    finally:
        os.close(pfd)
    with os.fdopen(fd) as f:
        return f.read(1 << 20)


def resolve_user(root: str, value: str) -> S.User:
    """NAME|UID[:GID] against the *container's* /etc/passwd and /etc/group."""
    name, _, group = value.partition(":")
    passwd = [ln.split(":") for ln in _read_in_root(root, "/etc/passwd").splitlines()]
    groups = [ln.split(":") for ln in _read_in_root(root, "/etc/group").splitlines()]
    uid = gid = None
    username = None
    for ent in passwd:
        if len(ent) >= 4 and (ent[0] == name or (name.isdigit() and ent[2] == name)):
            username, uid, gid = ent[0], int(ent[2]), int(ent[3])
            break
    if uid is None:
        if not name.isdigit():
            raise SpecError(f"--user: no user {name!r} in the container's /etc/passwd")
        uid, gid = int(name), int(name)
    if group:
        for ent in groups:
            if len(ent) >= 3 and (ent[0] == group or (group.isdigit() and ent[2] == group)):
                gid = int(ent[2])
                break
        else:
            if not group.isdigit():
                raise SpecError(f"--user: no group {group!r} in the container's /etc/group")
            gid = int(group)
    extra: list[int] = []
    if username:
        for ent in groups:
            if len(ent) >= 4 and username in ent[3].split(",") and ent[2].isdigit():
                extra.append(int(ent[2]))
    if uid >= RANGE_SIZE or (gid or 0) >= RANGE_SIZE:
        raise SpecError(f"--user: {uid}:{gid} is outside the container's 65536 IDs")
    return S.User(uid=uid, gid=gid or 0, additional_gids=sorted(set(extra)), username=username)


def _mount(dest: str, fstype: str, source: str, options: list[str]) -> S.Mount:
    return S.Mount(destination=dest, type=fstype, source=source, options=options)


def run_spec(
    rootfs: str, args: list[str], *, hostname: str | None = None, base: int = 0,
    size: int = 0, userns: bool = True, network_host: bool = False,
    user: str | None = None, chdir: str = "/", setenv: list[str] | None = None,
    add_caps: list[str] | None = None, drop_caps: list[str] | None = None,
    no_new_privileges: bool = False, tty: bool = False,
    binds: list[tuple[str, str, list[str]]] | None = None,
    console_size: tuple[int, int] | None = None, read_only: bool = False,
    boot: bool = False, host_dir: str | None = None, machine_uuid: str | None = None,
    netns_path: str | None = None,
) -> S.Spec:
    """The Spec for `uspawn run` (rootfs must be check_rootfs()'d already).

    boot=True makes it a system container (`uspawn boot`): the tree's init as
    pid 1, a writable cgroup2 subtree at /sys/fs/cgroup (the container's own,
    through the cgroup namespace; cgroup2 also on hybrid hosts, so systemd runs
    in unified mode everywhere), /run/host from host_dir (container-manager,
    container-uuid and the notify socket), and systemd's container environment.
    """
    if not args:
        raise UsageError("no command given", "uspawn run -D ROOTFS -- CMD [ARGS...]")
    namespaces = ["pid", "mount", "uts", "ipc", "cgroup"]
    if not network_host:
        namespaces.append("network")
    if userns:
        namespaces.append("user")
    linux = S.Linux(
        namespaces=[S.Namespace(type=t, path=netns_path if t == "network" else None)
                    for t in namespaces],
        masked_paths=list(MASKED_PATHS),
        readonly_paths=list(READONLY_PATHS),
    )
    if userns:
        linux.uid_mappings = [S.IDMapping(container_id=0, host_id=base, size=size)]
        linux.gid_mappings = [S.IDMapping(container_id=0, host_id=base, size=size)]

    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/pts", "devpts", "devpts",
               ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        _mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777",
                                            "size=65536k"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
    ]
    if network_host and userns:
        # sysfs can only be mounted by the owner of the network namespace; with
        # the host's network, show the host's /sys read-only instead (nspawn does too).
        mounts.append(_mount("/sys", "bind", "/sys", ["rbind", "ro", "nosuid", "nodev",
                                                     "noexec"]))
    else:
        mounts.append(_mount("/sys", "sysfs", "sysfs", ["ro", "nosuid", "noexec", "nodev"]))
        mounts.append(_mount("/sys/fs/cgroup", "cgroup", "cgroup",
                             ["rw" if boot else "ro", "nosuid", "noexec", "nodev"]))
    mounts.append(_mount("/run", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=755"]))
    mounts.append(_mount("/tmp", "tmpfs", "tmpfs", ["nosuid", "nodev", "mode=1777"]))
    if host_dir:
        mounts.append(_mount("/run/host", "bind", host_dir, ["bind", "ro", "nosuid", "nodev",
                                                            "noexec"]))
    for src, dst, opts in binds or []:
        mounts.append(S.Mount(destination=dst, type="bind", source=src, options=opts))

    env = [f"PATH={DEFAULT_PATH}", "container=uspawn", "HOME=/root"]
    if boot:
        # systemd's container interface (systemd.io/CONTAINER_INTERFACE).
        env = [f"PATH={DEFAULT_PATH}", "container=uspawn", "TERM=vt220"]
        if machine_uuid:
            env.append(f"container_uuid={machine_uuid}")
        if host_dir:
            env.append("NOTIFY_SOCKET=/run/host/notify")
    elif tty:
        env.append(f"TERM={os.environ.get('TERM', 'xterm')}")
    proc_user = resolve_user(rootfs, user) if user else S.User(uid=0, gid=0)
    if proc_user.uid != 0:
        env = [e for e in env if not e.startswith("HOME=")]
        home = _home_of(rootfs, proc_user.uid)
        env.append(f"HOME={home}")
        if proc_user.username:
            env.append(f"USER={proc_user.username}")
    for kv in setenv or []:
        if "=" not in kv:
            raise UsageError(f"--setenv: {kv!r} is not KEY=VALUE")
        key = kv.split("=", 1)[0]
        env = [e for e in env if not e.startswith(key + "=")] + [kv]

    try:
        keep = set(caps.DEFAULT_CAPS)
        if not network_host:
            keep.add("CAP_NET_ADMIN")
        keep |= {caps.normalize(c) for c in add_caps or []}
        keep -= {caps.normalize(c) for c in drop_caps or []}
    except caps.CapabilityError as exc:
        raise UsageError(f"--capability/--drop-capability: {exc}") from None
    capset = sorted(keep, key=lambda c: caps.CAP_NUMBERS[c])
    is_root = proc_user.uid == 0
    capabilities = S.Capabilities(
        bounding=capset,
        effective=capset if is_root else [],
        permitted=capset if is_root else [],
    )
    process = S.Process(
        terminal=tty, args=list(args), env=env, cwd=chdir, user=proc_user,
        capabilities=capabilities, no_new_privileges=no_new_privileges,
        console_size=S.ConsoleSize(height=console_size[0], width=console_size[1])
        if console_size else None,
    )
    spec = S.Spec(
        process=process, root=S.Root(path=rootfs, readonly=read_only),
        hostname=hostname or machine_name(rootfs), mounts=mounts, linux=linux,
    )
    S.validate(spec)
    return spec


def _home_of(root: str, uid: int) -> str:
    for ln in _read_in_root(root, "/etc/passwd").splitlines():
        ent = ln.split(":")
        if len(ent) >= 6 and ent[2] == str(uid):
            return ent[5] or "/"
    return "/"


INIT_CANDIDATES = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")


def find_init(root: str) -> str:
    """The tree's init, looked up inside the tree (symlinks resolved within it)."""
    from .linux import mounts

    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for cand in INIT_CANDIDATES:
            try:
                fd = mounts.open_in_root(rootfd, cand)
            except OSError:
                continue
            os.close(fd)
            return cand
    finally:
        os.close(rootfd)
    raise SpecError(f"rootfs {root}: no init found (looked for {', '.join(INIT_CANDIDATES)})",
                    "install systemd in the tree, or use `uspawn run` for a single command")
