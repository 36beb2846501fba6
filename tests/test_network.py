"""End-to-end networking of `uspawn run`: veth, bridge, published ports.

Only loopback, the container address range uspawn leases (10.252.0.0/16) and
a bridge the test creates are used; every object is checked gone afterwards.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner
from waits import children, open_pidfds, wait_pidfds

BRIDGE = "usptestbr1"


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _nft_rules() -> str:
    r = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True)
    return r.stdout


def _serve(uspawn: Runner, rootfs: Path, name: str, *net: str,
           body: str = "hi") -> subprocess.Popen[str]:
    (rootfs / "www").mkdir(exist_ok=True)
    (rootfs / "www" / "index.html").write_text(body)
    p = uspawn.popen("run", "-D", str(rootfs), "-M", name, *net, "--", "sh", "-c",
                     "trap 'exit 0' TERM; ip -4 -o addr show host0 | awk '{print $4}'; "
                     # Without -f, busybox httpd listens before it daemonizes: once it
                     # returns, the port answers (no retry loop on the client side).
                     "httpd -p 80 -h /www && echo up; while :; do sleep 1000 & wait $!; done",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return p


def _get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def _stop(p: subprocess.Popen[str]) -> None:
    p.terminate()  # forwarded; the payload's trap exits, uspawn cleans up
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def test_veth_and_published_port(uspawn: Runner, rootfs: Path) -> None:
    p = _serve(uspawn, rootfs, "webv", "--network=veth", "--port", "18181:80", body="veth-ok")
    assert p.stdout is not None
    try:
        addr = p.stdout.readline().strip()
        assert p.stdout.readline().strip() == "up"
        ip = addr.split("/")[0]
        assert ip.startswith("10.252.")
        assert _get(f"http://{ip}/") == "veth-ok"
        assert _get("http://127.0.0.1:18181/") == "veth-ok"
        assert "ve-webv" in _links()
        assert "uspawn:webv" in _nft_rules()
        rows = json.loads(uspawn.run("list", "--json").stdout)
        assert rows[0]["addresses"] == [addr]
    finally:
        _stop(p)
    assert p.returncode == 0
    # The runtime tears down the veth, the rules and the leases before it exits.
    _assert_net_gone("webv", 18181)


def _sigkill_serving(uspawn: Runner, rootfs: Path, name: str, port: int,
                     ) -> tuple[subprocess.Popen[str], list[int]]:
    """A container publishing port, its uspawn killed -9 (not reaped: the caller
    decides when); returns the process and pidfds of its children (the guardian)."""
    p = _serve(uspawn, rootfs, name, "--network=veth", "--port", f"{port}:80")
    assert p.stdout is not None
    p.stdout.readline()
    assert p.stdout.readline().strip() == "up"
    assert f"uspawn:{name}" in _nft_rules()
    assert list(Path("/run/uspawn/net/ports").glob(f"tcp-{port}.lock"))
    kids = open_pidfds(children(p.pid))
    p.kill()
    return p, kids


def _assert_net_gone(name: str, port: int) -> None:
    assert f"ve-{name}" not in _links()
    assert f"uspawn:{name}" not in _nft_rules()
    assert not list(Path("/run/uspawn/net/ports").glob(f"tcp-{port}.lock"))


def test_network_cleanup_after_sigkill_of_uspawn(uspawn: Runner, rootfs: Path) -> None:
    p, kids = _sigkill_serving(uspawn, rootfs, "webk", 18383)
    p.wait()
    # The guardian removes the stale rules and leases once the runtime and the init are
    # gone, then exits: waiting for it (pidfd) is waiting for the cleanup, no polling.
    wait_pidfds(kids)
    _assert_net_gone("webk", 18383)
    # Its address lease too (the directory is host-wide: others' leases are theirs).
    assert _addr_leases_of("webk") == []


def _addr_leases_of(name: str) -> list[str]:
    found = []
    for lock in Path("/run/uspawn/net/addr").glob("*.lock"):
        try:
            text = lock.read_text()
        except FileNotFoundError:
            continue
        try:
            record = json.loads(text) if text else {}
        except ValueError:
            record = {}  # being written by another start
        if isinstance(record, dict) and record.get("name") == name:
            found.append(f"{lock.name}: {text}")
    return found


def test_port_of_a_dead_unreaped_uspawn_is_taken_over(uspawn: Runner, rootfs: Path,
                                                      tmp_path: Path) -> None:
    """kill -9 of uspawn, its parent not reaping it yet (a shell's background job): the
    zombie's records own nothing, so its guardian releases the port, and a new
    container on that port starts instead of "already published"."""
    second = tmp_path / "second"
    subprocess.run(["cp", "-a", str(rootfs), str(second)], check=True)
    p, kids = _sigkill_serving(uspawn, rootfs, "webz", 18484)
    try:
        # The zombie stays until p.wait() below: both the guardian's cleanup and the
        # new start see its record with the same pid and start time.
        with open(f"/proc/{p.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("Z", "R", "D", "S")
        r = uspawn.run("run", "-D", str(second), "-M", "webz2", "--network=veth", "--port",
                       "18484:80", "--", "true")
        assert r.returncode == 0, r.stderr
        with open(f"/proc/{p.pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"  # still unreaped
        wait_pidfds(kids)
    finally:
        p.wait()
    _assert_net_gone("webz", 18484)
    _assert_net_gone("webz2", 18484)


def test_lease_of_a_zombie_owner_is_reclaimed(tmp_path: Path) -> None:
    """NetPool alone (its own directory): the owner took the port and died unreaped."""
    from uspawn.net.pool import NetPool

    port = _free_port()
    pid = os.fork()
    if pid == 0:  # the owner: holds the flock and records itself, then dies
        try:
            NetPool(str(tmp_path)).reserve_ports("dead", [("tcp", port, 80)])
        finally:
            os._exit(0)
    try:
        pidfd = os.pidfd_open(pid)
        wait_pidfds([pidfd])  # exited, not reaped: a zombie
        lock = tmp_path / "ports" / f"tcp-{port}.lock"
        assert json.loads(lock.read_text())["pid"] == pid
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
        taken = NetPool(str(tmp_path)).reserve_ports("new", [("tcp", port, 80)])
        assert [t.port for t in taken] == [port]
        assert json.loads(lock.read_text())["name"] == "new"
        for t in taken:
            t.release()
    finally:
        os.waitpid(pid, 0)


# exit(2) (this thread only, not the group), set_tid_address(2), futex(2)
_SYSCALLS = {"x86_64": (60, 218, 202), "aarch64": (93, 96, 98)}


def test_lease_flock_of_an_exiting_owner_is_waited_for(tmp_path: Path) -> None:
    """The owner's main thread is gone (zombie, exiting) while another of its threads
    still holds the fd table, so the flock: the new start waits on the owner's pidfd
    (readable once the whole process exited and its flocks dropped), then takes the
    port, instead of refusing. That is the window between kill -9 and the lock release."""
    import ctypes
    import platform
    import threading

    from uspawn.net.pool import NetPool

    nrs = _SYSCALLS.get(platform.machine())
    if nrs is None:
        pytest.skip(f"syscall numbers unknown on {platform.machine()}")
    nr_exit, nr_set_tid_address, nr_futex = nrs
    port = _free_port()
    gate_r, gate_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            NetPool(str(tmp_path)).reserve_ports("dying", [("tcp", port, 80)])
            # No pidfd tells a thread-group leader's exit apart (it waits for the
            # group), but the kernel clears and futex-wakes the leader's
            # clear_child_tid word in its exit, after marking it exiting: the
            # other thread waits on that, then says so.
            word = ctypes.c_int(1)
            libc.syscall(nr_set_tid_address, ctypes.byref(word))

            def watch() -> None:
                while word.value:
                    libc.syscall(nr_futex, ctypes.byref(word), 0, 1, None)  # FUTEX_WAIT
                os.write(ready_w, b"1")
                os.read(gate_r, 1)

            threading.Thread(target=watch).start()
            libc.syscall(nr_exit, 0)  # the main thread exits; the other one waits
        finally:
            os._exit(0)
    os.close(ready_w)
    owner = os.pidfd_open(pid)
    try:
        assert os.read(ready_r, 1) == b"1"
        fields = _proc_stat(pid)
        assert fields[0] == "Z" or int(fields[6]) & 0x4, fields  # zombie or PF_EXITING
        result: list[object] = []

        owner_gone: list[bool] = []

        def take() -> None:
            try:
                result.extend(NetPool(str(tmp_path)).reserve_ports("new", [("tcp", port, 80)]))
            except Exception as exc:
                result.append(exc)
            # Taken only after the owner's last thread exited (its flock dropped):
            # the owner lives until the gate below opens, whenever this runs.
            owner_gone.append(bool(select.select([owner], [], [], 0)[0]))

        taker = threading.Thread(target=take)
        taker.start()
        assert result == []  # nothing decided while the owner's flock is held ...
        os.write(gate_w, b"x")  # ... until its last thread exits
        taker.join(10)
        assert not taker.is_alive()
        assert [getattr(t, "port", t) for t in result] == [port]
        assert owner_gone == [True]  # waited for the owner, no refusal, no break-in
        lock = tmp_path / "ports" / f"tcp-{port}.lock"
        assert json.loads(lock.read_text())["name"] == "new"
        for t in result:
            t.release()  # type: ignore[attr-defined]
    finally:
        os.write(gate_w, b"x")
        os.waitpid(pid, 0)
        for fd in (gate_r, gate_w, ready_r, owner):
            os.close(fd)


def _proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def test_lease_of_a_live_owner_is_refused(tmp_path: Path) -> None:
    from uspawn.base.errors import StateError
    from uspawn.net.pool import NetPool

    port = _free_port()
    held = NetPool(str(tmp_path)).reserve_ports("live", [("tcp", port, 80)])
    try:
        with pytest.raises(StateError, match=f"tcp/{port} is already published by container live"):
            NetPool(str(tmp_path)).reserve_ports("new", [("tcp", port, 80)])
    finally:
        for t in held:
            t.release()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def bridge() -> Iterator[str]:
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    subprocess.run(["ip", "addr", "add", "10.253.77.1/24", "dev", BRIDGE], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    yield BRIDGE
    subprocess.run(["ip", "link", "del", BRIDGE], check=False)


def test_bridge_neighbours_and_isolation(uspawn: Runner, rootfs: Path, tmp_path: Path,
                                         bridge: str) -> None:
    second = tmp_path / "second"
    subprocess.run(["cp", "-a", str(rootfs), str(second)], check=True)
    a = _serve(uspawn, rootfs, "bra", f"--network=bridge:{bridge}", body="from-a")
    assert a.stdout is not None
    try:
        ip_a = a.stdout.readline().strip().split("/")[0]
        assert a.stdout.readline().strip() == "up"
        assert ip_a.startswith("10.253.77.")
        # busybox's static wget crashes in glibc's NSS code: talk HTTP with nc.
        fetch = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip_a} 80 | tail -n 1"
        r = uspawn.run("run", "-D", str(second), "-M", "brb", f"--network=bridge:{bridge}",
                       "--", "sh", "-c", fetch)
        assert r.returncode == 0 and r.stdout.strip() == "from-a", r.stderr
        r = uspawn.run("run", "-D", str(second), "-M", "brc", "--", "sh", "-c", fetch)
        assert r.stdout.strip() == ""  # private network: nothing reachable
    finally:
        _stop(a)


def test_port_collision_is_clear_and_leaves_nothing(uspawn: Runner, rootfs: Path,
                                                    tmp_path: Path) -> None:
    second = tmp_path / "second"
    subprocess.run(["cp", "-a", str(rootfs), str(second)], check=True)
    p = _serve(uspawn, rootfs, "pa", "--network=veth", "--port", "18282:80")
    assert p.stdout is not None
    try:
        p.stdout.readline()
        assert p.stdout.readline().strip() == "up"
        r = uspawn.run("run", "-D", str(second), "-M", "pb", "--network=veth", "--port",
                       "18282:80", "--", "true")
        assert r.returncode == 125
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "tcp/18282" in lines[0] and "pa" in lines[0], r.stderr
        assert "ve-pb" not in _links()
        assert not (uspawn.state / "containers" / "pb").exists()
        r = uspawn.run("run", "-D", str(second), "--port", "1:2", "--", "true")
        assert r.returncode == 2 and "--network=veth" in r.stderr
    finally:
        _stop(p)
