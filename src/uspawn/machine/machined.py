"""A machine inside its systemd unit: the unit's own cgroup, and systemd-machined.

`uspawn boot --keep-unit` (what uspawn@.service runs, with Delegate=yes) keeps the
machine in the cgroup of the unit that started it, as `systemd-nspawn --keep-unit`
does, instead of uspawn's own `uspawn/NAME`:

    <unit>.service/             the unit's cgroup, delegated to us
    <unit>.service/supervisor   uspawn (then its C monitor and guard)
    <unit>.service/payload      the machine; its systemd makes init.scope etc. below

Why: systemd-machined registers a machine only for the unit its leader's cgroup
belongs to (RegisterMachine: "Failed to determine unit of process" for a leader in
uspawn/NAME), `systemctl status` counts the machine's processes as the unit's, and
stopping or killing the unit reaches everything the machine runs. cgroup2 lets no
cgroup that has processes delegate controllers to children, so uspawn moves itself
into `supervisor` before it enables them for `payload`.

systemd cleans the unit's cgroup up when the unit stops, whatever killed uspawn;
uspawn's own teardown removes `payload` as it removes `uspawn/NAME` otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

from uspawn.base.errors import SetupError, UsageError
from uspawn.kernel import cgroups

SUPERVISOR = "supervisor"
PAYLOAD = "payload"
_UNIT_SUFFIXES = (".service", ".scope")
# Controllers the machine's limits and its own systemd use, enabled for `payload`.
_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids")
_MACHINED = ("org.freedesktop.machine1", "/org/freedesktop/machine1",
             "org.freedesktop.machine1.Manager")
_SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager")


def unit_of(cgroup: str) -> str | None:
    """The unit whose cgroup this is ("/machine.slice/uspawn@a.service" ->
    "uspawn@a.service"); None for a slice, the root, or anything else."""
    last = cgroup.rstrip("/").rpartition("/")[2]
    return last if last.endswith(_UNIT_SUFFIXES) and len(last) > 8 else None


def keep_unit() -> str:
    """Prepare the calling unit's cgroup for a machine; returns the machine's cgroup
    path (below the hierarchy root) for the engine to create."""
    _layout, unified = cgroups.detect_layout()
    if unified is None:
        raise SetupError("--keep-unit: this host has no cgroup2 hierarchy",
                         "boot without --keep-unit")
    own = cgroups.current_cgroup_v2()
    if own is None or unit_of(own) is None:
        raise UsageError(f"--keep-unit: this process's cgroup {own or '?'} is not a "
                         "systemd service's or scope's",
                         "use it in a unit's ExecStart= with Delegate=yes "
                         "(dist/systemd/uspawn@.service), or boot without --keep-unit")
    try:
        unit_dir = cgroups.under(unified, own.strip("/"))
        _move_into(unit_dir, os.path.join(unit_dir, SUPERVISOR))
        _enable_for_children(unit_dir)
    except (OSError, cgroups.CgroupError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SetupError(f"--keep-unit: cgroup {own}: {why}",
                         "the unit needs Delegate=yes (as dist/systemd/uspawn@.service has)"
                         ) from None
    return f"{own.strip('/')}/{PAYLOAD}"


def _move_into(unit_dir: str, sub: str) -> None:
    """Every process of the unit's cgroup (uspawn, normally alone) into sub."""
    try:
        os.mkdir(sub)
    except FileExistsError:
        pass
    for _ in range(20):
        with open(os.path.join(unit_dir, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
        if not pids:
            return
        for pid in pids:
            try:
                with open(os.path.join(sub, "cgroup.procs"), "w") as f:
                    f.write(str(pid))
            except ProcessLookupError:
                pass  # exited meanwhile
    raise cgroups.CgroupError(f"{unit_dir}: its processes kept forking; not all moved")


def _enable_for_children(unit_dir: str) -> None:
    with open(os.path.join(unit_dir, "cgroup.controllers")) as f:
        offered = set(f.read().split())
    with open(os.path.join(unit_dir, "cgroup.subtree_control")) as f:
        enabled = set(f.read().split())
    for ctrl in _CONTROLLERS:
        if ctrl in offered and ctrl not in enabled:
            try:
                with open(os.path.join(unit_dir, "cgroup.subtree_control"), "w") as f:
                    f.write("+" + ctrl)
            except OSError as exc:
                # A controller the kernel cannot enable here (cpu with realtime
                # tasks about) is left off; the limits that need it say so later.
                if exc.errno != errno.EINVAL:
                    raise


def machined_present() -> bool:
    """Is this host run by systemd, whose machined takes registrations?"""
    return os.path.isdir("/run/systemd/system") and shutil.which("busctl") is not None


def _busctl(dest: tuple[str, str, str], method: str, signature: str, *args: str) -> str | None:
    """Call a method of a systemd service's Manager object; None on success, else
    busctl's one-line error."""
    busctl = shutil.which("busctl")
    if busctl is None:
        return "busctl is not installed"
    try:
        r = subprocess.run([busctl, "--timeout=20", "call", *dest, method, signature, *args],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]


def register(name: str, uuid: str, leader: int, root: str) -> str | None:
    """RegisterMachine: machined takes the unit from the leader's cgroup (ours,
    with --keep-unit). Returns why it failed, or None."""
    try:
        id128 = bytes.fromhex(uuid.replace("-", ""))
    except ValueError:
        id128 = b""
    if len(id128) != 16:
        id128 = bytes(16)  # machined accepts a null ID
    return _busctl(_MACHINED, "RegisterMachine", "sayssus", name, "16", *(str(b) for b in id128),
                   "uspawn", "container", str(leader), root)


def unregister(name: str) -> str | None:
    return _busctl(_MACHINED, "UnregisterMachine", "s", name)


def scope_name(name: str) -> str:
    return f"uspawn-{name}.scope"


def enter_scope(name: str) -> str | None:
    """Move this process (a detached machine's supervisor) into a new transient unit,
    uspawn-NAME.scope in machine.slice with Delegate=yes, as `systemd-run --scope`
    does; then it is a unit's cgroup like --keep-unit's, and machined registers the
    machine for it. systemd removes the scope once its processes are gone. Returns
    None, or why not."""
    unit = scope_name(name)
    why = _busctl(_SYSTEMD, "StartTransientUnit", "ssa(sv)a(sa(sv))", unit, "fail", "5",
                  "PIDs", "au", "1", str(os.getpid()), "Delegate", "b", "true",
                  "Slice", "s", "machine.slice", "CollectMode", "s", "inactive-or-failed",
                  "Description", "s", f"uspawn machine {name}", "0")
    if why is not None:
        return why
    # The job moves us when it runs, just after the call returns.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if unit_of(cgroups.current_cgroup_v2() or "") == unit:
            return None
        time.sleep(0.005)
    return f"{unit}: this process was not moved into it within 10 s"
