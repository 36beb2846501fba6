"""Test-only fault switches, read from the environment (never set in production).

USPAWN_TEST_KILL_AT=NAME makes the process that reaches sync point NAME SIGKILL
itself there (tests/test_faults.py). USPAWN_TEST_FAULT=a,b turns on named
faults: `dev-nodev` builds /dev the way the 4.18-era breakage looked (nodes
present, unopenable) and skips the start-time verification, so that selftest
and the tests prove the in-container canaries catch it; `slow-release` pauses a
runtime for 1 s between dropping a container's lock and removing its directory.
"""

from __future__ import annotations

import os


def active(name: str) -> bool:
    return name in os.environ.get("USPAWN_TEST_FAULT", "").split(",")


def kill_point(name: str) -> None:
    if os.environ.get("USPAWN_TEST_KILL_AT") == name:
        if os.getpid() == 1:
            os._exit(137)  # a pid-namespace init ignores its own SIGKILL: die as if killed
        os.kill(os.getpid(), 9)
