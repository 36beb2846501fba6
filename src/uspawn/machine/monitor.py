"""A detached machine's steady state in uspawn-monitor (C), not in Python.

Two Python processes per detached machine (supervisor and guardian) cost about
9 MB PSS on the host; the issue's budget is 2 MB (docs/ARCHITECTURE.md, "Host
cost per machine"). So once a machine's init runs, its supervisor execs
`uspawn-monitor` (src/uspawn/native/monitor.c) in place: same pid, the init
still its child, every lease still held (the fds are passed without O_CLOEXEC).
The monitor pumps the console into the log, keeps state.json current from the
machine's sd_notify messages, forwards stop signals, and forks a small guard
that replaces the Python guardian. When the init exits, the monitor execs
Python again: resume.resume_main() tears that boot down and, after a reboot request,
boots the machine again through boot.Supervisor, which hands over once more.
If the monitor is killed, the guard (which holds no lease) sees EOF on its
pipe, and resume.guard_main() removes what is left.

What crosses the exec is in `monitor.json` in the container's state directory
(root only, removed with it): the cgroup, the lease fds and paths, the
supervisor's loop state and the boot's options (ns) to boot it again.

Without the binary (not built: no compiler on the host), or with
USPAWN_MONITOR=off, the Python supervisor does all of it as before.
"""

from __future__ import annotations

import os
import sys

from uspawn.kernel import sig
from uspawn.state import store as state

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from typing import Protocol

    from uspawn.engine.runtime import Container

    # What hand_over reads of boot.Supervisor and boot.Machine (this module must
    # not import boot, which imports it).
    class _Log(Protocol):
        path: str

        def write(self, data: bytes) -> None: ...

    class _Supervisor(Protocol):
        tell_fd: int
        ns: types.SimpleNamespace | None
        cap: int
        restarts: int
        recent: list[float]

        @property
        def clog(self) -> _Log | None: ...

    class _Notify(Protocol):
        ready: bool
        stopping: bool
        status: str

        def fileno(self) -> int: ...

    class _Machine(Protocol):
        @property
        def notify(self) -> _Notify: ...

        @property
        def name(self) -> str: ...

        def record_fields(self) -> dict[str, object]: ...

HANDOVER = "monitor.json"
# Bumped when monitor.json changes shape: a machine started before an upgrade is
# handed back to the new code, which then only reclaims it (resume.guard_main's
# way), rather than misread it.
HANDOVER_FORMAT = 1
# Blocked from just before the exec to the monitor's signalfd: none is lost, and
# none kills the process with its default action in between.
BLOCKED = (sig.SIGINT, sig.SIGTERM, sig.SIGHUP, sig.SIGQUIT, sig.SIGUSR1, sig.SIGUSR2,
           sig.SIGCONT, sig.SIGWINCH, sig.SIGCHLD)
STOP = (sig.SIGINT, sig.SIGTERM, sig.SIGHUP, sig.SIGQUIT, sig.SIGUSR1, sig.SIGUSR2)


def binary() -> str | None:
    """The monitor to exec, if it is installed and safe for root to run."""
    if os.environ.get("USPAWN_MONITOR") == "off":
        return None
    from uspawn.base import natives

    return natives.find(natives.MONITOR)


def _net_leases(c: Container) -> list[state.Lease]:
    """The address and port leases the front handed the engine (their release is in
    c.undo as bound methods of pool.AddressLease/PortLease)."""
    out = []
    for undo in c.undo:
        lease = getattr(getattr(undo, "__self__", None), "lease", None)
        if isinstance(lease, state.Lease) and lease.fd >= 0:
            out.append(lease)
    return out


def _ns_json(ns: types.SimpleNamespace) -> dict[str, object] | None:
    """ns as JSON that reads back equal, or None (then there is no hand-over)."""
    data = dict(vars(ns))
    try:
        text = state.dumps(data)
        return data if state.loads(text) == data else None
    except (TypeError, ValueError):
        return None


class Foreground:
    """What hand_over needs of a foreground `uspawn boot` without a terminal (the
    systemd unit's): the console goes to our stdout, no log file, no reboot loop
    (uspawn@.service restarts the unit on exit 133)."""

    def __init__(self, restarts: int = 0) -> None:
        self.tell_fd = -1
        self.ns: types.SimpleNamespace | None = None
        self.cap = 0
        self.restarts = restarts
        self.recent: list[float] = []
        self.clog: _Log | None = None


def hand_over(sup: _Supervisor, machine: _Machine, c: Container) -> None:
    """Exec the monitor for this running machine; returns only if that cannot be.

    A detached supervisor (sup.clog set) hands over its console log and reboot
    loop; a Foreground one its stdout, and resume exits with boot's exit code."""
    exe = binary()
    claim, clog = c.claim, sup.clog
    foreground = clog is None
    ns = _ns_json(sup.ns) if sup.ns is not None else None
    if exe is None or (ns is None and not foreground) or claim is None or c.cgroup is None \
            or c.init_pid <= 0 or c.console_master < 0:
        return
    nets = _net_leases(c)
    ranges = c.range_lease
    fields = machine.record_fields()
    for key in ("ready", "stopping", "status_text"):  # the monitor writes these
        fields.pop(key, None)
    record = state.dumps(fields)
    if not record.endswith("}") or record == "{}":
        return
    root = os.path.dirname(os.path.dirname(claim.dir))
    handover = {
        "format": HANDOVER_FORMAT, "name": machine.name, "root": root,
        "claim": [claim.lease.path, claim.lease.fd],
        "range": [ranges.path, ranges.fd] if ranges is not None and ranges.fd >= 0 else None,
        "net": [[lease.path, lease.fd] for lease in nets],
        "cgroup": c.cgroup.to_json(), "restarts": sup.restarts, "recent": sup.recent,
        "cap": sup.cap, "ns": ns, "foreground": foreground,
        "machined": bool(getattr(machine, "registered", False)),  # unregistered at teardown
    }
    path = os.path.join(claim.dir, HANDOVER)
    state.write_atomic(path, state.dumps(handover))
    notify = machine.notify
    argv = [exe, "--root", root, "--name", machine.name,
            "--init", str(c.init_pid), "--master", str(c.console_master),
            "--notify", str(notify.fileno()), "--tell", str(sup.tell_fd),
            "--tell-line", f"ready {machine.name}", "--guardian", str(c.guardian.wfd),
            *(["--log-fd", "1"] if clog is None else
              ["--log", clog.path, "--log-cap", str(sup.cap)]), "--state-dir", claim.dir,
            "--record", record[:-1], "--ready", str(int(notify.ready)),
            "--stopping", str(int(notify.stopping)), "--status", notify.status,
            "--python", sys.executable, "--handover", path]
    if c.req.verbose:  # as boot.Machine._on_notify says it
        from uspawn.base.textsafe import printable

        argv += ["--say-ready", f"uspawn: {printable(f'machine {machine.name} is ready')}"]
    for src, dst in c.req.signal_map.items():
        argv += ["--map", f"{src}:{dst}"]
    passed = [c.console_master, notify.fileno(), claim.lease.fd,
              *([ranges.fd] if ranges is not None and ranges.fd >= 0 else []),
              *(lease.fd for lease in nets),
              *(fd for fd in (sup.tell_fd, c.guardian.wfd) if fd >= 0)]
    import _signal  # type: ignore[import-not-found, unused-ignore]

    _signal.pthread_sigmask(_signal.SIG_BLOCK, BLOCKED)
    for fd in passed:
        os.set_inheritable(fd, True)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(exe, argv)
    except OSError as exc:
        for fd in passed:
            os.set_inheritable(fd, False)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, BLOCKED)
        note = f"-- uspawn: {exe}: {exc.strerror}; supervising in Python\n".encode()
        if clog is not None:
            clog.write(note)
        else:
            os.write(2, note)


def read_handover(path: str) -> dict[str, object] | None:
    try:
        with open(path, "rb") as f:
            data = state.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == HANDOVER_FORMAT else None


def pair(value: object) -> tuple[str, int] | None:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) \
            and isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 0:
        return value[0], value[1]
    return None


def destroy_cgroup(h: dict[str, object]) -> str | None:
    """Kill what is left of the boot in its cgroup and remove it; an error, or None."""
    from uspawn.kernel import cgroups

    data = h.get("cgroup")
    if not isinstance(data, dict):
        return None
    try:
        cgroups.Cgroup.from_json(data).destroy()
    except (cgroups.CgroupError, OSError, ValueError, KeyError, TypeError) as exc:
        return f"cgroup: {exc}"
    return None


def _cleanup_network() -> list[str]:
    """Reap the leases nobody holds now (ours, just closed): their veth and nft
    rules go first. Returns what could not be removed."""
    from uspawn.net import pool as netpool

    if not os.path.isdir(netpool.NET_DIR):
        return []
    return [r for r in netpool.cleanup_stale() if r.startswith("kept lease")]


def _disown(lease: state.Lease) -> None:
    """Drop a network lease so that the reap below takes it: its record names this
    process as the owner (a lease recorded for a live owner is never reaped), so
    the owner goes from the record before the flock is closed."""
    try:
        record = state.loads(os.pread(lease.fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict):
        record.pop("pid", None)
        record.pop("starttime", None)
        try:
            lease.record(**record)
        except OSError:
            pass
    lease.release(remove=False)


def teardown(h: dict[str, object]) -> list[str]:
    """What Container.destroy() does for a boot whose init has exited, from the
    hand-over: the cgroup, the network leases (then their veth and rules), the
    name claim and the UID-range lease. Returns the errors."""
    errors = [e for e in (destroy_cgroup(h),) if e]
    if h.get("machined") is True and isinstance(h.get("name"), str):
        from uspawn.machine import machined

        machined.unregister(str(h["name"]))  # best effort: it also goes with the unit
    nets = h.get("net")
    for item in nets if isinstance(nets, list) else []:
        lease = pair(item)
        if lease is not None:
            _disown(state.Lease(*lease))
    try:
        errors += _cleanup_network()
    except Exception as exc:  # a netlink or nft error: reported, the rest goes on
        errors.append(f"network: {exc}")
    root, name = h.get("root"), h.get("name")
    claim = pair(h.get("claim"))
    if isinstance(root, str) and isinstance(name, str) and claim is not None:
        state.NameClaim(root, name, state.Lease(*claim)).release()
    ranges = pair(h.get("range"))
    if ranges is not None:
        state.Lease(*ranges).release()
    return errors


