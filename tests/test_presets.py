"""Unit tier: command-line parsing helpers and the `run` preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from uspawn import presets
from uspawn.errors import SpecError, UsageError


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
    assert "ro" in opts and "rbind" in opts and "x-uspawn-idmap-auto" in opts
    _, dst2, opts2 = presets.parse_bind(str(tmp_path), True, "--bind-ro")
    assert dst2 == str(tmp_path) and "ro" in opts2
    with pytest.raises(UsageError, match="unknown option"):
        presets.parse_bind(f"{tmp_path}:/x:bogus", False, "--bind")
    with pytest.raises(UsageError, match="absolute"):
        presets.parse_bind("rel:/x", False, "--bind")


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
