"""Signal numbers and handlers without the `signal` module.

`import signal` pulls in `enum` (it wraps every constant in an IntEnum), ~3 ms
of every container start. The C module behind it, `_signal`, has the same
functions and plain int constants; this shim gives them types.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found, unused-ignore]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Handler = Callable[[int, object], None] | int | None

SIGHUP: int = _signal.SIGHUP
SIGINT: int = _signal.SIGINT
SIGQUIT: int = _signal.SIGQUIT
SIGKILL: int = _signal.SIGKILL
SIGUSR1: int = _signal.SIGUSR1
SIGUSR2: int = _signal.SIGUSR2
SIGPIPE: int = _signal.SIGPIPE
SIGTERM: int = _signal.SIGTERM
SIGCHLD: int = _signal.SIGCHLD
SIGCONT: int = _signal.SIGCONT
SIGTSTP: int = _signal.SIGTSTP
SIGTTIN: int = _signal.SIGTTIN
SIGTTOU: int = _signal.SIGTTOU
SIGXFSZ: int = _signal.SIGXFSZ
SIGWINCH: int = _signal.SIGWINCH
SIGRTMIN: int = _signal.SIGRTMIN
SIG_DFL: int = _signal.SIG_DFL
SIG_IGN: int = _signal.SIG_IGN


def set_handler(sig: int, handler: Handler) -> Handler:
    """signal.signal(): install handler, return the previous one."""
    old: Handler = _signal.signal(sig, handler)
    return old
