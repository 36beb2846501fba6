"""Files of a container tree read on the host (as host root, so treated as hostile)."""

from __future__ import annotations

import os

from uspawn.base.errors import SpecError


def read_in_root(root: str, path: str) -> str:
    """A tree's file (at most 1 MiB) opened inside the tree as host root: resolved
    with RESOLVE_IN_ROOT, a symlink never followed ("" then, as for a missing
    file), and only a regular file read (a FIFO would block, a device node would
    run its driver)."""
    import stat

    from uspawn.kernel import mounts

    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pfd = mounts.open_in_root(rootfd, path, os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return ""
    finally:
        os.close(rootfd)
    try:
        if stat.S_ISLNK(os.fstat(pfd).st_mode):
            return ""  # never followed, as before
        fd = mounts.reopen_regular(pfd)
        if fd is None:
            raise SpecError(f"rootfs {root}: {path} is not a regular file",
                            "a tree's /etc files must be plain files")
    finally:
        os.close(pfd)
    with os.fdopen(fd) as f:
        return f.read(1 << 20)


def entries(root: str, path: str) -> list[list[str]]:
    """The colon-separated lines of a tree's /etc/passwd or /etc/group."""
    return [ln.split(":") for ln in read_in_root(root, path).splitlines()]
