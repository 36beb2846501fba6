"""The engine request: everything a container start needs besides its Spec.

Each front (`run`, `boot`, `uspawn-runc create`/`run`) builds the Spec and one
Request in one function; the Request is complete before the engine starts and
read-only afterwards (assigning a field raises). `plan.build(spec, request)`
turns both into the host and init plans. What changes while a container runs
(its pid, its undo list) lives on the runtime's Container, not here.
"""

from __future__ import annotations

from uspawn.engine.spec import Model

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from uspawn.state.store import Lease, NameClaim

    Hook = tuple[str, list[str], list[str], int | None]  # path, args, env, timeout
    Undo = Callable[[], None]

# How the init goes from CREATED to execve.
START_AUTO = "auto"  # at once (run, boot, uspawn-runc run): no START round trip
START_MESSAGE = "message"  # on the runtime's START message
START_FIFO = "fifo"  # when `uspawn-runc start` opens the exec FIFO (runc's exec.fifo)


class FrozenModel(Model):
    """A Model whose fields cannot be assigned after construction."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_sealed"):
            raise AttributeError(f"{type(self).__name__}.{name} is read-only once built")
        object.__setattr__(self, name, value)


class Request(FrozenModel):
    name: str = ""
    # Held for the container's life and released by the runtime (or its guardian).
    claim: NameClaim | None = None
    range_lease: Lease | None = None
    ownership: str = "off"  # map | chown | auto | off
    seccomp_bpf: bytes | None = None
    start: str = START_MESSAGE
    # OCI `create`: the init outlives the runtime (no PDEATHSIG) and waits on this FIFO.
    detached: bool = False
    exec_fifo: str | None = None
    cgroup_path: str | None = None  # OCI linux.cgroupsPath, resolved and checked
    # Limits with no linux.resources field (systemd's MemoryHigh -> memory.high,
    # IOWeight -> io.weight), as cgroups.set_limits keys: set with the others,
    # before the first process enters the cgroup.
    cgroup_limits: tuple[tuple[str, int | str | bool], ...] = ()
    delegate_cgroup: bool = False  # hand the cgroup2 directory to container root (systemd)
    # Host-side hooks once the init exists (OCI prestart, createRuntime),
    # and in the init before execve (startContainer).
    create_hooks: tuple[Hook, ...] = ()
    # OCI createContainer: in the container's mount namespace before pivot_root.
    container_hooks: tuple[Hook, ...] = ()
    start_hooks: tuple[Hook, ...] = ()
    state_json: Callable[[int, str], str] | None = None
    # Host-side network setup once the init's network namespace exists (given the
    # init's pid and the runtime's undo list to append to, as it goes). `undo` is
    # what the front already prepared (address and port leases).
    network_setup: Callable[[int, list[Undo]], None] | None = None
    undo: tuple[Undo, ...] = ()
    stdio: tuple[int, int, int] | None = None  # the init's fds 0-2 (a stdio relay)
    close_in_child: tuple[int, ...] = ()  # ours, never the container's
    preserve_fds: int = 0  # OCI --preserve-fds
    # An open user namespace (nsfs fd) the init joins instead of creating one with
    # the spec's maps, which must be that namespace's maps. Chosen by the front
    # (uspawn-runc-pods: the pod sandbox's, verified), never by config.json, whose
    # user namespace path stays refused (plan._UNJOINABLE). The caller closes it.
    join_userns_fd: int = -1
    new_keyring: bool = True
    signal_map: dict[int, int] = {}  # signals to the runtime -> to the init
    # A stop signal to a foreground runtime (console.STOP_SIGNALS): send kill_signal
    # (0: the signal received, through signal_map), SIGKILL the init stop_timeout
    # seconds later or at a second one. < 0: forward only, never kill (OCI, boot).
    stop_timeout: float = -1.0
    kill_signal: int = 0
    verbose: bool = False
    debug: bool = False
    log: Callable[[str], None] | None = None

    def say(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
