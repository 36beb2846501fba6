"""Specs for the nspawn-style front end (`uspawn run`).

`run` is "build a Spec, then hand it to the one engine": everything a user
says on the command line ends up as spec fields (plus uspawn's own Options
for things the OCI spec has no field for: ownership mode, the UID lease).
"""

from __future__ import annotations

import os

from uspawn.base.errors import SpecError, UsageError
from uspawn.engine import spec as S
from uspawn.engine.defaults import DEFAULT_PATH, MASKED_PATHS, READONLY_PATHS
from uspawn.kernel import caps
from uspawn.state.store import RANGE_SIZE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable


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


BIND_OPTIONS = ("ro", "rw", "rbind", "norbind", "idmap", "noidmap")


def parse_bind(value: str, readonly: bool, field: str,
               warn: Callable[[str], None] | None = None) -> tuple[str, str, list[str]]:
    """--bind/--bind-ro SRC[:DST[:OPTIONS]] -> (source, destination, mount options).

    Binds are not idmapped unless OPTIONS has `idmap` (as systemd-nspawn): a
    plain bind shows host-owned files as their host owners (outside the
    container's range: nobody, no access beyond "other"), so container root is
    not host root there. `idmap` makes it so, hence the checks in _check_idmap.
    """
    parts = value.split(":")
    if len(parts) > 3 or not parts[0]:
        raise UsageError(f"{field}: {value!r} is not SRC[:DST[:OPTIONS]]")
    src = parts[0]
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    opts = parts[2].split(",") if len(parts) > 2 and parts[2] else []
    for o in opts:
        if o in ("rootidmap", "owneridmap"):
            raise UsageError(f"{field}: {o} is not supported",
                             "use idmap (container root = host root on the source) or no "
                             "option (host owners kept)")
        if o not in BIND_OPTIONS:
            raise UsageError(f"{field}: unknown option {o!r}", "use ro, rw, rbind, norbind, idmap")
    if not os.path.isabs(src) or not os.path.isabs(dst):
        raise UsageError(f"{field}: {value!r}: paths must be absolute")
    if not os.path.exists(src):
        raise SpecError(f"{field}: source {src} does not exist")
    real = os.path.realpath(src)
    # nosuid: a setuid file in the source (the host's, or one a process in the
    # container made) never raises privileges inside the container.
    mopts = ["rbind" if "norbind" not in opts else "bind", "nosuid", "nodev"]
    if readonly or "ro" in opts:
        mopts.append("ro")
    if "idmap" in opts and "noidmap" not in opts:
        _check_idmap(real, field, warn)
        mopts.append("idmap")
    return real, dst, mopts


def _check_idmap(src: str, field: str, warn: Callable[[str], None] | None) -> None:
    """With idmap, what container root creates in src is host-root-owned on disk:
    refuse a world-writable source, warn when other host users can reach it."""
    import stat

    st = os.stat(src)
    if st.st_mode & stat.S_IWOTH:
        raise SpecError(f"{field}: {src} is world-writable; refusing to idmap it (container "
                        "root would plant host-root-owned files any host user can reach)",
                        "bind a directory only root can write, or drop the idmap option")
    if warn is not None and closed_ancestor(src) is None:
        warn(f"warning: {field} {src} (idmap): unprivileged host users can reach it; files "
             "container root creates there are owned by host root (a setuid binary would "
             "run as root for them). Keep the source under a 0700 root-owned directory")


def closed_ancestor(path: str) -> str | None:
    """The first directory from path up to / (path included) that only root can
    traverse (root-owned, no group/other search bit); None when there is none."""
    import stat

    p = path
    while True:
        try:
            st = os.stat(p)
        except OSError:
            return p  # cannot even stat: not "reachable" in a way we can tell
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o011:
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


# Default tmpfs mounts and their limits (systemd's NESTED_TMPFS_LIMITS for /tmp
# and TMPFS_LIMITS_RUN for /run, as systemd-nspawn mounts them): a container
# writing to /tmp or /run must not be able to take the host's memory. Percentages
# are of the host's RAM; nr_inodes bounds small-file floods as well.
TMPFS_DEFAULTS: dict[str, list[str]] = {
    "/tmp": ["nosuid", "nodev", "mode=1777", "size=10%", "nr_inodes=400k"],
    "/run": ["nosuid", "nodev", "mode=755", "size=20%", "nr_inodes=800k"],
}
TMPFS_LIMITS = ["size=10%", "nr_inodes=400k"]
TMPFS_ATTRS = ("ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
               "strictatime", "relatime", "noatime", "nostrictatime")
TMPFS_PARAMS = ("size", "nr_inodes", "nr_blocks", "mode", "uid", "gid", "huge", "mpol")
TMPFS_FLAGS = ("noswap", "inode32", "inode64")
# API filesystems and host-made mounts: a --tmpfs there would hide what the
# container needs (/dev's verified nodes) or what it is told (/run/host).
TMPFS_REFUSED = ("/", "/dev", "/dev/pts", "/proc", "/sys", "/run/host")


def parse_tmpfs(value: str) -> tuple[str, list[str]]:
    """--tmpfs PATH[:OPTIONS] (systemd-nspawn's syntax) -> (path, mount options).

    nosuid,nodev first; mode=0755 when no mode is given (nspawn's default);
    size and nr_inodes bounded unless given (size=0/nr_inodes=0: unlimited).
    """
    path, _, optstr = value.partition(":")
    if not path.startswith("/"):
        raise UsageError(f"--tmpfs: {value!r}: PATH must be absolute", "--tmpfs /var/tmp:size=1G")
    path = os.path.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path in TMPFS_REFUSED or path.startswith(("/proc/", "/sys/")):
        raise UsageError(f"--tmpfs: {path}: refusing to cover an API filesystem")
    opts = [o for o in optstr.split(",") if o] if optstr else []
    for o in opts:
        key, eq, val = o.partition("=")
        if o not in TMPFS_ATTRS + TMPFS_FLAGS and not (key in TMPFS_PARAMS and eq and val):
            raise UsageError(f"--tmpfs: unknown option {o!r}",
                             "use size=, nr_inodes=, mode=, uid=, gid=, ro, noexec ...")
    keys = {o.partition("=")[0] for o in opts}
    out = ["nosuid", "nodev"]
    if "mode" not in keys:
        out.append("mode=1777" if path in ("/tmp", "/dev/shm") else "mode=755")
    defaults = TMPFS_DEFAULTS.get(path, TMPFS_LIMITS)
    out += [d for d in defaults if d.partition("=")[0] in ("size", "nr_inodes")
            and d.partition("=")[0] not in keys]
    return path, out + opts


def _id(text: str) -> int | None:
    """A decimal ID (ASCII digits: "²".isdigit() is true, int("²") raises), else None."""
    from uspawn.base.cmdline import is_uint

    return int(text) if is_uint(text) and len(text) <= 10 else None


def resolve_user(root: str, value: str) -> S.User:
    """NAME|UID[:GID] against the *container's* /etc/passwd and /etc/group."""
    name, _, group = value.partition(":")
    from uspawn.tree import etc  # only with --user

    passwd = etc.entries(root, "/etc/passwd")
    groups = etc.entries(root, "/etc/group")
    uid = gid = None
    username = None
    for ent in passwd:
        if len(ent) >= 4 and (ent[0] == name or (_id(name) is not None and ent[2] == name)):
            uid, gid = _id(ent[2]), _id(ent[3])
            if uid is None or gid is None:
                raise SpecError(f"--user: {name!r}: the container's /etc/passwd gives "
                                f"non-numeric IDs {ent[2]!r}:{ent[3]!r}",
                                "fix the tree's /etc/passwd or pass UID:GID")
            username = ent[0]
            break
    if uid is None:
        uid = _id(name)
        if uid is None:
            raise SpecError(f"--user: no user {name!r} in the container's /etc/passwd")
        gid = uid
    if group:
        for ent in groups:
            if len(ent) >= 3 and (ent[0] == group or (_id(group) is not None and ent[2] == group)):
                gid = _id(ent[2])
                if gid is None:
                    raise SpecError(f"--user: group {group!r}: the container's /etc/group "
                                    f"gives a non-numeric GID {ent[2]!r}")
                break
        else:
            gid = _id(group)
            if gid is None:
                raise SpecError(f"--user: no group {group!r} in the container's /etc/group")
    extra: list[int] = []
    if username:
        for ent in groups:
            extra_gid = _id(ent[2]) if len(ent) >= 4 else None
            if extra_gid is not None and username in ent[3].split(","):
                extra.append(extra_gid)
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
    netns_path: str | None = None, tmpfs: list[str] | None = None,
    resources: S.Resources | None = None, proc_views: list[tuple[str, str]] | None = None,
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
        resources=resources,  # machine/limits.py: --memory, --cpus, --pids, --property
    )
    if userns:
        linux.uid_mappings = [S.IDMapping(container_id=0, host_id=base, size=size)]
        linux.gid_mappings = [S.IDMapping(container_id=0, host_id=base, size=size)]

    user_tmpfs = dict(parse_tmpfs(t) for t in tmpfs or [])  # the last one per path wins
    mounts = [
        _mount("/proc", "proc", "proc", ["nosuid", "noexec", "nodev"]),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/pts", "devpts", "devpts",
               ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        _mount("/dev/shm", "tmpfs", "shm", user_tmpfs.pop("/dev/shm", [
            "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"])),
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
    # /run and /tmp: bounded by default; an explicit --tmpfs for the path replaces them.
    for dest, opts in TMPFS_DEFAULTS.items():
        mounts.append(_mount(dest, "tmpfs", "tmpfs", user_tmpfs.pop(dest, opts)))
    if host_dir:
        mounts.append(_mount("/run/host", "bind", host_dir, ["bind", "ro", "nosuid", "nodev",
                                                            "noexec"]))
    extra = [_mount(dst, "tmpfs", "tmpfs", opts) for dst, opts in user_tmpfs.items()]
    extra += [S.Mount(destination=dst, type="bind", source=src, options=opts)
              for src, dst, opts in binds or []]
    # Parents before children (--tmpfs /srv with --bind X:/srv/x, or the reverse);
    # the sort is stable, so equal depths keep the command line's order.
    extra.sort(key=lambda m: len([p for p in m.destination.split("/") if p]))
    mounts += extra
    # lxcfs's /proc and /sys files over the container's (after /proc and /sys).
    mounts += [_mount(dst, "bind", src, ["bind", "ro", "nosuid", "nodev", "noexec"])
               for src, dst in proc_views or []]

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
    from uspawn.tree import etc

    for ent in etc.entries(root, "/etc/passwd"):
        if len(ent) >= 6 and ent[2] == str(uid):
            return ent[5] or "/"
    return "/"


INIT_CANDIDATES = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")


def find_init(root: str) -> str:
    """The tree's init, looked up inside the tree (symlinks resolved within it)."""
    from uspawn.kernel import mounts

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
