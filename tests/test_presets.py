"""Unit tier: command-line parsing helpers and the `run` preset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from uspawn.base.errors import SpecError, UsageError
from uspawn.machine import presets


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("pick", ("pick", 0, 65536)),
        ("no", ("no", 0, 0)),
        ("524288", ("fixed", 524288, 65536)),
        ("0x80000:1000", ("fixed", 0x80000, 1000)),
    ],
)
def test_parse_private_users(value: str, expected: tuple[str, int, int]) -> None:
    assert presets.parse_private_users(value) == expected


@pytest.mark.parametrize("value", ["abc", "0", "-5", "4294967295:2"])
def test_parse_private_users_rejects(value: str) -> None:
    with pytest.raises(UsageError, match="--private-users"):
        presets.parse_private_users(value)


def test_parse_bind(tmp_path: Path) -> None:
    src, dst, opts = presets.parse_bind(f"{tmp_path}:/data:ro", False, "--bind")
    assert (src, dst) == (str(tmp_path), "/data")
    assert "ro" in opts and "rbind" in opts and "nosuid" in opts
    # Not idmapped unless asked (systemd-nspawn's default): container root is not
    # host root on the source.
    assert not {"idmap", "x-uspawn-idmap-auto"} & set(opts)
    _, dst2, opts2 = presets.parse_bind(str(tmp_path), True, "--bind-ro")
    assert dst2 == str(tmp_path) and "ro" in opts2
    with pytest.raises(UsageError, match="unknown option"):
        presets.parse_bind(f"{tmp_path}:/x:bogus", False, "--bind")
    with pytest.raises(UsageError, match="absolute"):
        presets.parse_bind("rel:/x", False, "--bind")


def test_parse_bind_idmap_only_on_request(tmp_path: Path) -> None:
    src = tmp_path / "closed"
    src.mkdir(mode=0o700)
    warnings: list[str] = []
    _, _, opts = presets.parse_bind(f"{src}:/d:idmap", False, "--bind", warnings.append)
    assert "idmap" in opts and warnings == []  # pytest's tmp dirs are 0700 root-owned
    _, _, opts = presets.parse_bind(f"{src}:/d:noidmap", False, "--bind", warnings.append)
    assert "idmap" not in opts
    for bad in ("rootidmap", "owneridmap"):
        with pytest.raises(UsageError, match=f"{bad} is not supported"):
            presets.parse_bind(f"{src}:/d:{bad}", False, "--bind")


def test_parse_bind_idmap_on_a_reachable_source_warns(tmp_path: Path) -> None:
    base = Path("/var/tmp") / f"uspawn-test-{tmp_path.name}"
    base.mkdir(mode=0o755)
    try:
        base.chmod(0o755)
        warnings: list[str] = []
        presets.parse_bind(f"{base}:/d:idmap", False, "--bind", warnings.append)
        assert len(warnings) == 1 and str(base) in warnings[0]
        assert "\n" not in warnings[0] and "setuid" in warnings[0]
        warnings.clear()
        presets.parse_bind(f"{base}:/d", False, "--bind", warnings.append)
        assert warnings == []  # no idmap, nothing to warn about
        base.chmod(0o777)
        with pytest.raises(SpecError, match="world-writable"):
            presets.parse_bind(f"{base}:/d:idmap", False, "--bind", warnings.append)
        presets.parse_bind(f"{base}:/d", False, "--bind")  # fine without idmap
    finally:
        base.rmdir()


def test_closed_ancestor(tmp_path: Path) -> None:
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True, mode=0o755)
    (tmp_path / "a").chmod(0o700)
    assert presets.closed_ancestor(str(d)) == str(tmp_path / "a")
    (tmp_path / "a").chmod(0o755)
    assert presets.closed_ancestor(str(d)) is not None  # pytest's own 0700 directory
    assert presets.closed_ancestor("/") is None or os.stat("/").st_mode & 0o011 == 0


@pytest.mark.parametrize(("value", "expected"), [
    ("/tmp", ("/tmp", ["nosuid", "nodev", "mode=1777", "size=10%", "nr_inodes=400k"])),
    ("/run:size=64M", ("/run", ["nosuid", "nodev", "mode=755", "nr_inodes=800k", "size=64M"])),
    ("/var/tmp", ("/var/tmp", ["nosuid", "nodev", "mode=755", "size=10%", "nr_inodes=400k"])),
    ("/srv//x/:mode=0700,size=0,nr_inodes=0,noexec",
     ("/srv/x", ["nosuid", "nodev", "mode=0700", "size=0", "nr_inodes=0", "noexec"])),
])
def test_parse_tmpfs(value: str, expected: tuple[str, list[str]]) -> None:
    assert presets.parse_tmpfs(value) == expected


@pytest.mark.parametrize(("value", "match"), [
    ("tmp", "absolute"), ("/", "API filesystem"), ("/dev", "API filesystem"),
    ("/proc/sys", "API filesystem"), ("/run/host", "API filesystem"),
    ("/x:bind", "unknown option"), ("/x:idmap", "unknown option"), ("/x:size", "unknown"),
])
def test_parse_tmpfs_rejects(value: str, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        presets.parse_tmpfs(value)


def test_run_spec_tmpfs_bounded_and_replaceable(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    spec = presets.run_spec(str(root), ["sh"], base=0x80000, size=65536)
    by_dest = {m.destination: m.options for m in spec.mounts}
    assert "size=10%" in by_dest["/tmp"] and "nr_inodes=400k" in by_dest["/tmp"]
    assert "size=20%" in by_dest["/run"] and "nr_inodes=800k" in by_dest["/run"]
    assert any(o.startswith("size=") for o in by_dest["/dev/shm"])
    spec = presets.run_spec(str(root), ["sh"], base=0x80000, size=65536,
                            tmpfs=["/tmp:size=1G", "/srv", "/dev/shm:size=128M"],
                            binds=[(str(tmp_path), "/srv/data", ["rbind"])])
    dests = [m.destination for m in spec.mounts]
    assert dests.count("/tmp") == 1 and dests.count("/dev/shm") == 1
    by_dest = {m.destination: m.options for m in spec.mounts}
    assert "size=1G" in by_dest["/tmp"] and "size=10%" not in by_dest["/tmp"]
    assert "size=128M" in by_dest["/dev/shm"]
    assert dests.index("/srv") < dests.index("/srv/data")  # parents first


def test_machine_name() -> None:
    assert presets.machine_name("/var/lib/machines/web 1/") == "web-1"
    assert presets.machine_name("/") == "container"


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nweb:x:33:33::/var/www:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\nweb:x:33:\nlog:x:4:web\nssl:x:101:web\n")
    return root


def test_resolve_user(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    u = presets.resolve_user(str(root), "web")
    assert (u.uid, u.gid, u.additional_gids) == (33, 33, [4, 101])
    assert presets.resolve_user(str(root), "web:log").gid == 4
    assert presets.resolve_user(str(root), "1234:5").uid == 1234
    with pytest.raises(SpecError, match="no user 'ghost'"):
        presets.resolve_user(str(root), "ghost")
    with pytest.raises(SpecError, match="outside"):
        presets.resolve_user(str(root), "70000")


def test_resolve_user_does_not_follow_symlinks_out_of_the_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "etc" / "passwd").unlink()
    outside = tmp_path / "host-passwd"
    outside.write_text("evil:x:7:7::/:/bin/sh\n")
    (root / "etc" / "passwd").symlink_to(outside)
    with pytest.raises(SpecError, match="no user 'evil'"):
        presets.resolve_user(str(root), "evil")


def test_run_spec_shape(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    spec = presets.run_spec(str(root), ["sh"], base=0x80000, size=65536, tty=True,
                            console_size=(24, 80), user="web", setenv=["A=1"])
    assert spec.linux is not None and spec.process is not None
    assert {n.type for n in spec.linux.namespaces} == {
        "pid", "mount", "uts", "ipc", "cgroup", "network", "user"}
    assert spec.linux.uid_mappings[0].host_id == 0x80000
    assert [m.destination for m in spec.mounts][:3] == ["/proc", "/dev", "/dev/pts"]
    assert "container=uspawn" in spec.process.env and "A=1" in spec.process.env
    assert "HOME=/var/www" in spec.process.env
    caps = spec.process.capabilities
    assert caps is not None and "CAP_NET_ADMIN" in caps.bounding
    assert caps.effective == []  # a non-root payload starts without capabilities
    assert spec.hostname == "root"
    with pytest.raises(UsageError, match="no command"):
        presets.run_spec(str(root), [])
