"""Python again after uspawn-monitor (machine/monitor.py): the entry points it execs.

resume_main: the machine's init exited; tear that boot down and, after a reboot
request, boot the machine again (boot.Supervisor, which hands over once more).
guard_main: the monitor was killed; remove what its machine left behind.
Both run as `python -I -c ...` with the arguments the monitor passes.
"""

from __future__ import annotations

import os
import sys

from uspawn.kernel import sig
from uspawn.machine import monitor
from uspawn.state import store as state

TYPE_CHECKING = False
if TYPE_CHECKING:
    from uspawn.machine.boot import Machine


def _args(argv: list[str]) -> dict[str, str]:
    return {argv[i]: argv[i + 1] for i in range(0, len(argv) - 1, 2)}


def resume_main() -> None:
    """Python again after the monitor: tear the boot down; boot it again on a reboot."""
    import _signal  # type: ignore[import-not-found, unused-ignore]

    code = 125
    try:
        for s in monitor.STOP:  # a stop request during the teardown is moot
            _signal.signal(s, _signal.SIG_IGN)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, monitor.BLOCKED)
        args = _args(sys.argv[2:])  # -c's argv: ["-c", "resume", "--root", ...]
        h = monitor.read_handover(args.get("--handover", ""))
        if h is None:  # unreadable, or an older uspawn's: the guard (EOF) reclaims it
            os.write(2, b"uspawn: the machine's monitor.json is unreadable or from another "
                        b"uspawn version: its guard cleans up\n")
            return
        status = int(args.get("--status", str(sig.SIGKILL)))
        errors = monitor.teardown(h)
        guard_fd, guard_pid = int(args.get("--guard-fd", "-1")), int(args.get("--guard-pid", "-1"))
        if guard_fd >= 0:
            try:
                os.write(guard_fd, b"done\n")
            except OSError:
                pass  # EPIPE: the guard was killed; nothing is left for it to do
            finally:
                os.close(guard_fd)
        if guard_pid > 0:
            try:
                os.waitpid(guard_pid, 0)
            except ChildProcessError:
                pass
        code = _boot_again(h, status, int(args.get("--tell", "-1")), errors)
    except BaseException as exc:
        # Never a traceback into the console log; the guard (not told `done`) sees
        # EOF when we exit and removes what is left.
        os.write(2, f"uspawn: internal error after the machine stopped: {exc!r} (a bug; "
                    "please report it)\n".encode())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _boot_again(h: dict[str, object], status: int, tell_fd: int, errors: list[str]) -> int:
    import types

    from uspawn.machine import boot
    from uspawn.machine.launch import machine_factory

    name = h.get("name")
    ns_data = h.get("ns")
    if not isinstance(name, str):
        return 125
    exit_code = os.waitstatus_to_exitcode(status)  # < 0: killed by that signal
    code = boot.reboot_code(128 - exit_code if exit_code < 0 else exit_code, name, _log)
    if h.get("foreground") is True:
        for error in errors:
            _log(f"cleanup: {error}")
        return code  # `uspawn boot`'s own exit code (133: uspawn@.service restarts)
    if not isinstance(ns_data, dict):
        return 125
    ns = types.SimpleNamespace(**ns_data)
    cap = h.get("cap")
    sup = boot.Supervisor(tell_fd, _unprepared, cap if isinstance(cap, int) and cap > 0
                          else boot.DEFAULT_CONSOLE_LOG_SIZE, ns)
    restarts, recent = h.get("restarts"), h.get("recent")
    sup.restarts = restarts if isinstance(restarts, int) else 0
    sup.recent = [t for t in recent if isinstance(t, float | int)] if isinstance(
        recent, list) else []
    clog = sup.open_log(name)
    for error in errors:
        clog.write(f"-- uspawn: cleanup: {error}\n".encode())
    if not sup.after(name, code):
        return 0
    try:
        sup.make_machine = machine_factory(ns, _log)[0]
    except Exception as exc:  # the options no longer parse (a settings file changed)
        clog.write(f"-- uspawn: reboot failed: {exc}\n".encode())
        return 125
    sup.loop()
    return 0


def _log(message: str) -> None:
    """uspawn's own line into the console log (fd 2 is the log here), as cli._log."""
    from uspawn.base.textsafe import printable

    os.write(2, f"uspawn: {printable(message)}\n".encode())


def _unprepared() -> Machine:
    from uspawn.base.errors import UspawnError

    raise UspawnError("reboot: the machine's options were not read back")


def guard_main() -> None:
    """The monitor died (kill -9): remove what its machine left behind."""
    try:
        args = _args(sys.argv[2:])
        root, name = args.get("--root", ""), args.get("--name", "")
        h = monitor.read_handover(args.get("--handover", "")) or {}
        monitor.destroy_cgroup(h)
        ranges = monitor.pair(h.get("range"))
        if ranges is not None:
            lease = state.try_lock(ranges[0])
            if lease is not None:
                lease.release()
        if root and name:
            from uspawn.machine.reclaim import reclaim_stale

            reclaim_stale(root)  # the record, leftover cgroups, the network leases
    finally:
        os._exit(0)
