"""`uspawn exec NAME -- CMD` and `uspawn shell NAME`: a process joining a running container.

The joining process enters every namespace of the container's init, takes the
container's root identity, its capability bounding set and seccomp policy,
and execs. Before it calls setns it makes itself non-dumpable, so nothing in
the container can open /proc/<pid>/exe or /proc/<pid>/mem of a process that
still runs host code (runc CVE-2019-5736); every fd but stdio is closed at
execve (CVE-2024-21626). It joins the init's cgroup first, so it is
accounted and killed with the container.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios  # imported here: after setns the container's tree is our /

from uspawn.base.errors import ExecError, SetupError
from uspawn.engine import channel as chan
from uspawn.engine import execseq
from uspawn.engine.defaults import DEFAULT_PATH
from uspawn.engine.request import FrozenModel
from uspawn.kernel import sig
from uspawn.kernel import syscalls as sc
from uspawn.kernel.cgroups import CGROUP_ROOT, detect_layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from uspawn.engine.console import StdioRelay

# nsenter's order; the user namespace first, so the others are entered with
# the capabilities the container's root has over them.
NS_ORDER = (("user", sc.CLONE_NEWUSER), ("cgroup", sc.CLONE_NEWCGROUP),
            ("ipc", sc.CLONE_NEWIPC), ("uts", sc.CLONE_NEWUTS), ("net", sc.CLONE_NEWNET),
            ("pid", sc.CLONE_NEWPID), ("mnt", sc.CLONE_NEWNS))


def _open_namespaces(pid: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    userns: tuple[int, int] | None = None
    for name, flag in NS_ORDER:
        mine = os.stat(f"/proc/self/ns/{name}")
        theirs = os.stat(f"/proc/{pid}/ns/{name}")
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            continue  # shared with the host (e.g. --network=host): nothing to enter
        if name == "user":
            userns = (theirs.st_dev, theirs.st_ino)
        out.append((os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag))
    if userns is None:
        return out
    # A namespace the container's user namespace does not own (a CRI pod's network
    # namespace, made by containerd in the host's) can only be entered before that
    # user namespace, while we are still real root here: those go first.
    from uspawn.kernel.nsfs import owner_userns

    foreign = [(fd, flag) for fd, flag in out
               if flag != sc.CLONE_NEWUSER and owner_userns(fd) not in (userns, None)]
    return foreign + [x for x in out if x not in foreign]


def _cgroup_procs(pid: int) -> list[str]:
    """The cgroup.procs files of the init's cgroups, seen from the host: its
    cgroup2 directory and, on hybrid/v1 hosts, each v1 hierarchy it was moved
    into (memory, pids, cpu limits live there: a joiner left in the caller's
    v1 cgroups would escape them)."""
    _layout, mount = detect_layout()
    found: list[str] = []
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        _hid, ctrls, path = line.split(":", 2)
        if not ctrls and mount is not None:
            found.append(os.path.join(mount, path.strip().lstrip("/"), "cgroup.procs"))
        elif ctrls and path.strip("/") and not ctrls.startswith("name="):
            hier = os.path.join(CGROUP_ROOT, ctrls)
            if os.path.isdir(hier):
                found.append(os.path.join(hier, path.strip().lstrip("/"), "cgroup.procs"))
    return found


class Joined:
    def __init__(self, pid: int, detach: bool = False) -> None:
        self.pid = pid
        # Detached, we never wait: the caller's subreaper (a containerd shim) may
        # already have reaped a short process, and pidfd_open would fail with ESRCH.
        self.pidfd = -1 if detach else sc.pidfd_open(pid)
        self.status: int | None = None

    def wait(self) -> int:
        if self.status is None:
            _, st = os.waitpid(self.pid, 0)
            code = os.waitstatus_to_exitcode(st)
            self.status = 128 - code if code < 0 else code
            os.close(self.pidfd)
        return self.status


def _init_limits(pid: int) -> tuple[int, bool]:
    bounding, nnp = 0, False
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                bounding = int(line.split()[1], 16)
            elif line.startswith("NoNewPrivs:"):
                nnp = line.split()[1] == "1"
    return bounding, nnp


class JoinRequest(FrozenModel):
    """Everything a process joining a running container gets: one value, built in one
    function by each front (`uspawn exec`/`shell`, `uspawn-runc exec`), read-only."""

    argv: list[str] = []
    tty: bool = False
    env_extra: list[str] = []  # KEY=VALUE added to (or replacing in) the environment
    env_replace: list[str] | None = None  # the whole environment (OCI process.env)
    cwd: str = "/"
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = []
    seccomp_bpf: bytes | None = None
    # None: the init's bounding set and no_new_privs (what the container was given).
    bounding: int | None = None
    caps: tuple[int, int, int, int] | None = None  # eff, perm, inh, ambient
    no_new_privs: bool = False
    detach: bool = False
    on_started: Callable[[int, int], None] | None = None  # (pid, pty master)
    preserve_fds: int = 0  # runc's --preserve-fds N: fds 3..3+N-1 reach the process
    console_size: tuple[int, int] | None = None  # rows, cols (process.consoleSize)


def enter(st: dict[str, object], req: JoinRequest) -> int:
    """Run req.argv inside the container described by the state record st; return its
    status."""
    pid = st.get("pid")
    assert isinstance(pid, int)
    nsfds = _open_namespaces(pid)
    procs = _cgroup_procs(pid)
    bounding, no_new_privs = req.bounding, req.no_new_privs
    if bounding is None:
        # What the container was given (--drop-capability, --no-new-privileges): the
        # init's bounding set and no_new_privs, which its payload can only have
        # lowered since. Never the defaults: they may hold more.
        bounding, nnp = _init_limits(pid)
        no_new_privs = no_new_privs or nnp
    tty = req.tty
    env = {"PATH": DEFAULT_PATH, "container": "uspawn",
           "HOME": "/root" if req.uid == 0 else "/",
           "TERM": os.environ.get("TERM", "xterm") if tty else "dumb"}
    if req.env_replace is not None:
        env = dict(e.split("=", 1) for e in req.env_replace if "=" in e)
    for kv in req.env_extra:
        k, _, v = kv.partition("=")
        env[k] = v
    # Without a terminal, host files on our stdio reach the process as pipes we
    # relay while it runs (console.StdioRelay): nothing it leaves behind keeps them.
    relay = None
    if not tty and not req.detach:
        from uspawn.engine.console import StdioRelay

        relay = StdioRelay.setup()
    parent_ch, child_ch = chan.Channel.pair()
    if not req.detach:
        sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
    mid = os.fork()
    if mid == 0:
        try:
            parent_ch.close()
            if relay is not None:
                relay.in_child()
            _child(nsfds, procs, child_ch, req, env, bounding, no_new_privs)
        except BaseException as exc:
            try:
                child_ch.send_error(str(exc), getattr(exc, "errno", 0) or 0,
                                    getattr(exc, "exit_code", 125))
            except BaseException:
                pass
        finally:
            os._exit(125)
    child_ch.close()
    if relay is not None:
        relay.after_fork()
    for fd, _ in nsfds:
        os.close(fd)
    started = False
    try:
        try:
            msg = parent_ch.expect(chan.INIT_PID)
            target = msg.data.get("pid")
            assert isinstance(target, int)
        finally:
            os.waitpid(mid, 0)
        joined = Joined(target, req.detach)
        master = -1
        if tty:
            m = parent_ch.expect(chan.CONSOLE)
            master = m.fds[0]
        end = parent_ch.recv()
        if end is not None:
            raise SetupError(f"exec: unexpected message {end.kind!r}")
        started = True
    except chan.ChildError as exc:
        raise ExecError(str(exc), not_found=exc.exit_code == 127) from None
    except chan.ProtocolError as exc:
        raise SetupError(f"exec: {exc}") from None
    finally:
        parent_ch.close()
        if relay is not None and not started:
            relay.close()
    if req.on_started is not None:
        req.on_started(joined.pid, master)
    if req.detach:
        return 0
    return _wait(joined, master, relay)


def _wait(joined: Joined, master: int, relay: StdioRelay | None = None) -> int:
    from uspawn.engine.console import ConsoleIO, pump

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(joined.pid, signum)
        except ProcessLookupError:
            pass

    saved: dict[int, Callable[[int, object], None] | int | None] = {}
    for s in (sig.SIGINT, sig.SIGTERM, sig.SIGHUP, sig.SIGQUIT, sig.SIGUSR1, sig.SIGUSR2):
        saved[s] = sig.set_handler(s, forward)
    try:
        if master < 0 and relay is None:
            return joined.wait()
        try:
            return pump(joined.pidfd, master, ConsoleIO(interactive=True, relay=relay),
                        joined.wait)
        finally:
            if master >= 0:
                os.close(master)
    finally:
        for s, h in saved.items():
            sig.set_handler(s, h)


def _child(nsfds: list[tuple[int, int]], procs: list[str], ch: chan.Channel,
           req: JoinRequest, env: dict[str, str], bounding: int, no_new_privs: bool) -> None:
    # Before anything of the container can see us (CVE-2019-5736).
    sc.prctl(sc.PR_SET_DUMPABLE, 0)
    sc.prctl(sc.PR_SET_PDEATHSIG, sig.SIGKILL)
    for path in procs:
        try:
            with open(path, "w") as f:
                f.write("0")
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.EOPNOTSUPP):
                raise SetupError(f"exec: join cgroup {os.path.dirname(path)}: "
                                 f"{exc.strerror}") from None
    for fd, flag in nsfds:
        try:
            sc.setns(fd, flag)
        except OSError as exc:
            raise SetupError(f"exec: setns: {exc}") from None
        os.close(fd)
    os.chdir("/")
    try:
        pid = os.fork()  # the pid namespace applies to children only
    except BlockingIOError:  # EAGAIN: the container's pids.max (TasksMax) is reached
        raise SetupError("exec: fork in the container: EAGAIN (its task limit, TasksMax or "
                         "--pids, is reached; see `uspawn status`)") from None
    if pid:
        ch.init_pid(pid)
        os._exit(0)

    os.setsid()
    if req.tty:
        _setup_pty(ch, req.uid, req.console_size)
    # The same sequence as the container init's payload (engine/execseq.py).
    have = sc.capget()[1] & bounding
    if req.caps is not None:
        eff, perm, inh, amb = (m & have for m in req.caps)
        capsets = (eff, perm, inh, amb)
    else:  # container root gets what the init's bounding set allows, others nothing
        capsets = (have, have, 0, 0) if req.uid == 0 else (0, 0, 0, 0)
    execseq.exec_process(execseq.Process(
        list(req.argv), [f"{k}={v}" for k, v in env.items()], req.cwd, req.uid, req.gid,
        list(req.additional_gids), None, bounding, capsets, no_new_privs, req.seccomp_bpf,
        req.preserve_fds), ch.fileno())


def _setup_pty(ch: chan.Channel, uid: int, size: tuple[int, int] | None) -> None:
    """The process's terminal, from the container's devpts; the master goes to the parent.

    devpts gives the slave the opener's fsuid: we are still host root, which the
    container cannot see (it shows as nobody) and may not chown. So we first
    become the container's root (setns gave us its capabilities), then hand the
    slave to the process user as runc does (its gid stays devpts' tty group).
    """
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError:
        pass  # no container root in the mapping: the pty stays host root's
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, sc.TIOCSPTLCK, b"\0\0\0\0")
    slave = fcntl.ioctl(master, sc.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    try:
        os.fchown(slave, uid, -1)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):  # runc ignores these too
            raise SetupError(f"exec: chown the pty to uid {uid}: {exc.strerror}") from None
    if size is not None:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    fcntl.ioctl(slave, sc.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(slave)
    ch.send(chan.CONSOLE, fds=[master])
    os.close(master)
