#!/usr/bin/env bash
# Kernel matrix (issue 8): uspawn selftest/doctor/run on Debian's 5.10, 6.1 and 6.12
# kernels under qemu (TCG) and on the host kernel, results to docs/KERNELS.md.
#
#   bash scripts/kernel-matrix.sh                 # everything, writes docs/KERNELS.md
#   bash scripts/kernel-matrix.sh --only 5.10     # one kernel (host, 5.10, 6.1, 6.12)
#   bash scripts/kernel-matrix.sh --jobs 2 --no-doc
#
# Run as root. Caches in /var/cache/uspawn-kernels (USPAWN_KERNEL_CACHE); the
# harness is tests/kernels/matrix.py, see its docstring. Exit 1 if a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    py=$PYTHON
elif [[ -x .venv/bin/python ]]; then
    py=.venv/bin/python
elif [[ -x /opt/uspawn-venv/bin/python ]]; then
    py=/opt/uspawn-venv/bin/python
else
    py=python3
fi
exec "$py" tests/kernels/matrix.py "$@"
