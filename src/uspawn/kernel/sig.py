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


def set_wakeup_fd(fd: int) -> int:
    """signal.set_wakeup_fd(): the C-level handler writes each signal's number to fd
    (non-blocking; a full pipe drops the byte silently); returns the previous fd."""
    old: int = _signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    return old


def parse_signal(value: str) -> int:
    v = value.upper().removeprefix("SIG")
    # isascii: "²".isdigit() is true, int("²") raises ValueError.
    if v.isascii() and v.isdigit():
        n = int(v)
    elif v.startswith("RTMIN"):
        off = v[5:].lstrip("+")
        n = SIGRTMIN + (int(off) if off.isascii() and off.isdigit() else 0)
    else:
        import signal as _signal_mod  # names only; not on the start path

        try:
            n = int(getattr(_signal_mod.Signals, "SIG" + v))
        except AttributeError:
            raise _usage(f"unknown signal {value!r}") from None
    if not 0 < n < 65:
        raise _usage(f"signal {value!r} out of range")
    return n


def _usage(message: str) -> Exception:
    from uspawn.base.errors import UsageError  # only on bad input

    return UsageError(message)
