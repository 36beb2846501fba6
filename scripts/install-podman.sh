#!/usr/bin/env bash
# Install podman (Debian 12's 4.3) and what tests/oci needs to drive it as root:
# conmon, runc and crun (reference runtimes), netavark (podman's network stack
# dependency; the tests themselves use --network=none), uidmap.
# Idempotent and quiet; run as root. Exits non-zero with a message on failure.
set -euo pipefail

pkgs=(podman conmon runc crun golang-github-containers-common netavark uidmap)

if [[ $(id -u) -ne 0 ]]; then
    echo "install-podman: must run as root (apt-get install ${pkgs[*]})" >&2
    exit 1
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)) && command -v podman >/dev/null; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/install-podman.XXXXXX.log)
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
        >"$log" 2>&1; then
    echo "install-podman: apt-get install ${missing[*]} failed; last lines of $log:" >&2
    tail -n 20 "$log" >&2
    exit 1
fi
rm -f "$log"

if ! podman --version >/dev/null 2>&1; then
    echo "install-podman: podman installed but 'podman --version' fails" >&2
    exit 1
fi
