"""kill -9 of every uspawn process while a machine runs (issue 17).

What happens, and what this test holds uspawn to: the machine is torn down, and
nothing of it is left once any uspawn command runs next.

- Its init dies with its runtime (PR_SET_PDEATHSIG); the pid namespace takes
  every process of the machine with it; the network namespace its veth; the
  flocks on the name, the UID range and the network leases drop with their
  holders, so none of them blocks a new start.
- No process is left to remove the record, the (empty) cgroup directories and
  the nft rules of the published ports: the next `list`, `status`, `stop` or
  start does (machine/reclaim.py). The test shows they are there after the kill,
  and gone after one `uspawn stop NAME` (which then says the machine does not run).

Every uspawn process of the test's state directory is stopped first and then
killed, so none of them can clean up in between: the worst case, not a race.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from conftest import Runner, cgroup_dirs, mounts_under
from fixtures.busybox_machine import BootFifo
from test_reboot import notify_binary, tree  # noqa: F401 (fixtures)
from waits import wait_exit

from uspawn.net import links as netsetup


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uspawn_processes(state: Path) -> list[int]:
    """Every process whose command line names this state directory (the supervisor,
    the guardian, anything else uspawn left running for it)."""
    needle = f"\0--root\0{state}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = b"\0" + f.read()
        except OSError:
            continue
        if needle in cmdline and b"uspawn" in cmdline:
            found.append(int(entry))
    return found


def _rules(name: str) -> list[dict[str, object]]:
    return [r for r in netsetup.list_rules() if r.get("comment") == f"uspawn:{name}"]


def _links() -> list[str]:
    return sorted(os.listdir("/sys/class/net"))


def test_kill9_of_every_uspawn_process_tears_down_and_nothing_stays(
        uspawn: Runner, tree: tuple[Path, BootFifo]) -> None:  # noqa: F811
    rootfs, fifo = tree
    name, port = "killnine", _free_port()
    boot = ("boot", "-D", str(rootfs), "-M", name, "--detach", "--lxcfs=no",
            "--network=veth", "-p", f"tcp:{port}:80")
    r = uspawn.run(*boot, timeout=90)
    assert r.returncode == 0, r.stderr
    fifo.wait_boot()
    record = (uspawn.state / "containers" / name / "state.json").read_text()
    init = int(record.split('"pid": ', 1)[1].split(",", 1)[0])
    procs = _uspawn_processes(uspawn.state)
    assert len(procs) >= 2, procs  # the supervisor and its guardian
    assert _rules(name) and f"ve-{name}" in _links()

    for pid in procs:  # none of them runs again: no cleanup in between
        os.kill(pid, signal.SIGSTOP)
    for pid in procs:
        os.kill(pid, signal.SIGKILL)
    wait_exit([*procs, init], what="uspawn's processes and the machine's init")

    # What the kernel could not remove (the veth goes with the network namespace,
    # asynchronously: checked after the reclaim):
    assert (uspawn.state / "containers" / name / "state.json").exists()
    assert cgroup_dirs(name) != []
    assert _rules(name) != []

    r = uspawn.run("stop", name)
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert f"no running container named '{name}'" in r.stderr, r.stderr
    assert not (uspawn.state / "containers" / name).exists()
    assert cgroup_dirs(name) == []
    assert _rules(name) == [] and f"ve-{name}" not in _links()
    assert mounts_under(rootfs) == [] and mounts_under(uspawn.state) == []

    # Same name, same port: nothing of the killed machine is in the way.
    r = uspawn.run(*boot, timeout=90)
    assert r.returncode == 0, r.stderr
    fifo.wait_boot()
    r = uspawn.run("stop", name, "--timeout", "10", timeout=60)
    assert r.returncode == 0, r.stderr
    assert cgroup_dirs(name) == [] and _rules(name) == []
    assert not (uspawn.state / "containers" / name).exists()
