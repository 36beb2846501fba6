"""`uspawn-runc exec`: a new process in a running (or created) OCI container, runc's flags.

The process comes from `--process FILE` (an OCI process JSON, what conmon
passes) or from the trailing arguments plus --cwd/--env/--user/--cap. Joining
is done by uspawn.engine.enter (non-dumpable before setns; container seccomp).
With --detach the runtime exits once the process exec'd; it then belongs to
the caller's subreaper (conmon), and its pid goes to --pid-file.
"""

from __future__ import annotations

import json
import os

from uspawn.base.errors import SpecError, UsageError
from uspawn.engine import spec as S
from uspawn.engine.defaults import DEFAULT_PATH
from uspawn.engine.enter import JoinRequest, enter
from uspawn.kernel import caps
from uspawn.oci import lifecycle as oci

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable


def _process(ns: types.SimpleNamespace) -> S.Process:
    if ns.process:
        try:
            with open(ns.process, "rb") as f:
                raw = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise SpecError(f"--process {ns.process}: {exc}") from None
        proc = S.decode(S.Process, raw, "process")
        if not proc.args:
            raise SpecError(f"--process {ns.process}: args is empty")
        return proc
    if not ns.args:
        raise UsageError("exec: no command given", "uspawn-runc exec ID CMD [ARGS...]")
    proc = S.Process(args=list(ns.args), terminal=ns.tty, cwd=ns.cwd or "/",
                     env=[f"PATH={DEFAULT_PATH}"])
    if ns.user:
        u, _, g = ns.user.partition(":")
        try:
            proc.user = S.User(uid=int(u), gid=int(g or u))
        except ValueError:
            raise UsageError(f"--user {ns.user!r}: expected UID[:GID]") from None
    if ns.cap:
        proc.capabilities = S.Capabilities(bounding=list(ns.cap), effective=list(ns.cap),
                                           permitted=list(ns.cap))
    return proc


def _preserve_fds(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise UsageError(f"--preserve-fds {value!r}: expected a number of fds (0 or more)")
    return n


def _kill_started(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def exec_command(root: str, ns: types.SimpleNamespace, log: Callable[[str], None]) -> int:
    rec = oci.Record(root, oci.check_id(ns.id))
    status = rec.status()
    # runc allows a created container too: its namespaces exist, the init waits.
    allowed = ("created", "running", "paused") if ns.ignore_paused else ("created", "running")
    if status not in allowed:
        if status == "stopped":
            raise oci.OciError(f"exec {ns.id}: container not running")
        raise oci.OciError(f"cannot exec in container {ns.id!r}: it is {status}",
                           "resume it first, or pass --ignore-paused")
    oci.check_pid_file(ns.pid_file)  # before anything runs (after is too late)
    preserve = _preserve_fds(ns.preserve_fds)
    proc = _process(ns)
    if ns.cwd:
        proc.cwd = ns.cwd
    if not proc.cwd.startswith("/"):
        # runc refuses it too; the joiner resolves the cwd inside the root
        # (linux/workdir.py), so this is only the early, clearer refusal.
        raise SpecError(f"process.cwd {proc.cwd!r}: not an absolute path",
                        "give an absolute path inside the container, e.g. /app")
    for e in ns.env:
        key = e.split("=", 1)[0]
        proc.env = [x for x in proc.env if not x.startswith(key + "=")] + [e]
    tty = proc.terminal or ns.tty
    if tty and ns.detach and not ns.console_socket:
        raise oci.OciError("exec --tty --detach needs --console-socket")
    spec = oci.load_bundle(str(rec.data.get("bundle")), log)
    bpf = oci.seccomp_for(spec)
    user = proc.user or S.User()
    c = proc.capabilities or (spec.process.capabilities if spec.process else None)
    bounding = capsets = None
    if c is not None:
        try:
            bounding = caps.mask(c.bounding)
            capsets = (caps.mask(c.effective), caps.mask(c.permitted),
                       caps.mask(c.inheritable), caps.mask(c.ambient))
        except caps.CapabilityError as exc:
            raise SpecError(f"process.capabilities: {exc}") from None

    def started(pid: int, master: int) -> None:
        try:
            oci.write_pid_file(ns.pid_file, pid)
        except oci.OciError:
            _kill_started(pid)  # nobody would know its pid: do not leave it behind
            raise
        if master >= 0 and ns.console_socket:
            oci.send_console(ns.console_socket, master)

    return enter(rec.data, JoinRequest(
        argv=list(proc.args), tty=tty, env_replace=list(proc.env), cwd=proc.cwd,
        uid=user.uid, gid=user.gid,
        additional_gids=list(user.additional_gids) + [int(g) for g in ns.additional_gids],
        seccomp_bpf=bpf, bounding=bounding, caps=capsets,
        no_new_privs=proc.no_new_privileges or ns.no_new_privs, detach=ns.detach,
        on_started=started, preserve_fds=preserve,
        console_size=((proc.console_size.height, proc.console_size.width)
                      if proc.console_size is not None else None)))
