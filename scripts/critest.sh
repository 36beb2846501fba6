#!/usr/bin/env bash
# critest, the CRI validation suite, against a private containerd with the runtime
# handlers uspawn (.venv/bin/uspawn-runc), runc and uspawn-pods (.venv/bin/uspawn-runc-pods),
# images from a local registry (docker-registry on 127.0.0.1); compared with
# tests/cri/critest-expected.json. Root; ~8 min on 2 cores. Arguments go to tests/cri/critest_run.py (--out DIR keeps
# the reports, --handlers uspawn, --focus REGEXP). See docs/KUBERNETES.md.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v docker-registry >/dev/null || {
    echo "critest: docker-registry missing (apt-get install docker-registry)" >&2
    exit 2
}
exec .venv/bin/python tests/cri/critest_run.py "$@"
