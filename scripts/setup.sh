#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for uspawn: system packages, a virtualenv
# in .venv with uspawn (editable) and its test tools, byte-compiled.
# Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
pkgs=(busybox-static libseccomp2 gcc libc6-dev acl libcap2-bin iproute2 python3-venv debootstrap systemd procps nftables iptables qemu-system-x86 e2fsprogs golang-go lxcfs containerd containernetworking-plugins)
# Comparison runtimes for bench/ (optional for the tests, so failures are not fatal).
bench_pkgs=(runc crun bubblewrap systemd-container)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# podman, conmon and runc for the OCI integration tests (tests/oci).
bash scripts/install-podman.sh
if [[ "${USPAWN_BENCH_DEPS:-0}" == 1 ]]; then
    apt-get install -y -qq "${bench_pkgs[@]}" >/dev/null || echo "setup: bench runtimes not installed" >&2
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q -e '.[test]'
# The detached machines' monitor (src/uspawn/native/monitor.c, machine/monitor.py):
# next to the interpreter, where uspawn looks for it; without it uspawn falls back
# to a Python supervisor per machine (about 9 MB more per machine).
gcc -O2 -Wall -Wextra -Werror -o .venv/bin/uspawn-monitor.new src/uspawn/native/monitor.c
mv -f .venv/bin/uspawn-monitor.new .venv/bin/uspawn-monitor
# The environment may set PYTHONDONTWRITEBYTECODE; without .pyc files every
# start recompiles uspawn (~20 ms), so compile once here.
.venv/bin/python -m compileall -q src/uspawn
# The systemd unit (dist/systemd/uspawn@.service) runs /usr/local/bin/uspawn.
ln -sfn "$PWD/.venv/bin/uspawn" /usr/local/bin/uspawn
ln -sfn "$PWD/.venv/bin/uspawn-runc" /usr/local/bin/uspawn-runc
# uspawn-runc with every CRI pod in a user namespace of its own (docs/KUBERNETES.md).
ln -sfn "$PWD/.venv/bin/uspawn-runc-pods" /usr/local/bin/uspawn-runc-pods
