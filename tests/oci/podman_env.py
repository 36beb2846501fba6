"""An isolated podman for the OCI runtime tests: its own config, storage and locks.

`PodmanEnv(root, runtime)` writes, under `root` (a fresh temp dir):

- containers.conf: cgroupfs, file events, file locks (no /dev/shm/libpod_lock), the
  ulimits this VM needs (see shared FIELD-NOTES), `netns = "none"` (no bridge, no
  netavark/iptables changes on the host), a runtime table entry
  `uspawn = ["/usr/local/bin/uspawn-runc", ...]`, and `runtime_supports_json` listing
  runc's usual names plus `uspawn` and `uspawn-runc`: podman then passes
  `--log FILE --log-format=json` before the subcommand, as it does to runc;
- storage.conf: driver vfs, graphroot/runroot under `root`;
- registries.conf: no registries at all, so podman never reaches for the network.

The runtime under test is not given to podman directly: podman gets `root/bin/NAME`,
where NAME is the runtime's own file name (podman decides `--log-format=json` by that
name), a small wrapper that appends one JSON line per call to `root/runtime-calls.jsonl`
(argv, cwd, parent process, open fds, a few env values and all env names, the content
of `exec --process FILE` and of the `create` bundle's config.json), then execs the real
runtime. The container process stays a direct child of conmon: the wrapper replaces
itself with the runtime. `RuntimeCall`s read that log back.

XDG_CONFIG_HOME and TMPDIR point under `root` too. What podman 4.3 still writes outside
it, hard-coded for root: the empty directory /run/containers/networks and the blob info
cache /var/lib/containers/cache/blob-info-cache-v1.boltdb; conmon's console sockets
/tmp/conmon-term.* (cleanup() removes those a failed runtime left); podman's cgroupfs
parents libpod_parent[/conmon] (cleanup() removes them if this session made them).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waits import IN_CLOSE_WRITE, IN_CREATE, IN_MOVED_TO, wait_all_gone, wait_until

IMAGE = "localhost/uspawn-busybox"
USPAWN_RUNC_PATHS = ("/usr/local/bin/uspawn-runc", "/opt/uspawn-venv/bin/uspawn-runc")
# runc global options that take a value (podman/conmon put them before the subcommand).
GLOBAL_OPTS_WITH_VALUE = {"--log", "--log-format", "--root", "--criu"}
CGROUP_BASES = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")

WRAPPER = r'''#!/usr/bin/python3 -IS
# Written by tests/oci/podman_env.py: log this runtime call, then exec the real runtime.
import json, os, sys, time
REAL = {real!r}
LOG = {log!r}
ENV_KEYS = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "XDG_RUNTIME_DIR", "HOME", "PATH",
            "TMPDIR", "_CONTAINERS_USERNS_CONFIGURED", "_CONTAINERS_ROOTLESS_UID")
args = sys.argv[1:]
fds = {{}}
for name in os.listdir("/proc/self/fd"):
    try:
        fds[int(name)] = os.readlink("/proc/self/fd/" + name)
    except OSError:
        pass
try:
    with open("/proc/%d/comm" % os.getppid()) as f:
        parent = f.read().strip()
except OSError:
    parent = "?"
rec = {{"time": time.time(), "argv0": sys.argv[0], "args": args, "cwd": os.getcwd(),
       "parent": parent, "fds": fds,
       "env": {{k: os.environ[k] for k in ENV_KEYS if k in os.environ}},
       "env_keys": sorted(os.environ)}}
for i, a in enumerate(args):
    if a == "--process" and i + 1 < len(args):
        try:
            with open(args[i + 1]) as f:
                rec["process"] = json.load(f)
        except (OSError, ValueError) as exc:
            rec["process"] = repr(exc)
    if a == "--bundle" and i + 1 < len(args):
        try:
            with open(os.path.join(args[i + 1], "config.json")) as f:
                rec["config"] = json.load(f)
        except (OSError, ValueError) as exc:
            rec["config"] = repr(exc)
line = json.dumps(rec) + "\n"
fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
os.write(fd, line.encode())
os.close(fd)
os.execv(REAL, [REAL] + args)
'''


def resolve_runtime(value: str) -> str | None:
    """A path or a command name -> absolute path of an executable, or None."""
    path = value if "/" in value else (shutil.which(value) or "")
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return os.path.abspath(path)
    return None


def option_value(args: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in args, if present."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


@dataclass
class RuntimeCall:
    """One logged runtime invocation."""

    args: list[str]
    parent: str
    record: dict[str, Any]

    @property
    def subcommand(self) -> str:
        it = iter(self.args)
        for a in it:
            if a.startswith("-"):
                if "=" not in a and a in GLOBAL_OPTS_WITH_VALUE:
                    next(it, None)
                continue
            return a
        return ""

    @property
    def sub_args(self) -> list[str]:
        """The arguments after the subcommand."""
        sub = self.subcommand
        return self.args[self.args.index(sub) + 1:] if sub else []

    def line(self, name: str = "RUNTIME") -> str:
        return shlex.join([name, *self.args])


class PodmanResult(subprocess.CompletedProcess[str]):
    """A finished podman command plus the runtime calls made while it ran."""

    calls: list[RuntimeCall]
    seconds: float

    def explain(self) -> str:
        lines = [f"$ {shlex.join(self.args)}", f"exit {self.returncode} after {self.seconds:.2f}s",
                 f"stdout: {self.stdout!r}", f"stderr: {self.stderr!r}", "runtime calls:"]
        lines += [f"  [{c.parent}] {c.line()}" for c in self.calls] or ["  (none)"]
        return "\n".join(lines)


class PodmanEnv:
    def __init__(self, root: Path, runtime: str, podman_bin: str = "podman") -> None:
        self.root = root
        self.runtime = runtime
        self.podman_bin = podman_bin
        self.name = os.path.basename(runtime)
        self.wrapper = root / "bin" / self.name
        self.trace = root / "runtime-calls.jsonl"
        self.tmp = root / "tmp"
        self.env = dict(os.environ)
        self.env.update({
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
            "TMPDIR": str(self.tmp),
            # `podman system reset` creates $XDG_CONFIG_HOME/containers/podman.
            "XDG_CONFIG_HOME": str(root / "config"),
        })
        for key in ("CONTAINER_HOST", "CONTAINER_CONNECTION", "CONTAINERS_REGISTRIES_CONF_DIR",
                    "REGISTRY_AUTH_FILE", "NOTIFY_SOCKET"):
            self.env.pop(key, None)
        self._cgroups_before = self._cgroup_dirs()

    # -- setup ------------------------------------------------------------------------

    def setup(self) -> None:
        r = self.root
        for d in ("bin", "graph", "run", "tmp", "net", "libpod-tmp"):
            (r / d).mkdir(parents=True, exist_ok=True)
        uspawn_paths = ", ".join(json.dumps(p) for p in USPAWN_RUNC_PATHS)
        json_names = ["crun", "runc", "kata", "runsc", "krun", "uspawn", "uspawn-runc"]
        if self.name not in json_names:
            json_names.append(self.name)
        (r / "containers.conf").write_text(f"""\
# Written by tests/oci/podman_env.py for one test session.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{r}/events.log"
lock_type = "file"
tmp_dir = "{r}/libpod-tmp"
image_copy_tmp_dir = "{r}/tmp"
runtime_supports_json = {json.dumps(json_names)}

[engine.runtimes]
uspawn = [{uspawn_paths}]

[network]
network_config_dir = "{r}/net"
""")
        (r / "storage.conf").write_text(f"""\
[storage]
driver = "vfs"
graphroot = "{r}/graph"
runroot = "{r}/run"
""")
        (r / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.wrapper.write_text(WRAPPER.format(real=self.runtime, log=str(self.trace)))
        self.wrapper.chmod(0o755)

    def import_image(self, rootfs: Path, name: str = IMAGE) -> None:
        tarball = self.root / "rootfs.tar.gz"
        with tarfile.open(tarball, "w:gz") as tar:
            tar.add(str(rootfs), arcname=".")
        res = self.podman("import", str(tarball), name, timeout=120)
        if res.returncode != 0:
            raise RuntimeError("podman import failed:\n" + res.explain())
        tarball.unlink()

    # -- running podman ---------------------------------------------------------------

    def argv(self, *args: str, runtime: str | None = None) -> list[str]:
        return [self.podman_bin, "--runtime", runtime or str(self.wrapper), *args]

    def podman(self, *args: str, runtime: str | None = None, timeout: float = 60,
               input: str | None = None) -> PodmanResult:
        """Run `podman --runtime RUNTIME ARGS` in the isolated configuration.

        RUNTIME defaults to the logging wrapper around the runtime under test.
        """
        mark = self.call_count()
        argv = self.argv(*args, runtime=runtime)
        t0 = time.monotonic()
        # Bytes, decoded by hand: text=True would turn a pty's "\r\n" into "\n".
        cp = subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout,
                            input=None if input is None else input.encode(),
                            stdin=None if input is not None else subprocess.DEVNULL)
        res = PodmanResult(argv, cp.returncode, cp.stdout.decode(errors="replace"),
                           cp.stderr.decode(errors="replace"))
        res.seconds = time.monotonic() - t0
        res.calls = self.calls()[mark:]
        return res

    def ok(self, *args: str, **kw: Any) -> PodmanResult:
        """podman(...) that must exit 0."""
        res = self.podman(*args, **kw)
        assert res.returncode == 0, res.explain()
        return res

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*args), env=self.env, **kw)

    # -- the runtime call log ---------------------------------------------------------

    def calls(self) -> list[RuntimeCall]:
        try:
            text = self.trace.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            if line.strip():
                rec = json.loads(line)
                out.append(RuntimeCall(rec["args"], rec.get("parent", "?"), rec))
        return out

    def call_count(self) -> int:
        return len(self.calls())

    def wait_for_call(self, pred: Callable[[RuntimeCall], bool], since: int = 0,
                      timeout: float = 15, what: str = "a runtime call") -> RuntimeCall:
        """A call made after podman returned (conmon's exit command runs `delete`).

        The wrapper appends each call to the log and closes it: inotify on the log's
        directory (IN_CLOSE_WRITE, IN_CREATE for the first call) re-checks the calls;
        the timeout only bounds a call that never comes (an assertion naming `what`
        and listing the calls that did come)."""

        def found() -> RuntimeCall | None:
            return next((c for c in self.calls()[since:] if pred(c)), None)

        try:
            call = wait_until(found, [self.trace.parent], what, timeout,
                              mask=IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO)
        except AssertionError as exc:
            made = "\n".join(f"  [{c.parent}] {c.line()}" for c in self.calls()[since:])
            raise AssertionError(f"{exc}; runtime calls since:\n{made or '  (none)'}") \
                from None
        assert call is not None  # wait_until returns a truthy cond()
        return call

    def dump_calls(self, dest: Path, real_name: str | None = None) -> None:
        name = real_name or self.runtime
        with open(dest, "w") as f:
            for c in self.calls():
                f.write(f"[{c.parent}] {c.line(name)}\n")

    # -- teardown ---------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove every container, image and file of this session. Returns problems."""
        problems: list[str] = []
        for args in (("rm", "-af", "-t", "0"), ("rmi", "-af"), ("system", "reset", "-f")):
            try:
                res = self.podman(*args, timeout=60)
                if res.returncode != 0:
                    problems.append(res.explain())
            except subprocess.TimeoutExpired as exc:
                problems.append(f"timeout: {exc}")
        self._kill_leftovers(problems)
        self._remove_console_sockets()
        self._unmount_under_root(problems)
        self._remove_new_cgroups(problems)
        if any(self._mounts_under_root()):
            problems.append(f"mounts left under {self.root}; not removing it")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _kill_leftovers(self, problems: list[str]) -> None:
        """conmon/container processes started by this session (their argv names our root)."""
        me = str(self.root).encode()
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            if pid == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if me in cmd:
                shown = cmd.replace(b"\0", b" ")[:200].decode(errors="replace")
                problems.append(f"killed leftover pid {pid}: {shown}")
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _remove_console_sockets(self) -> None:
        """conmon makes /tmp/conmon-term.XXXXXX and leaves it if the runtime never
        connects (a failed create/exec): remove the ones named in our calls."""
        for c in self.calls():
            path = option_value(c.args, "--console-socket")
            if path and path.startswith("/tmp/conmon-term.") and os.path.exists(path):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)

    def _mounts_under_root(self) -> list[str]:
        prefix = str(self.root).rstrip("/") + "/"
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp.startswith(prefix) or mp == str(self.root):
                    out.append(mp)
        return out

    def _unmount_under_root(self, problems: list[str]) -> None:
        for mp in sorted(self._mounts_under_root(), key=len, reverse=True):
            problems.append(f"unmounting leftover {mp}")
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)

    @staticmethod
    def _cgroup_dirs() -> set[str]:
        found = set()
        for base in CGROUP_BASES:
            if not os.path.isdir(base):
                continue
            for ctl in [base, *(os.path.join(base, d) for d in os.listdir(base))]:
                d = os.path.join(ctl, "libpod_parent")
                if os.path.isdir(d):
                    found.add(d)
                    found.update(os.path.join(d, sub) for sub in os.listdir(d)
                                 if os.path.isdir(os.path.join(d, sub)))
        return found

    def _remove_new_cgroups(self, problems: list[str] | None = None) -> None:
        """podman's cgroupfs manager leaves libpod_parent[/conmon] behind: remove those
        this session created, deepest first, each once its processes have exited.

        The last conmon may still be exiting: the pids in the directory's cgroup.procs
        are waited for by pidfd (wait_all_gone asks again after they exited), then the
        directory is removed; a timeout names the cgroup that kept a process."""
        for d in sorted(self._cgroup_dirs() - self._cgroups_before, key=len, reverse=True):
            try:
                wait_all_gone(functools.partial(_cgroup_pids, d), 5, f"processes in {d}")
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except (OSError, AssertionError) as exc:
                if problems is not None:
                    problems.append(f"cgroup {d} left: {exc}")


def _cgroup_pids(d: str) -> list[int]:
    """The processes in cgroup directory d (none once it is gone)."""
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []
