"""Build the built-in default rootfs: a tiny tree around Debian's busybox-static.

`uspawn mkrootfs busybox DIR` (and the tests and benchmarks) use it so a fresh
machine can run a container without finding an image by hand. The tree is
owned by host root (IDs 0..65535 layout), like a tree unpacked from a tarball.
"""

from __future__ import annotations

import os
import shutil
import subprocess

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

PASSWD = """root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
"""
GROUP = """root:x:0:
daemon:x:1:
tty:x:5:
users:x:100:user
nogroup:x:65534:
user:x:1000:
"""
OS_RELEASE = """NAME="uspawn busybox"
ID=uspawn-busybox
PRETTY_NAME="uspawn busybox rootfs"
"""


class RootfsError(Exception):
    pass


def find_busybox() -> str:
    for cand in BUSYBOX_CANDIDATES:
        if os.path.isfile(cand):
            # A dynamically linked busybox would need the host's libc inside.
            with open(cand, "rb") as f:
                head = f.read(4096)
            if b"ld-linux" not in head and b"/lib64/ld" not in head:
                return cand
    raise RootfsError(
        "no static busybox found (looked at /bin/busybox, /usr/bin/busybox); "
        "hint: apt-get install busybox-static"
    )


def build_busybox_rootfs(dest: str) -> None:
    """Create (or refresh) a busybox rootfs at dest. Idempotent."""
    busybox = find_busybox()
    # The tree's parent stays private (0700): with idmapped mounts, files the
    # container's root creates are host-root-owned on disk (docs/SECURITY.md).
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
        os.chmod(parent, 0o700)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "tmp",
              "run", "root", "home/user", "var/tmp", "var/log", "mnt"):
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    os.chmod(os.path.join(dest, "tmp"), 0o1777)
    os.chmod(os.path.join(dest, "var/tmp"), 0o1777)
    os.chmod(os.path.join(dest, "root"), 0o700)
    os.chown(os.path.join(dest, "home/user"), 1000, 1000)
    target = os.path.join(dest, "bin/busybox")
    tmp = target + ".new"
    shutil.copy2(busybox, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    applets = subprocess.run(
        [busybox, "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = os.path.join(dest, applet)
        if os.path.lexists(link):
            continue
        depth = applet.count("/")
        os.symlink("../" * depth + "bin/busybox", link)
    for name, text in (("etc/passwd", PASSWD), ("etc/group", GROUP),
                       ("etc/os-release", OS_RELEASE), ("etc/hostname", "busybox\n")):
        with open(os.path.join(dest, name), "w") as f:
            f.write(text)
