"""`uspawn boot`: a system container whose pid 1 is the tree's init (systemd).

systemd's container interface (systemd.io/CONTAINER_INTERFACE): `container=`
and `container_uuid=` in pid 1's environment, /run/host/container-manager,
NOTIFY_SOCKET for READY=1 / STATUS= / STOPPING=1, SIGRTMIN+3 for a clean
poweroff. pid 1 ends a poweroff or a reboot with reboot(2), which in a pid
namespace makes the kernel kill it with SIGINT (power-off, halt) or SIGHUP
(restart): pid_namespaces(7), kernel/pid_namespace.c reboot_pid_ns.

A reboot request makes the foreground `uspawn boot` exit EXIT_REBOOT (133, as
systemd-nspawn), which uspawn@.service turns into a restart
(RestartForceExitStatus=133). A detached machine keeps one supervisor process
(a fork of this one): it pumps the console pty into the log, reads the notify
socket, boots the machine again on a reboot request (same name, UID range,
subnet, limits, UUID) and cleans up when the machine stops. While the machine
runs, that process is the small C monitor (machine/monitor.py), not Python.
"""

from __future__ import annotations

import _socket
import os
import time

from uspawn.base.errors import UspawnError
from uspawn.base.textsafe import STATUS_LIMIT, printable
from uspawn.engine import console, runtime
from uspawn.engine.console import ConsoleIO
from uspawn.kernel import sig

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable

    from uspawn.engine import spec as S
    from uspawn.engine.request import Request
    from uspawn.machine.claims import Launch

LOG_DIR = "/var/log/uspawn"
SIGRTMIN_3 = sig.SIGRTMIN + 3  # systemd: clean poweroff
# `uspawn boot` exits with this when the machine asked for a reboot, as
# systemd-nspawn does (its unit restarts it: RestartForceExitStatus=133).
EXIT_REBOOT = 133
# A detached machine's console log: at most this many bytes in NAME.console.log,
# plus the previous NAME.console.log.1 (--console-log-size).
DEFAULT_CONSOLE_LOG_SIZE = 8 << 20
MIN_CONSOLE_LOG_SIZE = 4096
# A machine that reboots more often than this is not booted again (systemd's
# default start limit: StartLimitBurst=5 in StartLimitIntervalSec=10s).
REBOOT_BURST, REBOOT_INTERVAL = 5, 10.0


def console_log_path(name: str) -> str:
    return os.path.join(LOG_DIR, f"{name}.console.log")


def parse_size(value: str, field: str) -> int:
    """BYTES or N[K|M|G|T][iB|B] (powers of 1024), as for --console-log-size."""
    from uspawn.base.cmdline import size

    return size(value.strip(), field, MIN_CONSOLE_LOG_SIZE, 1 << 40)


class ConsoleLog:
    """NAME.console.log capped at `cap` bytes, with one rotated file (.1).

    The console of a detached machine is payload output: without a cap a
    chatty or hostile machine fills /var/log. When the next chunk would pass
    the cap the file becomes NAME.console.log.1 (replacing the older one) and a
    new file starts. A failed write (disk full, quota, I/O error) drops the
    chunk and counts it: the machine's console is never held up by the log;
    the count is noted in the log once writing works again.
    """

    def __init__(self, path: str, cap: int, stdio: bool = False) -> None:
        self.path = path
        self.cap = cap
        self.stdio = stdio  # keep fds 1 and 2 on the current file (uspawn's own lines)
        self.dropped = 0
        self.rotations = 0
        self.fd = self._open()
        self.size = os.fstat(self.fd).st_size

    def _open(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o640)
        if self.stdio:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        return fd

    def _rotate(self) -> None:
        try:
            os.rename(self.path, self.path + ".1")
            new = self._open()
        except OSError:
            # Cannot rotate: start the file over rather than pass the cap.
            os.ftruncate(self.fd, 0)
            self.size = 0
            return
        os.close(self.fd)
        self.fd, self.size = new, 0
        self.rotations += 1

    def write(self, data: bytes) -> None:
        if self.dropped:
            note = f"\n-- uspawn: {self.dropped} bytes of console output dropped\n".encode()
            if self._write(note):
                self.dropped += len(data)
                return
            self.dropped = 0
        self.dropped += self._write(data)

    def _write(self, data: bytes) -> int:
        """Write data; return how many bytes of it were dropped."""
        try:
            if self.size + len(data) > self.cap:
                # uspawn's own lines reach the file through fds 1 and 2 too.
                self.size = os.fstat(self.fd).st_size
            while data:
                if self.size >= self.cap:
                    self._rotate()
                room = self.cap - self.size
                n = os.write(self.fd, data[:room])
                self.size += n
                data = data[n:]
        except OSError:  # ENOSPC, EDQUOT, EFBIG, EIO: drop, never block the console
            return len(data)
        return 0

    def close(self) -> None:
        os.close(self.fd)


def new_uuid() -> str:
    """A random (version 4) UUID without importing `uuid` (it loads ctypes helpers)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class NotifyListener:
    """The sd_notify datagram socket the machine's systemd reports to."""

    def __init__(self, state_dir: str, root_uid: int) -> None:
        self.dir = os.path.join(state_dir, "host")
        os.makedirs(self.dir, mode=0o755, exist_ok=True)
        os.chmod(self.dir, 0o755)
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
        # Bind through the directory fd: state paths can exceed sun_path's 108 bytes.
        dfd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                os.unlink("notify", dir_fd=dfd)
            except FileNotFoundError:
                pass
            self.sock.bind(f"/proc/self/fd/{dfd}/notify")
            # connect() needs write permission on the socket inode: the container's root.
            os.chown("notify", root_uid, root_uid, dir_fd=dfd, follow_symlinks=False)
        finally:
            os.close(dfd)
        self.ready = False
        self.stopping = False
        self.status = ""

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> list[str]:
        """Read one datagram; return the keys it changed (READY, STATUS, STOPPING)."""
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return []
        changed = []
        # sd_notify separates assignments by "\n" only (splitlines would also
        # split on CR, VT, FF, U+2028 ... and hide part of a hostile STATUS=).
        for line in data.decode(errors="replace").split("\n"):
            key, _, value = line.partition("=")
            if key == "READY" and value == "1" and not self.ready:
                self.ready = True
                changed.append("READY")
            elif key == "STATUS":
                # Stored escaped and capped: every reader of the state file
                # (status, list --json) gets text that is safe to show.
                self.status = printable(value, STATUS_LIMIT)
                changed.append("STATUS")
            elif key == "STOPPING" and value == "1":
                self.stopping = True
                changed.append("STOPPING")
        return changed

    def close(self) -> None:
        self.sock.close()


def sd_notify(message: str) -> None:
    """Tell our own service manager (uspawn@.service is Type=notify), if any."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
    try:
        s.sendto(message.encode(), path)
    except OSError:
        pass
    finally:
        s.close()


def make_host_dir(state_dir: str, root_uid: int, notify: NotifyListener) -> str:
    """/run/host of the machine: container-manager, container-uuid (written later), notify."""
    d = notify.dir
    for name, text in (("container-manager", "uspawn\n"),):
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
    return d


class Machine:
    """A booted system container, driven in the foreground (or by a supervisor)."""

    def __init__(self, spec: S.Spec, req: Request, la: Launch,
                 notify: NotifyListener, machine_uuid: str, ns: types.SimpleNamespace) -> None:
        self.spec = spec
        self.req = req
        self.la = la
        self.notify = notify
        self.uuid = machine_uuid
        self.ns = ns
        self.container: runtime.Container | None = None
        self.on_ready: Callable[[], None] | None = None
        self.console_log: str | None = None
        self.console_sink: Callable[[bytes], None] | None = None
        self.restarts = 0  # reboots of this machine under the same supervisor
        # Set by a detached supervisor or a boot without a terminal: takes the
        # running machine over (the C monitor, by exec: never returns then);
        # returns if it could not.
        self.handover: Callable[[runtime.Container], None] | None = None
        self.registered = False  # with systemd-machined (--keep-unit)
        with open(os.path.join(notify.dir, "container-uuid"), "w") as f:
            f.write(machine_uuid + "\n")

    @property
    def name(self) -> str:
        return self.req.name

    def record_fields(self) -> dict[str, object]:
        """The machine's record (state.json) as it is now."""
        assert self.container is not None
        return self.la.record_fields(
            self.container, machine=True, uuid=self.uuid, ready=self.notify.ready,
            stopping=self.notify.stopping, status_text=self.notify.status,
            console_log=self.console_log, restarts=self.restarts)

    def _state(self) -> None:
        if self.container is not None and self.container.claim is not None:
            self.container.claim.write_state(self.record_fields())

    def _started(self, c: runtime.Container) -> None:
        self.container = c
        self._state()
        if getattr(self.ns, "cgroup_rel", None):  # in a unit's cgroup (machine/machined.py)
            self._register(c.init_pid)

    def _register(self, leader: int) -> None:
        """With systemd-machined, as nspawn: `machinectl list/status/shell NAME` and
        `journalctl -M NAME`. A failure is a warning: the machine runs on."""
        from uspawn.machine import machined

        if not machined.machined_present():
            return
        why = machined.register(self.name, self.uuid, leader, self.la.rootfs)
        if why is None:
            self.registered = True
            if self.req.verbose:
                self.req.say(f"machine {self.name} registered with systemd-machined")
        else:
            self.req.say(f"warning: machine {self.name} not registered with "
                         f"systemd-machined: {why}")

    def unregister(self) -> None:
        if self.registered:
            from uspawn.machine import machined

            self.registered = False
            machined.unregister(self.name)  # best effort: machined also drops it with the unit

    def _on_notify(self) -> None:
        changed = self.notify.receive()
        if not changed:
            return
        self._state()
        if "READY" in changed:
            if self.req.verbose:
                self.req.say(f"machine {self.name} is ready")
            sd_notify(f"READY=1\nSTATUS=machine {self.name} is ready")
            if self.on_ready is not None:
                self.on_ready()
        if "STOPPING" in changed:
            sd_notify("STOPPING=1")

    def run_foreground(self, out_fd: int = 1, interactive: bool | None = None) -> int:
        if interactive is None:
            interactive = os.isatty(0)
        io = ConsoleIO(interactive=interactive, out_fd=out_fd,
                       extra={self.notify.fileno(): self._on_notify},
                       sink=self.console_sink, handover=self.handover, hold_console=True)
        try:
            code = console.run(self.spec, self.req, on_start=self._started, io=io)
        finally:
            self.notify.close()
            self.unregister()
        return reboot_code(code, self.name, self.req.say)


def reboot_code(code: int, name: str, say: Callable[[str], None]) -> int:
    """`uspawn boot`'s exit code for the init's wait status `code` (128+N: killed by N).

    reboot(2) in a pid namespace kills its init: SIGINT for power-off and halt
    (a clean stop: 0), SIGHUP for restart (EXIT_REBOOT). No other process can
    kill an init with these: the kernel drops signals an init does not handle.
    """
    if code == 128 + sig.SIGINT:
        return 0
    if code == 128 + sig.SIGHUP:
        say(f"machine {name} asked for a reboot: exit {EXIT_REBOOT} (uspawn@.service and "
            "--detach boot it again)")
        return EXIT_REBOOT
    return code


def detach(ns: types.SimpleNamespace, log: Callable[[str], None],
           make_machine: Callable[[], Machine]) -> int:
    """Boot in a supervisor process; return once the machine is ready (or failed)."""
    cap = parse_size(ns.console_log_size, "--console-log-size") if getattr(
        ns, "console_log_size", None) else DEFAULT_CONSOLE_LOG_SIZE
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            os.setsid()
            _supervise(wfd, log, make_machine, cap, ns)
        finally:
            os._exit(0)
    os.close(wfd)
    timeout = float(ns.ready_timeout)
    deadline = time.monotonic() + timeout
    buf = b""
    import select

    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([rfd], [], [], left)[0]:
            os.close(rfd)
            raise UspawnError(f"boot: machine not ready within {timeout:.0f}s; it keeps "
                              "booting in the background",
                              "see `uspawn logs NAME` and `uspawn status NAME`")
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        buf += chunk
    os.close(rfd)
    line = buf.decode(errors="replace").split("\n", 1)[0]
    kind, _, rest = line.partition(" ")
    if kind == "ready":
        print(printable(rest))
        return 0
    if kind == "error":
        code, _, msg = rest.partition(" ")
        log(msg)
        return int(code) if code.isdigit() else 125
    log("boot: the machine's supervisor exited before the machine was ready "
        "(hint: see `uspawn logs NAME`)")
    return 125


def _supervise(wfd: int, log: Callable[[str], None],
               make_machine: Callable[[], Machine], cap: int = DEFAULT_CONSOLE_LOG_SIZE,
               ns: types.SimpleNamespace | None = None) -> None:
    """The detached machine's life: boot it, and boot it again after each reboot."""
    Supervisor(wfd, make_machine, cap, ns).loop()


class Supervisor:
    """A detached machine's supervisor loop, resumable after an exec.

    Where the small C monitor exists (machine/monitor.py), each boot's steady state
    runs in it: this process execs it once the init runs, and it execs Python again
    (resume.resume_main) when the init exits, which rebuilds this object from the
    hand-over file and goes on with after().
    """

    def __init__(self, tell_fd: int, make_machine: Callable[[], Machine],
                 cap: int = DEFAULT_CONSOLE_LOG_SIZE,
                 ns: types.SimpleNamespace | None = None) -> None:
        self.tell_fd = tell_fd  # -1 once `uspawn boot --detach` was told
        self.make_machine = make_machine
        self.cap = cap
        self.ns = ns
        self.clog: ConsoleLog | None = None
        self.restarts = 0
        self.recent: list[float] = []  # monotonic times of the last reboots

    def tell(self, line: str) -> None:
        if self.tell_fd < 0:
            return  # `uspawn boot --detach` has returned: only the first boot reports
        try:
            os.write(self.tell_fd, (line + "\n").encode())
        except OSError:
            pass
        os.close(self.tell_fd)
        self.tell_fd = -1

    def open_log(self, name: str) -> ConsoleLog:
        if self.clog is None:
            os.makedirs(LOG_DIR, mode=0o750, exist_ok=True)
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.close(null)
            self.clog = ConsoleLog(console_log_path(name), self.cap, stdio=True)
        return self.clog

    def loop(self) -> None:
        while self.boot_once():
            pass

    def boot_once(self) -> bool:
        """Boot the machine and wait for it; True to boot it again."""
        try:
            machine = self.make_machine()
        except UspawnError as exc:
            self.tell(f"error {exc.exit_code} {exc.one_line()}")
            if self.clog is not None:  # a reboot that could not boot again
                self.clog.write(f"-- uspawn: reboot failed: {exc.one_line()}\n".encode())
            return False
        keep_identity(self.ns, machine)  # leased now; released when this boot ends
        clog = self.open_log(machine.name)
        machine.console_log = clog.path
        machine.console_sink = clog.write
        machine.restarts = self.restarts
        clog.write(f"-- uspawn: booting {machine.name} ({machine.uuid})\n".encode())
        machine.on_ready = _teller(self.tell, f"ready {machine.name}")
        if self.ns is not None:
            from uspawn.machine import monitor

            machine.handover = lambda c: monitor.hand_over(self, machine, c)
        try:
            code = machine.run_foreground(out_fd=clog.fd, interactive=False)
        except UspawnError as exc:
            self.tell(f"error {exc.exit_code} {exc.one_line()}")
            clog.write(f"-- uspawn: {exc.one_line()}\n".encode())
            return False
        again = self.after(machine.name, code)
        if again:
            _reap_guardian(machine)
        return again

    def after(self, name: str, code: int) -> bool:
        """The boot ended with `code` (boot's exit code); True to boot it again."""
        clog = self.open_log(name)
        if code != EXIT_REBOOT or self.ns is None:
            clog.write(f"-- uspawn: {name} stopped (exit {code})\n".encode())
            self.tell(f"error {code or 125} machine {name} stopped before it was ready")
            return False
        now = time.monotonic()
        self.recent = [t for t in self.recent if now - t < REBOOT_INTERVAL] + [now]
        if len(self.recent) > REBOOT_BURST:
            msg = (f"machine {name} rebooted {len(self.recent)} times in "
                   f"{REBOOT_INTERVAL:g}s: not booting it again")
            clog.write(f"-- uspawn: {msg}\n".encode())
            self.tell(f"error 125 {msg} (hint: see `uspawn logs {name}`)")
            return False
        self.restarts += 1
        clog.write(f"-- uspawn: {name} rebooting (restart {self.restarts})\n".encode())
        return True


def _reap_guardian(machine: Machine) -> None:
    """Wait for the old boot's guardian: it holds copies of the name claim and the
    UID-range lease (flocks) until it exits, just after the engine's `done`, and
    the next boot asks for exactly those again."""
    c = machine.container
    if c is not None and c.guardian.pid > 0:
        try:
            os.waitpid(c.guardian.pid, 0)
        except ChildProcessError:
            pass  # already reaped by the engine


def _teller(tell: Callable[[str], None], line: str) -> Callable[[], None]:
    return lambda: tell(line)


def keep_identity(ns: types.SimpleNamespace | None, machine: Machine) -> None:
    """Make the next boot from ns the same machine: its UID range, veth subnet and UUID.

    The engine releases every lease when the old init is gone; the next boot
    asks for exactly these again (a range or subnet taken meanwhile by another
    machine fails that boot with one line in the console log, never a
    different identity). Name, tree, limits and options are ns itself.
    """
    if ns is None:
        return
    la = machine.la
    if la.userns:
        ns.private_users = f"{la.base}:{la.size}"
    ns.machine_uuid = machine.uuid
    # veth only: on a bridge the old address is still in the host's neighbour
    # table, which the pool counts as taken (net/pool.py allocate_on_bridge), so
    # a bridged machine gets the first free address again, often another one.
    if getattr(ns, "network", None) == "veth":
        import ipaddress

        from uspawn.net import pool as netpool

        if os.path.isdir(netpool.NET_DIR):
            for cidr in netpool.addresses().get(machine.name, []):
                ns.keep_network = str(ipaddress.IPv4Interface(cidr).network)
