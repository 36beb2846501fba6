"""Waiting for a process that is not our child: poll its pidfd (Linux 5.3)."""

from __future__ import annotations

import os
import select

from uspawn.kernel import syscalls as sc


def wait_gone(pid: int, timeout: float | None) -> bool:
    """True once pid has exited (or never existed), False on timeout."""
    try:
        pidfd = sc.pidfd_open(pid)
    except OSError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
