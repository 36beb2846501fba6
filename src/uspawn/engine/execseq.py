"""The one exec sequence: how any process enters the container's payload.

The container init (after its setup) and every process that joins a running
container (`uspawn exec`/`shell`, `uspawn-runc exec`) end here, so they cannot
drift apart. The order matters:

  1. fds: only stdio, the fds the caller passes on purpose and the sync channel
     stay open; the executable's path walk must not reach any other fd (a
     /proc/self/fd/N symlink in the tree, CVE-2024-21626);
  2. the working directory, resolved inside the root (never through a magic
     link), and only then a relative "./x" looked up in it (runc: chdir, then
     LookPath);
  3. umask, the capability bounding set;
  4. SIGPIPE and SIGXFSZ back to default (Python ignores them, and ignored
     dispositions survive execve);
  5. groups, gid, uid (KEEPCAPS across the change), then exactly the
     configured capability sets, clamped to what we hold;
  6. every fd but stdio and the passed ones CLOEXEC (the channel reports a
     failed execve, then closes at the successful one);
  7. seccomp last, so a profile that refuses everything it does not list
     (defaultAction ERRNO, common in hardened profiles) only has to allow
     execve. Without no_new_privs the kernel wants CAP_SYS_ADMIN for the load:
     when the configured sets lack it, step 5 keeps it effective and one
     capset after the load drops it (that profile must allow capset; a refusal
     is an error, never a process left with CAP_SYS_ADMIN);
  8. execve.

Errors after the filter load cannot be tolerated silently: a refused capset
fails the start naming the syscall and the fix.

Errors are InitError with errno and the exit code the caller reports (126: it
cannot run, 127: not found), never an unwinding exception.
"""

from __future__ import annotations

import errno
import os

from uspawn.base import timing
from uspawn.engine.defaults import DEFAULT_PATH
from uspawn.kernel import caps, workdir
from uspawn.kernel import sig as signal
from uspawn.kernel import syscalls as sc


class InitError(Exception):
    def __init__(self, message: str, err: int = 0, exit_code: int = 125) -> None:
        super().__init__(message)
        self.errno = err
        self.exit_code = exit_code


def step_error(what: str, exc: OSError) -> InitError:
    return InitError(f"{what}: {exc}", exc.errno or 0)


class Process:
    """What the payload gets (plain class: the init and a joiner fill it)."""

    def __init__(self, args: list[str], env: list[str], cwd: str, uid: int = 0,
                 gid: int = 0, additional_gids: list[int] | None = None,
                 umask: int | None = None, bounding: int = 0,
                 capsets: tuple[int, int, int, int] = (0, 0, 0, 0),
                 no_new_privileges: bool = False, seccomp_bpf: bytes | None = None,
                 preserve_fds: int = 0) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.uid, self.gid = uid, gid
        self.additional_gids = additional_gids or []
        self.umask = umask
        self.bounding = bounding
        self.capsets = capsets  # effective, permitted, inheritable, ambient
        self.no_new_privileges = no_new_privileges
        self.seccomp_bpf = seccomp_bpf
        self.preserve_fds = preserve_fds


def find_executable(name: str, path_env: str) -> str:
    if "/" in name:
        if not os.path.exists(name):
            raise InitError(f"executable {name} not found in the container",
                            errno.ENOENT, exit_code=127)
        return name
    for d in path_env.split(":"):
        cand = os.path.join(d or ".", name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise InitError(f"executable {name!r} not found in the container's PATH ({path_env})",
                    errno.ENOENT, exit_code=127)


def exec_process(p: Process, channel_fd: int) -> None:
    """Steps 1-8 above; returns only by raising InitError."""
    env = dict(e.split("=", 1) for e in p.env)
    first_closed = 3 + p.preserve_fds
    workdir.close_fds_from(first_closed, channel_fd)
    try:
        workdir.enter_workdir(p.cwd)
    except workdir.WorkdirError as exc:
        raise InitError(exc.with_hint(), exc.errno, exit_code=126) from None
    exe = find_executable(p.args[0], env.get("PATH", DEFAULT_PATH))
    if p.umask is not None:
        os.umask(p.umask)
    try:
        caps.drop_bounding(p.bounding)
    except OSError as exc:
        raise step_error("drop capability bounding set", exc) from None
    signal.set_handler(signal.SIGPIPE, signal.SIG_DFL)
    signal.set_handler(signal.SIGXFSZ, signal.SIG_DFL)
    final = _final_sets(p)
    # Without no_new_privs the load needs CAP_SYS_ADMIN effective; keep it
    # (only it) until the filter is in, when the payload is not to have it.
    bracket = bool(p.seccomp_bpf) and not p.no_new_privileges and not final[0] & _SYS_ADMIN
    _switch_user(p, _with_sys_admin(final) if bracket else final)
    if p.no_new_privileges:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    sc.close_range(first_closed, 0xFFFFFFFF, sc.CLOSE_RANGE_CLOEXEC)
    if p.seccomp_bpf:
        _seccomp(p.seccomp_bpf)
    if bracket:
        _drop_sys_admin(final)
    timing.mark("exec: fds, cwd, lookup, caps, seccomp (then execve)")
    try:
        os.execve(exe, p.args, env)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        raise InitError(f"execve {exe}: {exc.strerror}", exc.errno or 0, exit_code=code) from None


_SYS_ADMIN = 1 << caps.CAP_NUMBERS["CAP_SYS_ADMIN"]


def _final_sets(p: Process) -> tuple[int, int, int, int]:
    # Never more than we hold (a host or sandbox may withhold some).
    have = sc.capget()[1]
    eff, perm, inh, amb = (m & have for m in p.capsets)
    return eff, perm, inh, amb


def _with_sys_admin(s: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    have = sc.capget()[1] & _SYS_ADMIN
    return s[0] | have, s[1] | have, s[2], s[3]


def _switch_user(p: Process, sets: tuple[int, int, int, int]) -> None:
    try:
        sc.prctl(sc.PR_SET_KEEPCAPS, 1)
        os.setgroups(p.additional_gids)
        os.setresgid(p.gid, p.gid, p.gid)
        os.setresuid(p.uid, p.uid, p.uid)
        sc.prctl(sc.PR_SET_KEEPCAPS, 0)
        caps.apply_sets(*sets)
    except OSError as exc:
        raise step_error(f"switch to user {p.uid}:{p.gid}", exc) from None


def _drop_sys_admin(final: tuple[int, int, int, int]) -> None:
    """The one syscall besides execve after the filter (ambient caps, raised
    before, survive: capset keeps ambient bits still permitted and inheritable)."""
    try:
        sc.capset(final[0], final[1], final[2])
    except OSError as exc:
        raise InitError(
            f"seccomp profile refuses capset ({exc.strerror}): without "
            "process.noNewPrivileges the filter is loaded holding CAP_SYS_ADMIN and "
            "capset must drop it after; allow capset in linux.seccomp or set "
            "process.noNewPrivileges", exc.errno or 0) from None


def _seccomp(bpf: bytes) -> None:
    try:
        sc.seccomp_set_mode_filter(bpf)
    except OSError as exc:
        raise step_error("load seccomp filter", exc) from None
