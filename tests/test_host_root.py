"""The suite runs where users run: scripts/run-tests puts it in a mount namespace
whose / is rshared (as on every systemd host), then runs the attack suite again
on this machine's / as it is. This checks that the setting it asked for took."""

from __future__ import annotations

import os

import pytest


def root_propagation() -> str:
    """'shared' or 'private'/'slave' for / in our mount namespace (mountinfo tags)."""
    with open("/proc/self/mountinfo") as f:
        tops = [line.split() for line in f if line.split()[4] == "/"]
    assert tops, "no / in /proc/self/mountinfo"
    fields = tops[-1]  # the topmost mount on /
    tags = fields[6:fields.index("-")]
    if any(t.startswith("shared:") for t in tags):
        return "shared"
    return "slave" if any(t.startswith("master:") for t in tags) else "private"


def test_root_propagation_is_what_the_runner_asked_for() -> None:
    expected = os.environ.get("USPAWN_EXPECT_ROOT_PROPAGATION")
    if expected is None:
        pytest.skip("not started by scripts/run-tests")
    actual = root_propagation()
    if expected == "shared":
        assert actual == "shared", f"/ is {actual}, the suite must run with / rshared"
    else:
        assert expected == "host"
