"""What the OCI face says about itself: the `spec` template and the `features` document.

`default_config()` is the config.json that `uspawn-runc spec [--rootless]` writes. It
follows runc's template (libcontainer/specconv/example.go, `Example()` and
`ToRootless()`), with these differences:

- ociVersion is the runtime-spec version uspawn implements (spec.OCI_VERSION), the
  hostname is "uspawn";
- capabilities: bounding, effective and permitted, as runc >= 1.2 writes (runc 1.1 also
  filled the ambient set, which does nothing for uid 0);
- a cgroup namespace always (runc adds it only on a cgroup v2 host; uspawn unshares it
  after the child is born in its cgroup on every hierarchy);
- masked and read-only paths are those of `uspawn run` (presets.py), a superset of
  runc 1.1's lists;
- a user namespace (runc's rootful template has none, so its container root is host
  root: it reaches host root's user keyring, and host sysctls once a mask is lifted).
  Container root is host ID TEMPLATE_HOST_ID, a 65536-ID range at the top of the
  window `uspawn run` picks from (state.PICK_FIRST..PICK_LAST), so a `uspawn run`
  container only lands on it after ~28000 others; `create` also leases the range
  host-wide while the container lives (oci.py), so `uspawn run` skips it then. The
  tree's files keep their owners: chown the rootfs to the range, or edit the
  mapping, for a container that writes to its own tree;
- seccomp: uspawn's default policy (seccomp.default_policy with the userns mknod
  filter) written as an OCI profile: keyctl/add_key/request_key, bpf, module
  loading, open_by_handle_at... get EPERM, unknown syscalls ENOSYS.

`features()` is the runtime-spec features document (features.md, features-linux.md).
It lists only what the engine accepts: every seccomp action, operator, architecture and
flag listed here passes `seccomp.policy_from_oci`, every mount option is one that
`mounts.parse_options` knows by name, every namespace is one that plan.py creates.

Not on the container start path; stdlib and uspawn only.
"""

from __future__ import annotations

import os

from uspawn.engine import spec as S
from uspawn.engine.defaults import DEFAULT_PATH, MASKED_PATHS, READONLY_PATHS
from uspawn.kernel import caps, seccomp

VERSION = "0.1.0"  # fallback when the package metadata is not installed

DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]

# The template's user namespace: the last 64K block `uspawn run` may pick
# (state.PICK_LAST is exclusive), far from the first picks at 524288. Not
# imported from state.py: the template is a documented constant.
TEMPLATE_HOST_ID = 0x6FFE0000
TEMPLATE_SIZE = 65536

# Created (not only joined) by the engine: plan.NS_FLAGS plus the user namespace.
# "time" is recognised by spec.validate but not created yet, so it is not listed.
NAMESPACES = ["pid", "network", "ipc", "uts", "mount", "user", "cgroup"]

# The option names mounts.parse_options() recognises; everything else is passed to the
# filesystem as fsconfig data (not listed, as features.md asks). The access-time options,
# sync/async, defaults and tmpcopyup are accepted and have no effect.
MOUNT_OPTIONS = sorted([
    "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec",
    "bind", "rbind", "idmap", "ridmap",
    "private", "rprivate", "slave", "rslave", "shared", "rshared",
    "relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime",
    "nodiratime", "diratime", "async", "sync", "defaults", "tmpcopyup",
])  # fmt: skip

# Accepted by seccomp.policy_from_oci. SCMP_ACT_NOTIFY (and listenerPath) is refused
# with an error, so it is not listed. SCMP_ACT_KILL is libseccomp's KILL_THREAD.
SECCOMP_ACTIONS = [
    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP",
]  # fmt: skip
SECCOMP_OPERATORS = [
    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
    "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE",
]  # fmt: skip


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # ~5 ms: only here

    try:
        return version("uspawn")
    except PackageNotFoundError:
        return VERSION


def _mount(dest: str, fstype: str, source: str, options: list[str] | None = None) -> S.Mount:
    return S.Mount(destination=dest, type=fstype, source=source, options=options or [])


def _mounts(rootless: bool) -> list[S.Mount]:
    devpts = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    if not rootless:
        # ToRootless drops uid=/gid=: gid 5 is not mapped in a one-ID user namespace.
        devpts.append("gid=5")
    if rootless:
        # sysfs may only be mounted by the owner of the network namespace, and a
        # rootless container keeps the host's: show the host's /sys read-only.
        sysfs = _mount("/sys", "none", "/sys", ["rbind", "nosuid", "noexec", "nodev", "ro"])
    else:
        sysfs = _mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"])
    return [
        _mount("/proc", "proc", "proc"),
        _mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/pts", "devpts", "devpts", devpts),
        _mount("/dev/shm", "tmpfs", "shm",
               ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        _mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        sysfs,
        # runc's ToRootless keeps this one: with a cgroup namespace the container's
        # root may mount cgroup2, and it shows only the container's own subtree.
        _mount("/sys/fs/cgroup", "cgroup", "cgroup",
               ["nosuid", "noexec", "nodev", "relatime", "ro"]),
    ]  # fmt: skip


def oci_seccomp(policy: seccomp.Policy) -> dict[str, object]:
    """A seccomp Policy as an OCI `linux.seccomp` object; policy_from_oci() reads it
    back to the same policy."""

    def action(act: seccomp.Action) -> tuple[str, int | None]:
        if act.kind in ("ERRNO", "TRACE"):
            return f"SCMP_ACT_{act.kind}", act.value
        return f"SCMP_ACT_{act.kind}", None

    default, default_errno = action(policy.default_action)
    out: dict[str, object] = {"defaultAction": default}
    if default_errno is not None:
        out["defaultErrnoRet"] = default_errno
    out["architectures"] = [f"SCMP_ARCH_{a.upper()}" for a in policy.architectures]
    if policy.flags:
        out["flags"] = list(policy.flags)
    rules: list[dict[str, object]] = []
    for rule in policy.rules:
        name, err = action(rule.action)
        entry: dict[str, object] = {"names": list(rule.names), "action": name}
        if err is not None:
            entry["errnoRet"] = err
        if rule.args:
            entry["args"] = [{"index": a.index, "value": a.value, "valueTwo": a.value2,
                              "op": f"SCMP_CMP_{a.op}"} for a in rule.args]
        rules.append(entry)
    out["syscalls"] = rules
    return out


def default_spec(rootless: bool = False) -> S.Spec:
    """The `spec` template as a model object (see default_config)."""
    process = S.Process(
        terminal=True,
        user=S.User(uid=0, gid=0),
        args=["sh"],
        env=[f"PATH={DEFAULT_PATH}", "TERM=xterm"],
        cwd="/",
        capabilities=S.Capabilities(
            bounding=list(DEFAULT_CAPS), effective=list(DEFAULT_CAPS),
            permitted=list(DEFAULT_CAPS),
        ),
        rlimits=[S.Rlimit(type="RLIMIT_NOFILE", hard=1024, soft=1024)],
        no_new_privileges=True,
    )
    ns_types = ["pid", "network", "ipc", "uts", "mount", "cgroup", "user"]
    linux = S.Linux(masked_paths=list(MASKED_PATHS), readonly_paths=list(READONLY_PATHS))
    # Both: the policy of `uspawn run` (with the mknod filter a user namespace needs).
    linux.seccomp = oci_seccomp(seccomp.default_policy(userns=True))
    if rootless:
        # runc's ToRootless: no network namespace (nothing could configure it), a user
        # namespace mapping root to the caller, and no cgroup resources.
        ns_types = [t for t in ns_types if t != "network"]
        linux.uid_mappings = [S.IDMapping(container_id=0, host_id=os.geteuid(), size=1)]
        linux.gid_mappings = [S.IDMapping(container_id=0, host_id=os.getegid(), size=1)]
    else:
        linux.uid_mappings = [S.IDMapping(container_id=0, host_id=TEMPLATE_HOST_ID,
                                          size=TEMPLATE_SIZE)]
        linux.gid_mappings = [S.IDMapping(container_id=0, host_id=TEMPLATE_HOST_ID,
                                          size=TEMPLATE_SIZE)]
        linux.resources = S.Resources(devices=[S.DeviceRule(allow=False, access="rwm")])
    linux.namespaces = [S.Namespace(type=t) for t in ns_types]
    return S.Spec(
        oci_version=S.OCI_VERSION,
        process=process,
        root=S.Root(path="rootfs", readonly=True),
        hostname="uspawn",
        mounts=_mounts(rootless),
        linux=linux,
    )


def default_config(rootless: bool = False) -> dict[str, object]:
    """The config.json `uspawn-runc spec [--rootless]` writes (a fresh dict per call).

    Decodes into spec.Spec with no unknown field; root.path is "rootfs", relative to
    the bundle, as in runc.
    """
    out: dict[str, object] = default_spec(rootless).to_json()
    return out


def features() -> dict[str, object]:
    """The runtime-spec features document (`uspawn-runc features`)."""
    hooks = [S.Hooks.json_name(f) for f in S.Hooks.fields()]
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": S.OCI_VERSION,
        "hooks": hooks,
        "mountOptions": list(MOUNT_OPTIONS),
        "linux": {
            "namespaces": sorted(NAMESPACES),
            "capabilities": list(caps.CAP_NAMES),
            "cgroup": {
                "v1": True, "v2": True, "systemd": False, "systemdUser": False,
                "rdma": False,
            },
            "seccomp": {
                "enabled": True,
                "actions": list(SECCOMP_ACTIONS),
                "operators": list(SECCOMP_OPERATORS),
                "archs": sorted(f"SCMP_ARCH_{a.upper()}" for a in seccomp.ARCHITECTURES),
                "knownFlags": list(seccomp.FLAGS),
                # Recorded, not applied: the filter is loaded with prctl(PR_SET_SECCOMP),
                # which takes no flags (seccomp.install).
                "supportedFlags": [],
            },
            "apparmor": {"enabled": False},
            "selinux": {"enabled": False},
            "intelRdt": {"enabled": False},
            "mountExtensions": {"idmap": {"enabled": True}},
        },
        "annotations": {
            "org.opencontainers.runc.checkpoint.enabled": "false",
            "run.oci.uspawn.version": _version(),
        },
    }
