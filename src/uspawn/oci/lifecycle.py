"""The OCI runtime face: create/start/state/kill/delete/run/exec/list/ps/pause/resume.

The same engine as `uspawn run`, driven by a bundle's config.json. The
lifecycle follows runtime-spec runtime.md: creating -> created -> running ->
stopped. `create` leaves the container's init (pid 1) set up and blocked on
an exec FIFO in the state directory (runc's exec.fifo) and exits; the init
is then a child of the caller's subreaper (conmon). `start` opens the FIFO;
the init execs the payload. Status is derived, never stored: init alive +
FIFO present = created; alive + FIFO gone = running (paused when the cgroup
is frozen); dead = stopped.

State: <root>/<id>/state.json (default root /run/uspawn/oci; podman never
passes --root). IDs are unique because the directory is created with mkdir.
"""

from __future__ import annotations

import errno
import os
import select
import time

from uspawn.base import timing
from uspawn.base.errors import SpecError, UspawnError
from uspawn.engine import spec as S
from uspawn.kernel import cgroups
from uspawn.state import store as statemod
from uspawn.state.store import dumps, loads, proc_running, proc_starttime, write_atomic

# podman and conmon call the runtime several times per container: only
# `create`/`run`/`exec` import the engine; `json` (and its `re`) is avoided.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from uspawn.engine import runtime

DEFAULT_ROOT = "/run/uspawn/oci"
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-+")


class OciError(UspawnError):
    exit_code = 1  # runc's exit code for every runtime error


def check_id(cid: str) -> str:
    # 255 = NAME_MAX: the id is a directory name under the state root.
    if not cid or len(cid) > 255 or not set(cid) <= _ID_CHARS or cid in (".", ".."):
        raise OciError(f"invalid container id {cid!r}",
                       "use letters, digits and _ . - + only")
    return cid


# --- loading a bundle -----------------------------------------------------------


# linux.resources sections uspawn-runc has no code for (net_cls and net_prio,
# blkio, rdma, raw cgroup2 files): a config that sets them is refused, as runc
# refuses one it cannot apply, instead of running without the limit.
_UNAPPLIED_RESOURCES = ("linux.resources.network", "linux.resources.blockIO",
                        "linux.resources.rdma", "linux.resources.unified")


def _resource_set(raw: object, field: str) -> bool:
    """Whether linux.resources.X carries a value (an empty object asks for nothing)."""
    node = raw
    for key in field.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node not in (None, {}, [])


def _check_capabilities_held(spec: S.Spec) -> None:
    """A capability the host withholds from us (not in our bounding set) cannot
    be given to the container: name it instead of starting without it (runc
    fails the same config with EPERM from capset)."""
    c = spec.process.capabilities if spec.process else None
    if c is None:
        return
    from uspawn.kernel import caps

    held = caps.bounding_set()
    for field in ("bounding", "effective", "permitted", "inheritable", "ambient"):
        for name in getattr(c, field):
            try:
                n = caps.CAP_NUMBERS[caps.normalize(name)]
            except caps.CapabilityError:
                continue  # plan.build names unknown ones
            if n <= caps.last_cap() and not held >> n & 1:
                raise SpecError(f"process.capabilities.{field}: {caps.normalize(name)} is not "
                                "in uspawn-runc's bounding set (the host withholds it)",
                                "remove it from the config")


def load_bundle(bundle: str, log: Callable[[str], None]) -> S.Spec:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = loads(f.read())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file", "pass --bundle DIR holding config.json") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
        raise SpecError(f"{path}: {exc}") from None
    unknown: list[str] = []
    spec = S.decode(S.Spec, raw, unknown=unknown)
    # Fields we do not implement: warn (none of them weakens what uspawn enforces).
    for field in unknown:
        if field in _UNAPPLIED_RESOURCES and _resource_set(raw, field):
            # A limit the config asks for and uspawn cannot apply: never dropped.
            raise SpecError(f"{path}: {field}: not supported by uspawn-runc",
                            "remove it from the config (the limit would not be applied)")
        log(f"warning: {path}: field {field} is not supported and was ignored")
    if spec.process and (spec.process.apparmor_profile or spec.process.selinux_label):
        log("warning: process.apparmorProfile/selinuxLabel ignored: no LSM support in uspawn")
    if spec.root is not None and spec.root.path and not os.path.isabs(spec.root.path):
        spec.root.path = os.path.join(os.path.abspath(bundle), spec.root.path)
    S.resolve_bind_sources(spec, bundle)
    S.validate(spec)
    _check_capabilities_held(spec)
    if spec.root is not None and not os.path.isdir(spec.root.path):
        raise SpecError(f"root.path: {spec.root.path} is not a directory")
    return spec


def cgroup_path(spec: S.Spec, cid: str) -> str:
    """linux.cgroupsPath resolved below the hierarchy roots (refused if it leaves them)."""
    path = (spec.linux or S.Linux()).cgroups_path or ""
    try:
        return cgroups.oci_cgroup_path(path, cid)
    except cgroups.CgroupPathError as exc:
        raise SpecError(f"linux.cgroupsPath: {exc}",
                        "use /a/b (below the cgroup root) or slice:prefix:name") from None


def seccomp_for(spec: S.Spec) -> bytes | None:
    """The compiled filter: the config's profile, plus the mknod device filter with a
    userns and the TIOCSTI/TIOCLINUX refusal always."""
    from uspawn.kernel import seccomp

    linux = spec.linux or S.Linux()
    userns = any(n.type == "user" for n in linux.namespaces)
    if linux.seccomp is not None:
        try:
            policy = seccomp.policy_from_oci(linux.seccomp)
        except seccomp.SeccompPolicyError as exc:
            raise SpecError(str(exc)) from None
    else:
        policy = seccomp.Policy(seccomp.ALLOW, [])
    if userns:
        policy = seccomp.with_mknod_filter(policy)
    # Terminal input injection (TIOCSTI/TIOCLINUX) into a host tty handed to the
    # payload is refused whatever the profile says, as for `uspawn run`.
    return seccomp.policy_bpf(seccomp.with_tty_ioctl_filter(policy))


def _hooks(hs: list[S.Hook]) -> list[tuple[str, list[str], list[str], int | None]]:
    return [(h.path, list(h.args), list(h.env), h.timeout) for h in hs]


# --- state ------------------------------------------------------------------------


class IdLock:
    """Serialises commands on one container id: an flock on its state directory
    (create holds it from mkdir to the end; start/delete/pause/resume take it).
    Bounded: a wedged holder gives an error, never a hang."""

    def __init__(self, cdir: str, timeout: float = 30) -> None:
        from uspawn.kernel.flock import flock_exclusive

        try:
            self.fd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise OciError(f"container {os.path.basename(cdir)!r} does not exist") from None
        except OSError as exc:
            raise OciError(f"container {os.path.basename(cdir)!r}: {exc.strerror}") from None
        if not flock_exclusive(self.fd, timeout):
            os.close(self.fd)
            raise OciError(f"container {os.path.basename(cdir)!r} is busy: another "
                           f"command held its lock for {timeout:.0f}s")

    def __enter__(self) -> IdLock:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


class Record:
    def __init__(self, root: str, cid: str) -> None:
        self.dir = os.path.join(root, cid)
        self.id = cid
        try:
            # Not open(): a FIFO there would block it forever (issue 15).
            data = loads(statemod.read_record(os.path.join(self.dir, "state.json")))
            if not isinstance(data, dict):
                raise ValueError("not an object")
            self.data: dict[str, object] = data
        except FileNotFoundError:
            raise OciError(f"container {cid!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise OciError(f"container {cid!r}: unreadable state: {exc}") from None

    @property
    def pid(self) -> int:
        pid = self.data.get("pid")
        return pid if isinstance(pid, int) else 0

    def alive(self) -> bool:
        return self.pid > 0 and proc_running(self.pid, self.data.get("pid_start"))

    def cgroup(self) -> cgroups.Cgroup | None:
        cg = self.data.get("cgroup")
        return cgroups.Cgroup.from_json(cg) if isinstance(cg, dict) else None

    def status(self) -> str:
        if not self.alive():
            return "stopped"
        if os.path.exists(os.path.join(self.dir, "exec.fifo")):
            return "created"
        cg = self.cgroup()
        if cg is not None and cg.v2_dir is not None:
            try:
                with open(os.path.join(cg.v2_dir, "cgroup.freeze")) as f:
                    if f.read().strip() == "1":
                        return "paused"
            except OSError:
                pass
        return "running"

    def oci_state(self) -> dict[str, object]:
        status = self.status()
        return {"ociVersion": S.OCI_VERSION, "id": self.id, "status": status,
                "pid": self.pid if status != "stopped" else 0,
                "bundle": self.data.get("bundle"), "rootfs": self.data.get("rootfs"),
                "created": self.data.get("created"), "owner": "",
                "annotations": self.data.get("annotations") or {}}


def _state_json(cid: str, bundle: str, spec: S.Spec, pid: int, status: str) -> str:
    return dumps({"ociVersion": S.OCI_VERSION, "id": cid, "status": status, "pid": pid,
                  "bundle": bundle, "annotations": spec.annotations})


def _iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"


def check_pid_file(path: str | None) -> None:
    """Refuse a --pid-file whose directory is missing before anything exists or runs:
    found only after the start, the process would be left behind unrecorded."""
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise OciError(f"--pid-file {path}: directory {d} does not exist",
                       "create the directory first")
    if not os.access(d, os.W_OK):
        raise OciError(f"--pid-file {path}: directory {d} is not writable")


def write_pid_file(path: str | None, pid: int) -> None:
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(str(pid))
        os.replace(tmp, path)
    except OSError as exc:
        raise OciError(f"--pid-file {path}: {exc.strerror}") from None


def send_console(socket_path: str, master: int) -> None:
    """Hand the pty master to the caller's console socket (SCM_RIGHTS), as runc does."""
    import _socket
    import struct

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.connect(socket_path)
        s.sendmsg([b"console"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                     struct.pack("i", master))])
    except OSError as exc:
        raise OciError(f"--console-socket {socket_path}: {exc.strerror}") from None
    finally:
        s.close()


# --- lifecycle ----------------------------------------------------------------------


def create(root: str, cid: str, bundle: str, pid_file: str | None, console_socket: str | None,
           log: Callable[[str], None], preserve_fds: int = 0, new_keyring: bool = True,
           foreground: bool = False, pods: bool = False) -> runtime.Container:
    """runc's create (run with foreground). pods: `uspawn-runc-pods`, every pod in a user
    namespace of its own (oci/pods.py)."""
    from uspawn.engine import runtime
    from uspawn.engine.request import START_AUTO, START_FIFO, Request

    timing.mark("imports (create: engine, kernel)")
    check_id(cid)
    check_pid_file(pid_file)
    bundle = os.path.abspath(bundle)
    spec = load_bundle(bundle, log)
    timing.mark("bundle: config.json read, decoded, checked")
    assert spec.process is not None and spec.root is not None
    if spec.process.terminal and not console_socket and not foreground:
        raise OciError("process.terminal is true but no --console-socket was given",
                       "pass --console-socket or set terminal to false")
    cgroup_rel = cgroup_path(spec, cid)
    os.makedirs(root, mode=0o700, exist_ok=True)
    cdir = os.path.join(root, cid)
    try:
        os.mkdir(cdir, 0o700)
    except FileExistsError:
        raise OciError(f"container with id {cid!r} already exists") from None
    lock = IdLock(cdir)
    lease = None
    pod = None
    try:
        if pods:
            from uspawn.oci import pods as podmod

            pod = podmod.prepare(spec, root, cid)  # gives spec the pod's user namespace
        lease = pod.lease if pod is not None else _lease_range(spec)
        hooks = spec.hooks or S.Hooks()
        fifo = None
        if not foreground:
            fifo = os.path.join(cdir, "exec.fifo")
            os.mkfifo(fifo, 0o622)
            os.chmod(fifo, 0o622)  # the container's root (an unmapped host uid) writes it
        req = Request(
            name=cid, ownership="map" if pod is not None else "off",
            seccomp_bpf=seccomp_for(spec), log=log,
            join_userns_fd=pod.join_fd if pod is not None else -1,
            start=START_AUTO if foreground else START_FIFO, detached=not foreground,
            exec_fifo=fifo, cgroup_path=cgroup_rel,
            create_hooks=tuple(_hooks(hooks.prestart + hooks.create_runtime)),
            container_hooks=tuple(_hooks(hooks.create_container)),
            start_hooks=tuple(_hooks(hooks.start_container)),
            state_json=lambda pid, status: _state_json(cid, bundle, spec, pid, status),
            preserve_fds=preserve_fds, new_keyring=new_keyring,
            close_in_child=(lock.fd,))  # else the init holds the lock until execve
        timing.mark("state dir, lock, UID lease, exec FIFO, seccomp, request")
        c = runtime.Container(spec, req)
        runtime.create_container(c)
        if c.console_master >= 0 and console_socket:
            send_console(console_socket, c.console_master)
            os.close(c.console_master)
            c.console_master = -1
        record = {
            "id": cid, "pid": c.init_pid, "pid_start": proc_starttime(c.init_pid),
            "bundle": bundle, "rootfs": spec.root.path, "created": _iso_now(),
            "annotations": spec.annotations,
            "cgroup": c.cgroup.to_json() if c.cgroup else None,
            "userns": "user" in spec.namespace_types(),
            # Kept so start/delete need not parse config.json again (podman calls
            # them for every container; the bundle may also be gone by delete).
            "poststart": [list(h) for h in _hooks(hooks.poststart)],
            "poststop": [list(h) for h in _hooks(hooks.poststop)],
        }
        if pod is not None:
            record["pod"] = pod.record  # the sandbox's is what its containers join
        if c.host_root_mnt:
            # No mount namespace of its own: delete detaches its mounts on the host.
            record["host_root_mnt"] = c.host_root_mnt
        if lease is not None:
            # Handed over to the init: held while it lives (state.owner_alive).
            lease.record(name=cid, pid=c.init_pid, starttime=record["pid_start"])
            record["range_lease"] = lease.path
            lease.release(remove=False)
        write_atomic(os.path.join(cdir, "state.json"), dumps(record))
        write_pid_file(pid_file, c.init_pid)
        if not foreground:
            c.handover()
        return c
    except BaseException:
        if lease is not None:
            lease.release()  # not handed over yet (a no-op after the hand-over)
        _remove_dir(cdir)
        raise
    finally:
        if pod is not None:
            pod.close()
        lock.__exit__()


def _lease_range(spec: S.Spec) -> statemod.Lease | None:
    """Lease the container's host-ID range in the host-wide allocator, so `uspawn run`
    does not pick it while this container lives. Best effort: OCI configs may share
    a range on purpose (runc allows it), so a range already leased is used as is."""
    linux = spec.linux or S.Linux()
    if "user" not in spec.namespace_types() or not linux.uid_mappings:
        return None
    base = min(m.host_id for m in linux.uid_mappings)
    size = max(m.host_id + m.size for m in linux.uid_mappings) - base
    try:
        return statemod.RangeAllocator().lease(base, size)
    except (UspawnError, OSError):
        return None


def _drop_range_lease(rec: Record) -> None:
    """Remove the lease file create() handed to the (now dead) init."""
    path = rec.data.get("range_lease")
    if not isinstance(path, str):
        return
    try:
        with open(path) as f:
            owner = loads(f.read() or "{}")
    except (OSError, ValueError):
        return
    # Ours (not a later container's lease of the same range); the init is stopped
    # (maybe an unreaped zombie still; owner_alive() counts a zombie as dead).
    if isinstance(owner, dict) and (owner.get("pid"), owner.get("starttime")) == (
            rec.pid, rec.data.get("pid_start")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _remove_dir(cdir: str) -> None:
    for name in ("state.json", "exec.fifo"):
        try:
            os.unlink(os.path.join(cdir, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(cdir)
    except OSError:
        pass


def start(root: str, cid: str, log: Callable[[str], None], timeout: float = 60) -> None:
    with IdLock(os.path.join(root, check_id(cid))):
        _start(root, cid, log, timeout)


def _start(root: str, cid: str, log: Callable[[str], None], timeout: float) -> None:
    rec = Record(root, cid)
    status = rec.status()
    if status != "created":
        raise OciError(f"cannot start container {cid!r} in state {status!r}",
                       "only a created container can be started")
    fifo = os.path.join(rec.dir, "exec.fifo")
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise OciError(f"start {cid}: the container's init did not answer in "
                               f"{timeout:.0f}s")
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                continue
            if not chunk:
                if data:
                    break  # the init exec'd (its FIFO end was close-on-exec) or died
                continue
            data += chunk
    finally:
        os.close(fd)
        try:
            os.unlink(fifo)
        except FileNotFoundError:
            pass
    if data[1:].startswith(b"error "):
        _, _code, msg = data[1:].decode(errors="replace").split(" ", 2)
        raise OciError(msg)
    # runtime-spec: poststart failures are only logged.
    _run_recorded_hooks(rec, "poststart", rec.pid, "running", log)


def _run_recorded_hooks(rec: Record, which: str, pid: int, status: str,
                        log: Callable[[str], None]) -> None:
    hooks = rec.data.get(which)
    if not isinstance(hooks, list) or not hooks:
        return
    from uspawn.engine.hooks import HookError, run_hook

    state = dumps({"ociVersion": S.OCI_VERSION, "id": rec.id, "status": status, "pid": pid,
                   "bundle": rec.data.get("bundle"),
                   "annotations": rec.data.get("annotations") or {}})
    for h in hooks:
        # What create() recorded: [path, args, env, timeout]; anything else is a
        # corrupted record, skipped (it raised TypeError here; issue 15 fuzz).
        if not (isinstance(h, list) and len(h) == 4 and isinstance(h[1], list)
                and isinstance(h[2], list)):
            log(f"warning: {which} hook in the state of {rec.id!r} is malformed: skipped")
            continue
        path, args, env, tmo = h
        try:
            run_hook(str(path), list(args), list(env), tmo if isinstance(tmo, int) else None,
                     state, which)
        except HookError as exc:
            log(f"warning: {exc}")


def state(root: str, cid: str) -> dict[str, object]:
    return Record(root, check_id(cid)).oci_state()


def kill(root: str, cid: str, signum: int, all_processes: bool = False) -> None:
    rec = Record(root, check_id(cid))
    if rec.status() == "stopped":
        # runc's wording: containerd treats "container not running" as already gone.
        raise OciError(f"kill {cid}: container not running")
    targets = [rec.pid]
    cg = rec.cgroup()
    if all_processes and cg is not None:
        targets = cg.processes() or targets
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_gone(pid: int, timeout: float) -> bool:
    from uspawn.kernel.pidwait import wait_gone  # ctypes: only when something must be waited for

    return wait_gone(pid, timeout)


def delete(root: str, cid: str, force: bool, log: Callable[[str], None]) -> None:
    try:
        lock = IdLock(os.path.join(root, check_id(cid)))
    except OciError:
        if force:
            return  # runc: delete --force of a missing container is not an error
        raise
    with lock:
        _delete(root, cid, force, log)


def _delete(root: str, cid: str, force: bool, log: Callable[[str], None]) -> None:
    try:
        rec = Record(root, check_id(cid))
    except OciError:
        if force:
            # runc: delete --force of a missing container is not an error; a
            # `create` killed half-way leaves a directory without state.json.
            _remove_dir(os.path.join(root, cid))
            return
        raise
    status = rec.status()
    if status != "stopped":
        if not force:
            raise OciError(f"cannot delete container {cid!r} that is not stopped: {status}",
                           "stop it first or use --force")
        cg = rec.cgroup()
        for pid in (cg.processes() if cg else []) or [rec.pid]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        if rec.alive() and not _wait_gone(rec.pid, 10):
            raise OciError(f"container {cid!r}: init {rec.pid} did not die after SIGKILL")
    cg = rec.cgroup()
    if cg is not None:
        try:
            cg.destroy()
        except cgroups.CgroupError as exc:
            raise OciError(str(exc)) from None
    _detach_host_mounts(rec)
    _drop_range_lease(rec)
    _remove_dir(rec.dir)
    _run_recorded_hooks(rec, "poststop", 0, "stopped", log)


def _detach_host_mounts(rec: Record) -> None:
    """A container created without a mount namespace of its own left its mounts
    on the host's rootfs directory (as runc's do): detach them."""
    mnt, rootfs = rec.data.get("host_root_mnt"), rec.data.get("rootfs")
    if type(mnt) is not int or mnt <= 0 or not isinstance(rootfs, str) \
            or not os.path.isabs(rootfs):
        return
    # Imported here: kernel.mounts loads ctypes (~4 ms), which start, state, kill
    # and a plain delete never need.
    from uspawn.kernel import mounts

    try:
        mounts.detach_if_covered(rootfs, mnt)
    except OSError as exc:
        raise OciError(f"detach the container's mounts on {rootfs}: {exc.strerror}") from None


def list_ids(root: str) -> list[Record]:
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            out.append(Record(root, name))
        except OciError:
            continue
    return out


def pause(root: str, cid: str, frozen: bool) -> None:
    with IdLock(os.path.join(root, check_id(cid))):
        _pause(root, cid, frozen)


def _pause(root: str, cid: str, frozen: bool) -> None:
    rec = Record(root, cid)
    status = rec.status()
    if status not in (("running",) if frozen else ("paused",)):
        raise OciError(f"container {cid!r} is {status}")
    cg = rec.cgroup()
    if cg is None or cg.v2_dir is None:
        raise OciError("pause needs a cgroup v2 hierarchy (cgroup.freeze)")
    with open(os.path.join(cg.v2_dir, "cgroup.freeze"), "w") as f:
        f.write("1" if frozen else "0")
    deadline = time.monotonic() + 5
    want = "frozen 1" if frozen else "frozen 0"
    while time.monotonic() < deadline:
        with open(os.path.join(cg.v2_dir, "cgroup.events")) as f:
            if want in f.read():
                return
        time.sleep(0.01)
    raise OciError(f"container {cid!r}: cgroup did not become {want}")


def pids(root: str, cid: str) -> list[int]:
    rec = Record(root, check_id(cid))
    cg = rec.cgroup()
    out: list[int] = []
    if cg is not None:
        for d in cg.dirs[:1]:
            for top, _dirs, files in os.walk(d):
                if "cgroup.procs" in files:
                    try:
                        with open(os.path.join(top, "cgroup.procs")) as f:
                            out += [int(x) for x in f.read().split()]
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:
                            raise
    return sorted(set(out))
