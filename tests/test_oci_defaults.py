"""Unit tier: the `spec` template and the `features` document (no root needed).

The runc comparisons run the installed runc (`runc spec`, `runc features`) and skip
only themselves when runc is missing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from uspawn.base.errors import SpecError
from uspawn.engine import plan
from uspawn.engine import spec as S
from uspawn.engine.defaults import MASKED_PATHS, READONLY_PATHS
from uspawn.engine.request import Request
from uspawn.kernel import caps, mounts, seccomp
from uspawn.oci import defaults as oci_defaults

# --- default_config -------------------------------------------------------------------


def _roundtrip(obj: object) -> Any:
    return json.loads(json.dumps(obj, allow_nan=False))


def _decode(config: dict[str, object]) -> S.Spec:
    unknown: list[str] = []
    spec = S.decode(S.Spec, _roundtrip(config), unknown=unknown)
    assert unknown == []
    return spec


def _by_dest(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in config["mounts"]}


@pytest.mark.parametrize("rootless", [False, True])
def test_default_config_decodes_validates_and_plans(rootless: bool, tmp_path: Path) -> None:
    config = oci_defaults.default_config(rootless=rootless)
    spec = _decode(config)
    assert spec.oci_version == S.OCI_VERSION
    assert spec.root is not None and spec.root.path == "rootfs" and spec.root.readonly
    assert spec.hostname == "uspawn"
    # the template's encoding is the model's encoding: nothing lost, nothing added
    assert spec.to_json() == _roundtrip(config)
    assert spec == oci_defaults.default_spec(rootless)

    spec.root.path = str(tmp_path)
    if rootless and os.geteuid() == 0:
        # --rootless maps container root to the caller: host root here, refused
        with pytest.raises(SpecError, match=r"linux\.uidMappings\[0\]\.hostID"):
            S.validate(spec)
        assert spec.linux is not None
        for m in spec.linux.uid_mappings + spec.linux.gid_mappings:
            m.host_id = 1000
    S.validate(spec)
    # and the engine accepts every field (mount types, rlimit and capability names)
    host, init = plan.build(spec, Request())
    assert init.userns  # rootful too: container root is never host root
    assert [b.source for b in host.binds] == (["/sys"] if rootless else [])


@pytest.mark.parametrize("rootless", [False, True])
def test_default_config_process(rootless: bool) -> None:
    proc: Any = oci_defaults.default_config(rootless)["process"]
    assert proc["terminal"] is True
    assert proc["user"] == {"uid": 0, "gid": 0}
    assert proc["args"] == ["sh"]
    assert proc["env"] == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"
    ]
    assert proc["cwd"] == "/"
    want = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    assert proc["capabilities"] == {"bounding": want, "effective": want, "permitted": want}
    assert proc["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert proc["noNewPrivileges"] is True


def test_default_config_is_fresh_per_call() -> None:
    a: Any = oci_defaults.default_config()
    a["process"]["args"].append("-x")
    a["linux"]["maskedPaths"].clear()
    b: Any = oci_defaults.default_config()
    assert b["process"]["args"] == ["sh"]
    assert b["linux"]["maskedPaths"] == MASKED_PATHS
    assert MASKED_PATHS  # the presets list itself was not emptied


def test_default_config_rootful_shape() -> None:
    config: Any = oci_defaults.default_config()
    linux = config["linux"]
    assert [n["type"] for n in linux["namespaces"]] == [
        "pid", "network", "ipc", "uts", "mount", "cgroup", "user"
    ]
    assert all("path" not in n for n in linux["namespaces"])
    assert linux["resources"] == {"devices": [{"allow": False, "access": "rwm"}]}
    m = [{"containerID": 0, "hostID": 0x6FFE0000, "size": 65536}]
    assert linux["uidMappings"] == m and linux["gidMappings"] == m
    assert linux["maskedPaths"] == MASKED_PATHS
    assert linux["readonlyPaths"] == READONLY_PATHS
    mnts = _by_dest(config)
    assert list(mnts) == [
        "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/sys/fs/cgroup"
    ]
    assert mnts["/sys"]["type"] == "sysfs"
    assert "gid=5" in mnts["/dev/pts"]["options"]
    assert mnts["/sys/fs/cgroup"]["type"] == "cgroup"


def test_default_config_rootless_maps_the_caller() -> None:
    config: Any = oci_defaults.default_config(rootless=True)
    linux = config["linux"]
    types = [n["type"] for n in linux["namespaces"]]
    assert "user" in types and "network" not in types
    assert set(types) == {"pid", "ipc", "uts", "mount", "cgroup", "user"}
    assert linux["uidMappings"] == [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
    assert linux["gidMappings"] == [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
    assert "resources" not in linux
    mnts = _by_dest(config)
    assert mnts["/sys"] == {
        "destination": "/sys", "type": "none", "source": "/sys",
        "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
    }
    for m in config["mounts"]:
        assert not any(o.startswith(("uid=", "gid=")) for o in m.get("options", []))
    # every other mount is the rootful one minus uid=/gid=
    rootful = _by_dest(oci_defaults.default_config())
    for dest, m in mnts.items():
        if dest != "/sys":
            want = dict(rootful[dest])
            want["options"] = [o for o in want.get("options", []) if o != "gid=5"]
            assert {k: v for k, v in m.items() if v} == {k: v for k, v in want.items() if v}


# --- features ---------------------------------------------------------------------------


def _features() -> Any:
    return _roundtrip(oci_defaults.features())


def test_features_is_json_and_has_the_required_keys() -> None:
    doc = oci_defaults.features()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert set(doc) == {"ociVersionMin", "ociVersionMax", "hooks", "mountOptions", "linux",
                        "annotations"}
    assert doc["ociVersionMin"] == "1.0.0"
    assert doc["ociVersionMax"] == S.OCI_VERSION
    vmin = tuple(int(p) for p in str(doc["ociVersionMin"]).split("."))
    vmax = tuple(int(p) for p in str(doc["ociVersionMax"]).split("-")[0].split("."))
    assert vmin <= vmax
    linux = _features()["linux"]
    assert set(linux) == {"namespaces", "capabilities", "cgroup", "seccomp", "apparmor",
                          "selinux", "intelRdt", "mountExtensions"}
    assert linux["cgroup"] == {"v1": True, "v2": True, "systemd": False,
                               "systemdUser": False, "rdma": False}
    assert linux["apparmor"] == linux["selinux"] == linux["intelRdt"] == {"enabled": False}
    assert linux["mountExtensions"] == {"idmap": {"enabled": True}}
    ann = _features()["annotations"]
    assert ann["org.opencontainers.runc.checkpoint.enabled"] == "false"
    assert ann["run.oci.uspawn.version"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items())


def test_features_hooks_are_the_model_hooks() -> None:
    hooks = _features()["hooks"]
    assert hooks == ["prestart", "createRuntime", "createContainer", "startContainer",
                     "poststart", "poststop"]
    unknown: list[str] = []
    S.decode(S.Hooks, {h: [{"path": "/bin/true"}] for h in hooks}, unknown=unknown)
    assert unknown == []


def test_features_capabilities_are_known() -> None:
    names = _features()["linux"]["capabilities"]
    assert names == list(caps.CAP_NAMES)
    assert len(set(names)) == len(names)
    for name in names:
        assert caps.normalize(name) == name


def test_features_namespaces_are_created_by_the_engine() -> None:
    names = _features()["linux"]["namespaces"]
    assert set(names) == {"pid", "network", "ipc", "uts", "mount", "user", "cgroup"}
    for name in names:
        assert name in S.NAMESPACE_TYPES
        assert name == "user" or name in plan.NS_FLAGS


def test_features_mount_options_are_parsed_by_name() -> None:
    listed = _features()["mountOptions"]
    assert len(set(listed)) == len(listed)
    for opt in listed:
        # a recognised option never reaches the filesystem as fsconfig data
        assert mounts.parse_options([opt]).fs_params == [], opt
    # and every name parse_options recognises is listed
    recognised = ({"bind", "rbind", "idmap", "ridmap"} | set(mounts._ATTR_OPTIONS)
                  | set(mounts._PROPAGATION) | set(mounts._IGNORED))
    assert set(listed) == recognised
    assert "idmap" in listed and "rbind" in listed


def _seccomp(action: str, **extra: object) -> dict[str, object]:
    return {"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getpid"], "action": action, **extra}]}


def test_features_seccomp_actions_are_accepted() -> None:
    sec = _features()["linux"]["seccomp"]
    assert sec["enabled"] is True
    assert "SCMP_ACT_NOTIFY" not in sec["actions"]
    for action in sec["actions"]:
        # in a rule and as the default action
        rule = seccomp.policy_from_oci(_seccomp(action)).rules[0]
        default = seccomp.policy_from_oci({"defaultAction": action}).default_action
        assert rule.action == default
        if action in ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"):
            assert rule.action.value == errno.EPERM  # errnoRet defaults to EPERM
            with_ret = seccomp.policy_from_oci(_seccomp(action, errnoRet=38))
            assert with_ret.rules[0].action.value == 38
    # every kind the model knows is reachable through some listed OCI name
    kinds = {seccomp.policy_from_oci({"defaultAction": a}).default_action.kind
             for a in sec["actions"]}
    assert kinds == set(seccomp._ACTION_KINDS)


def test_seccomp_notify_is_consistently_unsupported() -> None:
    assert "SCMP_ACT_NOTIFY" not in _features()["linux"]["seccomp"]["actions"]
    with pytest.raises(seccomp.SeccompPolicyError, match="not supported"):
        seccomp.policy_from_oci(_seccomp("SCMP_ACT_NOTIFY"))
    with pytest.raises(seccomp.SeccompPolicyError, match="not supported"):
        seccomp.policy_from_oci({"defaultAction": "SCMP_ACT_ALLOW",
                                 "listenerPath": "/run/x.sock"})


def test_features_seccomp_operators_are_accepted() -> None:
    ops = _features()["linux"]["seccomp"]["operators"]
    for op in ops:
        arg = {"index": 1, "value": 0o170000, "valueTwo": 0o020000, "op": op}
        policy = seccomp.policy_from_oci(_seccomp("SCMP_ACT_ERRNO", args=[arg]))
        assert policy.rules[0].args[0].op == op.removeprefix("SCMP_CMP_")
    assert {op.removeprefix("SCMP_CMP_") for op in ops} == set(seccomp._ARG_OPS)


def test_features_seccomp_archs_and_flags_are_accepted() -> None:
    sec = _features()["linux"]["seccomp"]
    archs = sec["archs"]
    assert len(archs) == len(seccomp.ARCHITECTURES)
    policy = seccomp.policy_from_oci({"defaultAction": "SCMP_ACT_ALLOW", "architectures": archs})
    assert set(policy.architectures) == set(seccomp.ARCHITECTURES)
    try:
        import pyseccomp
    except ImportError:
        pass
    else:  # compile_bpf looks each one up there
        for arch in policy.architectures:
            assert hasattr(pyseccomp.Arch, arch.upper()), arch
    flags = sec["knownFlags"]
    assert flags == list(seccomp.FLAGS)
    policy = seccomp.policy_from_oci({"defaultAction": "SCMP_ACT_ALLOW", "flags": flags})
    assert list(policy.flags) == flags
    assert set(sec["supportedFlags"]) <= set(flags)


# --- against the installed runc -----------------------------------------------------


def _runc() -> str:
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed (apt-get install runc): comparison skipped")
    return runc


def _runc_spec(tmp_path: Path, rootless: bool) -> Any:
    bundle = tmp_path / ("rootless" if rootless else "rootful")
    bundle.mkdir()
    cmd = [_runc(), "spec", "--bundle", str(bundle)] + (["--rootless"] if rootless else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((bundle / "config.json").read_text())


def _namespaces(config: Any) -> set[str]:
    return {n["type"] for n in config["linux"]["namespaces"]}


@pytest.mark.parametrize("rootless", [False, True])
def test_default_config_matches_runc_spec(rootless: bool, tmp_path: Path) -> None:
    runc: Any = _runc_spec(tmp_path, rootless)
    ours: Any = _roundtrip(oci_defaults.default_config(rootless))
    # runc accepts everything in its own template, and so do we
    _decode(runc)

    assert [m["destination"] for m in ours["mounts"]] == [
        m["destination"] for m in runc["mounts"]
    ]
    for dest, m in _by_dest(runc).items():
        assert _by_dest(ours)[dest] == m, dest
    assert set(runc["linux"]["maskedPaths"]) <= set(ours["linux"]["maskedPaths"])
    assert set(ours["linux"]["maskedPaths"]) - set(runc["linux"]["maskedPaths"]) <= {
        "/sys/devices/virtual/powercap"  # runc >= 1.2 masks it too
    }
    assert ours["linux"]["readonlyPaths"] == runc["linux"]["readonlyPaths"]
    # cgroup: runc adds it only on a cgroup v2 host (always since runc 1.2 there);
    # user: runc's rootful template has none (its container root is host root)
    assert _namespaces(ours) - {"cgroup", "user"} == _namespaces(runc) - {"cgroup", "user"}
    assert "user" in _namespaces(ours)
    assert ours["linux"].get("resources") == runc["linux"].get("resources")
    if rootless:
        assert ours["linux"].get("uidMappings") == runc["linux"].get("uidMappings")
        assert ours["linux"].get("gidMappings") == runc["linux"].get("gidMappings")
    else:
        assert "uidMappings" not in runc["linux"]
        assert ours["linux"]["uidMappings"][0]["hostID"] > 0
    assert "seccomp" not in runc["linux"] and "seccomp" in ours["linux"]
    for key in ("terminal", "user", "args", "env", "cwd", "rlimits", "noNewPrivileges"):
        assert ours["process"][key] == runc["process"][key], key
    for cap_set in ("bounding", "effective", "permitted"):
        assert ours["process"]["capabilities"][cap_set] == (
            runc["process"]["capabilities"][cap_set]
        )
    assert ours["root"] == runc["root"]


def test_features_against_runc_features() -> None:
    out = subprocess.run([_runc(), "features"], check=True, capture_output=True, text=True)
    runc = json.loads(out.stdout)
    ours = _features()
    assert ours["ociVersionMin"] == runc["ociVersionMin"]
    assert ours["hooks"] == runc["hooks"]
    assert set(ours["mountOptions"]) - {"idmap", "ridmap"} <= set(runc["mountOptions"])
    assert set(ours["linux"]["namespaces"]) == set(runc["linux"]["namespaces"])
    assert set(runc["linux"]["capabilities"]) <= set(ours["linux"]["capabilities"])
    sec, rsec = ours["linux"]["seccomp"], runc["linux"]["seccomp"]
    assert set(sec["actions"]) == set(rsec["actions"]) - {"SCMP_ACT_NOTIFY"}
    assert sec["operators"] == rsec["operators"]
    assert set(rsec["archs"]) <= set(sec["archs"])
    assert set(ours["linux"]) >= set(runc["linux"])
