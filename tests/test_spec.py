"""Unit tier: the spec model, decoding errors, validation (no root needed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from uspawn.base.errors import SpecError
from uspawn.engine import spec as S

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


# --- integer ranges (issue 19: out-of-range values gave tracebacks) -------------------


def _all_models() -> list[type[S.Model]]:
    return [c for c in vars(S).values()
            if isinstance(c, type) and issubclass(c, S.Model) and c is not S.Model]


def _is_int_field(hint: object) -> bool:
    text = str(hint)
    return hint is int or text in ("int | None", "list[int]")


def test_every_int_field_has_bounds() -> None:
    """A new int field without a range would be the next traceback: fail on it."""
    missing = []
    for cls in _all_models():
        for name, hint in S._hints(cls).items():
            if _is_int_field(hint) and name not in cls._bounds:
                missing.append(f"{cls.__name__}.{name}")
    assert missing == []
    for cls in _all_models():  # and no bound names a field that does not exist
        assert set(cls._bounds) <= set(cls.fields()), cls


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"linux": {"devices": [{"uid": 4294967295}]}}, "linux.devices[0].uid"),
        ({"linux": {"devices": [{"gid": -1}]}}, "linux.devices[0].gid"),
        ({"linux": {"devices": [{"major": 99999999999}]}}, "linux.devices[0].major"),
        ({"linux": {"devices": [{"major": -1}]}}, "linux.devices[0].major"),
        ({"linux": {"devices": [{"major": 4096}]}}, "linux.devices[0].major"),
        ({"linux": {"devices": [{"minor": 2**20}]}}, "linux.devices[0].minor"),
        ({"linux": {"devices": [{"fileMode": 0o10000}]}}, "linux.devices[0].fileMode"),
        ({"process": {"user": {"uid": 2**32}}}, "process.user.uid"),
        ({"process": {"user": {"gid": -5}}}, "process.user.gid"),
        ({"process": {"user": {"additionalGids": [5, 2**40]}}},
         "process.user.additionalGids[1]"),
        ({"process": {"user": {"umask": 0o1000}}}, "process.user.umask"),
        ({"process": {"rlimits": [{"type": "RLIMIT_NOFILE", "hard": 2**64, "soft": 1}]}},
         "process.rlimits[0].hard"),
        ({"process": {"rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1, "soft": -1}]}},
         "process.rlimits[0].soft"),
        ({"process": {"oomScoreAdj": 1001}}, "process.oomScoreAdj"),
        ({"process": {"oomScoreAdj": -1001}}, "process.oomScoreAdj"),
        ({"process": {"consoleSize": {"height": 70000, "width": 80}}},
         "process.consoleSize.height"),
        ({"process": {"consoleSize": {"height": 24, "width": -1}}},
         "process.consoleSize.width"),
        ({"linux": {"uidMappings": [{"containerID": 0, "hostID": 2**32, "size": 1}]}},
         "linux.uidMappings[0].hostID"),
        ({"linux": {"gidMappings": [{"containerID": -1, "hostID": 1, "size": 1}]}},
         "linux.gidMappings[0].containerID"),
        ({"linux": {"uidMappings": [{"containerID": 0, "hostID": 1, "size": 0}]}},
         "linux.uidMappings[0].size"),
        ({"mounts": [{"destination": "/m", "uidMappings": [{"size": 2**33}]}]},
         "mounts[0].uidMappings[0].size"),
        ({"linux": {"resources": {"memory": {"limit": -2}}}}, "linux.resources.memory.limit"),
        ({"linux": {"resources": {"memory": {"swap": 2**63}}}}, "linux.resources.memory.swap"),
        ({"linux": {"resources": {"pids": {"limit": -7}}}}, "linux.resources.pids.limit"),
        ({"linux": {"resources": {"cpu": {"period": 999}}}}, "linux.resources.cpu.period"),
        ({"linux": {"resources": {"cpu": {"quota": 2**63}}}}, "linux.resources.cpu.quota"),
        ({"linux": {"resources": {"cpu": {"shares": -1}}}}, "linux.resources.cpu.shares"),
        ({"hooks": {"prestart": [{"path": "/x", "timeout": 0}]}}, "hooks.prestart[0].timeout"),
        ({"hooks": {"poststop": [{"path": "/x", "timeout": 2**40}]}},
         "hooks.poststop[0].timeout"),
    ],
)
def test_out_of_range_integers_name_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as exc:
        S.decode(S.Spec, patch)
    msg = str(exc.value)
    assert msg.startswith(f"{field}: ") and "out of range" in msg, msg
    assert "\n" not in msg


def test_integers_at_their_bounds_are_accepted() -> None:
    spec = S.decode(S.Spec, {
        "process": {"user": {"uid": 2**32 - 2, "gid": 0, "umask": 0o777},
                    "rlimits": [{"type": "RLIMIT_CORE", "hard": 2**64 - 1, "soft": 0}],
                    "oomScoreAdj": -1000, "consoleSize": {"height": 65535, "width": 0}},
        "linux": {"devices": [{"type": "c", "path": "/dev/x", "major": 4095,
                               "minor": 2**20 - 1, "fileMode": 0o7777, "uid": 0}],
                  "resources": {"memory": {"limit": -1}, "pids": {"limit": 2**63 - 1},
                                "cpu": {"quota": -1, "period": 1_000_000}}},
        "hooks": {"prestart": [{"path": "/x", "timeout": 1}]},
    })
    assert spec.linux is not None and spec.linux.devices[0].major == 4095


# --- ID mappings: never host root (issue 19) --------------------------------------------


def _with_maps(uid: list[dict[str, int]], gid: list[dict[str, int]] | None = None) -> S.Spec:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["linux"]["uidMappings"] = uid
    cfg["linux"]["gidMappings"] = gid if gid is not None else [
        {"containerID": 0, "hostID": 100000, "size": 65536}]
    return S.decode(S.Spec, cfg)


@pytest.mark.parametrize(
    ("uid", "gid", "field"),
    [
        ([{"containerID": 0, "hostID": 0, "size": 1}], None, "linux.uidMappings[0].hostID"),
        ([{"containerID": 0, "hostID": 0, "size": 65536}], None, "linux.uidMappings[0].hostID"),
        # host root mapped to a non-root container ID is host root all the same
        ([{"containerID": 0, "hostID": 100000, "size": 65536},
          {"containerID": 65536, "hostID": 0, "size": 1}], None,
         "linux.uidMappings[1].hostID"),
        ([{"containerID": 0, "hostID": 100000, "size": 65536}],
         [{"containerID": 0, "hostID": 0, "size": 10}], "linux.gidMappings[0].hostID"),
        ([{"containerID": 2**32 - 10, "hostID": 1000, "size": 20}], None,
         "linux.uidMappings[0].size"),
        ([{"containerID": 0, "hostID": 2**32 - 10, "size": 20}], None,
         "linux.uidMappings[0].size"),
    ],
)
def test_mappings_refused(uid: list[dict[str, int]], gid: list[dict[str, int]] | None,
                          field: str) -> None:
    spec = _with_maps(uid, gid)
    with pytest.raises(SpecError) as exc:
        S.validate(spec)
    assert str(exc.value).startswith(field + ": "), str(exc.value)


def test_mapping_host_root_is_fine_without_a_user_namespace() -> None:
    spec = _with_maps([{"containerID": 0, "hostID": 0, "size": 1}])
    assert spec.linux is not None
    spec.linux.namespaces = [n for n in spec.linux.namespaces if n.type != "user"]
    S.validate(spec)  # no user namespace: the mappings are not used


def test_mapping_starting_at_host_id_1_is_accepted() -> None:
    S.validate(_with_maps([{"containerID": 0, "hostID": 1, "size": 65536}]))


def test_rlimit_soft_above_hard_refused() -> None:
    spec = _valid()
    assert spec.process is not None
    spec.process.rlimits = [S.Rlimit(type="RLIMIT_NOFILE", hard=10, soft=11)]
    with pytest.raises(SpecError, match=r"^process\.rlimits\[0\]\.soft: "):
        S.validate(spec)


# --- linux.cgroupsPath (issue 19: traversal to host directories) ------------------------


@pytest.mark.parametrize("path", [
    "../../../../var/tmp/x:rt:x", "system.slice:../../x:n", "system.slice:p:../../x",
    "a/b:p:n", "..:p:n", ".:p:n", "a:b:c:d", "/a/../b", "../x", "/..", "/./a", "a/.",
])
def test_cgroups_path_traversal_refused(path: str) -> None:
    from uspawn.kernel import cgroups

    with pytest.raises(cgroups.CgroupPathError):
        cgroups.oci_cgroup_path(path, "cid")


@pytest.mark.parametrize(("path", "rel"), [
    ("", "uspawn/cid"), ("/", "uspawn/cid"), ("/a/b", "a/b"), ("a//b/", "a/b"),
    ("machine.slice:libpod:abc", "machine.slice/libpod-abc.scope"),
    (":p:", "system.slice/p-cid.scope"), ("/x..y/.z", "x..y/.z"),
])
def test_cgroups_path_forms(path: str, rel: str) -> None:
    from uspawn.kernel import cgroups

    assert cgroups.oci_cgroup_path(path, "cid") == rel


@pytest.mark.parametrize("rel", ["..", "../x", "a/../../x", "/abs", "", ".", "a/./b"])
def test_cgroup_dir_stays_below_the_hierarchy(rel: str) -> None:
    from uspawn.kernel import cgroups

    with pytest.raises(cgroups.CgroupPathError):
        cgroups.under("/sys/fs/cgroup", rel)
    assert cgroups.under("/sys/fs/cgroup", "uspawn/x") == "/sys/fs/cgroup/uspawn/x"


def test_cgroups_path_error_names_the_field() -> None:
    from uspawn.oci import lifecycle as oci

    spec = _valid()
    assert spec.linux is not None
    spec.linux.cgroups_path = "../../../../var/tmp/x:rt:x"
    with pytest.raises(SpecError) as exc:
        oci.cgroup_path(spec, "cid")
    assert str(exc.value).startswith("linux.cgroupsPath: ")


# --- namespace paths must be nsfs files (issue 19) --------------------------------------


def test_ns_path_accepts_a_namespace_of_its_type() -> None:
    from uspawn.kernel import nsfs

    nsfs.check_ns_path("/proc/self/ns/net", "network")
    fd = nsfs.open_ns("/proc/self/ns/uts", "uts")
    try:
        assert os.stat(f"/proc/self/fd/{fd}").st_ino == os.stat("/proc/self/ns/uts").st_ino
    finally:
        os.close(fd)


def test_ns_path_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    from uspawn.kernel import nsfs

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(nsfs.NsPathError, match="is a FIFO, not a namespace file"):
        nsfs.check_ns_path(str(fifo), "network")
    assert time.monotonic() - t0 < 1


@pytest.mark.parametrize(("path", "kind"), [
    ("/dev/null", "a character device"), ("/etc/passwd", "a regular file"),
    ("/proc", "a directory"),
])
def test_ns_path_refuses_other_files(path: str, kind: str) -> None:
    from uspawn.kernel import nsfs

    with pytest.raises(nsfs.NsPathError, match=f"is {kind}, not a namespace file"):
        nsfs.check_ns_path(path, "network")


def test_ns_path_refuses_a_namespace_of_another_type() -> None:
    from uspawn.kernel import nsfs

    with pytest.raises(nsfs.NsPathError, match="is a uts namespace, not network"):
        nsfs.check_ns_path("/proc/self/ns/uts", "network")
