#!/usr/bin/env bash
# uspawn@.service under a real systemd (issue 17): a Debian bookworm guest under
# qemu (TCG) whose init is systemd, running the Debian fixture machine as
# uspawn@debian.service: start/ready, reboot inside, restart, kill, stop with
# nothing left, console in the journal, enable + a reboot of the VM, disable.
#
#   bash scripts/systemd-vm.sh [--timeout S] [--json FILE]
#
# Run as root. Caches in /var/cache/uspawn-kernels (USPAWN_KERNEL_CACHE): the
# harness is tests/kernels/systemd_guest.py (see its docstring), the checks run
# in the guest are tests/kernels/systemd_guest_checks.py; docs/SYSTEMD.md has
# the results. Exit 1 if a check failed, 77 if it cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
else
    py=python3
fi
exec "$py" tests/kernels/systemd_guest.py "$@"
