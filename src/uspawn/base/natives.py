"""uspawn's compiled helpers: where they are, and whether root may run them.

Only `uspawn-monitor` so far (src/uspawn/native/monitor.c; machine/monitor.py).
scripts/setup.sh builds it next to the virtualenv's interpreter; a package would
put it in a libexec directory. Found here so that both the machine front (which
execs it) and `uspawn doctor` (which reports it) ask the same question.
"""

from __future__ import annotations

import os
import sys

MONITOR = "uspawn-monitor"
LIBEXEC = ("/usr/local/libexec/uspawn", "/usr/libexec/uspawn")


def find(name: str) -> str | None:
    """The first `name` next to the interpreter or in LIBEXEC that root may run: a
    regular, executable, root-owned file that nobody else can write."""
    import stat

    for d in (os.path.dirname(sys.executable), *LIBEXEC):
        path = os.path.join(d, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022 \
                and st.st_mode & 0o100:
            return path
    return None
