"""An exclusive flock with a deadline: host-side waits are always bounded."""

from __future__ import annotations

import fcntl
import time


def flock_exclusive(fd: int, timeout: float) -> bool:
    """Take LOCK_EX on fd; False if another holder keeps it past timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
