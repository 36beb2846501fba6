"""`uspawn enable NAME` / `disable NAME`: boot a machine with the host, as `machinectl enable`.

Enabling is two symlinks, the ones `systemctl enable` would make:

    uspawn-machines.target.wants/uspawn@NAME.service -> .../uspawn@.service
    multi-user.target.wants/uspawn-machines.target   -> .../uspawn-machines.target

uspawn ships its own target (dist/systemd/uspawn-machines.target) rather than
systemd's machines.target: on Debian machines.target comes with
systemd-container (nspawn), which a uspawn host need not have, and a target of
its own lets `systemctl stop uspawn-machines.target` stop uspawn's machines
only. The target is enabled along with the first machine, as `machinectl
enable` enables machines.target; `disable` leaves it (an empty target costs
nothing). USPAWN_UNIT_DIR moves the unit directory (tests; packagers' staging
trees); there the unit files must be in that directory itself.
"""

from __future__ import annotations

import os
import subprocess

from uspawn.base.errors import StateError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

UNIT_DIR = "/etc/systemd/system"
ENV_UNIT_DIR = "USPAWN_UNIT_DIR"
TEMPLATE = "uspawn@.service"
TARGET = "uspawn-machines.target"
# systemd's search path for system units, most specific first (systemd.unit(5)).
SEARCH_PATH = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
               "/usr/lib/systemd/system", "/lib/systemd/system")
INSTALL_HINT = ("install the units first: cp dist/systemd/uspawn@.service "
                "dist/systemd/uspawn-machines.target /etc/systemd/system/")


def unit_dir() -> tuple[str, bool]:
    """(the directory the symlinks go in, whether it is the host's own)."""
    env = os.environ.get(ENV_UNIT_DIR)
    return (env, False) if env else (UNIT_DIR, True)


def find_unit(name: str, directory: str, host: bool) -> str:
    """Where unit file `name` is installed (the symlink's target)."""
    for d in SEARCH_PATH if host else (directory,):
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return path
    where = ", ".join(SEARCH_PATH) if host else directory
    raise StateError(f"enable: unit {name} is not installed (looked in {where})", INSTALL_HINT)


def _link(target: str, link: str, out: TextIO) -> None:
    """link -> target, replacing a symlink that points elsewhere; never a real file."""
    try:
        if os.readlink(link) == target:
            return
        os.unlink(link)
    except FileNotFoundError:
        pass
    except OSError:  # EINVAL: a real file, an admin's own unit: leave it
        raise StateError(f"enable: {link} exists and is not a symlink",
                         "remove or rename it by hand") from None
    os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
    os.symlink(target, link)
    out.write(f"Created symlink {link} \N{RIGHTWARDS ARROW} {target}.\n")


def _reload(host: bool) -> None:
    """systemctl daemon-reload, as `systemctl enable` does, when systemd runs the host."""
    if host and os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)


def enable(name: str, out: TextIO) -> int:
    from uspawn.machine import settings

    settings.machine_tree(name)  # checks the name; the tree must exist, as for machinectl
    directory, host = unit_dir()
    template = find_unit(TEMPLATE, directory, host)
    target = find_unit(TARGET, directory, host)
    _link(template, os.path.join(directory, f"{TARGET}.wants", f"uspawn@{name}.service"), out)
    _link(target, os.path.join(directory, "multi-user.target.wants", TARGET), out)
    _reload(host)
    return 0


def disable(name: str, out: TextIO) -> int:
    from uspawn.machine.claims import check_name

    check_name(name)  # the tree may be gone already: only the name is checked
    directory, host = unit_dir()
    link = os.path.join(directory, f"{TARGET}.wants", f"uspawn@{name}.service")
    if not os.path.islink(link):
        return 0  # not enabled (or an admin's own file, which is not ours to remove)
    os.unlink(link)
    out.write(f"Removed \"{link}\".\n")
    _reload(host)
    return 0
