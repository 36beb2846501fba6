"""Unit tier: the spec model, decoding errors, validation (no root needed)."""

from __future__ import annotations

import json

import pytest

from uspawn import spec as S
from uspawn.errors import SpecError

CONFIG = {
    "ociVersion": "1.0.2",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0, "additionalGids": [5]},
        "args": ["sh"],
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_CHOWN"], "effective": ["CAP_CHOWN"]},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
        "oomScoreAdj": 10,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "h",
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {
        "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "user"}, {"type": "uts"}],
        "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
        "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"},
        "maskedPaths": ["/proc/kcore"],
    },
}


def test_decode_roundtrip() -> None:
    unknown: list[str] = []
    spec = S.decode(S.Spec, json.loads(json.dumps(CONFIG)), unknown=unknown)
    assert unknown == []
    assert spec.process is not None and spec.process.user is not None
    assert spec.process.user.additional_gids == [5]
    assert spec.process.oom_score_adj == 10
    assert spec.linux is not None
    assert spec.linux.uid_mappings[0].host_id == 100000
    assert spec.linux.seccomp == {"defaultAction": "SCMP_ACT_ALLOW"}
    assert spec.to_json() == CONFIG
    S.validate(spec)


def test_defaults_are_not_shared() -> None:
    a, b = S.Process(), S.Process()
    a.args.append("x")
    assert b.args == []


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"process": {"args": "sh"}}, "process.args: expected a list"),
        ({"process": {"args": [1]}}, "process.args[0]: expected str"),
        ({"process": {"user": {"uid": True}}}, "process.user.uid: expected an integer"),
        ({"linux": {"uidMappings": [{"hostID": "x"}]}}, "linux.uidMappings[0].hostID"),
        ({"mounts": {}}, "mounts: expected a list"),
    ],
)
def test_decode_errors_name_the_field(patch: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as exc:
        S.decode(S.Spec, patch)
    assert message in str(exc.value)


def test_unknown_fields_are_reported() -> None:
    unknown: list[str] = []
    S.decode(S.Spec, {"process": {"args": ["a"], "frobnicate": 1}, "x": 2}, unknown=unknown)
    assert sorted(unknown) == ["process.frobnicate", "x"]


def _valid() -> S.Spec:
    return S.decode(S.Spec, json.loads(json.dumps(CONFIG)))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: setattr(s.root, "path", ""), "root.path"),
        (lambda s: setattr(s.process, "args", []), "process.args"),
        (lambda s: setattr(s.process, "cwd", "rel"), "process.cwd"),
        (lambda s: s.process.env.append("NOEQ"), "process.env[1]"),
        (lambda s: s.linux.namespaces.append(S.Namespace(type="pid")), "listed twice"),
        (lambda s: s.linux.namespaces.append(S.Namespace(type="bogus")), "unknown namespace"),
        (lambda s: setattr(s.linux, "uid_mappings", []), "linux.uidMappings"),
        (lambda s: s.mounts.append(S.Mount(destination="rel")), "mounts[1].destination"),
    ],
)
def test_validate_rejects(mutate: object, message: str) -> None:
    spec = _valid()
    mutate(spec)  # type: ignore[operator]
    with pytest.raises(SpecError) as exc:
        S.validate(spec)
    assert message in str(exc.value)
