"""`uspawn-runc-pods`: every CRI pod in a user namespace of its own (issue 14).

The same runtime as `uspawn-runc`, started under a second name (containerd's runc
shim has no per-handler channel but BinaryName, and the choice belongs to the
cluster admin's RuntimeClass, not to an annotation a pod author could set). For a
config that asks for no user namespace:

- the pod's sandbox container (`io.kubernetes.cri.container-type: sandbox`, or a
  config with no CRI annotations at all, which is a pod of its own) picks a free
  65536-ID range from the host-wide leases `uspawn run` uses (state.RangeAllocator)
  and gets a new user namespace mapping 0..65535 onto it; the lease is handed to its
  init like any uspawn-runc range lease (oci/lifecycle.py) and dropped when the
  sandbox is deleted (or is stale once that init is dead);
- every other container of the pod (`container-type: container`) joins the
  sandbox's user namespace: the sandbox's record in the same --root names its init
  (pid and start time); the namespace is opened through a /proc/<pid> directory fd
  whose identity and uid_map/gid_map are checked, so a recycled pid is never used,
  and the engine is handed that fd (Request.join_userns_fd), never a path from
  config.json;
- the rootfs of each container is an idmapped mount onto the range (`map`), and so
  is every bind source where the filesystem allows it (emptyDir and hostPath
  volumes, /etc/hosts, /dev/shm...): what pod root writes there is host root's on
  disk, as with runc without a user namespace;
- the pod's network namespace is containerd's, owned by the host's user namespace,
  where pod root has no CAP_NET_BIND_SERVICE: when the sandbox is created, we (host
  root) set net.ipv4.ip_unprivileged_port_start=0 in that namespace only.

A config that has a user namespace already runs as with `uspawn-runc`.
"""

from __future__ import annotations

import errno
import os

from uspawn.base.errors import SpecError, StateError
from uspawn.engine import spec as S
from uspawn.state import store as statemod

POD_MODE_NAME = "uspawn-runc-pods"
TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
SANDBOX_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# Set in the pod's network namespace when its sandbox is created.
POD_NET_SYSCTLS = (("net/ipv4/ip_unprivileged_port_start", "0"),)

# The container ids uspawn-runc accepts (oci/lifecycle.py check_id).
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+")

IdMap = list[list[int]]  # [[container_id, host_id, size], ...] as in the state record


class PodError(StateError):
    """The pod's sandbox cannot be joined."""


class PodUserns:
    """What create() needs for one container of a pod: the sandbox's new range
    (lease) or the sandbox's user namespace to join (fd), and the record to keep."""

    def __init__(self, record: dict[str, object], lease: statemod.Lease | None = None,
                 join_fd: int = -1) -> None:
        self.record = record
        self.lease = lease
        self.join_fd = join_fd

    def close(self) -> None:
        if self.join_fd >= 0:
            os.close(self.join_fd)
            self.join_fd = -1


def prepare(spec: S.Spec, root: str, cid: str) -> PodUserns | None:
    """Give spec the pod's user namespace (maps, idmapped binds) and return what
    create() must hold; None when the config has a user namespace of its own."""
    if "user" in spec.namespace_types():
        return None
    ann = spec.annotations or {}
    kind = ann.get(TYPE_ANNOTATION, "sandbox")
    if kind == "container":
        pod = _join_sandbox(spec, root, ann.get(SANDBOX_ANNOTATION, ""), cid)
    elif kind == "sandbox":
        pod = _new_pod(spec, cid)
    else:
        raise SpecError(f"annotations.{TYPE_ANNOTATION}: unknown value {kind!r}",
                        "containerd sets sandbox or container")
    try:
        uid_map, gid_map = pod.record["uid_map"], pod.record["gid_map"]
        assert isinstance(uid_map, list) and isinstance(gid_map, list)
        _give_userns(spec, uid_map, gid_map)
    except BaseException:
        pod.close()
        if pod.lease is not None:
            pod.lease.release()
        raise
    return pod


def _new_pod(spec: S.Spec, cid: str) -> PodUserns:
    netns = _pod_netns(spec)
    base, lease = statemod.RangeAllocator().pick()
    try:
        if netns:
            _set_pod_sysctls(netns)
    except BaseException:
        lease.release()
        raise
    size = statemod.RANGE_SIZE
    return PodUserns({"sandbox": cid, "uid_map": [[0, base, size]],
                      "gid_map": [[0, base, size]]}, lease=lease)


def _give_userns(spec: S.Spec, uid_map: IdMap, gid_map: IdMap) -> None:
    if spec.linux is None:
        spec.linux = S.Linux()
    linux = spec.linux
    linux.namespaces = [*linux.namespaces, S.Namespace(type="user")]
    linux.uid_mappings = [S.IDMapping(container_id=c, host_id=h, size=n) for c, h, n in uid_map]
    linux.gid_mappings = [S.IDMapping(container_id=c, host_id=h, size=n) for c, h, n in gid_map]
    for m in spec.mounts:
        opts = m.options
        if (m.type in ("bind", "none") or "bind" in opts or "rbind" in opts) and not (
                {"idmap", "ridmap", "x-uspawn-idmap-auto"} & set(opts)):
            # Idmapped where the source's filesystem allows it, else host owners
            # (proc, sysfs...: the engine warns); see the module docstring.
            m.options = [*opts, "x-uspawn-idmap-auto"]


def _pod_netns(spec: S.Spec) -> str:
    """The network namespace path the sandbox joins, if it is not the host's own
    (hostNetwork pods: nothing is changed there)."""
    for ns in (spec.linux.namespaces if spec.linux else []):
        if ns.type == "network" and ns.path:
            return ns.path
    return ""


def _set_pod_sysctls(path: str) -> None:
    """POD_NET_SYSCTLS in the network namespace at path (containerd's pod netns), by
    a child that joins it: /proc/sys/net shows the namespace of the process reading
    it. Never in ours (the host's)."""
    from uspawn.kernel import nsfs
    from uspawn.kernel import syscalls as sc

    field = "linux.namespaces[network].path"
    try:
        fd = nsfs.open_ns(path, "network")
    except nsfs.NsPathError as exc:
        raise SpecError(f"{field}: {exc}") from None
    except OSError as exc:
        raise SpecError(f"{field}: {path}: {exc.strerror}") from None
    try:
        st, mine = os.fstat(fd), os.stat("/proc/self/ns/net")
        if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            return  # the host's network namespace: never touched
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(r)
            os.close(w)
            raise StateError(f"pod network namespace {path}: fork: {exc.strerror}") from None
        if pid == 0:
            msg = b""
            try:
                os.close(r)
                sc.setns(fd, sc.CLONE_NEWNET)
                for key, value in POD_NET_SYSCTLS:
                    with open(f"/proc/sys/{key}", "w") as f:
                        f.write(value)
            except BaseException as exc:
                msg = str(exc).encode() or b"failed"
            finally:
                try:
                    os.write(w, msg)
                finally:
                    os._exit(0)
        os.close(w)
        try:
            err = os.read(r, 4096)
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        if err:
            raise StateError(f"pod network namespace {path}: set "
                             f"{', '.join(k.replace('/', '.') for k, _ in POD_NET_SYSCTLS)}: "
                             f"{err.decode(errors='replace')}")
    finally:
        os.close(fd)


def _join_sandbox(spec: S.Spec, root: str, sid: str, cid: str) -> PodUserns:
    """The sandbox's user namespace, opened so that it cannot be another's."""
    field = f"annotations.{SANDBOX_ANNOTATION}"
    if not sid:
        raise SpecError(f"{field}: missing for a container of a pod",
                        "containerd's CRI sets it; run a lone container as a sandbox")
    if len(sid) > 255 or not set(sid) <= _ID_CHARS or sid in (".", ".."):
        raise SpecError(f"{field}: {sid!r} is not a container id")
    try:
        data = statemod.loads(statemod.read_record(os.path.join(root, sid, "state.json")))
    except FileNotFoundError:
        raise PodError(f"pod sandbox {sid!r} does not exist in {root}",
                       "create the sandbox with the same runtime and --root first") from None
    except (OSError, ValueError) as exc:
        raise PodError(f"pod sandbox {sid!r}: unreadable state: {exc}") from None
    pod = data.get("pod") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(pod, dict):
        raise PodError(f"pod sandbox {sid!r} has no pod user namespace (it was not created "
                       f"by {POD_MODE_NAME}, or its config had a user namespace)")
    pid, start = data.get("pid"), data.get("pid_start")
    uid_map, gid_map = pod.get("uid_map"), pod.get("gid_map")
    if not (type(pid) is int and pid > 0 and type(start) is int and _is_map(uid_map)
            and _is_map(gid_map)):
        raise PodError(f"pod sandbox {sid!r}: malformed pod record")
    assert isinstance(uid_map, list) and isinstance(gid_map, list)
    # This container holds the pod's range too (its own lease file, handed to its
    # init as the sandbox's is): should the sandbox's init die first, the range is
    # still taken while this container runs in it. Taken before the check below:
    # a sandbox alive after it has held its lease all along, so no other pod can
    # have picked the range in between.
    base = min(m[1] for m in uid_map)
    size = max(m[1] + m[2] for m in uid_map) - base
    share = statemod.RangeAllocator().share(base, size, cid)
    try:
        fd = _open_userns(pid, start, uid_map, gid_map)
    except BaseException:
        share.release()
        raise
    if fd < 0:
        share.release()
        raise PodError(f"pod sandbox {sid!r} is not running (its init {pid} is gone)",
                       "the pod must be recreated")
    return PodUserns({"sandbox": sid, "uid_map": uid_map, "gid_map": gid_map},
                     lease=share, join_fd=fd)


def _is_map(m: object) -> bool:
    return (isinstance(m, list) and bool(m) and all(
        isinstance(e, list) and len(e) == 3 and all(type(x) is int and x >= 0 for x in e)
        for e in m))


def _open_userns(pid: int, start: int, uid_map: IdMap, gid_map: IdMap) -> int:
    """/proc/<pid>/ns/user of the process started at `start`, or -1 if it is gone.

    Everything is read through one /proc/<pid> directory fd: it stays bound to the
    process it was opened for, and lookups below it fail once that process is gone,
    even if the pid is reused meanwhile. Its start time (read through it) proves it
    is the recorded one; its maps must be the recorded pod maps."""
    try:
        dfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    except OSError as exc:
        raise PodError(f"pod sandbox init {pid}: /proc/{pid}: {exc.strerror}") from None
    try:
        try:
            stat = _read_at(dfd, "stat")
            fields = stat[stat.rindex(b")") + 2:].split()
            if int(fields[19]) != start or fields[0] in (b"Z", b"X"):
                return -1
            maps = (_read_at(dfd, "uid_map"), _read_at(dfd, "gid_map"))
            nsfd = os.open("ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                return -1
            raise PodError(f"pod sandbox init {pid}: {exc.filename or 'read /proc'}: "
                           f"{exc.strerror}") from None
        want = tuple(_map_text(m) for m in (uid_map, gid_map))
        got = tuple(m.decode().split() for m in maps)
        if got != want:
            os.close(nsfd)
            raise StateError(f"pod sandbox init {pid}: its ID maps {got} are not the "
                             f"recorded pod maps {want}")
        return nsfd
    finally:
        os.close(dfd)


def _read_at(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _map_text(m: IdMap) -> list[str]:
    return [str(x) for entry in m for x in entry]
