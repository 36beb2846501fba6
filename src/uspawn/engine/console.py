"""Foreground containers: forward signals, pump the pty, wait for the exit.

Without a terminal the payload gets our pipes, sockets and /dev/null as they
are; a stdio fd that is a host file (regular file, tty, directory, device) is
replaced by a pipe we relay (StdioRelay), as runc does. With a terminal, the
pty master came from the container (its own devpts instance); we put our
terminal in raw mode so job control keys reach the container's line
discipline, copy bytes both ways, and mirror window-size changes.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import select
import stat
import termios
import time

from uspawn.kernel import sig as signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from uspawn.engine import spec as S
    from uspawn.engine.request import Request
    from uspawn.engine.runtime import Container

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)


def copy_winsize(src: int, dst: int) -> None:
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass


# Signals that ask a foreground container to stop: forwarded (or --kill-signal
# instead), then SIGKILL after the grace period. SIGINT only without a terminal:
# with one, Ctrl-C is a byte for the pty's foreground job (the line discipline).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class forward_signals:
    """Forward FORWARDED signals to the container's init while active, and stop it.

    A pid-namespace init only gets the signals it has a handler for: a payload
    without a SIGTERM handler (busybox httpd, most single binaries) ignores the
    forwarded signal. So with req.stop_timeout >= 0, the first stop signal arms a
    deadline (docker stop's grace period) at which the foreground loop (pump, woken
    through a self-pipe) SIGKILLs the init, and its pid namespace with it; a second
    stop signal kills at once.
    """

    def __init__(self, c: Container) -> None:
        self.c = c
        self.saved: dict[int, object] = {}
        self.deadline: float | None = None  # time.monotonic() of the SIGKILL
        self.undelivered = 0  # a stop signal that came before the init existed
        self.killed = False
        self.wake_r = -1  # readable once a stop signal came: the loop recomputes its timeout
        self.wake_w = -1
        self.saved_wakeup = -1

    def _forward(self, sig: int, _frame: object) -> None:
        if sig == signal.SIGWINCH and self.c.console_master >= 0:
            # The kernel signals the pty's foreground group itself on resize.
            copy_winsize(0, self.c.console_master)
        elif self._is_stop(sig):
            self._stop(sig)
        else:
            self.c.signal(self.c.req.signal_map.get(sig, sig))

    def _is_stop(self, sig: int) -> bool:
        if self.c.req.stop_timeout < 0 or sig not in STOP_SIGNALS:
            return False
        process = self.c.spec.process
        return sig == signal.SIGTERM or process is None or not process.terminal

    def _stop(self, sig: int) -> None:
        req = self.c.req
        if self.killed:
            return
        if self.deadline is None:
            self.deadline = time.monotonic() + req.stop_timeout
            first = req.kill_signal or req.signal_map.get(sig, sig)
            if self.c.pidfd >= 0:
                self.c.signal(first)
            else:
                self.undelivered = first  # sent once the loop starts (tick)
        else:
            self.deadline = time.monotonic()  # a second stop signal: no more grace
        if self.wake_w >= 0:
            try:
                os.write(self.wake_w, b"s")
            except BlockingIOError:
                pass  # already pending

    def timeout(self) -> float | None:
        """Seconds until the SIGKILL is due (None: not armed)."""
        if self.deadline is None or self.killed:
            return None
        return max(self.deadline - time.monotonic(), 0.0)

    def tick(self, ready: list[int]) -> None:
        """After each wake-up of the loop: drain the self-pipe, SIGKILL when due."""
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 64)
            except BlockingIOError:
                pass
        if self.undelivered and self.c.pidfd >= 0:
            self.c.signal(self.undelivered)
            self.undelivered = 0
        if not self.killed and self.deadline is not None and time.monotonic() >= self.deadline:
            self.killed = True  # once: the loop then waits for the pidfd, no busy timeout
            self.c.signal(signal.SIGKILL)

    def __enter__(self) -> forward_signals:
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for sig in FORWARDED:
            self.saved[sig] = signal.set_handler(sig, self._forward)
        # Python runs a handler only between bytecodes. A signal that lands after
        # the loop computed its select() timeout but before select() blocks would
        # run _forward only when select returns: with a stop armed, up to the whole
        # grace period later (a second SIGTERM that should kill at once waited the
        # 60 s of --stop-timeout in a CI run). The C-level handler writes to the
        # wakeup fd at once, so select() sees wake_r readable, returns, and the
        # Python handler runs before the loop's next step.
        self.saved_wakeup = signal.set_wakeup_fd(self.wake_w)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self.saved_wakeup)
        for sig, handler in self.saved.items():
            signal.set_handler(sig, handler)  # type: ignore[arg-type]
        for fd in (self.wake_r, self.wake_w):
            os.close(fd)
        self.wake_r = self.wake_w = -1


class ConsoleIO:
    """Where a foreground container's console goes.

    interactive: our stdin is copied to the pty (raw mode when it is a tty);
    passive (a booted machine without a terminal, or detached): output only.
    out_fd receives the console output (stdout, or a log file when detached).
    extra maps further fds to callbacks run when they are readable (the
    notify socket of a booted machine). sink, if given, takes the console
    output instead of out_fd (boot's size-capped, rotating console log).
    relay: the pipes a payload without a terminal got instead of our stdio.
    handover, if given, is offered the running container before the loop starts:
    a detached machine's supervisor execs its C monitor there (never returns).
    hold_console: keep the pty's other end open while pumping (a booted machine,
    whose init may hold no console fd for a while).
    """

    def __init__(self, interactive: bool = True, out_fd: int = 1,
                 extra: dict[int, Callable[[], None]] | None = None,
                 sink: Callable[[bytes], None] | None = None,
                 relay: StdioRelay | None = None,
                 handover: Callable[[Container], None] | None = None,
                 hold_console: bool = False) -> None:
        self.interactive = interactive
        self.handover = handover
        self.hold_console = hold_console
        self.out_fd = out_fd
        self.extra = extra or {}
        self.sink = sink
        self.relay = relay

    def write(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            _write_all(self.out_fd, data)


def forward_and_wait(c: Container, io: ConsoleIO | None = None,
                     stop: forward_signals | None = None) -> int:
    """Wait for the container (pumping its console); with `stop`, enforce its deadline."""
    io = io or ConsoleIO()
    if c.console_master < 0 and not io.extra and io.relay is None and (
            stop is None or c.req.stop_timeout < 0):
        return c.wait()
    if stop is not None:
        stop.tick([])  # a stop that came during create: deliver it, or kill if already due
    if io.handover is not None:
        io.handover(c)
    return pump(c.pidfd, c.console_master, io, c.wait, stop)


def pump(pidfd: int, master: int, io: ConsoleIO, wait: Callable[[], int],
         stop: forward_signals | None = None) -> int:
    """Copy console bytes (and serve io.extra) until the process behind pidfd exits.

    With `stop`, also wake up on its self-pipe and at its deadline (stop.tick kills).
    """
    stdin_tty = io.interactive and master >= 0 and os.isatty(0)
    saved = None
    if stdin_tty:
        copy_winsize(0, master)
        saved = termios.tcgetattr(0)
        import tty

        tty.setraw(0, termios.TCSANOW)
    inputs = [pidfd, *io.extra, *([stop.wake_r] if stop is not None else [])]
    peer = -1
    if master >= 0:
        inputs.append(master)
        if io.hold_console:
            peer = _hold_peer(master)
        if io.interactive and _readable_stdin():
            inputs.append(0)
    relay = io.relay
    if relay is not None:
        relay.after_fork()
    try:
        while True:
            try:
                extra_r, extra_w = (relay.readers(), relay.writers()) if relay else ([], [])
                ready, writable, _ = select.select(inputs + extra_r, extra_w, [],
                                                   stop.timeout() if stop else None)
            except InterruptedError:
                continue
            if stop is not None:
                stop.tick(ready)
            if relay is not None:
                relay.step(ready, writable)
            if master in ready and not _copy(master, io):
                inputs.remove(master)
            if master >= 0 and 0 in ready:
                data = _read(0)
                if data:
                    _write_all(master, data)
                else:
                    inputs.remove(0)
                    if not stdin_tty:
                        _write_all(master, b"\x04")  # EOF for the pty's reader
            for fd, callback in io.extra.items():
                if fd in ready:
                    callback()
            if pidfd in ready:
                break
        # Drain what the payload wrote before it exited (readable first: with the
        # console's other end held, a read with nothing left would block).
        while master >= 0 and select.select([master], [], [], 0.05)[0] and _copy(master, io):
            pass
        if relay is not None:
            relay.finish()
        return wait()
    finally:
        if peer >= 0:
            os.close(peer)
        if relay is not None:
            relay.close()
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


TIOCGPTPEER = 0x5441  # _IO('T', 0x41), Linux 4.13


def _hold_peer(master: int) -> int:
    """An fd of the pty's other end, held while we pump (-1 if the kernel has none).

    A booted init (systemd) closes its stdio at start and opens /dev/console again
    later; while no process holds the console, the master reads EIO and the pump
    would stop reading it for good. uspawn-monitor does the same (native/monitor.c)."""
    try:
        return int(fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
    except OSError:
        return -1


def _readable_stdin() -> bool:
    try:
        os.fstat(0)
        return True
    except OSError:
        return False


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError as exc:
        if exc.errno in (errno.EIO, errno.EBADF):
            return b""
        raise


def _copy(src: int, io: ConsoleIO) -> bool:
    data = _read(src)
    if not data:
        return False
    io.write(data)
    return True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EPIPE):
                return
            raise
        data = data[n:]


# --- stdio of a payload without a terminal ------------------------------------------

_DEV_NULL = os.makedev(1, 3)
_DRAIN_QUIET = 0.05  # s: no output this long after the exit, whoever holds the pipe idles
_DRAIN_MAX = 1.0  # s: a daemon that keeps writing does not hold us longer


def _host_file(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a stdio fd the payload must not hold; None to pass it on.

    Pipes, sockets and /dev/null have no host file behind them. Anything else does:
    a regular file reopened through /proc/self/fd is read back or truncated, a
    directory is a cwd outside the root (fchdir), a tty is read after we return and
    takes TIOCSCTTY, a device is the device itself.
    """
    try:
        st = os.fstat(fd)
    except OSError:
        return None  # closed
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return None
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL:
        return None
    return (st.st_dev, st.st_ino)


class StdioRelay:
    """Pipes in place of our stdio where it is a host file, and the copying.

    `child` is what the payload gets as 0, 1, 2: a pipe end, or our own fd passed
    through. We read our stdin only while the payload runs and close its pipe when
    it exits (or at EOF), so a daemon it left behind reads EOF, never what the admin
    types next; output pipes are drained (bounded) and closed. runc does the same
    for a foreground process without a terminal (utils_linux.go setupProcessPipes).
    """

    def __init__(self) -> None:
        self.child = [0, 1, 2]
        self.feed = -1  # our end of the stdin pipe (non-blocking)
        self.pending = b""  # read from stdin, not yet taken by the pipe
        self.outputs: dict[int, int] = {}  # our end of an output pipe -> fd 1 or 2
        self.theirs: set[int] = set()  # the payload's ends, closed here once it has them

    @classmethod
    def setup(cls) -> StdioRelay | None:
        """Pipes for the stdio fds that are host files; None when all pass through."""
        ids = [_host_file(fd) for fd in (0, 1, 2)]
        if not any(ids):
            return None
        _fill_closed_stdio()  # else a pipe could land on fd 0-2
        r = cls()
        try:
            if ids[0] is not None:
                rd, wr = os.pipe2(os.O_CLOEXEC)
                os.set_blocking(wr, False)
                r.child[0], r.feed = rd, wr
                r.theirs.add(rd)
            for fd in (1, 2):
                if ids[fd] is None:
                    continue
                if fd == 2 and ids[2] == ids[1]:
                    r.child[2] = r.child[1]  # one file: one pipe keeps the order of lines
                    continue
                rd, wr = os.pipe2(os.O_CLOEXEC)
                r.child[fd] = wr
                r.theirs.add(wr)
                r.outputs[rd] = fd
        except BaseException:
            r.close()
            raise
        return r

    def fds(self) -> list[int]:
        """Every pipe end of the relay (for the child to close once it has dup2'd)."""
        return [*self.theirs, *self.outputs, *([self.feed] if self.feed >= 0 else [])]

    def in_child(self) -> None:
        """In a forked child: the pipe ends become 0, 1, 2; the rest is closed."""
        for target, fd in enumerate(self.child):
            if fd != target:
                os.dup2(fd, target)
        for fd in self.fds():
            os.close(fd)

    def after_fork(self) -> None:
        """In the parent: drop our copies of the payload's ends (else no EOF ever)."""
        for fd in self.theirs:
            os.close(fd)
        self.theirs.clear()

    def readers(self) -> list[int]:
        fds = list(self.outputs)
        if self.feed >= 0 and not self.pending:
            fds.append(0)
        return fds

    def writers(self) -> list[int]:
        return [self.feed] if self.pending else []

    def step(self, readable: list[int], writable: list[int]) -> None:
        for rd in [fd for fd in self.outputs if fd in readable]:
            self._copy_out(rd)
        if self.feed >= 0 and (0 in readable or self.feed in writable):
            self._feed()

    def _copy_out(self, rd: int) -> None:
        try:
            data = os.read(rd, 65536)
        except BlockingIOError:
            return
        if not data or not _write_host(self.outputs[rd], data):
            # EOF, or our side cannot take it (closed terminal, full disk): the
            # payload's next write gets EPIPE, as it would have got an error.
            os.close(rd)
            del self.outputs[rd]

    def _feed(self) -> None:
        if not self.pending:
            try:
                self.pending = os.read(0, 65536)
            except BlockingIOError:
                return  # someone else on a shared, non-blocking stdin was faster
            except OSError:
                self.pending = b""  # EIO (hung-up tty), EISDIR (a directory): EOF
            if not self.pending:
                self._end_feed()
                return
        try:
            n = os.write(self.feed, self.pending)
        except BlockingIOError:
            return  # the pipe is full: wait until the payload reads
        except OSError:  # EPIPE: nobody reads any more; leave our stdin alone
            self._end_feed()
            return
        self.pending = self.pending[n:]

    def _end_feed(self) -> None:
        if self.feed >= 0:
            os.close(self.feed)
            self.feed = -1
        self.pending = b""

    def finish(self) -> None:
        """The payload exited: EOF on its stdin, copy what it wrote (bounded), close."""
        self._end_feed()
        self.after_fork()
        deadline = time.monotonic() + _DRAIN_MAX
        while self.outputs:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ready = select.select(list(self.outputs), [], [], min(_DRAIN_QUIET, left))[0]
            except InterruptedError:
                continue
            if not ready:
                break
            for rd in ready:
                self._copy_out(rd)
        self.close()

    def close(self) -> None:
        self._end_feed()
        self.after_fork()
        for rd in self.outputs:
            os.close(rd)
        self.outputs.clear()


def _fill_closed_stdio() -> None:
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open("/dev/null", os.O_RDWR)  # the lowest free fd: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _write_host(fd: int, data: bytes) -> bool:
    """Write all of data to our stdout/stderr; False if it cannot take it."""
    while data:
        try:
            n = os.write(fd, data)
        except BlockingIOError:  # a non-blocking terminal shared with the shell
            select.select([], [fd], [])
            continue
        except OSError:
            return False
        data = data[n:]
    return True


def run(spec: S.Spec, req: Request, on_start: Callable[[Container], None] | None = None,
        io: ConsoleIO | None = None) -> int:
    """A foreground container: create + start + forward signals + wait (+ pump the
    pty or the stdio relay) + destroy -> exit code."""
    from uspawn.engine.request import START_AUTO
    from uspawn.engine.runtime import Container, create_container

    if req.start != START_AUTO:
        raise ValueError("console.run needs a request with start=auto")
    c = Container(spec, req)
    try:
        # Forward from before the init exists: until execve a signal is
        # ignored by the kernel (a pid-namespace init only gets signals it
        # handles), after execve the payload gets it.
        with forward_signals(c) as stop:
            create_container(c)
            c.start()
            if not gc.isenabled():
                # `uspawn run` sets up with the cyclic GC off (cli.entry); a long
                # foreground container must not accumulate cycles. Frozen first: a
                # collection over everything set-up allocated would cost ~2 ms now.
                gc.freeze()
                gc.enable()
            if on_start is not None:
                on_start(c)
            return forward_and_wait(c, io, stop)
    finally:
        c.destroy()
