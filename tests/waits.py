"""Deterministic waits for the tests (issue 15): never a sleep, never a polling loop.

Each wait blocks on a kernel event: a pipe or pty line, a pidfd (readable once a
process exited), inotify (a file written or renamed into a directory). The
timeout only bounds a failure (an assertion naming what never happened); it never
decides a pass. Facts that no event announces are read where the kernel keeps them
(/proc/PID/status signal masks, /proc/PID/stat state and flags).
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol, TypeVar

T = TypeVar("T")

IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x04, 0x08, 0x80, 0x100, 0x200
IN_MODIFY = 0x02
_IN_NONBLOCK = 0o4000
_PF_EXITING = 0x4  # task flag (/proc/PID/stat field 9): do_exit has begun


class Inotify:
    """One inotify instance watching paths (directories: events for their entries)."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]],
                 mask: int = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd: int = self._libc.inotify_init1(_IN_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        for p in paths:
            if self._libc.inotify_add_watch(self.fd, os.fsencode(p), mask) < 0:
                err = ctypes.get_errno()
                os.close(self.fd)
                raise OSError(err, os.strerror(err), str(p))

    def fileno(self) -> int:
        return int(self.fd)

    def drain(self) -> list[str]:
        """Names in the queued events (empty for events on a watched path itself)."""
        names = []
        while select.select([self.fd], [], [], 0)[0]:
            buf = os.read(self.fd, 65536)
            off = 0
            while off < len(buf):
                n = struct.unpack_from("iIII", buf, off)[3]
                names.append(buf[off + 16:off + 16 + n].rstrip(b"\0").decode(errors="replace"))
                off += 16 + n
        return names

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HasPid(Protocol):
    pid: int


def wait_until(cond: Callable[[], T], watch: Iterable[str | os.PathLike[str]],
               what: str, timeout: float = 30, proc: _HasPid | None = None,
               mask: int = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) -> T:
    """cond() once it is truthy, re-checked at every inotify event on watch.

    The watch is set up before the first check, so a change between the check
    and the wait is never missed. proc: a process whose exit fails the wait at
    once (e.g. the uspawn that should produce the change)."""
    with Inotify(watch, mask) as ino:
        pid = proc.pid if proc is not None else 0
        pidfd = os.pidfd_open(pid) if pid else -1
        try:
            deadline = time.monotonic() + timeout
            while not (value := cond()):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                ready = select.select([ino.fd] + ([pidfd] if pidfd >= 0 else []), [], [],
                                      left)[0]
                if pidfd in ready:
                    value = cond()  # the change may have come just before the exit
                    assert value, f"{what}: the process {pid} exited first"
                    return value
                ino.drain()
            return value
        finally:
            if pidfd >= 0:
                os.close(pidfd)


def wait_file(path: Path, timeout: float = 30, proc: _HasPid | None = None) -> None:
    """path exists (created, written or renamed into its directory)."""
    wait_until(path.exists, [path.parent], f"{path} to appear", timeout, proc)


def wait_state(state_dir: Path, name: str, proc: _HasPid, timeout: float = 30,
               ) -> dict[str, object]:
    """A `uspawn run`/`boot` container's state.json, once written (after the
    payload's execve): inotify on its directory, made here first (claim_name
    accepts an existing one), plus proc's pidfd so that an early exit fails at once."""
    cdir = state_dir / "containers" / name
    cdir.mkdir(parents=True, exist_ok=True)
    wait_file(cdir / "state.json", timeout, proc)
    record = json.loads((cdir / "state.json").read_text())
    assert isinstance(record, dict)
    return record


# --- processes -----------------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the comm field (state first), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def running(pid: int) -> bool:
    """pid exists and is neither a zombie nor exiting."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X") and \
        not int(fields[6]) & _PF_EXITING


def _pidfds(pids: Iterable[int]) -> list[int]:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass  # reaped already
    return fds


def children(pid: int) -> list[int]:
    """pid's children (every thread's), e.g. a runtime's guardian and stage processes."""
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def open_pidfds(pids: Iterable[int]) -> list[int]:
    """pidfds for pids (the ones still there), to wait on later: opened while the
    pids are known to be right, they stay right even if a pid is reused."""
    return _pidfds(pids)


def wait_pidfds(fds: list[int], timeout: float = 30, what: str = "processes") -> None:
    """Every process behind fds has exited; the fds are closed."""
    try:
        deadline = time.monotonic() + timeout
        for fd in fds:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], \
                f"{what} still running after {timeout}s"
    finally:
        for fd in fds:
            os.close(fd)


def wait_exit(pids: Iterable[int], timeout: float = 30, what: str = "") -> None:
    """Every pid has exited (its pidfd polls readable: zombie or reaped)."""
    fds = _pidfds(pids)
    try:
        deadline = time.monotonic() + timeout
        for fd in fds:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([fd], [], [], left)[0], \
                f"still running after {timeout}s: {what or list(pids)}"
    finally:
        for fd in fds:
            os.close(fd)


def wait_all_gone(find: Callable[[], Iterable[int]], timeout: float = 30,
                  what: str = "processes") -> None:
    """No process that find() reports is still running.

    find() is asked again after the ones it named have exited, since a process
    may fork before it exits: once a snapshot holds no running process, nothing
    that find() can see is left to start another."""
    deadline = time.monotonic() + timeout
    while True:
        fds = _pidfds(find())
        try:
            live = [fd for fd in fds if not select.select([fd], [], [], 0)[0]]
            if not live:
                return
            for fd in live:
                left = deadline - time.monotonic()
                assert left > 0 and select.select([fd], [], [], left)[0], \
                    f"{what} still running after {timeout}s: {list(find())}"
        finally:
            for fd in fds:
                os.close(fd)


def signal_masks(pid: int) -> dict[str, int]:
    """SigPnd/ShdPnd/SigBlk/SigIgn/SigCgt of pid: which signals it ignores, catches,
    blocks. Bit n-1 stands for signal n."""
    masks = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"):
                masks[key] = int(value, 16)
    return masks


def has_signal(mask: int, signum: int) -> bool:
    return bool(mask >> (signum - 1) & 1)


# --- pipes and ttys ------------------------------------------------------------------


def read_until(fd: int, needle: bytes, timeout: float = 30) -> bytes:
    """Read fd (a pipe or a pty master) until needle arrived; what was read.

    Fails on EOF (or EIO: the pty slave closed) and on the timeout bound."""
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], \
            f"no {needle!r} within {timeout}s: {out!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        assert chunk, f"EOF before {needle!r}: {out!r}"
        out += chunk
    return out


def tty_pending(fd: int) -> bytes:
    """All a tty side has for a reader right now, without waiting for anything.

    A non-blocking read of a tty first flushes the pty's buffer work (n_tty_read:
    tty_buffer_flush_work when no input is available), so bytes written to the
    other side before this call are returned: no time window decides."""
    blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                break
            except OSError:  # EIO: the other side is closed and everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.set_blocking(fd, blocking)
    return out


def read_to_eof(fd: int, timeout: float = 30) -> bytes:
    """Everything fd (a pipe or a pty master) yields until EOF (or EIO: the pty's last
    slave fd closed). Fails on the timeout bound, with what was read."""
    out = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], \
            f"no EOF within {timeout}s: {out!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            chunk = b""
        if not chunk:
            return out
        out += chunk
