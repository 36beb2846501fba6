"""Running machines: list, status, stop, kill, logs (read from the state directory).

A container's record is trusted only while its owner holds the name lock
(state.read_states), and a pid is signalled only if its start time still
matches the record, so a recycled pid is never hit.
"""

from __future__ import annotations

import os
import select
import sys
import time

from uspawn.base.errors import StateError, UsageError
from uspawn.base.textsafe import STATUS_LIMIT, clip, field
from uspawn.kernel import sig
from uspawn.kernel.pidwait import wait_gone
from uspawn.machine.reclaim import reclaim_stale
from uspawn.state.store import proc_starttime, read_states

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO, TextIO

    from uspawn.kernel import cgroups


def find(root: str, name: str) -> dict[str, object]:
    reclaim_stale(root)  # status, stop, kill, set: a dead machine's leftovers go first
    for st in read_states(root):
        if st.get("name") == name:
            return st
    raise StateError(f"no running container named {name!r}", "see `uspawn list`")


def _pid(st: dict[str, object]) -> int:
    pid = st.get("pid")
    ok = isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31
    # None: no such process; a record's "pid_start": null must not match it.
    start = proc_starttime(pid) if ok and isinstance(pid, int) else None
    if start is None or start != st.get("pid_start") or not isinstance(pid, int):
        raise StateError(f"container {st.get('name')!r} has no live init process")
    return pid


def _started(st: dict[str, object]) -> float | None:
    """The record's start time, if it is a sane one (a foreign record may hold NaN or 1e999)."""
    started = st.get("started")
    if isinstance(started, int | float) and not isinstance(started, bool) and \
            0 <= started <= time.time() + 86400:
        return float(started)
    return None


def _uptime(st: dict[str, object]) -> str:
    started = _started(st)
    if started is None:
        return "-"
    secs = int(max(time.time() - started, 0))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}min"
    return f"{secs // 3600}h"


def _state_word(st: dict[str, object]) -> str:
    if st.get("stopping"):
        return "stopping"
    if st.get("machine") and not st.get("ready"):
        return "starting"
    return "running"


def _addresses() -> dict[str, list[str]]:
    from uspawn.net import pool as netpool

    if not os.path.isdir(netpool.NET_DIR):
        return {}
    return netpool.addresses()


def _capped(value: object, limit: int = 4096) -> object:
    """A state value for JSON: JSON escapes control characters itself; only the
    length is capped, with the same limits as the text output."""
    return clip(value, limit) if isinstance(value, str) else value


def _json_row(s: dict[str, object], addrs: dict[str, list[str]]) -> dict[str, object]:
    started = _started(s)
    return {"name": _capped(s.get("name")), "pid": s.get("pid"), "state": _state_word(s),
            "uid_base": s.get("uid_base"), "uid_size": s.get("uid_size"),
            "uptime_seconds": int(max(time.time() - started, 0))
            if started is not None else None,
            "rootfs": _capped(s.get("rootfs")), "ownership": _capped(s.get("ownership")),
            "machine": bool(s.get("machine")), "uuid": _capped(s.get("uuid")),
            "addresses": [clip(a, 64) for a in addrs.get(str(s.get("name")), [])],
            "status_text": _capped(s.get("status_text"), STATUS_LIMIT),
            "ready": bool(s.get("ready")), "restarts": _restarts(s),
            "resources": _usage_json(s)}


def _usage_json(st: dict[str, object]) -> dict[str, dict[str, object]] | None:
    """Use and limit per resource, as `status` shows them: a limit of "max" is none
    (cgroup v2's word), null is unknown; None if the cgroup cannot be read."""
    from uspawn.kernel import cgroups

    try:
        use = cgroups.usage(_cgroup_of(st))
    except StateError:
        return None

    def limit(value: int | None) -> object:
        return "max" if value is not None and value < 0 else value

    mem, mem_max = use["memory"]
    tasks, tasks_max = use["tasks"]
    cpu, cpu_max = use["cpu"]
    return {"memory": {"current_bytes": mem, "limit_bytes": limit(mem_max)},
            "tasks": {"current": tasks, "limit": limit(tasks_max)},
            "cpu": {"usage_usec": cpu,
                    "limit_cpus": limit(cpu_max) if cpu_max is None or cpu_max < 0
                    else cpu_max / 1e6}}


def _restarts(st: dict[str, object]) -> int:
    """Reboots of a detached machine under its supervisor (0 for anything else)."""
    n = st.get("restarts")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else 0


def list_command(root: str, as_json: bool, out: TextIO = sys.stdout) -> int:
    reclaim_stale(root)
    states = read_states(root)
    addrs = _addresses()
    if as_json:
        import json

        rows = [_json_row(s, addrs) for s in states]
        out.write(json.dumps(rows, indent=2) + "\n")
        return 0
    header = ("NAME", "PID", "STATE", "UID RANGE", "ADDRESSES", "UPTIME", "ROOTFS")
    rows2 = [header]
    for s in states:
        base, size = s.get("uid_base"), s.get("uid_size")
        rng = f"{base}:{size}" if isinstance(base, int) else "host"
        # Every value from the state directory is shown through the one sanitiser.
        rows2.append((field(s.get("name")), field(s.get("pid")), _state_word(s), field(rng),
                      field(",".join(addrs.get(str(s.get("name")), []))),
                      _uptime(s), field(s.get("rootfs"))))
    widths = [max(len(r[i]) for r in rows2) for i in range(len(header))]
    for r in rows2:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return 0


def status_command(root: str, name: str, out: TextIO = sys.stdout) -> int:
    st = find(root, name)
    # STATUS= comes straight from the machine's pid 1 (sd_notify): a terminal
    # escape there must reach the admin as text, never as a control sequence.
    lines = [
        ("Name", field(st.get("name"))), ("State", _state_word(st)),
        ("Init PID", field(st.get("pid"))), ("UUID", field(st.get("uuid"))),
        ("Root", field(st.get("rootfs"))),
        ("UID range", field(f"{st.get('uid_base')}:{st.get('uid_size')}")),
        ("Ownership", field(st.get("ownership"))), ("Uptime", _uptime(st)),
        ("Status", field(st.get("status_text"), STATUS_LIMIT)),
        ("Console log", field(st.get("console_log"))),
        ("Restarts", str(_restarts(st))),
    ]
    lines += _usage_lines(st)
    for key, value in lines:
        out.write(f"{key + ':':<13}{value}\n")
    return 0


def _cgroup_of(st: dict[str, object]) -> cgroups.Cgroup:
    """The machine's cgroup, proven by its live init being in it."""
    from uspawn.kernel import cgroups

    try:
        # of_process proves the path: the live init must be in it (or below it).
        rel = st.get("cgroup_rel")
        return cgroups.of_process(_pid(st), rel if isinstance(rel, str) and rel
                                  else f"{cgroups.PARENT}/{st.get('name')}")
    except cgroups.CgroupError as exc:
        raise StateError(f"container {field(st.get('name'))}: {exc}") from None


def _usage_lines(st: dict[str, object]) -> list[tuple[str, str]]:
    """Memory, tasks and CPU time against their limits (what `uspawn set` changes)."""
    from uspawn.kernel import cgroups

    try:
        use = cgroups.usage(_cgroup_of(st))
    except StateError:
        return []

    def show(value: int | None, unit: str) -> str:
        if value is None:
            return "?"
        if value < 0:
            return "no limit"
        if unit == "bytes":
            return _size(value)
        return str(value)

    lines: list[tuple[str, str]] = []
    mem, mem_max = use["memory"]
    lines.append(("Memory", f"{show(mem, 'bytes')} of {show(mem_max, 'bytes')}"))
    tasks, tasks_max = use["tasks"]
    lines.append(("Tasks", f"{show(tasks, '')} of {show(tasks_max, '')}"))
    cpu, cpu_max = use["cpu"]
    time_s = "?" if cpu is None else f"{cpu / 1e6:.3f}s"
    limit = "?" if cpu_max is None else "no limit" if cpu_max < 0 else \
        f"{cpu_max / 1e6:g} CPUs"
    lines.append(("CPU time", f"{time_s}, limit {limit}"))
    return lines


def _size(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"


def set_command(root: str, name: str, assignments: list[str]) -> int:
    """`uspawn set NAME KEY=VALUE...`: new limits for a running container, written
    to its cgroup by the code that applies them at start (machine/limits.py)."""
    from uspawn.machine import limits

    if not assignments:
        raise UsageError("set: no KEY=VALUE given", "uspawn set NAME MemoryMax=1G")
    given: dict[str, tuple[str, str]] = {}
    for kv in assignments:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            raise UsageError(f"set: {kv!r} is not KEY=VALUE", "uspawn set NAME MemoryMax=1G")
        given[key] = (value, key)
    lim = limits.settings_of(given)
    st = find(root, name)
    limits.apply(_cgroup_of(st), lim.settings, lim)
    return 0


def kill_command(root: str, name: str, signal_name: str) -> int:
    signo = sig.parse_signal(signal_name)
    pid = _pid(find(root, name))
    try:
        os.kill(pid, signo)
    except ProcessLookupError:  # died since _pid looked
        raise StateError(f"container {name!r} has no live init process") from None
    return 0


def stop_command(root: str, name: str, timeout: float, log: object = None) -> int:
    """SIGRTMIN+3 (systemd's clean poweroff), SIGKILL after the timeout; wait for cleanup."""
    st = find(root, name)
    pid = _pid(st)
    # A booted machine powers off on SIGRTMIN+3; a plain `run` payload gets the
    # container's --kill-signal and --stop-timeout (at most --timeout), as its runtime does.
    first, grace = sig.SIGRTMIN + 3, timeout
    if not st.get("machine"):
        first, grace = _run_stop(st, timeout)
    runtime = _runtime_pidfd(root, st)
    try:
        try:
            os.kill(pid, first)
            if not wait_gone(pid, grace):
                os.kill(pid, sig.SIGKILL)
                wait_gone(pid, 10)
        except ProcessLookupError:
            pass  # it died on its own meanwhile: the same outcome
        # The runtime that owns the container removes its state and cgroup, and
        # only then exits: its lock goes before its directory does, so waiting for
        # the lock alone returned while state/containers/NAME still existed.
        if runtime is not None and not select.select([runtime], [], [], 10)[0]:
            raise StateError(f"container {name!r} stopped but its runtime (pid "
                             f"{st.get('runtime_pid')}) did not exit in 10s")
    finally:
        if runtime is not None:
            os.close(runtime)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a record of a runtime without runtime_pid
        if all(s.get("name") != name for s in read_states(root)):
            return 0
        time.sleep(0.02)
    raise StateError(f"container {name!r} stopped but its runtime did not clean up in 10s")


def _runtime_pidfd(root: str, st: dict[str, object]) -> int | None:
    """A pidfd of the process that owns st's record, or None (gone, or not recorded).

    The pidfd is trusted only if the record is still live after it was opened: the
    owner holds the record's lock until it dies, so a live record means the pid was
    not recycled before pidfd_open."""
    from uspawn.kernel import syscalls as sc

    pid = st.get("runtime_pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31 \
            or pid == os.getpid():
        return None
    try:
        fd = sc.pidfd_open(pid)
    except OSError:
        return None
    if any(s.get("name") == st.get("name") and s.get("runtime_pid") == pid
           for s in read_states(root)):
        return fd
    os.close(fd)
    return None


def _run_stop(st: dict[str, object], timeout: float) -> tuple[int, float]:
    """(first signal, grace) of a `run` container's record (older records: SIGTERM)."""
    first, grace = st.get("kill_signal"), st.get("stop_timeout")
    if not isinstance(first, int) or isinstance(first, bool) or not 0 < first < 65:
        first = sig.SIGTERM
    if isinstance(grace, int | float) and not isinstance(grace, bool) and 0 <= grace < timeout:
        return first, float(grace)
    return first, timeout


def logs_command(name: str, follow: bool, out: TextIO = sys.stdout) -> int:
    """The rotated log (NAME.console.log.1) first, then the current one.

    On a terminal the bytes are filtered (textsafe.terminal_text: colours stay,
    other control sequences from the payload are shown escaped); into a pipe or
    file they are copied as recorded.
    """
    from uspawn.machine.boot import console_log_path

    path = console_log_path(name)
    try:
        # .1 before the current file: a rotation in between repeats lines, never loses them.
        old: BinaryIO | None = open(path + ".1", "rb")
    except OSError:
        old = None  # never rotated (or removed meanwhile)
    try:
        f: BinaryIO = open(path, "rb")
    except OSError as exc:
        if old is not None:
            old.close()
        if isinstance(exc, FileNotFoundError):
            raise StateError(f"no console log for {name!r} ({path})", "logs exist for "
                             "machines started with `uspawn boot --detach`") from None
        # a name of 300 characters, "x/" ...
        raise StateError(f"console log {path}: {exc.strerror}") from None
    emit = _log_writer(out)
    try:
        if old is not None:
            with old:
                _copy_all(old, emit)
        while True:
            if _copy_all(f, emit):
                continue
            if not follow:
                return 0
            f = _reopen_if_rotated(f, path, emit)
            time.sleep(0.2)
    finally:
        f.close()


def _copy_all(f: BinaryIO, emit: Callable[[bytes], None]) -> bool:
    """Copy what f has now; True if anything was read."""
    any_read = False
    while chunk := f.read(65536):
        emit(chunk)
        any_read = True
    return any_read


def _reopen_if_rotated(f: BinaryIO, path: str, emit: Callable[[bytes], None]) -> BinaryIO:
    """`logs -f` across a rotation: finish the old file (now .1), go on with the new."""
    try:
        st = os.stat(path)
    except OSError:
        return f
    if st.st_ino == os.fstat(f.fileno()).st_ino:
        return f
    try:
        new = open(path, "rb")
    except OSError:
        return f
    _copy_all(f, emit)
    f.close()
    return new


def _log_writer(out: TextIO) -> Callable[[bytes], None]:
    buf = getattr(out, "buffer", None)
    if buf is not None and not out.isatty():
        def raw(chunk: bytes) -> None:
            buf.write(chunk)
            buf.flush()
        return raw
    import codecs

    from uspawn.base.textsafe import terminal_text

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def text(chunk: bytes) -> None:
        out.write(terminal_text(decoder.decode(chunk)))
        out.flush()
    return text


def exec_command(root_override: str | None, name: str, cmd: list[str] | None, tty: bool,
                 setenv: list[str], cwd: str) -> int:
    """exec (cmd given) or shell (cmd None: the root user's login shell)."""
    from uspawn.engine.enter import JoinRequest, enter
    from uspawn.kernel import seccomp
    from uspawn.state.store import state_root

    st = find(state_root(root_override), name)
    _pid(st)
    env = list(setenv)
    if cmd is None:
        shell = _root_shell(str(st.get("rootfs")))
        cmd = [shell, "-l"]
        env = ["USER=root", "LOGNAME=root", f"SHELL={shell}", *env]
    userns = st.get("uid_base") is not None
    bpf = seccomp.policy_bpf(seccomp.default_policy(userns=userns))
    return enter(st, JoinRequest(argv=cmd, tty=tty, env_extra=env, cwd=cwd, seccomp_bpf=bpf))


def _root_shell(rootfs: str) -> str:
    from uspawn.tree import etc

    for ent in etc.entries(rootfs, "/etc/passwd"):
        if len(ent) >= 7 and ent[0] == "root" and ent[6].startswith("/"):
            return ent[6]
    return "/bin/sh"
