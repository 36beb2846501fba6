"""Fuzzing hostile input (issue 6): config.json documents and command lines.

Malformed, random and near-valid input must end in success or in one of
uspawn's own errors (UspawnError and its subclasses, SeccompPolicyError), which
the front ends print as one line. Any other exception is a traceback for the
user, i.e. a bug. End to end, nothing may be left behind either: no state
directory entry, no cgroup, no process, no mount.

- In process (no root needed, fast): `spec.decode` + `spec.validate` +
  `plan.build` and `oci.load_bundle` on mutated default configs, random JSON
  and raw JSON text; `seccomp.policy_from_oci` (+ `compile_bpf`) on mutated
  and random profiles; `cli.main` / `oci_cli.main` on random argv lists, for
  commands that do not start containers.
- End to end (root): `uspawn-runc create` on mutated bundles, then
  `delete --force`, then the leak checks.

- Hostile state (issue 15, in process, root): `cli.main` / `oci_cli.main` with a drawn
  --root or $USPAWN_STATE_DIR (a file, below a file, a FIFO, a symlink loop, /dev/null,
  /etc/passwd, /proc/1/root, empty, missing, too long, relative, `containers` a file) or a
  state directory of drawn records (corrupted, deep, FIFOs, directories, symlinks, foreign
  layouts, wrong types, held or stale locks); the property adds "no traceback, no
  'internal error', nothing left behind (mounts in the sandbox, children, cgroups)".
- Closed stdio (issue 15, subprocesses of the real entry points): fd 1, fd 2 or all of
  0-2 closed, a pipe without a reader, /dev/full.

The default run does ~1,100 in-process cases, 20 stdio subprocesses and ~30 end-to-end cases
(USPAWN_FUZZ_E2E_EXAMPLES=N for more). `test_fuzz_long` (marked slow) does
10,000 in-process cases per target (70,000 in all, ~25 min; 500 stdio subprocesses); it
runs only with `-m slow` or USPAWN_FUZZ_LONG=1 (the marker alone does not deselect it).
The `test_found_*` tests replay, every run, the inputs the fuzz found bugs with.

Hostile input is not allowed to harm the host running the tests: argv that would
start containers, walk the host or write outside a sandbox directory is not run,
and the end-to-end configs are kept from running host hooks, opening random device
numbers, joining host namespaces or using another rootfs (`sanitize_for_host`).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    cgroup_dirs,
    mounts_under,
    processes_in_cgroup_named,
    skip_or_fail,
    uspawn_cmd,
)
from hypothesis import HealthCheck, Phase, given, settings  # the `test` extra
from hypothesis import strategies as st
from waits import running, wait_all_gone

from uspawn import cli
from uspawn.base.errors import SpecError, UspawnError
from uspawn.engine import plan as planmod
from uspawn.engine import spec as S
from uspawn.engine.request import Request
from uspawn.kernel import seccomp
from uspawn.oci import cli as oci_cli
from uspawn.oci import lifecycle as oci
from uspawn.oci.defaults import default_config

ALLOWED = (UspawnError, seccomp.SeccompPolicyError)
# Documented exit codes of uspawn and uspawn-runc for commands that run no payload
# (base/errors.py): runtime error (runc), usage, setup, interrupted.
EXIT_CODES = (1, 2, 125, 130)
LONG_EXAMPLES = 10_000

# No example database (it would be written into the work tree) and no deadline
# (the first plan.build of a run imports modules; a slow VM is not a bug).
COMMON: dict[str, Any] = {
    "database": None,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.filter_too_much],
}


def long_run_requested(config: pytest.Config) -> bool:
    if os.environ.get("USPAWN_FUZZ_LONG") == "1":
        return True
    expr = str(config.getoption("markexpr", "") or "")
    return "slow" in expr.split() and "not" not in expr.split()


# --- hostile values -----------------------------------------------------------------

HOSTILE_STRINGS = [
    "", "/", ".", "..", "//", "/.", "/..", "../../../../../../etc/passwd",
    "/../../../../../etc/shadow", "/proc/self/root/etc", "/proc/1/root", "/dev/../../etc",
    "/dev/", "/dev/..", "/dev/../dev/null", "/dev/sda", "/proc/self/ns/net", "/dev/null",
    "relative/path", "./x", "~root", "$(id)", "`id`", "%s%n%x", "\n", "a\nb", "a\x00b",
    "/tmp/a\x00b", "\ud800", "/\udcff", "é/ü/€", "\u202e/txt.exe", "\ufeff",
    "\uff43\uff4f\uff4e\uff46",
    "x" * 5000, "/" + "a/" * 1500, "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_NOTIFY",
    "SCMP_CMP_EQ", "SCMP_ARCH_X86_64", "user", "mount", "network", "pid", "cgroup", "time",
    "bind", "rbind", "tmpfs", "proc", "sysfs", "overlay", "cgroup2", "devpts", "ro", "rw",
    "idmap", "ridmap", "mode=0777", "size=1", "uid=4294967295", "CAP_SYS_ADMIN", "CAP_NOPE",
    "ALL", "RLIMIT_NOFILE", "RLIMIT_NOPE", "c", "b", "u", "p", "rshared", "unbindable",
    "system:uspawn:x", ":::", "1.2.0", "NaN", "-1", "0x10", "1e400",
]
HOSTILE_INTS = [
    0, 1, -1, 5, 6, 7, 64, 255, 256, 65535, 65536, 2**31 - 1, 2**31, -(2**31), 2**32 - 1,
    2**32, 2**53 + 1, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 2**64, 10**100, -(10**100),
]

# Inserted into an otherwise valid string of the config.
INJECT = ["\x00", "\n", "\r", "\x1b[2J", "\ud800", "\udcff", "\u202e", "/../../..", "/..",
          "//", " ", "=", ",", ":", "*", "\\", "\t", "é", "\uffff", "x" * 4096]

PATH_KEYS = {"source", "destination", "path", "cwd", "type", "cgroupsPath"}

json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from(HOSTILE_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(HOSTILE_STRINGS),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(HOSTILE_STRINGS), inner,
                      max_size=4),
    max_leaves=12,
)


def _nest(depth: int, leaf: object) -> object:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"a": leaf}
    return leaf


hostile_values = st.one_of(
    json_scalars,
    json_values,
    st.lists(st.sampled_from(HOSTILE_STRINGS), max_size=4),
    st.lists(st.sampled_from(HOSTILE_INTS), max_size=4),
    st.builds(_nest, st.integers(20, 300), json_scalars),
)

# Plausible places in a config (intermediate objects and lists are created as
# needed), so that mutations reach the code behind the first type checks.
I = 0  # noqa: E741  (list index in a target path)
TARGETS: list[tuple[str | int, ...]] = [
    ("ociVersion",), ("process",), ("process", "args"), ("process", "args", I),
    ("process", "env"), ("process", "env", I), ("process", "cwd"), ("process", "user"),
    ("process", "user", "uid"), ("process", "user", "gid"), ("process", "user", "umask"),
    ("process", "user", "additionalGids"), ("process", "user", "additionalGids", I),
    ("process", "user", "username"), ("process", "capabilities"),
    ("process", "capabilities", "bounding", I), ("process", "capabilities", "ambient"),
    ("process", "capabilities", "effective", I), ("process", "rlimits"),
    ("process", "rlimits", I, "type"), ("process", "rlimits", I, "soft"),
    ("process", "rlimits", I, "hard"), ("process", "oomScoreAdj"), ("process", "terminal"),
    ("process", "consoleSize"), ("process", "consoleSize", "height"),
    ("process", "noNewPrivileges"), ("process", "apparmorProfile"),
    ("root",), ("root", "path"), ("root", "readonly"), ("hostname",), ("domainname",),
    ("mounts",), ("mounts", I), ("mounts", I, "destination"), ("mounts", I, "type"),
    ("mounts", I, "source"), ("mounts", I, "options"), ("mounts", I, "options", I),
    ("mounts", I, "uidMappings"), ("mounts", 9, "destination"), ("mounts", 9, "options"),
    ("mounts", -1, "destination"), ("mounts", -1, "source"), ("mounts", -1, "type"),
    ("mounts", -1, "options"), ("mounts", -1, "options", -1), ("mounts", 3, "destination"),
    ("mounts", 6, "destination"), ("mounts", 2, "options", -1),
    ("linux",), ("linux", "namespaces"), ("linux", "namespaces", I),
    ("linux", "namespaces", I, "type"), ("linux", "namespaces", I, "path"),
    ("linux", "namespaces", 9), ("linux", "uidMappings"), ("linux", "uidMappings", I),
    ("linux", "uidMappings", I, "size"), ("linux", "uidMappings", I, "hostID"),
    ("linux", "uidMappings", I, "containerID"), ("linux", "gidMappings", I, "size"),
    ("linux", "devices"), ("linux", "devices", I), ("linux", "devices", I, "type"),
    ("linux", "devices", I, "path"), ("linux", "devices", I, "major"),
    ("linux", "devices", I, "minor"), ("linux", "devices", I, "fileMode"),
    ("linux", "devices", I, "uid"), ("linux", "resources"), ("linux", "resources", "memory"),
    ("linux", "resources", "memory", "limit"), ("linux", "resources", "pids", "limit"),
    ("linux", "resources", "cpu", "quota"), ("linux", "resources", "cpu", "period"),
    ("linux", "resources", "devices"), ("linux", "resources", "devices", I),
    ("linux", "cgroupsPath"), ("linux", "sysctl"), ("linux", "sysctl", "kernel.msgmax"),
    ("linux", "seccomp"), ("linux", "seccomp", "defaultAction"),
    ("linux", "seccomp", "defaultErrnoRet"), ("linux", "seccomp", "architectures"),
    ("linux", "seccomp", "flags"), ("linux", "seccomp", "syscalls"),
    ("linux", "seccomp", "syscalls", I, "names"), ("linux", "seccomp", "syscalls", I, "action"),
    ("linux", "seccomp", "syscalls", I, "errnoRet"),
    ("linux", "seccomp", "syscalls", I, "args", I, "index"),
    ("linux", "seccomp", "syscalls", I, "args", I, "op"),
    ("linux", "seccomp", "syscalls", I, "args", I, "value"),
    ("linux", "seccomp", "listenerPath"), ("linux", "rootfsPropagation"),
    ("linux", "maskedPaths"), ("linux", "maskedPaths", I), ("linux", "readonlyPaths", I),
    ("linux", "mountLabel"), ("hooks",), ("hooks", "prestart", I, "path"),
    ("hooks", "createRuntime", I, "timeout"), ("hooks", "poststop", I, "args"),
    ("annotations",), ("annotations", "org.example"),
]


def _paths(obj: object, prefix: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(obj: object, path: tuple[str | int, ...], value: object) -> object:
    """obj with path set to value; intermediates created; a mismatching shape is left."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    blank: object = [] if rest and isinstance(rest[0], int) else {}
    if isinstance(head, int) and isinstance(obj, list):
        if head < 0 and obj:  # -1: the last element
            obj[head] = _set(obj[head], rest, value)
        elif 0 <= head < len(obj):
            obj[head] = _set(obj[head], rest, value)
        else:
            obj.append(_set(copy.deepcopy(blank), rest, value))
    elif isinstance(head, str) and isinstance(obj, dict):
        obj[head] = _set(obj.get(head, copy.deepcopy(blank)), rest, value)
    return obj


def _delete(obj: object, path: tuple[str | int, ...]) -> object:
    if not path:
        return None
    parent: object = obj
    for key in path[:-1]:
        if isinstance(parent, dict) and isinstance(key, str) and key in parent:
            parent = parent[key]
        elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
            parent = parent[key]
        else:
            return obj
    last = path[-1]
    if isinstance(parent, dict) and isinstance(last, str):
        parent.pop(last, None)
    elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
        del parent[last]
    return obj


SECCOMP_PROFILE: dict[str, object] = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
    "syscalls": [
        {"names": ["read", "write", "exit_group", "openat", "execve"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
        {"names": ["mknodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
         "args": [{"index": 2, "value": 0o170000, "valueTwo": 0o20000,
                   "op": "SCMP_CMP_MASKED_EQ"}]},
    ],
}


def base_config(rootfs: str, rich: bool, bind_source: str) -> dict[str, Any]:
    """A valid user-namespaced config (runc's template + mappings); `rich` adds the
    optional parts (devices, a bind, seccomp, limits, hooks) for mutations to hit."""
    cfg: dict[str, Any] = default_config()
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = ["true"]
    cfg["root"] = {"path": rootfs, "readonly": False}
    linux = cfg["linux"]
    linux["namespaces"] = [n for n in linux["namespaces"] if n["type"] != "user"] + [
        {"type": "user"}]  # the template has one already; the range is picked here
    m = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    linux["uidMappings"] = copy.deepcopy(m)
    linux["gidMappings"] = copy.deepcopy(m)
    if rich:
        linux["devices"] = [{"type": "c", "path": "/dev/fuse", "major": 10, "minor": 229,
                             "fileMode": 0o666, "uid": 0, "gid": 0}]
        cfg["mounts"].append({"destination": "/mnt", "type": "bind", "source": bind_source,
                              "options": ["rbind", "ro", "nosuid"]})
        linux["seccomp"] = copy.deepcopy(SECCOMP_PROFILE)
        linux["resources"] = {"memory": {"limit": 1 << 28}, "pids": {"limit": 64},
                              "cpu": {"quota": 50000, "period": 100000}}
        linux["sysctl"] = {"kernel.msgmax": "8192"}
        cfg["process"]["oomScoreAdj"] = 100
        cfg["hooks"] = {"poststop": [{"path": "/nonexistent-hook", "args": ["x"]}]}
        cfg["annotations"] = {"org.example": "x"}
    return cfg


def value_for(current: object) -> st.SearchStrategy[object]:
    """Half of the time a value of the field's own type (so the mutation gets past
    the type check and reaches the code behind it), else anything."""
    if isinstance(current, str):
        typed: st.SearchStrategy[object] = st.sampled_from(HOSTILE_STRINGS) | st.text(max_size=20)
    elif isinstance(current, bool):
        typed = st.booleans()
    elif isinstance(current, int):
        typed = st.sampled_from(HOSTILE_INTS) | st.integers()
    elif isinstance(current, list) and current and isinstance(current[0], str):
        typed = st.lists(st.sampled_from(HOSTILE_STRINGS), min_size=1, max_size=4)
    else:
        return hostile_values
    return typed | hostile_values


@st.composite
def mutated_configs(draw: st.DrawFn, rootfs: str, bind_source: str) -> object:
    cfg: object = base_config(rootfs, draw(st.sampled_from([False, True, True])), bind_source)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["target", "target", "target", "any", "inject", "inject",
                                   "delete", "unknown", "dup"]))
        if op == "inject":
            # A hostile character or fragment inside one of the config's strings.
            leaves = [p for p in _paths(cfg) if isinstance(_get(cfg, p), str)]
            pathish = [p for p in leaves if p and p[-1] in PATH_KEYS]
            prefer_paths = draw(st.booleans())
            if pathish and prefer_paths:
                leaves = pathish  # the strings that become syscall arguments on the host
            if leaves:
                path = draw(st.sampled_from(leaves))
                old = _get(cfg, path)
                assert isinstance(old, str)
                at = draw(st.integers(0, len(old)))
                frag = draw(st.sampled_from(INJECT))
                cfg = _set(cfg, path, old[:at] + frag + old[at:])
        elif op in ("target", "any"):
            path = draw(st.sampled_from(TARGETS if op == "target" else list(_paths(cfg))))
            cfg = _set(cfg, path, draw(value_for(_get(cfg, path))))
        elif op == "delete":
            cfg = _delete(cfg, draw(st.sampled_from(list(_paths(cfg))[1:] or [()])))
        elif op == "unknown":
            parents = [p for p in _paths(cfg) if isinstance(_get(cfg, p), dict)]
            if parents:
                p = draw(st.sampled_from(parents))
                cfg = _set(cfg, (*p, draw(st.text(max_size=8) | st.sampled_from(HOSTILE_STRINGS))),
                           draw(json_scalars))
        else:
            lists = [p for p in _paths(cfg) if isinstance(_get(cfg, p), list) and _get(cfg, p)]
            if lists:
                p = draw(st.sampled_from(lists))
                seq = _get(cfg, p)
                assert isinstance(seq, list)
                seq.append(copy.deepcopy(seq[0]))
    return cfg


def _get(obj: object, path: tuple[str | int, ...]) -> object:
    for key in path:
        if isinstance(obj, dict) and isinstance(key, str):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return None
    return obj


def any_configs(rootfs: str, bind_source: str) -> st.SearchStrategy[object]:
    return st.one_of(
        mutated_configs(rootfs, bind_source),
        mutated_configs(rootfs, bind_source),
        json_values,
        st.dictionaries(st.sampled_from(["ociVersion", "process", "root", "mounts", "linux",
                                         "hooks", "hostname", "annotations"]),
                        json_values, max_size=6),
    )


# --- the in-process targets ----------------------------------------------------------------


def _one_line(exc: UspawnError | seccomp.SeccompPolicyError) -> str:
    """What the front ends print (oci.seccomp_for wraps SeccompPolicyError in SpecError)."""
    return exc.one_line() if isinstance(exc, UspawnError) else SpecError(str(exc)).one_line()


def check_config(obj: object) -> str:
    """decode + validate + plan (+ the seccomp conversion): 'ok' or 'error'."""
    try:
        spec = S.decode(S.Spec, obj, unknown=[])
        S.validate(spec)
        planmod.build(spec, Request())
        if spec.linux is not None and spec.linux.seccomp is not None:
            seccomp.policy_from_oci(spec.linux.seccomp)
    except ALLOWED as exc:
        msg = _one_line(exc)
        assert msg and msg.isprintable(), f"error is not one printable line: {msg!r}"
        return "error"
    return "ok"


def _dump(obj: object, deep: int) -> str:
    """JSON text; `deep` > 0 puts a nesting deeper than any parser recursion limit in."""
    text = json.dumps(obj, allow_nan=True)
    if deep and isinstance(obj, dict):
        inner = "[" * deep + "]" * deep
        text = "{" + f'"annotations": {{"x": {inner}}}, ' + text[1:] if text != "{}" else (
            f'{{"annotations": {{"x": {inner}}}}}')
    return text


def check_bundle_text(bundle: Path, text: str | bytes) -> str:
    """oci.load_bundle on raw config.json bytes (the JSON parser is fuzzed too)."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    (bundle / "config.json").write_bytes(data)
    try:
        spec = oci.load_bundle(str(bundle), lambda msg: None)
        planmod.build(spec, Request())
        if spec.linux is not None and spec.linux.seccomp is not None:
            seccomp.policy_from_oci(spec.linux.seccomp)
    except ALLOWED as exc:
        msg = _one_line(exc)
        assert msg and msg.isprintable(), f"error is not one printable line: {msg!r}"
        return "error"
    return "ok"


def seccomp_profiles() -> st.SearchStrategy[object]:
    rule = st.fixed_dictionaries(
        {"names": st.lists(st.sampled_from(["read", "mknodat", "keyctl", "bpf", "no_such_call",
                                            "", "clone3", "personality"]) | st.text(max_size=8),
                           max_size=3)},
        optional={
            "action": st.sampled_from(oci_defaults_actions()) | json_scalars,
            "errnoRet": st.sampled_from(HOSTILE_INTS) | json_scalars,
            "args": st.lists(st.fixed_dictionaries(
                {"index": st.sampled_from(HOSTILE_INTS) | json_scalars,
                 "value": st.sampled_from(HOSTILE_INTS) | json_scalars,
                 "op": st.sampled_from(oci_defaults_ops()) | json_scalars},
                optional={"valueTwo": st.sampled_from(HOSTILE_INTS) | json_scalars}),
                max_size=3) | json_scalars,
        })
    profile = st.fixed_dictionaries(
        {},
        optional={
            "defaultAction": st.sampled_from(oci_defaults_actions()) | json_scalars,
            "defaultErrnoRet": st.sampled_from(HOSTILE_INTS) | json_scalars,
            "architectures": st.lists(st.sampled_from(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86",
                                                       "SCMP_ARCH_AARCH64", "SCMP_ARCH_NOPE",
                                                       "x86_64"]) | json_scalars, max_size=3),
            "flags": st.lists(st.sampled_from(["SECCOMP_FILTER_FLAG_TSYNC",
                                               "SECCOMP_FILTER_FLAG_LOG", "NOPE"])
                              | json_scalars, max_size=2),
            "syscalls": st.lists(rule, max_size=4) | json_scalars,
            "listenerPath": st.none() | st.text(max_size=5),
        })
    mutated = st.builds(lambda v, p: _set(copy.deepcopy(SECCOMP_PROFILE), p, v),
                        hostile_values,
                        st.sampled_from([p for p in _paths(SECCOMP_PROFILE) if p]))
    return st.one_of(profile, mutated, json_values)


def oci_defaults_actions() -> list[str]:
    from uspawn.oci.defaults import SECCOMP_ACTIONS

    return [*SECCOMP_ACTIONS, "SCMP_ACT_NOTIFY", "SCMP_ACT_NOPE", "ALLOW"]


def oci_defaults_ops() -> list[str]:
    from uspawn.oci.defaults import SECCOMP_OPERATORS

    return [*SECCOMP_OPERATORS, "SCMP_CMP_NOPE", "EQ"]


def check_seccomp(obj: object, compile_it: bool) -> str:
    try:
        policy = seccomp.policy_from_oci(obj)  # type: ignore[arg-type]  # hostile on purpose
        if compile_it:
            # No cache (policy_bpf would store every random program under /var/cache).
            seccomp.compile_bpf(seccomp.with_mknod_filter(policy))
    except ALLOWED as exc:
        msg = _one_line(exc)
        assert msg and msg.isprintable(), f"error is not one printable line: {msg!r}"
        return "error"
    return "ok"


# --- argv -------------------------------------------------------------------------------------

CLI_WORDS = [
    "run", "boot", "list", "status", "stop", "kill", "exec", "shell", "logs", "doctor", "check",
    "selftest", "mkrootfs", "busybox", "help", "--help", "-h", "--version", "--", "-", "--json",
    "-D", "--directory", "-M", "--machine", "--name", "--hostname", "-U", "--private-users",
    "--private-users-ownership", "-u", "--user", "--chdir", "-E", "--setenv", "--capability",
    "--drop-capability", "--no-new-privileges", "--bind", "--bind-ro", "--network",
    "--read-only", "-t", "--tty", "-v", "--verbose", "--debug", "-d", "--detach",
    "--ready-timeout", "--timeout", "-f", "--follow", "--path", "pick", "no", "auto", "map",
    "chown", "off", "private", "host", "TERM", "SIGKILL", "9", "0", "65", "RTMIN+3", "RTMIN+99",
    "--bind=/etc:/x:ro", "-Uno", "-Mx", "-vt", "--network=", "--timeout=-1", "--timeout=nan",
    "--timeout=inf", "--ready-timeout=0", "--nope", "-Z",
]
RUNC_WORDS = [
    "spec", "create", "start", "run", "state", "kill", "delete", "list", "ps", "pause",
    "resume", "features", "exec", "checkpoint", "--help", "-h", "-v", "--version", "--", "-",
    "--debug", "--systemd-cgroup", "--rootless", "true", "--criu", "--log-format", "json",
    "text", "xml", "--log-level", "-b", "--bundle", "--pid-file", "--console-socket",
    "--no-pivot", "--no-new-keyring", "--preserve-fds", "--no-subreaper", "-d", "--detach",
    "--keep", "-a", "--all", "-f", "--force", "--format", "table", "-q", "--quiet", "-p",
    "--process", "-t", "--tty", "--cwd", "-e", "--env", "-u", "--user", "-c", "--cap",
    "--no-new-privs", "--apparmor", "--process-label", "-g", "--additional-gids",
    "--ignore-paused", "--cgroup", "TERM", "SIGKILL", "KILL", "9", "0", "-1", "65",
    "RTMIN+3", "RTMIN+99", "SIGRTMAX", "ZZ", "c1", "bad/id", "..", ".", "a" * 1100,
    "--preserve-fds=-1", "--preserve-fds=99999999999999999999", "--format=json", "-fq",
]
# An argv string has no NUL and is UTF-8, or undecodable bytes that Python
# surrogate-escapes (such as "/\udcff" in the hostile strings).
ARG_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
                   max_size=20)


ARG_HOSTILE = [s for s in HOSTILE_STRINGS if "\x00" not in s and "\ud800" not in s]


def arg_values(sandbox: str) -> st.SearchStrategy[str]:
    return st.one_of(
        ARG_TEXT, st.sampled_from(ARG_HOSTILE), st.sampled_from([str(n) for n in HOSTILE_INTS]),
        st.sampled_from([sandbox, f"{sandbox}/new", f"{sandbox}/no/such/dir", "/nonexistent",
                         f"{sandbox}/../{os.path.basename(sandbox)}/x", "c1", "fz-1", "x" * 300,
                         "TERM", "KILL", "SIGRTMIN+2", "RTMIN+70", "²", "٣", "0x9", "+9",
                         " 9", "9 ", "1.5", "nan", "inf", "-inf", "1e9", "-0", "pick", "0:1",
                         "524288:65536", "4294967295:2", "a:b:c", "/etc:/x:ro", "K=V", "=V"]),
    )


@st.composite
def structured_argv(draw: st.DrawFn, commands: list[Any], global_opts: list[Any],
                    sandbox: str) -> list[str]:
    """[global options] COMMAND [its options and positionals, with hostile values]."""
    values = arg_values(sandbox)

    def opt_tokens(opts: list[Any]) -> list[str]:
        o = draw(st.sampled_from(opts))
        name = draw(st.sampled_from(list(o.names)))
        if o.kind == "flag":
            return [name]
        value = draw(st.sampled_from(list(o.choices)) | values if o.choices else values)
        if name.startswith("--") and draw(st.booleans()):
            return [f"{name}={value}"]
        return [name, value]

    argv: list[str] = []
    usable_globals = [o for o in global_opts if "--root" not in o.names and "--log" not in o.names]
    for _ in range(draw(st.integers(0, 2))):
        argv += opt_tokens(usable_globals)
    cmd = draw(st.sampled_from(commands))
    argv.append(cmd.name)
    # Mostly the right number of positionals, so that parsing succeeds and the
    # command itself meets the hostile values; sometimes too few or too many.
    n_pos = len(cmd.positionals) + draw(st.sampled_from([0, 0, 0, 0, -1, 1]))
    items = ["pos"] * max(n_pos, 0) + ["opt"] * draw(st.integers(0, 3))
    if draw(st.integers(0, 9)) == 0:
        items.append(draw(st.sampled_from(["dashdash", "junk"])))
    for kind in draw(st.permutations(items)):
        if kind == "opt" and cmd.opts:
            argv += opt_tokens(cmd.opts)
        elif kind == "dashdash":
            argv.append("--")
        elif kind == "junk":
            argv.append(draw(st.sampled_from(["-", "--nope", "-Z", "-h", "--help"]) | ARG_TEXT))
        elif kind == "pos":
            argv.append(draw(values))
    if cmd.rest is not None and draw(st.booleans()):
        argv += ["--", *draw(st.lists(values, max_size=3))]
    return argv


def argvs(words: list[str], commands: list[Any], global_opts: list[Any],
          sandbox: str) -> st.SearchStrategy[list[str]]:
    return st.one_of(
        structured_argv(commands, global_opts, sandbox),
        structured_argv(commands, global_opts, sandbox),
        structured_argv(commands, global_opts, sandbox),
        st.lists(st.sampled_from(words) | arg_values(sandbox), max_size=8),
    )


def _is_dir_or_file(path: object) -> bool:
    return isinstance(path, str) and bool(path) and os.path.lexists(path)


def _inside(path: object, sandbox: str) -> bool:
    try:
        real = os.path.realpath(os.path.join(sandbox, str(path)))
    except OSError:  # a link it may not read (/proc/1/root in a container): not ours
        return False
    return real == sandbox or real.startswith(sandbox + "/")


# Commands that only read the state directory: the only ones run against a --root
# outside the sandbox (/proc/1/root is the host's / where pid 1 shares our namespaces).
READ_ONLY_CLI = {"list", "status"}
READ_ONLY_RUNC = {"list", "state", "features", "spec"}


def _safe_cli(argv: list[str], sandbox: str, root: str | None = None) -> bool:
    """argv for `uspawn` that cannot start a container, walk the host or write outside sandbox
    (`root`: the --root the caller chose, sandbox when None)."""
    from uspawn.base.cmdline import HelpRequested, parse
    from uspawn.base.errors import UsageError

    try:
        cmd, ns = parse(cli.GLOBAL_OPTS, cli.COMMANDS, argv)
    except (UsageError, HelpRequested):
        return True
    if ns.root != (sandbox if root is None else root):
        return False
    if root is not None and not _inside(root, sandbox) and cmd not in READ_ONLY_CLI:
        return False
    if cmd in ("run", "boot"):
        return not _is_dir_or_file(ns.directory) and not getattr(ns, "detach", False)
    if cmd in ("doctor", "selftest", "mkrootfs", "check"):
        return (cmd == "mkrootfs" and ns.kind != "busybox") or (
            cmd == "check" and (not _is_dir_or_file(ns.rootfs) or _inside(ns.rootfs, sandbox)))
    if cmd in ("enable", "disable"):
        return False  # symlinks in /etc/systemd/system: tests/test_enable.py, in a temp dir
    if cmd == "logs":
        from uspawn.machine.boot import LOG_DIR

        return not os.path.lexists(os.path.join(LOG_DIR, f"{ns.name}.console.log"))
    return True  # list, status, stop, kill, exec, shell: name lookups in the sandbox


def _safe_runc(argv: list[str], sandbox: str, root: str | None = None) -> bool:
    from uspawn.base.cmdline import HelpRequested, parse
    from uspawn.base.errors import UsageError

    if oci_cli._wants_version(argv):
        return True
    try:
        cmd, ns = parse(oci_cli.GLOBAL, oci_cli.COMMANDS, argv, prog="uspawn-runc")
    except (UsageError, HelpRequested):
        return True
    if ns.root != (sandbox if root is None else root) or (
            ns.log and not ns.log.startswith(sandbox + "/")):
        return False
    if root is not None and not _inside(root, sandbox) and cmd not in READ_ONLY_RUNC:
        return False
    bundle = getattr(ns, "bundle", None)
    if cmd == "spec":
        return not _is_dir_or_file(bundle) or _inside(bundle, sandbox)
    if cmd in ("create", "run"):
        return not os.path.lexists(os.path.join(str(bundle), "config.json")) and not (
            _is_dir_or_file(ns.pid_file) or _is_dir_or_file(ns.console_socket))
    if cmd == "exec":
        return not (_is_dir_or_file(ns.pid_file) or _is_dir_or_file(ns.console_socket))
    return True


def run_main(main: Callable[[list[str]], int], argv: list[str], prog: str, cwd: str) -> int:
    """main(argv) with output captured and relative paths landing in cwd (the sandbox)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except ALLOWED as exc:  # pragma: no cover - main catches them; keep the message
            raise AssertionError(f"{prog} {argv!r}: {exc!r} escaped main()") from exc
    assert isinstance(code, int), (argv, code)
    lines = err.getvalue().split("\n")[:-1]
    assert all(line.startswith(f"{prog}: ") and line.isprintable() for line in lines), \
        (argv, lines)
    assert "Traceback" not in err.getvalue() and "internal error" not in err.getvalue(), \
        (argv, lines)
    if code != 0:
        assert code in EXIT_CODES, (argv, code, lines)
        assert lines, f"{prog} {argv!r}: exit {code} without a message"
        errors = [line for line in lines if not line.startswith(f"{prog}: warning: ")]
        assert len(errors) == 1, (argv, lines)
    return code


def check_cli(argv: list[str], sandbox: str) -> int:
    return run_main(cli.main, ["--root", sandbox, *argv], "uspawn", sandbox)


def check_runc(argv: list[str], sandbox: str) -> int:
    return run_main(oci_cli.main, ["--root", sandbox, *argv], "uspawn-runc", sandbox)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real busybox rootfs (made once per module), a bind source, a bundle dir and
    a sandbox for state roots and `spec` output."""
    from uspawn.tree.busybox import build_busybox_rootfs

    base = tmp_path_factory.mktemp("fuzz")
    rootfs = base / "shared" / "rootfs"
    try:
        build_busybox_rootfs(str(rootfs))
    except Exception as exc:
        skip_or_fail(f"cannot build busybox rootfs: {exc}")
    (base / "bindsrc").mkdir()
    (base / "bundle").mkdir()
    (base / "bundle" / "rootfs").symlink_to(rootfs)  # relative root.path "rootfs" resolves
    (base / "sandbox").mkdir()
    return {"base": base, "rootfs": rootfs, "bindsrc": base / "bindsrc",
            "bundle": base / "bundle", "sandbox": base / "sandbox"}


def _strategies(d: dict[str, Path]) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "config": any_configs(str(d["rootfs"]), str(d["bindsrc"])),
        "text": st.tuples(any_configs("rootfs", str(d["bindsrc"])), st.sampled_from(
            [0, 0, 0, 10, 1500, 100_000])) | st.binary(max_size=64) | st.sampled_from(
            [b"", b"{", b"[]", b"null", b"\xff\xfe{}", b'{"a": NaN}', b'{"a":1e999999}',
             b'{"process": {"args": ["\\ud800"]}}', b"{}" * 3, b'{"a": 1} x',
             b'{"root": {"path": "rootfs"}, "process": {"args": ["x"], "env": ["\\u0000=1"]}}']),
        "seccomp": st.tuples(seccomp_profiles(), st.booleans()),
        "cli": argvs(CLI_WORDS, cli.COMMANDS, cli.GLOBAL_OPTS, str(d["sandbox"])),
        "runc": argvs(RUNC_WORDS, oci_cli.COMMANDS, oci_cli.GLOBAL, str(d["sandbox"])),
        "cli-state": state_cases(STATE_CLI_CMDS, str(d["sandbox"])),
        "runc-state": state_cases(STATE_RUNC_CMDS, str(d["sandbox"])),
        "stdio": stdio_cases(),
    }


def _run_target(name: str, value: Any, d: dict[str, Path]) -> None:
    sandbox = str(d["sandbox"])
    if name == "config":
        check_config(value)
    elif name == "text":
        if isinstance(value, tuple):
            obj, deep = value
            check_bundle_text(d["bundle"], _dump(obj, deep))
        else:
            check_bundle_text(d["bundle"], value)
    elif name == "seccomp":
        check_seccomp(value[0], value[1])
    elif name == "cli":
        with contextlib.chdir(sandbox):
            safe = _safe_cli(["--root", sandbox, *value], sandbox)
        if safe:
            check_cli(value, sandbox)
            _clean_sandbox(d["sandbox"])
    elif name == "runc":
        with contextlib.chdir(sandbox):
            safe = _safe_runc(["--root", sandbox, *value], sandbox)
        if safe:
            check_runc(value, sandbox)
            _clean_sandbox(d["sandbox"])
    elif name == "cli-state":
        check_state_case("uspawn", value, d["sandbox"])
    elif name == "runc-state":
        check_state_case("uspawn-runc", value, d["sandbox"])
    elif name == "stdio":
        check_stdio_case(value, d["sandbox"])


def _clean_sandbox(sandbox: Path) -> None:
    for entry in sandbox.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


# --- hostile state roots, state directories and stdio (issue 15) ------------------------------
#
# The argv fuzz above pins --root to an empty sandbox, so it never met `--root /etc/passwd`,
# /proc/1/root, a state directory holding a file where a directory belongs, corrupted or
# foreign records, or a closed stdout. These targets draw the --root (or $USPAWN_STATE_DIR)
# and the directory's contents too. Records are made so that nothing on the host can be hit:
# their pids never match a live process's start time, their cgroups and leases point into
# the sandbox, their hooks at nothing; outside the sandbox only read-only commands run.

ROOT_KINDS = ["file", "under-file", "fifo", "loop", "dangling", "devnull", "etc-passwd",
              "proc1-root", "empty", "missing", "long", "relative", "containers-file",
              "records", "records", "records"]
RECORD_NAMES = ["web", "c1", "fz-1", "x" * 200]
RECORD_SHAPES = ["json", "json", "json", "garbage", "deep", "fifo", "dir", "none", "symlink",
                 "file", "lock-dir", "lock-fifo", "huge-line"]
RECORD_KEYS = ["name", "started", "machine", "ready", "stopping", "uid_base", "uid_size",
               "rootfs", "ownership", "uuid", "status_text", "console_log", "bundle", "created",
               "annotations", "id", "status", "kill_signal", "stop_timeout", "ociVersion"]
SAFE_PIDS = [0, -1, 1, 2, 2**31, 2**70, -(2**70), True, False, None, "1", 1.5, 4194305,
             float("nan"), float("inf")]
# Never a live process's start time (None is what proc_starttime() says of a missing pid).
SAFE_STARTS = [None, -1, "x", 1.5, float("nan"), [1], {"a": 1}]


def _safe_cgroups(sandbox: str) -> st.SearchStrategy[object]:
    gone = f"{sandbox}/no-cgroup"
    return st.sampled_from([None, "x", 5, [], {}, {"dirs": [gone], "made": [gone]},
                            {"dirs": "x", "made": 5, "unified": 1}, {"dirs": [1, None]},
                            {"name": "\ud800", "layout": [], "dirs": [gone + "/a"]}])


@st.composite
def hostile_records(draw: st.DrawFn, sandbox: str) -> list[tuple[str, str, bool, object]]:
    """(directory name, shape, lock held by us, record) for each entry of a state dir."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(RECORD_NAMES))
        rec: dict[str, object] = draw(st.fixed_dictionaries(
            {}, optional={k: json_values for k in RECORD_KEYS}))
        if draw(st.booleans()):
            rec["name"] = name
        rec["pid"] = draw(st.sampled_from(SAFE_PIDS) | st.just(os.getpid()))
        rec["pid_start"] = draw(st.sampled_from(SAFE_STARTS))
        rec["cgroup"] = draw(_safe_cgroups(sandbox))
        rec["range_lease"] = draw(st.sampled_from([None, 5, f"{sandbox}/no-lease", ""]))
        rec["poststop"] = draw(st.sampled_from(
            [None, "x", [], [1], [[1, 2]], [["/nonexistent-hook", [], [], 1]],
             [["relative-hook", "x", None, None]]]))
        if draw(st.booleans()):
            rec = {k: v for k, v in rec.items() if v is not None}
        value: object = rec if draw(st.integers(0, 9)) else draw(json_values)
        out.append((name, draw(st.sampled_from(RECORD_SHAPES)), draw(st.booleans()), value))
    return out


def _write_record(d: Path, shape: str, value: object) -> None:
    """d/state.json shaped as asked (d exists)."""
    path = d / "state.json"
    if shape == "json":
        path.write_text(json.dumps(value))
    elif shape == "garbage":
        path.write_bytes(b"\xff{\x00\x1b[2J")
    elif shape == "deep":
        path.write_text("[" * 50_000)
    elif shape == "fifo":
        os.mkfifo(path)
    elif shape == "dir":
        path.mkdir()
    elif shape == "symlink":
        path.symlink_to("/etc/hostname")
    elif shape == "huge-line":
        path.write_text(json.dumps({"name": "x" * 100_000, "pid": 1, "pid_start": -1}))


def make_state_root(kind: str, sandbox: Path, records: list[tuple[str, str, bool, object]],
                    held: list[int]) -> str:
    """A --root of `kind` (made under sandbox); locks of held records are flocked by us
    (their fds appended to `held`), as a live container's runtime holds them."""
    fixed = {"devnull": "/dev/null", "etc-passwd": "/etc/passwd", "proc1-root": "/proc/1/root",
             "empty": "", "relative": "st-relative"}
    if kind in fixed:
        return fixed[kind]
    base = sandbox / f"st-{kind}"
    if kind in ("file", "under-file"):
        base.write_text("not a directory")
        return str(base / "sub") if kind == "under-file" else str(base)
    if kind == "fifo":
        os.mkfifo(base)
    elif kind == "loop":
        base.symlink_to(base.name)
    elif kind == "dangling":
        base.symlink_to("no/such/target")
    elif kind == "missing":
        return str(base / "a" / "b")
    elif kind == "long":
        return str(sandbox / ("x" * 300))
    elif kind == "containers-file":
        base.mkdir()
        (base / "containers").write_text("x")
    elif kind == "records":
        base.mkdir()
        (base / "containers").mkdir()
        seen = set()
        for name, shape, lock_held, value in records:
            if name in seen:  # the first entry of a name wins
                continue
            seen.add(name)
            # The same entry in both layouts: uspawn's containers/NAME and uspawn-runc's
            # NAME/ (each CLI meets the other's records as foreign ones).
            for d in (base / "containers" / name, base / name):
                if shape == "file":
                    d.write_text("x")
                    continue
                d.mkdir()
                _write_record(d, shape, value)
                if d.parent.name != "containers":
                    continue
                if shape == "lock-dir":
                    (d / "lock").mkdir()
                elif shape == "lock-fifo":
                    os.mkfifo(d / "lock")
                elif lock_held:
                    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    held.append(fd)
                else:
                    (d / "lock").touch()
    return str(base)


STATE_CLI_CMDS = [c for c in cli.COMMANDS if c.name in (
    "list", "status", "stop", "kill", "exec", "shell", "run", "boot", "logs")]
STATE_RUNC_CMDS = [c for c in oci_cli.COMMANDS if c.name in (
    "list", "state", "kill", "delete", "start", "pause", "resume", "ps", "exec", "create",
    "spec")]


@st.composite
def state_argv(draw: st.DrawFn, commands: list[Any], sandbox: str) -> list[str]:
    """COMMAND [options] NAME... with names that often match a record."""
    values = arg_values(sandbox)
    cmd = draw(st.sampled_from(commands))
    argv = [cmd.name]
    for _ in range(draw(st.integers(0, 2))):
        if cmd.opts:
            o = draw(st.sampled_from(cmd.opts))
            name = draw(st.sampled_from(list(o.names)))
            if o.kind == "flag":
                argv.append(name)
            else:
                argv += [name, draw(st.sampled_from(list(o.choices)) if o.choices else values)]
    n = len(cmd.positionals) - draw(st.sampled_from([0, 0, 0, cmd.optional_positionals]))
    for _ in range(n):
        argv.append(draw(st.sampled_from(RECORD_NAMES) | values))
    if draw(st.integers(0, 4)) == 0:
        argv += ["--", *draw(st.lists(st.sampled_from(RECORD_NAMES) | values, max_size=2))]
    return argv


def state_cases(commands: list[Any], sandbox: str) -> st.SearchStrategy[Any]:
    return st.tuples(st.sampled_from(ROOT_KINDS), hostile_records(sandbox),
                     state_argv(commands, sandbox), st.integers(0, 4))


def leak_snapshot(sandbox: Path, names: list[str]) -> tuple[int, frozenset[int], frozenset[str]]:
    """What a command could leave behind: mounts in the sandbox, our children, uspawn
    cgroups of the names it was given (others' tests run containers meanwhile)."""
    mounts = len(mounts_under(sandbox))
    children: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                children |= {int(p) for p in f.read().split()}
        except OSError:
            pass
    cgroups = set()
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory",
                 "/sys/fs/cgroup/pids"):
        cgroups |= {f"{base}/uspawn/{n}" for n in names if os.path.isdir(f"{base}/uspawn/{n}")}
    return mounts, frozenset(children), frozenset(cgroups)


CASE_TIMEOUT_S = 20  # no command on a hostile state dir may block (a FIFO open()ed, a lock)


@contextlib.contextmanager
def hang_alarm(seconds: int, what: object) -> Iterator[None]:
    """A blocked case fails (SIGALRM interrupts the syscall) instead of hanging the run."""
    import signal

    def fire(signum: int, frame: object) -> None:
        raise AssertionError(f"hang: {what!r} still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_state_case(prog: str, value: Any, sandbox: Path) -> None:
    """One hostile (root kind, records, argv, via-env) case of `prog` (uspawn|uspawn-runc)."""
    kind, records, argv, how = value
    held: list[int] = []
    try:
        with contextlib.chdir(sandbox):
            root = make_state_root(kind, sandbox, records, held)
            full = ["--root", root, *argv]
            safe = (_safe_cli(full, str(sandbox), root) if prog == "uspawn"
                    else _safe_runc(full, str(sandbox), root))
        if not safe:
            return
        env_root = prog == "uspawn" and how == 0  # $USPAWN_STATE_DIR instead of --root
        main = cli.main if prog == "uspawn" else oci_cli.main
        names = [w for w in argv if w and "/" not in w and w not in (".", "..")]
        before = leak_snapshot(sandbox, names)
        old_env = os.environ.get("USPAWN_STATE_DIR")
        try:
            if env_root:
                os.environ["USPAWN_STATE_DIR"] = root
            with hang_alarm(CASE_TIMEOUT_S, (prog, kind, records, argv)):
                run_main(main, argv if env_root else full, prog, str(sandbox))
        finally:
            if old_env is None:
                os.environ.pop("USPAWN_STATE_DIR", None)
            else:
                os.environ["USPAWN_STATE_DIR"] = old_env
        assert leak_snapshot(sandbox, names) == before, (prog, kind, argv, "left behind")
    finally:
        for fd in held:
            os.close(fd)
        _clean_sandbox(sandbox)


# Closed and broken stdio: the real entry points in subprocesses (the kernel's EPIPE,
# Python's None sys.stdout for a closed fd 1), so fewer cases.
STDIO_MODES = ["close-1", "close-2", "close-012", "epipe", "full"]
STDIO_ARGV = [["--version"], ["--help"], ["list"], ["list", "--json"], ["status", "web"],
              ["stop", "web", "--timeout", "nan"], ["kill", "web", "--", "KILL"], ["nope"],
              ["features"], ["state", "c1"], ["spec", "--bundle", "/nonexistent/b"]]
STDIO_ROOTS = ["records", "missing", "file", "etc-passwd", "proc1-root", "empty"]


def check_stdio_case(value: Any, sandbox: Path) -> None:
    from test_oci import runtime_cmd

    prog, mode, argv, kind = value
    cmd = uspawn_cmd() if prog == "uspawn" else runtime_cmd()
    held: list[int] = []
    try:
        with contextlib.chdir(sandbox):
            root = make_state_root(kind, sandbox, [("web", "json", True, {"name": "web"})], held)
        full = [*cmd, "--root", root, *argv]
        closes = {"close-1": (1,), "close-2": (2,), "close-012": (0, 1, 2)}.get(mode, ())
        wrapper = [sys.executable, "-c", "import os, sys; [os.close(int(f)) for f in "
                   "sys.argv[1].split(',') if f]; os.execv(sys.argv[2], sys.argv[2:])",
                   ",".join(map(str, closes)), *full]
        env = {k: v for k, v in os.environ.items() if k != "USPAWN_DEBUG"}
        with tempfile.TemporaryFile("w+") as err:
            out: Any = subprocess.DEVNULL
            if mode == "epipe":
                rfd, out = os.pipe()
                os.close(rfd)
            elif mode == "full":
                out = open("/dev/full", "w")
            try:
                code = subprocess.run(wrapper, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                      cwd=sandbox, env=env, timeout=30).returncode
            finally:
                if isinstance(out, int) and out >= 0:
                    os.close(out)
                elif hasattr(out, "close"):
                    out.close()
            err.seek(0)
            text = err.read()
        lines = text.splitlines()
        assert "Traceback" not in text and "internal error" not in text, (value, text)
        assert len(lines) <= 1, (value, text)
        assert code in (0, 141, *EXIT_CODES), (value, code, text)
        if mode != "epipe" and code != 0 and "2" not in mode.partition("-")[2]:
            assert len(lines) == 1, (value, code, text)
    finally:
        for fd in held:
            os.close(fd)
        _clean_sandbox(sandbox)


def stdio_cases() -> st.SearchStrategy[Any]:
    return st.tuples(st.sampled_from(["uspawn", "uspawn-runc"]), st.sampled_from(STDIO_MODES),
                     st.sampled_from(STDIO_ARGV), st.sampled_from(STDIO_ROOTS))


# --- in-process tests (default suite: a few hundred cases) ----------------------------------


DEFAULT_EXAMPLES = {"config": 250, "text": 100, "seccomp": 120, "cli": 120, "runc": 120,
                    "cli-state": 200, "runc-state": 200, "stdio": 20}
# Subprocesses (~0.1 s each): fewer in the long run too.
LONG_OVERRIDE = {"stdio": 500}


@pytest.mark.parametrize("target", list(DEFAULT_EXAMPLES))
def test_fuzz_in_process(target: str, fuzz_dirs: dict[str, Path]) -> None:
    strategy = _strategies(fuzz_dirs)[target]

    @settings(max_examples=DEFAULT_EXAMPLES[target], **COMMON)
    @given(strategy)
    def run(value: Any) -> None:
        _run_target(target, value, fuzz_dirs)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("target", list(DEFAULT_EXAMPLES))
def test_fuzz_long(target: str, fuzz_dirs: dict[str, Path], request: pytest.FixtureRequest,
                   ) -> None:
    """>= 10,000 in-process cases per target: `pytest -m slow tests/test_fuzz.py`."""
    if not long_run_requested(request.config):
        pytest.skip("long fuzz run: pass -m slow or set USPAWN_FUZZ_LONG=1")
    strategy = _strategies(fuzz_dirs)[target]
    seen = {"n": 0}

    examples = LONG_OVERRIDE.get(target, LONG_EXAMPLES)

    @settings(max_examples=examples, **COMMON)
    @given(strategy)
    def run(value: Any) -> None:
        seen["n"] += 1
        _run_target(target, value, fuzz_dirs)

    run()
    assert seen["n"] >= examples


def test_pipeline_accepts_the_base_configs(fuzz_dirs: dict[str, Path]) -> None:
    """The mutations start from configs that pass: the fuzz exercises real code paths."""
    for rich in (False, True):
        cfg = base_config(str(fuzz_dirs["rootfs"]), rich, str(fuzz_dirs["bindsrc"]))
        assert check_config(cfg) == "ok"
        assert check_bundle_text(fuzz_dirs["bundle"], json.dumps(cfg)) == "ok"
    assert check_seccomp(SECCOMP_PROFILE, True) == "ok"
    assert check_runc(["features"], str(fuzz_dirs["sandbox"])) == 0
    assert check_cli(["list"], str(fuzz_dirs["sandbox"])) == 0


# --- end to end: uspawn-runc create + delete --force on mutated bundles -------------------------

E2E_EXAMPLES = int(os.environ.get("USPAWN_FUZZ_E2E_EXAMPLES", "30"))
E2E_TIMEOUT_S = 20  # a create that takes longer is a hang (the runtime is then SIGKILLed)
SAFE_HOOKS = ("/nonexistent-hook", "/bin/false", "relative-hook", "")
# Only nodes whose open has no side effect (a random major:minor could be a watchdog).
SAFE_DEVICES = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (10, 229), (4095, 1048575),
                (2**31, 0), (2**32, 2**32), (-1, -1)]


def _runtime(root: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Like test_oci.Oci: output through files (a created init inherits stdio)."""
    from test_oci import runtime_cmd

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run([*runtime_cmd(), "--root", str(root), *args], stdout=out,
                           stderr=err, stdin=subprocess.DEVNULL, timeout=timeout,
                           env=env)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())


def sanitize_for_host(cfg: object, rootfs: str, bundle: Path, cid: str) -> object:
    """Keep a mutated config from touching the host in ways the fuzz is not about:
    root.path only our rootfs (or nothing that exists), hooks that run nothing,
    harmless device numbers, no joins of host namespaces, our own cgroup path,
    seccomp profiles from a fixed set (the compiled programs are cached on disk)."""
    if not isinstance(cfg, dict):
        return cfg
    root = cfg.get("root")
    if isinstance(root, dict) and isinstance(root.get("path"), str):
        p = root["path"]
        try:
            resolved = os.path.normpath(os.path.join(str(bundle), p))
            exists = os.path.lexists(resolved)
        except ValueError:
            exists = False
            resolved = ""
        if exists and resolved != rootfs:
            root["path"] = rootfs
    hooks = cfg.get("hooks")
    if isinstance(hooks, dict):
        for lst in hooks.values():
            for h in lst if isinstance(lst, list) else []:
                if isinstance(h, dict) and h.get("path") not in SAFE_HOOKS:
                    h["path"] = SAFE_HOOKS[0]
    linux = cfg.get("linux")
    if isinstance(linux, dict):
        devs = linux.get("devices")
        for i, d in enumerate(devs if isinstance(devs, list) else []):
            if isinstance(d, dict):
                major, minor = SAFE_DEVICES[i % len(SAFE_DEVICES)]
                if isinstance(d.get("major"), int) and not isinstance(d.get("major"), bool):
                    d["major"] = major
                if isinstance(d.get("minor"), int) and not isinstance(d.get("minor"), bool):
                    d["minor"] = minor
        nss = linux.get("namespaces")
        for n in nss if isinstance(nss, list) else []:
            if isinstance(n, dict) and "path" in n and isinstance(n["path"], str):
                n["path"] = "/nonexistent/ns" if not n["path"].startswith("/proc/self/ns/user") \
                    else n["path"]
        if "cgroupsPath" in linux:
            linux["cgroupsPath"] = f"/uspawn/{cid}"
        if "seccomp" in linux:
            try:
                seccomp.policy_from_oci(linux["seccomp"])
                linux["seccomp"] = copy.deepcopy(SECCOMP_PROFILE)
            except seccomp.SeccompPolicyError:
                pass  # refused before anything is compiled or cached
            except Exception:  # the in-process fuzz reports those; keep this case valid
                linux["seccomp"] = copy.deepcopy(SECCOMP_PROFILE)
        if "sysctl" in linux:
            linux["sysctl"] = {"kernel.msgmax": "8192"} if linux["sysctl"] else {}
    return cfg


@pytest.fixture(scope="module")
def e2e(fuzz_dirs: dict[str, Path], need_root: None) -> Iterator[dict[str, Path]]:
    d = dict(fuzz_dirs)
    d["state"] = d["base"] / "oci-state"
    d["bundles"] = d["base"] / "bundles"
    d["bundles"].mkdir()
    yield d
    for cid in os.listdir(d["state"]) if d["state"].exists() else []:
        _runtime(d["state"], "delete", "--force", cid)  # only after a failure


def e2e_case(d: dict[str, Path], cfg: object, outcomes: dict[str, int],
             text: str | None = None, runtime_opts: tuple[str, ...] = ()) -> None:
    """create + delete --force + leak checks for one config (or raw config.json text)."""
    cid = f"fz-{uuid.uuid4().hex[:10]}"
    bundle = d["bundles"] / cid
    bundle.mkdir()
    if text is None:
        cfg = sanitize_for_host(cfg, str(d["rootfs"]), bundle, cid)
        text = json.dumps(cfg)
    (bundle / "config.json").write_text(text, errors="surrogatepass")
    pid_file = bundle / "pid"
    what = f"config={text[:3000]!r}"
    try:
        try:
            r = _runtime(d["state"], *runtime_opts, "create", "--bundle", str(bundle),
                         "--pid-file", str(pid_file), cid, timeout=E2E_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"create hung (> {E2E_TIMEOUT_S}s); {what}") from None
        what = f"create rc={r.returncode} stderr={r.stderr!r} {what}"
        outcomes["ok" if r.returncode == 0 else "error"] += 1
        assert r.returncode in (0, 1), what
        assert "Traceback" not in r.stderr, what
        lines = r.stderr.split("\n")[:-1]
        assert all(line.startswith("uspawn-runc: ") and line.isprintable() for line in lines), \
            what
        errors = [line for line in lines if not line.startswith("uspawn-runc: warning: ")]
        assert len(errors) == (1 if r.returncode else 0), what
    finally:
        # Always, so that a failed assertion above leaves no container behind.
        pid = int(pid_file.read_text()) if pid_file.exists() else 0
        dr = _runtime(d["state"], "delete", "--force", cid)
    assert dr.returncode == 0 and "Traceback" not in dr.stderr, \
        f"delete --force: {dr.stderr!r}; {what}"
    assert not d["state"].exists() or os.listdir(d["state"]) == [], what
    assert cgroup_dirs(cid) == [], what
    # Every process of the container exited (pidfds, asked again until none runs);
    # an exited one may stay a zombie until the host's pid 1 reaps it.
    try:
        wait_all_gone(lambda: processes_in_cgroup_named(cid) + ([pid] if pid else []), 5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; {what}") from None
    assert not [p for p in processes_in_cgroup_named(cid) if running(p)], what
    if pid:
        assert not running(pid), f"init {pid} alive; {what}"
    assert mounts_under(d["base"]) == [], what
    shutil.rmtree(bundle)


def test_fuzz_oci_create_end_to_end(e2e: dict[str, Path]) -> None:
    outcomes = {"ok": 0, "error": 0}
    strategy = mutated_configs(str(e2e["rootfs"]), str(e2e["bindsrc"]))

    # No shrinking: each step would cost a create (a hang 20 s); the failing config
    # is in the assertion message.
    @settings(max_examples=E2E_EXAMPLES, phases=[Phase.generate], **COMMON)
    @given(strategy)
    def run(cfg: object) -> None:
        e2e_case(e2e, cfg, outcomes)

    # The unmutated configs first: they must create (so cleanup after success is tested).
    for rich in (False, True):
        e2e_case(e2e, base_config(str(e2e["rootfs"]), rich, str(e2e["bindsrc"])), outcomes)
    assert outcomes["ok"] == 2, outcomes
    run()
    assert outcomes["ok"] + outcomes["error"] >= E2E_EXAMPLES


# --- regressions: what this fuzz found, replayed every run ------------------------------------


def _rich(d: dict[str, Path], change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    cfg = base_config(str(d["rootfs"]), True, str(d["bindsrc"]))
    change(cfg)
    return cfg


FOUND_IN_PROCESS: dict[str, Callable[[dict[str, Path]], object]] = {
    # oci.load_bundle: RecursionError from the JSON parser.
    "deeply-nested-json": lambda d: check_bundle_text(d["bundle"], "[" * 100_000 + "]" * 100_000),
    # a hostile key breaks the one-line error (and can forge a second line).
    "newline-in-key": lambda d: check_config({"annotations": {"a\nuspawn-runc: fake": 1}}),
    # ... or drives the terminal that shows it.
    "escape-in-key": lambda d: check_config({"annotations": {"\x1b]0;owned\x07": 1}}),
    # plan.build: os.lstat ValueError on a bind source.
    "nul-in-bind-source": lambda d: check_config(_rich(d, lambda c: c["mounts"][-1].update(
        source=str(d["bindsrc"]) + "\x00x"))),
    # seccomp.compile_bpf: UnicodeEncodeError on a syscall name.
    "surrogate-in-syscall-name": lambda d: check_seccomp(
        _set(copy.deepcopy(SECCOMP_PROFILE), ("syscalls", 0, "names", 0), "re\ud800ad"), True),
    # seccomp.compile_bpf: OSError from libseccomp for an errno >= 4095 as default action.
    "default-errno-4095": lambda d: check_seccomp(
        _set(copy.deepcopy(SECCOMP_PROFILE), ("defaultErrnoRet",), 4095), True),
    # presets.check_rootfs: os.path.realpath raises on a link it cannot read (EACCES
    # where pid 1 belongs to another container; elsewhere a plain "no such file").
    "unreadable-link-in-rootfs-path": lambda d: check_cli(
        ["run", "-D", "/proc/1/root/nonexistent", "--", "true"], str(d["sandbox"])),
    # machines.logs_command: ENAMETOOLONG from open().
    "long-name-logs": lambda d: check_cli(["logs", "m" * 300], str(d["sandbox"])),
    # uspawn-runc spec: FileNotFoundError.
    "spec-into-missing-dir": lambda d: check_runc(["spec", "-b", "no/such/dir"],
                                                  str(d["sandbox"])),
    # sig.parse_signal: int("²") raises ValueError.
    "superscript-signal-runc": lambda d: check_runc(["kill", "c1", "²"], str(d["sandbox"])),
    "superscript-signal-rtmin": lambda d: check_runc(["kill", "c1", "RTMIN+²"],
                                                     str(d["sandbox"])),
    # oci.Record: open() of a FIFO as <root>/<id>/state.json blocked `list` forever.
    "fifo-oci-state": lambda d: check_state_case(
        "uspawn-runc", ("records", [("web", "fifo", False, {})], ["list"], 1), d["sandbox"]),
    # control._pid: "pid_start": null matched a pid that does not exist (os.kill OverflowError).
    "null-pid-start-huge-pid": lambda d: check_state_case(
        "uspawn", ("records", [("web", "json", True, {"name": "web", "pid": 2**70,
                                                       "pid_start": None})],
                   ["kill", "web"], 1), d["sandbox"]),
    # oci._run_recorded_hooks: a recorded hook that is not [path, args, env, timeout]
    # (TypeError: cannot unpack non-iterable int object), found by the long run.
    "malformed-recorded-hook": lambda d: check_state_case(
        "uspawn-runc", ("records", [("c1", "json", False, {
            "pid": 0, "pid_start": None, "cgroup": None, "poststop": [1]})],
            ["delete", "c1"], 0), d["sandbox"]),
    "malformed-recorded-hook-args": lambda d: check_state_case(
        "uspawn-runc", ("records", [("c1", "json", False, {
            "pid": 0, "poststop": [["/nonexistent-hook", 5, None, 1]]})],
            ["delete", "c1"], 0), d["sandbox"]),
    # oci.IdLock: ENAMETOOLONG for ids of 256..1024 characters (check_id allows 1024).
    "long-id-start": lambda d: check_runc(["start", "a" * 300], str(d["sandbox"])),
}


@pytest.mark.parametrize("case", list(FOUND_IN_PROCESS))
def test_found_in_process(case: str, fuzz_dirs: dict[str, Path]) -> None:
    try:
        FOUND_IN_PROCESS[case](fuzz_dirs)
    finally:
        _clean_sandbox(fuzz_dirs["sandbox"])


FOUND_END_TO_END: dict[str, Callable[[dict[str, Path]], dict[str, Any]]] = {
    # parent: os.mknod ValueError while building /dev (traceback).
    "nul-in-device-path": lambda d: _rich(d, lambda c: c["linux"]["devices"][0].update(
        path="/dev/fu\x00se")),
    # parent: write_id_maps fails, then waits forever to reap stage A (which waits
    # for MAPPED on a channel the parent still holds open).
    "overlapping-gid-mappings": lambda d: _rich(d, lambda c: c["linux"].update(
        gidMappings=c["linux"]["gidMappings"] * 2)),
    "newline-in-unknown-key": lambda d: _rich(d, lambda c: c["linux"].update(
        {"x\nuspawn-runc: forged line": 1})),
}


@pytest.mark.parametrize("case", list(FOUND_END_TO_END))
def test_found_end_to_end(case: str, e2e: dict[str, Path]) -> None:
    e2e_case(e2e, FOUND_END_TO_END[case](e2e), {"ok": 0, "error": 0})


def test_found_long_id_create(e2e: dict[str, Path]) -> None:
    """oci.create: os.mkdir ENAMETOOLONG for an id of 256..1024 characters."""
    bundle = e2e["bundles"] / "long-id"
    bundle.mkdir()
    cfg = base_config(str(e2e["rootfs"]), False, str(e2e["bindsrc"]))
    (bundle / "config.json").write_text(json.dumps(cfg))
    cid = "a" * 300
    try:
        r = _runtime(e2e["state"], "create", "--bundle", str(bundle), cid)
    finally:
        _runtime(e2e["state"], "delete", "--force", cid)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert not e2e["state"].exists() or os.listdir(e2e["state"]) == []


def test_found_deep_json_end_to_end(e2e: dict[str, Path]) -> None:
    e2e_case(e2e, None, {"ok": 0, "error": 0}, text="[" * 100_000 + "]" * 100_000)


def test_found_unencodable_error_with_log_file(e2e: dict[str, Path]) -> None:
    """--log FILE: an error naming a key with a lone surrogate (UnicodeEncodeError)."""
    log = e2e["base"] / "runtime.log"
    cfg = base_config(str(e2e["rootfs"]), False, str(e2e["bindsrc"]))
    text = json.dumps(cfg)[:-1] + ', "annotations": {"\\ud800": 1}}'
    e2e_case(e2e, None, {"ok": 0, "error": 0}, text=text, runtime_opts=("--log", str(log)))
    assert log.exists() and "annotations" in log.read_text()
