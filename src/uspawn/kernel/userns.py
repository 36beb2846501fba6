"""User namespace ID maps, written by the parent (real root on the host)."""

from __future__ import annotations

import os


def format_map(mappings: list[tuple[int, int, int]]) -> str:
    return "".join(f"{inside} {outside} {size}\n" for inside, outside, size in mappings)


def write_id_maps(pid: int, uid_map: list[tuple[int, int, int]],
                  gid_map: list[tuple[int, int, int]]) -> None:
    """Write /proc/PID/{uid,gid}_map (each is written exactly once, in one write).

    As root in the parent namespace we may map any IDs and keep setgroups
    allowed: the container needs setgroups() for its own users, and the
    CVE-2014-8989 concern (dropping groups to gain access) does not apply
    when the mapping is written by a privileged parent.
    """
    for name, mapping in (("uid_map", uid_map), ("gid_map", gid_map)):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, format_map(mapping).encode())
        finally:
            os.close(fd)
