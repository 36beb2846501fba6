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
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
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


@dataclass
class ImageSpec:
    """One image: the shared base layer (a rootfs) plus, if files is given, a small
    layer of its own. files: path in the image -> (content, mode), content None for
    a directory; owned by root, parent directories made 0755."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    user: str = ""
    files: dict[str, tuple[bytes | None, int]] = field(default_factory=dict)


@dataclass
class ImageSet:
    """Blobs (digest -> bytes) and, per image name, its manifest's bytes."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"digest": digest, "size": len(data)}

    def blobs_of(self, name: str) -> list[str]:
        manifest = json.loads(self.manifests[name])
        return [manifest["config"]["digest"]] + [layer["digest"] for layer in manifest["layers"]]


def _layer_tar(rootfs: Path) -> bytes:
    """The rootfs as one uncompressed layer, owners and modes as on disk."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(rootfs.iterdir()):
            tar.add(str(entry), arcname=entry.name)
    return buf.getvalue()


def _files_tar(files: dict[str, tuple[bytes | None, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(parent) for path in files for parent in Path(path.strip("/")).parents
                       if str(parent) != "."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path.strip("/"))
            info.mode = mode
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_images(rootfs: Path, images: dict[str, ImageSpec]) -> ImageSet:
    """OCI manifests and blobs for images (linux/amd64), all on rootfs as base layer."""
    out = ImageSet()

    def layer(tar: bytes) -> tuple[str, dict[str, Any]]:
        return ("sha256:" + hashlib.sha256(tar).hexdigest(),
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                 **out.add(gzip.compress(tar, compresslevel=1, mtime=0))})

    base = layer(_layer_tar(rootfs))
    for name, spec in images.items():
        layers = [base] + ([layer(_files_tar(spec.files))] if spec.files else [])
        conf: dict[str, Any] = {"WorkingDir": "/", "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]}
        if spec.entrypoint is not None:
            conf["Entrypoint"] = spec.entrypoint
        if spec.cmd is not None:
            conf["Cmd"] = spec.cmd
        if spec.user:
            conf["User"] = spec.user
        config = {"architecture": "amd64", "os": "linux", "config": conf,
                  "rootfs": {"type": "layers", "diff_ids": [d for d, _ in layers]}}
        manifest = {"schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               **out.add(json.dumps(config).encode())},
                    "layers": [desc for _, desc in layers]}
        out.manifests[name] = json.dumps(manifest).encode()
    return out


def write_image_archive(rootfs: Path, dest: Path, images: dict[str, list[str]]) -> None:
    """An OCI image-layout tarball at dest with one image per name (same layer; the value
    is the image's Entrypoint), importable with `ctr images import` (no registry)."""
    built = build_images(rootfs, {name: ImageSpec(entrypoint=ep) for name, ep in images.items()})
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        layout = Path(tmp)
        (layout / "blobs" / "sha256").mkdir(parents=True)
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        for data in [*built.blobs.values(), *built.manifests.values()]:
            (layout / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()).write_bytes(data)
        manifests = []
        for name, data in built.manifests.items():
            manifests.append({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data),
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


# ---------------------------------------------------------------- a local registry


def split_name(name: str) -> tuple[str, str, str]:
    """'registry.k8s.io/e2e-test-images/busybox:1.29-2' -> (host, repository, tag)."""
    host, rest = name.split("/", 1)
    repo, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
    return host, repo, tag


class Registry:
    """Debian's docker-registry (distribution v2) on 127.0.0.1 only, its storage under
    root; start() ... stop(). Images are pushed with the registry's HTTP API."""

    def __init__(self, root: Path, binary: str = "docker-registry") -> None:
        self.root = root
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "registry.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        from waits import IN_MODIFY, wait_until

        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # another process may take the free port first
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            conf = self.root / "config.yml"
            conf.write_text(f"""\
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.root / "storage"}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
""")
            self.log.write_bytes(b"")
            with open(self.log, "ab") as logf:
                self.proc = subprocess.Popen([self.binary, "serve", str(conf)],
                                             stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=logf, start_new_session=True)
            line = f"listening on 127.0.0.1:{self.port}"

            def listening(line: str = line) -> bool:
                return line in self.log.read_text(errors="replace")

            try:
                wait_until(listening, [self.log], f"{line!r} in {self.log}", timeout,
                           self.proc, mask=IN_MODIFY)
                return
            except AssertionError:
                self.stop()
                if "address already in use" not in self.log.read_text(errors="replace"):
                    raise
        raise AssertionError(f"docker-registry: no free port: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _request(self, method: str, url: str, data: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        # Never through a proxy from the environment: the registry is on 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=60) as resp:
                return resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            if method == "HEAD" and exc.code == 404:
                return 404, {}
            raise AssertionError(f"{method} {url}: {exc.code} {exc.read()[:300]!r}") from exc

    def push(self, images: ImageSet, name: str) -> None:
        """Push images' image name as <repository>:<tag> (the host part is dropped: the
        registry answers for every host containerd mirrors onto it)."""
        _, repo, tag = split_name(name)
        base = f"{self.url}/v2/{repo}"
        for digest in images.blobs_of(name):
            if self._request("HEAD", f"{base}/blobs/{digest}")[0] == 200:
                continue
            _, hdrs = self._request("POST", f"{base}/blobs/uploads/", b"")
            loc = urllib.parse.urljoin(self.url, hdrs["Location"])
            loc += ("&" if "?" in loc else "?") + urllib.parse.urlencode({"digest": digest})
            self._request("PUT", loc, images.blobs[digest],
                          {"Content-Type": "application/octet-stream"})
        self._request("PUT", f"{base}/manifests/{tag}", images.manifests[name],
                      {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})


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



def _describe_pid(pid: int) -> str:
    """pid (comm, state, parent) for a report."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return f"{pid} (gone)"
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    return f"{pid} ({comm}, state {state}, parent {ppid})"


# containerd runs below this subreaper, as below systemd on a real host: a shim's
# daemon and, when a shim is killed, the pause and container processes it leaves are
# reparented to it and reaped at once. On this VM pid 1 is not systemd but the VM
# agent, which reaps orphans seconds late: a killed pause stayed a zombie (state Z,
# parent 1) in the pod's cgroup long after containerd had cleaned up. It forwards
# TERM/INT to containerd and exits with it; containerd dies with it (PDEATHSIG).
REAPER = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
main = os.fork()
if main == 0:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    os.execvp(sys.argv[1], sys.argv[1:])
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda signum, _frame: os.kill(main, signum))
while True:
    pid, status = os.wait()
    if pid == main:
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


class CrictlError(AssertionError):
    pass


class CriEnv:
    """One private containerd with its CRI plugin. start() ... stop() (cleans up)."""

    def __init__(self, root: Path, crictl: Path, uspawn_runc: str, runc: str | None,
                 sandbox_image: str = PAUSE_IMAGE, registry_mirrors: dict[str, str] | None = None,
                 host_address: bool = False, private_ipc: bool = False,
                 uspawn_runc_pods: str | None = None) -> None:
        """sandbox_image: the pause image's name. registry_mirrors: registry host ->
        the URL containerd pulls its images from instead (hosts.toml `server`, so
        nothing else is asked). host_address: the bridge gets the subnet's first
        address (made here, before containerd; isGateway stays false, so no route,
        no forwarding change): the host reaches the pods, nothing more. private_ipc:
        containerd (and so every pod with hostIPC) runs in an IPC namespace of its
        own, whose segments go with it (critest makes some with ipcmk).
        uspawn_runc_pods: the binary of a third handler, `uspawn-pods` (uspawn-runc-pods:
        every pod in a user namespace of its own)."""
        self.root = root
        self.uspawn_runc_pods = uspawn_runc_pods
        self.crictl_bin = crictl
        self.uspawn_runc = uspawn_runc
        self.runc = runc
        self.sandbox_image = sandbox_image
        self.registry_mirrors = registry_mirrors or {}
        self.host_address = host_address
        self.private_ipc = private_ipc
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
                  "runc-state", "uspawn-pods-state"):
            (r / d).mkdir(parents=True, exist_ok=True)
        runtimes = self._runtime_toml("uspawn", self.uspawn_runc, r / "uspawn-state")
        if self.uspawn_runc_pods:
            runtimes += self._runtime_toml("uspawn-pods", self.uspawn_runc_pods,
                                           r / "uspawn-pods-state")
        if self.runc:
            runtimes += self._runtime_toml("runc", self.runc, r / "runc-state")
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        registry = ""
        if self.registry_mirrors:
            for host, url in self.registry_mirrors.items():
                (r / "certs.d" / host).mkdir(parents=True, exist_ok=True)
                # containerd 1.6 rejects a hosts.toml without a host tree.
                (r / "certs.d" / host / "hosts.toml").write_text(
                    f'server = "{url}"\n[host."{url}"]\n  capabilities = ["pull", "resolve"]\n')
            registry = f'[{cri}.registry]\n  config_path = "{r}/certs.d"\n'
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
  sandbox_image = "{self.sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = {str(not has_cap_sys_resource()).lower()}
{registry}[{cri}.cni]
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
                          "ranges": [[{"subnet": self.subnet,
                                       "rangeStart": self.subnet_address(2)}]]}},
                {"type": "loopback"}]}, indent=1))
        (r / "crictl.yaml").write_text(f"runtime-endpoint: unix://{self.sock}\n"
                                       f"image-endpoint: unix://{self.sock}\ntimeout: 60\n")

    def subnet_address(self, n: int) -> str:
        return str(ipaddress.ip_network(self.subnet)[n])

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
        if self.host_address:
            for cmd in (["link", "add", self.bridge, "type", "bridge"],
                        ["addr", "add", f"{self.subnet_address(1)}/24", "dev", self.bridge],
                        ["link", "set", self.bridge, "up"]):
                subprocess.run(["ip", *cmd], check=True, capture_output=True)
        logf = open(self.log, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        self.proc = subprocess.Popen(
            (["unshare", "--ipc"] if self.private_ipc else [])
            + [sys.executable, "-I", "-S", "-c", REAPER,
               "containerd", "--config", str(self.root / "config.toml")],
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
        described = [_describe_pid(pid) for pid in found]
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
        return [f"killed leftover pids {described}"] if found else []

    def shim_socket(self, ident: str) -> Path:
        """The socket containerd 1.6 gives the shim of task ident (runtime/v2/shim
        SocketAddress: sha256 of "<grpc address>/<namespace>/<id>"; not configurable)."""
        digest = hashlib.sha256(f"{self.sock}/{NAMESPACE}/{ident}".encode()).hexdigest()
        return SHIM_SOCKETS / digest
