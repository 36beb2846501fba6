"""Foreground containers: forward signals, pump the pty, wait for the exit.

Without a terminal the payload shares our stdio (nothing to copy). With one,
the pty master came from the container (its own devpts instance); we put our
terminal in raw mode so job control keys reach the container's line
discipline, copy bytes both ways, and mirror window-size changes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import termios

from .linux import sig as signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from .runtime import Container

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)


def copy_winsize(src: int, dst: int) -> None:
    try:
        size = fcntl.ioctl(src, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(dst, termios.TIOCSWINSZ, size)
    except OSError:
        pass


class forward_signals:
    """Forward FORWARDED signals to the container's init while active."""

    def __init__(self, c: Container) -> None:
        self.c = c
        self.saved: dict[int, object] = {}

    def _forward(self, sig: int, _frame: object) -> None:
        if sig == signal.SIGWINCH and self.c.console_master >= 0:
            # The kernel signals the pty's foreground group itself on resize.
            copy_winsize(0, self.c.console_master)
        else:
            self.c.signal(self.c.opts.signal_map.get(sig, sig))

    def __enter__(self) -> forward_signals:
        for sig in FORWARDED:
            self.saved[sig] = signal.set_handler(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.set_handler(sig, handler)  # type: ignore[arg-type]


class ConsoleIO:
    """Where a foreground container's console goes.

    interactive: our stdin is copied to the pty (raw mode when it is a tty);
    passive (a booted machine without a terminal, or detached): output only.
    out_fd receives the console output (stdout, or a log file when detached).
    extra maps further fds to callbacks run when they are readable (the
    notify socket of a booted machine). sink, if given, takes the console
    output instead of out_fd (boot's size-capped, rotating console log).
    """

    def __init__(self, interactive: bool = True, out_fd: int = 1,
                 extra: dict[int, Callable[[], None]] | None = None,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.interactive = interactive
        self.out_fd = out_fd
        self.extra = extra or {}
        self.sink = sink

    def write(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            _write_all(self.out_fd, data)


def forward_and_wait(c: Container, io: ConsoleIO | None = None) -> int:
    io = io or ConsoleIO()
    if c.console_master < 0 and not io.extra:
        return c.wait()
    return pump(c.pidfd, c.console_master, io, c.wait)


def pump(pidfd: int, master: int, io: ConsoleIO, wait: Callable[[], int]) -> int:
    """Copy console bytes (and serve io.extra) until the process behind pidfd exits."""
    stdin_tty = io.interactive and master >= 0 and os.isatty(0)
    saved = None
    if stdin_tty:
        copy_winsize(0, master)
        saved = termios.tcgetattr(0)
        import tty

        tty.setraw(0, termios.TCSANOW)
    inputs = [pidfd, *io.extra]
    if master >= 0:
        inputs.append(master)
        if io.interactive and _readable_stdin():
            inputs.append(0)
    try:
        while True:
            try:
                ready = select.select(inputs, [], [])[0]
            except InterruptedError:
                continue
            if master in ready and not _copy(master, io):
                inputs.remove(master)
            if 0 in ready:
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
        # Drain what the payload wrote before it exited.
        while master >= 0 and _copy(master, io):
            if not select.select([master], [], [], 0.05)[0]:
                break
        return wait()
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)


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
