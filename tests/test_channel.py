"""The setup channel between uspawn and the container's processes (engine/channel.py)."""

from __future__ import annotations

import pytest

from uspawn.engine import channel as chan


def test_send_to_a_peer_that_failed_raises_its_error() -> None:
    """The init may fail (and exit) while the parent is still sending it a step: the
    parent must report the init's error, not its own EPIPE ('create container: [Errno
    32] Broken pipe' is all containerd showed for a privileged pod, issue 14)."""
    parent, child = chan.Channel.pair()
    child.send(chan.CREATED)  # a step it got through first: dropped, not the cause
    child.send_error("device node /dev/hwrng cannot be opened: EINVAL", 22)
    child.close()
    with pytest.raises(chan.ChildError) as info:
        parent.send(chan.ADOPTED)
    assert "hwrng" in str(info.value) and info.value.errno == 22
    parent.close()


def test_send_to_a_peer_that_died_silently_is_broken_pipe() -> None:
    parent, child = chan.Channel.pair()
    child.close()
    with pytest.raises(BrokenPipeError):
        parent.send(chan.ADOPTED)
    parent.close()
