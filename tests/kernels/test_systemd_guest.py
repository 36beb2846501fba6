"""uspawn@.service under a real systemd, in a qemu guest (tests/kernels/systemd_guest.py).

Opt-in: a cold run (debootstrap of the guest, image, two systemd boots and five
machine boots under TCG) takes far longer than CI may, so this test is skipped
unless USPAWN_SYSTEMD_VM=1. `bash scripts/systemd-vm.sh` runs the same and
prints the table that docs/SYSTEMD.md records.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


def test_systemd_guest(need_root: None) -> None:
    if os.environ.get("USPAWN_SYSTEMD_VM") != "1":
        pytest.skip("opt-in: set USPAWN_SYSTEMD_VM=1 (or run scripts/systemd-vm.sh)")
    from kernels import matrix, systemd_guest

    try:
        res = systemd_guest.run()
    except matrix.Skip as exc:
        pytest.skip(f"systemd guest: {exc}")
    print(systemd_guest.report(res))
    assert not res.failures(), "; ".join(res.failures()) + f" (console: {res.console})"
