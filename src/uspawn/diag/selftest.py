"""`uspawn selftest`: the kernel-upgrade canary.

Runs throwaway containers from the built-in busybox rootfs through the real CLI
(`python -m uspawn --root <private state dir> run ...`) and checks, inside them,
what a 2018-style kernel change breaks first: device nodes usable by a non-root
UID, device mknod refused with EPERM, a PrivateDevices=-style fallback that gives
a working /dev/null, writes in /var by a non-root UID, and ownership that matches
the ID map. Run it after installing a new kernel, before rolling it out.

The rootfs is built once at SELFTEST_ROOTFS (directories made for it are 0700)
and reused.
Each canary is its own container, so one failure never hides another; every line
is `PASS name` or `FAIL name: reason`, the last one `N passed, M failed`. The
environment passes through, so USPAWN_TEST_FAULT=dev-nodev (a /dev whose nodes
exist but cannot be opened, uspawn's own verification skipped) makes the /dev
canaries fail as they would on a broken kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TextIO

SELFTEST_ROOTFS = "/var/lib/uspawn/selftest/busybox"
USER = "1000"  # `user` in the busybox rootfs's /etc/passwd
EPERM_TEXT = "Operation not permitted"

# A PrivateDevices=-style fallback, as systemd does it: try mknod for a private
# /dev; on EPERM, bind-mount the container's node onto an empty file in a new
# tmpfs (mode 0755 like systemd's: in a sticky world-writable directory O_CREAT on
# another user's node is refused), in a new mount namespace when busybox has
# unshare, else in the container's own.
_FALLBACK = """
export d=/tmp/selftest-pd; rm -rf $d; mkdir -p $d
if mknod $d/null c 1 3 2>$d.err; then echo MKNOD-SUCCEEDED; exit 0; fi
grep -q "Operation not permitted" $d.err || { echo "MKNOD-ERROR $(cat $d.err)"; exit 0; }
steps='mount -t tmpfs -o mode=755 tmpfs "$d" && touch "$d/null" &&
       mount --bind /dev/null "$d/null" && echo x > "$d/null" && echo bound-null-works'
if command -v unshare >$d.which; then unshare -m sh -c "$steps"; else sh -c "$steps"; fi
"""
_VAR = """
d=/var/uspawn-selftest; rm -rf $d; mkdir $d && chown 1000:1000 $d &&
su -s /bin/sh user -c "id -u; echo data > $d/f && cat $d/f && stat -c %u $d/f && rm $d/f &&
                       test ! -e $d/f && echo deleted"
rc=$?; rm -rf $d; exit $rc
"""


def _last_error(out: str, err: str) -> str:
    """The most telling line of a failed canary's output."""
    lines = [ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
    return lines[0] if lines else "no output"


def _expect(want: list[str]) -> Callable[[int, str, str], str | None]:
    """A judge: stdout must be exactly these lines (else the first error line)."""
    def judge(rc: int, out: str, err: str) -> str | None:
        got = out.split()
        if got == want:
            return None
        return _last_error("", err) if err.strip() else f"output {got}, expected {want}"
    return judge


def _mknod_judge(rc: int, out: str, err: str) -> str | None:
    text = out + err
    if EPERM_TEXT in text and "EXISTS" not in out:
        return None
    if "EXISTS" in out:
        return "mknod of a character device SUCCEEDED inside the container (seccomp not applied)"
    return f"mknod was not refused with EPERM: {_last_error(out, err)}"


def _fallback_judge(rc: int, out: str, err: str) -> str | None:
    if out.split() == ["bound-null-works"]:
        return None
    if "MKNOD-SUCCEEDED" in out:
        return "mknod succeeded, so the EPERM fallback never runs (unopenable nodes on 4.18?)"
    if "MKNOD-ERROR" in out:
        return f"mknod failed, but not with EPERM: {out.strip()}"
    return f"the bind-mounted /dev/null does not work: {_last_error(out, err)}"


# (name, user or None for root, script, judge)
CANARIES: list[tuple[str, str | None, str, Callable[[int, str, str], str | None]]] = [
    ("dev-null", USER, "echo selftest > /dev/null && cat /dev/null && echo ok", _expect(["ok"])),
    ("dev-zero", USER, "head -c 4096 /dev/zero | tr -d '\\000' | wc -c; "
     "head -c 4096 /dev/zero | wc -c", _expect(["0", "4096"])),
    ("dev-urandom", USER, "head -c 64 /dev/urandom | wc -c; echo seed > /dev/urandom && "
     "echo written", _expect(["64", "written"])),
    ("mknod-refused", None, "mknod /tmp/selftest-chr c 1 3; test -e /tmp/selftest-chr && "
     "echo EXISTS; true", _mknod_judge),
    ("private-devices-fallback", None, _FALLBACK, _fallback_judge),
    ("var-write-nonroot", None, _VAR, _expect(["1000", "data", "1000", "deleted"])),
    ("ownership-map", USER, "id -u; stat -c %u /bin/busybox /home/user",
     _expect(["1000", "0", "1000"])),
]


def ensure_rootfs(path: str) -> None:
    """Build the busybox rootfs once; later runs reuse it (rebuilding would put
    fresh host-root-owned files into a tree an earlier chown shifted)."""
    if os.path.isfile(os.path.join(path, "bin/busybox")) and \
            os.path.isfile(os.path.join(path, "etc/passwd")):
        return
    from uspawn.tree.busybox import build_busybox_rootfs

    # Directories made here are 0700: no host user may reach into trees (issue 6).
    parent = os.path.dirname(path)
    missing = []
    d = parent
    while not os.path.isdir(d):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        os.mkdir(d, 0o700)
    os.chmod(parent, 0o700)
    build_busybox_rootfs(path)


def _state_dir() -> str:
    import tempfile

    base = "/run" if os.access("/run", os.W_OK) else None  # root's tmpfs; else $TMPDIR
    return tempfile.mkdtemp(prefix="uspawn-selftest.", dir=base)


def run_canary(state: str, rootfs: str, user: str | None, script: str,
               judge: Callable[[int, str, str], str | None], timeout: float) -> str | None:
    """One throwaway container; None when it passed, else the reason."""
    # A name of its own: cgroups are host-wide, so a container named after the
    # directory ("busybox") could collide with one in another state directory.
    name = f"selftest-{os.getpid()}-{len(os.listdir(state))}-{os.urandom(3).hex()}"
    argv = [sys.executable, "-m", "uspawn", "--root", state, "run", "-D", rootfs, "-M", name,
            *(["--user", user] if user else []), "--", "sh", "-c", script]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g} s"
    if res.returncode >= 125:  # uspawn itself failed (setup, exec, signal)
        return f"uspawn exit {res.returncode}: {_last_error(res.stdout, res.stderr)}"
    return judge(res.returncode, res.stdout, res.stderr)


def run_selftest(as_json: bool, out: TextIO, rootfs: str = SELFTEST_ROOTFS,
                 timeout: float = 60.0) -> int:
    """Run every canary; 0 when all pass, else 1."""
    results: list[tuple[str, str | None]] = []
    if os.geteuid() != 0:
        results.append(("root", "selftest starts containers and must run as root (sudo)"))
    else:
        try:
            ensure_rootfs(rootfs)
        except Exception as exc:
            results.append(("rootfs", f"cannot build {rootfs}: {exc}"))
    if not results:
        import shutil

        state = _state_dir()
        try:
            for name, user, script, judge in CANARIES:
                results.append((name, run_canary(state, rootfs, user, script, judge, timeout)))
        finally:
            shutil.rmtree(state, ignore_errors=True)
    passed = sum(1 for _, reason in results if reason is None)
    failed = len(results) - passed
    if as_json:
        import json

        out.write(json.dumps({"rootfs": rootfs, "kernel": os.uname().release,
                              "canaries": [{"name": n, "passed": r is None, "reason": r or ""}
                                           for n, r in results],
                              "passed": passed, "failed": failed}, indent=2) + "\n")
    else:
        for name, reason in results:
            out.write(f"PASS {name}\n" if reason is None else f"FAIL {name}: {reason}\n")
        out.write(f"{passed} passed, {failed} failed\n")
    return 0 if failed == 0 else 1
