"""End-to-end networking of `uspawn run`: veth, bridge, published ports.

Only loopback, the container address range uspawn leases (10.252.0.0/16) and
a bridge the test creates are used; every object is checked gone afterwards.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner

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
                     "httpd -f -p 80 -h /www & echo up; while :; do sleep 0.1; done",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return p


def _get(url: str, timeout: float = 3) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _stop(p: subprocess.Popen[str]) -> None:
    p.terminate()  # forwarded; the payload's trap exits, uspawn cleans up
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _gone(name: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"ve-{name}" not in _links() and f"uspawn:{name}" not in _nft_rules():
            return True
        time.sleep(0.05)
    return False


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
    assert _gone("webv")
    assert not list(Path("/run/uspawn/net/ports").glob("tcp-18181.lock"))


def test_network_cleanup_after_sigkill_of_uspawn(uspawn: Runner, rootfs: Path) -> None:
    p = _serve(uspawn, rootfs, "webk", "--network=veth", "--port", "18383:80")
    assert p.stdout is not None
    p.stdout.readline()
    assert p.stdout.readline().strip() == "up"
    assert "uspawn:webk" in _nft_rules()
    p.kill()
    p.wait()
    # The guardian removes the stale rules and leases once the init is gone.
    assert _gone("webk")
    assert not list(Path("/run/uspawn/net/ports").glob("tcp-18383.lock"))


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
