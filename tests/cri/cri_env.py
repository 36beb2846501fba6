"""A private containerd with the CRI plugin, driven with crictl (issue 14).

Everything lives under one temporary directory: containerd's config, root, state, gRPC
socket, the runtimes' state roots, the CNI config and IPAM data, pod logs. The system
containerd (/run/containerd, /var/lib/containerd, /etc/cni) is never used. Two runtime
handlers: `uspawn` (runc v2 shim, BinaryName = the repo's uspawn-runc) and `runc`.

crictl comes from ../shared/cri-tools, built once into
/var/cache/uspawn-cri-tools/<first 16 hex of the tarball's sha256>/ (as tests/oci_validation
does for the OCI suite) and rebuilt when that directory is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conftest import processes_in_cgroups
from fixtures import cached_build

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SRC = "/work/shared/cri-tools"
CACHE = Path("/var/cache/uspawn-cri-tools")
CNI_BIN = Path("/usr/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_SOCKETS = Path("/run/containerd/s")
IMAGE = "localhost/uspawn-busybox:test"
PAUSE_IMAGE = "localhost/uspawn-pause:test"
NAMESPACE = "k8s.io"


# ---------------------------------------------------------------- crictl build


def tools_src() -> Path:
    return Path(os.environ.get("USPAWN_CRI_TOOLS_SRC") or DEFAULT_SRC)


def ensure_tools(src: Path, cache: Path = CACHE) -> Path:
    """The directory holding crictl and critest for src's tarball; built when missing
    (~2.5 min)."""
    return cached_build.ensure_built(src, "cri-tools-*.tar.gz", cache, "cri-tools")


# ---------------------------------------------------------------- the image


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layer_tar(rootfs: Path) -> bytes:
    """The rootfs as one uncompressed layer, owners and modes as on disk."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(rootfs.iterdir()):
            tar.add(str(entry), arcname=entry.name)
    return buf.getvalue()


def write_image_archive(rootfs: Path, dest: Path, images: dict[str, list[str]]) -> None:
    """An OCI image-layout tarball at dest with one image per name (same layer; the value
    is the image's Entrypoint), importable with `ctr images import` (no registry)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        layout = Path(tmp)
        (layout / "blobs" / "sha256").mkdir(parents=True)
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        layer = _layer_tar(rootfs)
        diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
        layer_desc = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      **_blob(layout, gzip.compress(layer, compresslevel=1, mtime=0))}
        manifests = []
        for name, entrypoint in images.items():
            config = {"architecture": "amd64", "os": "linux",
                      "config": {"Entrypoint": entrypoint, "WorkingDir": "/",
                                 "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
            manifest = {"schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                   **_blob(layout, json.dumps(config).encode())},
                        "layers": [layer_desc]}
            manifests.append({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(layout, json.dumps(manifest).encode()),
                "platform": {"architecture": "amd64", "os": "linux"},
                # containerd's importer names the image after this annotation.
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]}})
        (layout / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": manifests}))
        with tarfile.open(dest, "w") as tar:
            for entry in sorted(layout.iterdir()):
                tar.add(str(entry), arcname=entry.name)


# ---------------------------------------------------------------- host state for leak checks


def mounts_matching(needles: Iterable[str]) -> list[str]:
    """Host mount points that contain any of needles (ids, our temporary root)."""
    keys = [n for n in needles if n]
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if any(k in p for k in keys)]


def cgroup_dirs_under(parent: str) -> list[str]:
    """Directories below /sys/fs/cgroup/*/<parent> (every hierarchy, v1 and v2)."""
    found: list[str] = []
    rel = parent.strip("/")
    bases = [CGROUP_ROOT] + [p for p in CGROUP_ROOT.iterdir()
                             if p.is_dir() and not p.is_symlink()]
    for base in bases:
        top = base / rel
        if top.is_dir():
            found += [str(d) for d, _, _ in os.walk(top) if d != str(top)]
    return found


def remove_cgroup_tree(parent: str) -> list[str]:
    """rmdir every cgroup below and at <parent>, deepest first; returns the ones left."""
    rel = parent.strip("/")
    left = []
    bases = [CGROUP_ROOT] + [p for p in CGROUP_ROOT.iterdir()
                             if p.is_dir() and not p.is_symlink()]
    for base in bases:
        top = base / rel
        if not top.is_dir():
            continue
        for d, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
    return left


def pids_in_cgroup_tree(parent: str) -> list[int]:
    """Host pids in the cgroup parent or below it (any hierarchy)."""
    rel = "/" + parent.strip("/")
    return processes_in_cgroups(lambda path: path == rel or path.startswith(rel + "/"))


def links_on_bridge(bridge: str) -> list[str]:
    res = subprocess.run(["ip", "-o", "link", "show", "master", bridge],
                         capture_output=True, text=True)
    return [line.split(":")[1].strip() for line in res.stdout.splitlines() if ":" in line]


def free_subnet() -> str:
    """A /24 in 10.200-10.254 that no host route or address overlaps."""
    used = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True,
                          text=True).stdout + subprocess.run(
        ["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for second in range(200, 255):
        for third in range(1, 255, 7):
            if f"10.{second}." not in used:
                return f"10.{second}.{third}.0/24"
    raise RuntimeError("no free 10.x subnet for the CNI bridge")


# ---------------------------------------------------------------- the environment

CAP_SYS_RESOURCE = 24


def has_cap_sys_resource() -> bool:
    """Whether we may lower oom_score_adj. The CRI gives every sandbox -998; without
    CAP_SYS_RESOURCE (this VM's bounding set lacks it) runc and uspawn-runc both fail
    create with EPERM, so containerd must cap it at its own (restrict_oom_score_adj)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False



class CrictlError(AssertionError):
    pass


class CriEnv:
    """One private containerd with its CRI plugin. start() ... stop() (cleans up)."""

    def __init__(self, root: Path, crictl: Path, uspawn_runc: str, runc: str | None) -> None:
        self.root = root
        self.crictl_bin = crictl
        self.uspawn_runc = uspawn_runc
        self.runc = runc
        self.sock = root / "containerd.sock"
        self.token = root.name.rsplit("-", 1)[-1][:8]
        self.bridge = f"uspcri{self.token[:8]}"[:15]
        self.cgroup_parent = f"/uspawn-cri-{self.token}"
        self.subnet = free_subnet()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "containerd.log"

    # -- setup ------------------------------------------------------------------------

    def write_config(self) -> None:
        r = self.root
        for d in ("root", "state", "opt", "net.d", "ipam", "logs", "uspawn-state",
                  "runc-state"):
            (r / d).mkdir(parents=True, exist_ok=True)
        runtimes = self._runtime_toml("uspawn", self.uspawn_runc, r / "uspawn-state")
        if self.runc:
            runtimes += self._runtime_toml("runc", self.runc, r / "runc-state")
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        (r / "config.toml").write_text(f"""\
# Written by tests/cri/cri_env.py for one test session.
version = 2
root = "{r}/root"
state = "{r}/state"
# Snapshotters this host cannot use would only log errors at start.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
  level = "info"
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/opt"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = {str(not has_cap_sys_resource()).lower()}
[{cri}.cni]
  bin_dir = "{CNI_BIN}"
  conf_dir = "{r}/net.d"
  max_conf_num = 1
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "uspawn"
{runtimes}""")
        (r / "net.d" / "10-uspawn-cri.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": f"uspawn-cri-{self.token}",
            "plugins": [
                # No gateway: the bridge gets no address and the host no route or
                # forwarding change; the pods of this session only reach each other.
                {"type": "bridge", "bridge": self.bridge, "isGateway": False,
                 "ipMasq": False, "hairpinMode": False,
                 "ipam": {"type": "host-local", "dataDir": str(r / "ipam"),
                          "ranges": [[{"subnet": self.subnet}]]}},
                {"type": "loopback"}]}, indent=1))
        (r / "crictl.yaml").write_text(f"runtime-endpoint: unix://{self.sock}\n"
                                       f"image-endpoint: unix://{self.sock}\ntimeout: 60\n")

    @staticmethod
    def _runtime_toml(name: str, binary: str, state: Path) -> str:
        base = f'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{name}'
        return f"""
[{base}]
  runtime_type = "io.containerd.runc.v2"
[{base}.options]
  BinaryName = "{binary}"
  Root = "{state}"
  SystemdCgroup = false
"""

    def start(self, timeout: float = 60) -> None:
        from waits import IN_MODIFY, wait_file, wait_until

        self.write_config()
        logf = open(self.log, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(self.root / "config.toml")],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
            start_new_session=True)
        logf.close()
        wait_file(self.sock, timeout, self.proc)
        # The CRI plugin starts in the background (CRIService.Run in a goroutine) and
        # answers "not initialized" until Run has set its flag; the last thing Run logs
        # before that is "Start streaming server": inotify on the log (containerd appends
        # to it) waits for that line, or for containerd to exit.
        started = "Start streaming server"
        wait_until(lambda: started in self.log.read_text(errors="replace"), [self.log],
                   f"{started} in {self.log}", timeout, self.proc, mask=IN_MODIFY)
        # Between that line and the flag there is no blocking step (a `go` statement), so
        # the flag is set long before a crictl process gets its answer; should a crictl
        # still find it unset, the next crictl's answer is awaited (a count bounds it,
        # not a clock).
        for _ in range(20):
            res = self.crictl_run("info", timeout=timeout)
            if "not initialized" not in res.stderr:
                break
        assert res.returncode == 0, f"crictl info: {res.stdout} {res.stderr} {self.log_tail()}"
        conds = {c["type"]: c["status"] for c in json.loads(res.stdout)["status"]["conditions"]}
        # RuntimeReady is always true; NetworkReady once the CNI config is loaded, which the
        # plugin does when it is made (the config is written before containerd starts).
        assert conds.get("RuntimeReady") and conds.get("NetworkReady"), \
            f"CRI not ready: {res.stdout} {self.log_tail()}"

    def import_images(self, archive: Path) -> None:
        res = subprocess.run(["ctr", "--address", str(self.sock), "-n", NAMESPACE, "images",
                              "import", str(archive)], capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, f"ctr import: {res.stdout} {res.stderr}"

    # -- crictl -----------------------------------------------------------------------

    def crictl_run(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.crictl_bin), "--config", str(self.root / "crictl.yaml"),
                               *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def crictl(self, *args: str, timeout: float = 90) -> str:
        """crictl ARGS that must succeed; its stdout, stripped."""
        res = self.crictl_run(*args, timeout=timeout)
        if res.returncode != 0:
            raise CrictlError(f"crictl {' '.join(args)}: exit {res.returncode}\n"
                              f"{res.stderr.strip()}\n{self.log_tail()}")
        return res.stdout.strip()

    def inspect(self, kind: str, ident: str) -> dict[str, Any]:
        out = json.loads(self.crictl(kind, "-o", "json", ident))
        assert isinstance(out, dict)
        return out

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "containerd log:\n" + "\n".join(lines[-n:])

    # -- configs ----------------------------------------------------------------------

    def pod_config(self, name: str) -> Path:
        logdir = self.root / "logs" / name
        path = self.root / f"pod-{name}.json"
        path.write_text(json.dumps({
            "metadata": {"name": name, "namespace": "uspawn-test", "uid": f"uid-{name}",
                         "attempt": 0},
            "hostname": name, "log_directory": str(logdir),
            "linux": {"cgroup_parent": self.cgroup_parent,
                      "security_context": {"namespace_options": {"network": 0}}}}))
        return path

    def container_config(self, name: str, command: list[str],
                         image: str = IMAGE) -> Path:
        path = self.root / f"ctr-{name}.json"
        path.write_text(json.dumps({
            "metadata": {"name": name}, "image": {"image": image},
            "command": command, "log_path": f"{name}.log", "linux": {}}))
        return path

    # -- teardown ---------------------------------------------------------------------

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every pod (after a failed test); returns what went wrong."""
        problems = []
        res = self.crictl_run("pods", "-q")
        for pod in res.stdout.split():
            for verb in ("stopp", "rmp"):
                r = self.crictl_run(verb, pod)
                if r.returncode != 0:
                    problems.append(f"crictl {verb} {pod}: {r.stderr.strip()}")
        return problems

    def stop(self) -> list[str]:
        """Stop containerd and its shims; remove mounts, cgroups, the bridge and the
        temporary root. Returns what had to be cleaned up by force."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            problems += self.remove_all_pods()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                problems.append("containerd ignored SIGTERM for 30s: killed")
                self.proc.kill()
                self.proc.wait()
        problems += self._kill_leftovers()
        for mp in sorted(mounts_matching([str(self.root)]), key=len, reverse=True):
            problems.append(f"unmounting leftover {mp}")
            subprocess.run(["umount", "-l", mp], capture_output=True)
        left = remove_cgroup_tree(self.cgroup_parent)
        if left:
            problems.append(f"cgroups left: {left}")
        if subprocess.run(["ip", "link", "show", self.bridge], capture_output=True
                          ).returncode == 0:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if not mounts_matching([str(self.root)]):
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            problems.append(f"mounts left under {self.root}; not removed")
        return problems

    def shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes of this containerd (their argv names our
        socket; other sessions' shims name theirs)."""
        me = str(self.sock).encode()
        found = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"containerd-shim-runc-v2") and me in cmd:
                found.append(int(p))
        return found

    def _kill_leftovers(self) -> list[str]:
        """Shims (their argv names our socket) and what lives in our cgroups."""
        from waits import wait_all_gone

        me = str(self.sock).encode()

        def ours() -> list[int]:
            pids = set(pids_in_cgroup_tree(self.cgroup_parent))
            for p in os.listdir("/proc"):
                if not p.isdigit() or int(p) == os.getpid():
                    continue
                try:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        if me in f.read():
                            pids.add(int(p))
                except OSError:
                    continue
            return sorted(pids)

        found = ours()
        tasks = self.root / "state" / "io.containerd.runtime.v2.task" / NAMESPACE
        ids = [d.name for d in tasks.iterdir()] if tasks.is_dir() else []
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if found:
            wait_all_gone(ours, 30, "leftover shims and containers")
        # A killed shim leaves its socket in the host-wide /run/containerd/s.
        for ident in ids:
            self.shim_socket(ident).unlink(missing_ok=True)
        return [f"killed leftover pids {found}"] if found else []

    def shim_socket(self, ident: str) -> Path:
        """The socket containerd 1.6 gives the shim of task ident (runtime/v2/shim
        SocketAddress: sha256 of "<grpc address>/<namespace>/<id>"; not configurable)."""
        digest = hashlib.sha256(f"{self.sock}/{NAMESPACE}/{ident}".encode()).hexdigest()
        return SHIM_SOCKETS / digest
