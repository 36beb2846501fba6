"""Parent/child sync channel: typed messages over a SOCK_SEQPACKET socketpair.

SEQPACKET keeps message boundaries and carries fds (SCM_RIGHTS). Both ends are
CLOEXEC, so the parent sees EOF exactly when the container init has execve'd
its payload: that is how a successful exec is detected without polling.

The sequence for one container start (numbers are the sync points referenced
in runtime.py and init.py):

    1. stage A -> parent  USERNS_READY    stage A is ready to be moved into its cgroups
    2. parent -> stage A  MAPPED          cgroups joined (1-2 only when clone3 could not
                                          place it, or v1 controllers are used)
    3. stage A -> parent  INIT_PID        the init exists (pid 1 inside), in its new user
                                          namespace; the parent writes its maps
    4. parent -> stage A  MOUNTS (+fds)   host-made detached mounts (rootfs, /dev, binds);
                                          A attaches them and forwards the rest to the init
                                          on a socketpair of their own, then exits
    5. init   -> parent  CONSOLE (+fd)    pty master, only with a terminal
       parent -> init    ADOPTED          stage A is reaped: the init's parent is the
                                          runtime now, so PR_SET_PDEATHSIG is safe to set
    6. init   -> parent  CREATED          everything set up; waiting to start
    7. parent -> init    START            go: drop privileges, execve
    8. EOF                                execve succeeded (or ERROR if it failed)

Any side may send ERROR {message, errno, exit_code} instead of the expected
message; the receiver raises it as ChildError. Every receive has a timeout,
so a wedged peer cannot block the host-side runtime forever.
"""

from __future__ import annotations

import _socket
import marshal
import os as _os
import struct

# _socket, not socket: `socket` imports enum (~3 ms per start). Payloads are
# marshalled: both ends are uspawn's own code (the init has not exec'd yet),
# and marshal is a builtin, where json would load `re` (~4 ms).

USERNS_READY = "userns-ready"
MAPPED = "mapped"
INIT_PID = "init-pid"
MOUNTS = "mounts"
CONSOLE = "console"
ADOPTED = "adopted"
CREATED = "created"
START = "start"
ERROR = "error"

MAX_MSG = 65536
MAX_FDS = 64
DEFAULT_TIMEOUT = 120.0


class ProtocolError(Exception):
    pass


class ChildError(Exception):
    """An error reported by the other side (already one line, with errno)."""

    def __init__(self, message: str, err: int = 0, exit_code: int = 125) -> None:
        super().__init__(message)
        self.errno = err
        self.exit_code = exit_code


class Message:
    def __init__(self, kind: str, data: dict[str, object], fds: list[int]) -> None:
        self.kind = kind
        self.data = data
        self.fds = fds


class Channel:
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def send(self, kind: str, fds: list[int] | None = None, **data: object) -> None:
        payload = marshal.dumps({"kind": kind, **data})
        try:
            if fds:
                # struct, not array: `array` imports collections (~2 ms).
                anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                        struct.pack(f"{len(fds)}i", *fds))]
                self.sock.sendmsg([payload], anc)
            else:
                # write(2), not send(2): an error after a seccomp profile that
                # refuses what it does not list still reaches the parent.
                _os.write(self.sock.fileno(), payload)
        except BrokenPipeError:
            self._raise_pending_error()
            raise

    def _raise_pending_error(self) -> None:
        """The peer failed and exited before reading what we sent: the ERROR it left
        queued is the cause to report (raised as ChildError), not our EPIPE."""
        try:
            while (msg := self.recv(timeout=0.0)) is not None:
                for fd in msg.fds:
                    _close(fd)
        except (BlockingIOError, ProtocolError):
            pass  # nothing queued: a silent death stays EPIPE

    def send_error(self, message: str, err: int = 0, exit_code: int = 125) -> None:
        self.send(ERROR, message=message, errno=err, exit_code=exit_code)

    def recv(self, timeout: float | None = DEFAULT_TIMEOUT, watch_pidfd: int = -1,
             ) -> Message | None:
        """Next message, or None on EOF (the peer closed or execve'd).

        watch_pidfd: the process that should send it. If it dies first, the
        wait ends at once (a process it forked may still hold the socket, so
        no EOF would come).
        """
        if watch_pidfd >= 0:
            import select

            ready = select.select([self.sock.fileno(), watch_pidfd], [], [], timeout)[0]
            if not ready:
                raise ProtocolError(f"no message from the other side within {timeout:.0f}s")
            if self.sock.fileno() not in ready and not select.select(
                    [self.sock.fileno()], [], [], 0)[0]:
                # (Re-checked: the peer may have sent its message and exited at once.)
                raise ProtocolError("the container's setup process died")
        self.sock.settimeout(timeout)
        try:
            raw, anc, _flags, _addr = self.sock.recvmsg(
                MAX_MSG, _socket.CMSG_SPACE(MAX_FDS * 4)
            )
        except TimeoutError:
            raise ProtocolError(f"no message from the other side within {timeout:.0f}s") from None
        finally:
            self.sock.settimeout(None)
        fds: list[int] = []
        for level, typ, cdata in anc:
            if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
                n = len(cdata) // 4
                fds.extend(struct.unpack(f"{n}i", cdata[: n * 4]))
        if not raw:
            for fd in fds:
                _close(fd)
            return None
        try:
            obj = marshal.loads(raw)
        except (ValueError, EOFError, TypeError):
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            raise ProtocolError("malformed message on the sync socket")
        kind = obj.pop("kind")
        if kind == ERROR:
            for fd in fds:
                _close(fd)
            raise ChildError(str(obj.get("message")), int(obj.get("errno") or 0),
                             int(obj.get("exit_code") or 125))
        return Message(kind, obj, fds)

    def peer_gone(self) -> bool:
        """True if the other end was closed (a peek that sees EOF, without blocking)."""
        try:
            return self.sock.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def expect(self, kind: str, timeout: float | None = DEFAULT_TIMEOUT,
               watch_pidfd: int = -1) -> Message:
        msg = self.recv(timeout, watch_pidfd)
        if msg is None:
            raise ProtocolError(f"expected {kind!r}, got end of stream (peer died)")
        if msg.kind != kind:
            for fd in msg.fds:
                _close(fd)
            raise ProtocolError(f"expected {kind!r}, got {msg.kind!r}")
        return msg

    # Named steps (youki-style): callers never send raw kinds.
    def userns_ready(self) -> None:
        self.send(USERNS_READY)

    def wait_userns_ready(self, watch_pidfd: int = -1) -> None:
        self.expect(USERNS_READY, watch_pidfd=watch_pidfd)

    def mapped(self) -> None:
        self.send(MAPPED)

    def wait_mapped(self) -> None:
        self.expect(MAPPED)

    def init_pid(self, pid: int) -> None:
        self.send(INIT_PID, pid=pid)

    def wait_init_pid(self, watch_pidfd: int = -1) -> int:
        pid = self.expect(INIT_PID, watch_pidfd=watch_pidfd).data.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            raise ProtocolError(f"bad init pid {pid!r}")
        return pid

    def wait_created(self) -> None:
        self.expect(CREATED)

    def start(self) -> None:
        self.send(START)

    def wait_start(self) -> None:
        # The parent may legitimately wait a long time between create and start.
        self.expect(START, timeout=None)


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
