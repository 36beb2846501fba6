"""Kernel matrix: uspawn's checks on Debian's 5.10, 6.1 and 6.12 kernels under qemu, and
on the host kernel without a VM (issue 8).

    bash scripts/kernel-matrix.sh [--only host,5.10,...] [--jobs N] [--no-doc]

Everything CPU-heavy is prepared natively on the host and cached outside the
repository in /var/cache/uspawn-kernels (USPAWN_KERNEL_CACHE overrides it), keyed
by content and rebuilt when missing:

- kernels/<suite>.json + kernels/<sha>/: the `linux-image-*-amd64` package that
  suite's `linux-image-amd64` depends on, fetched with apt from the mirror of this
  machine's own apt sources (private apt state under apt/<suite>, read-only for
  the host's apt), verified against the Packages index (sha256), then only
  vmlinuz and the few modules the guest needs kept;
- kernels/<sha>/initrd-<key>.gz: a busybox-static initramfs that loads
  virtio_pci, virtio_blk, ext4, overlay, crc32c and loop where they are modules
  (with their dependencies first: the .deb has no modules.dep, so each module's
  `depends=` is read from its .modinfo; modules decompressed on the host) and
  switch_roots into the guest root;
- root-base-<key>/: debootstrap bookworm minbase + python3, venv, libseccomp2,
  busybox-static, and a venv with pyseccomp (wheel fetched once into wheels/);
- images/root-<basekey>-<srckey>.img: that tree plus *this source tree* installed
  into the venv (pip, no network) and byte-compiled, as an ext4 image made with
  `mkfs.ext4 -d` (no loop device, no mount). srckey hashes src/, bin/ and
  pyproject.toml, so CI always tests the submitted code.

Each guest boots with the root image as a throwaway snapshot (`snapshot=on`) and
a per-run ext4 work disk (built with `mkfs.ext4 -d`: this harness's guest
scripts, the plan, and the trees: the busybox rootfs for `uspawn run`, the
prebuilt selftest rootfs and, where the kernel takes the chown path, a large
tree for the kill-mid-shift test). The guest mounts pure cgroup v2 at
/sys/fs/cgroup, the work disk's trees at /var/lib/uspawn and runs
tests/kernels/guest_checks.py; results come back on a second serial port
(ttyS1), the console goes to logs/<kernel>.console.log. qemu runs with TCG (KVM
is not usable here), every step has a timeout, qemu is killed on timeout, and
the per-run directory is removed afterwards (nothing is mounted or attached on
the host at any point).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import inspect
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from fixtures.debian_tree import apt_mirror  # noqa: E402

CACHE = Path(os.environ.get("USPAWN_KERNEL_CACHE", "/var/cache/uspawn-kernels"))
# The source tree installed into the guests (and run for the host row): this checkout,
# or USPAWN_MATRIX_SOURCE (a checkout with a candidate fix, to try it on every kernel).
SOURCE = Path(os.environ.get("USPAWN_MATRIX_SOURCE", str(REPO))).resolve()
GUEST_SUITE = "bookworm"
GUEST_PACKAGES = ("python3", "python3-venv", "libseccomp2", "busybox-static")
GUEST_VENV = "/opt/uspawn-venv"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Modules the guest needs before it can mount its disks (plus their modules.dep
# closure); the optional ones are loaded when they exist as modules.
MODULES_REQUIRED = ("virtio_pci", "virtio_blk", "ext4", "overlay")
MODULES_OPTIONAL = ("crc32c_generic", "crc32c_intel", "loop")
BIG_TREE_FILES = (100, 250)  # dirs x files: a chown shift that takes seconds under TCG

# Check columns of the table, in order.
COLUMNS = (
    ("boot", "boot"),
    ("selftest", "selftest"),
    ("doctor", "doctor verdicts"),
    ("run-devnull-nonroot", "run: non-root /dev/null"),
    ("run-mknod-eperm", "run: mknod EPERM"),
    ("ownership-path", "ownership path"),
    ("limits", "limits"),
    ("oci-cgroups", "OCI cgroupsPath shapes"),
    ("shift-kill-resume", "chown shift killed + resumed"),
)
SHIFT_CHECKS = ("shift-started", "shift-unfinished-after-kill", "shift-resumed",
                "shift-consistent")


@dataclass
class Kernel:
    name: str  # "host", "5.10", ...
    suite: str | None  # Debian suite of the kernel package; None: the running kernel
    ownership: str  # the path `uspawn run` must take on a tree on ext4: map | chown
    doctor: dict[str, str]  # doctor row -> the verdict this kernel must get

    @property
    def shift_test(self) -> bool:
        return self.ownership == "chown"


def expectations(version: tuple[int, int]) -> tuple[str, dict[str, str]]:
    """What uspawn must report on a kernel of this version (upstream feature versions)."""
    doctor = {
        "kernel": "ok" if version >= (5, 12) else "degraded",
        # idmapped mounts of ext4: 5.12; of tmpfs: 6.3; overlayfs in a userns: 5.11
        "idmap {trees}": "ok" if version >= (5, 12) else "degraded",
        "idmap tmpfs": "ok" if version >= (6, 3) else "degraded",
        "overlay-in-userns": "ok" if version >= (5, 11) else "degraded",
    }
    return ("map" if version >= (5, 12) else "chown"), doctor


def _kernel(name: str, suite: str | None, version: tuple[int, int]) -> Kernel:
    ownership, doctor = expectations(version)
    return Kernel(name, suite, ownership, doctor)


def host_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m is not None
    return int(m.group(1)), int(m.group(2))


KERNELS = (
    _kernel("host", None, host_version()),
    _kernel("5.10", "bullseye", (5, 10)),
    _kernel("6.1", "bookworm", (6, 1)),
    _kernel("6.12", "trixie", (6, 12)),
)


class Skip(Exception):
    """The kernel cannot be tested here (package not fetchable, no qemu): skipped + reason."""


class HarnessError(Exception):
    pass


_log_lock = threading.Lock()


def log(msg: str) -> None:
    with _log_lock:
        sys.stderr.write(f"[kernel-matrix {time.strftime('%H:%M:%S')}] {msg}\n")
        sys.stderr.flush()


def sh(cmd: list[str], timeout: float, *, cwd: Path | None = None,
       env: dict[str, str] | None = None, logfile: Path | None = None,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with a timeout; its whole process group is killed on timeout."""
    out: Any = open(logfile, "a") if logfile else subprocess.PIPE
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise HarnessError(f"timed out after {timeout:.0f} s: {shlex.join(cmd)}") from None
    finally:
        if logfile:
            out.close()
    res = subprocess.CompletedProcess(cmd, p.returncode, stdout or "", "")
    if check and p.returncode != 0:
        tail = (stdout or "")[-2000:] if not logfile else _tail_file(logfile)
        raise HarnessError(f"{shlex.join(cmd)} exited {p.returncode}: {tail}")
    return res


def _tail_file(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def key_of(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def source_of(*fns: Callable[..., object]) -> dict[str, str]:
    return {f.__name__: hashlib.sha256(inspect.getsource(f).encode()).hexdigest()
            for f in fns}


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    (CACHE / "locks").mkdir(parents=True, exist_ok=True)
    fd = os.open(CACHE / "locks" / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    if path.exists() or path.is_symlink():
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def ensure_host_tools() -> None:
    """qemu-system-x86, debootstrap, mkfs.ext4 (apt-get install when missing)."""
    need = {"qemu-system-x86_64": "qemu-system-x86", "debootstrap": "debootstrap",
            "mkfs.ext4": "e2fsprogs", "dpkg-deb": "dpkg"}
    missing = sorted({pkg for exe, pkg in need.items()
                      if not shutil.which(exe, path="/usr/sbin:/usr/bin:/sbin:/bin")})
    if not missing:
        return
    log(f"installing {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    try:
        if sh(cmd, 600, env=env, check=False).returncode != 0:
            sh(["apt-get", "update", "-qq"], 300, env=env)
            sh(cmd, 600, env=env)
    except HarnessError as exc:
        raise Skip(f"cannot install {' '.join(missing)}: {exc}") from None


# ------------------------------------------------------------------ kernel packages


@dataclass
class KernelFiles:
    suite: str
    package: str
    version: str
    sha256: str
    release: str  # uname -r
    dir: Path
    vmlinuz: Path
    modules: list[str]  # paths relative to dir/modules, in load order
    initrd: Path | None = None
    note: str = ""


def _apt_opts(d: Path) -> list[str]:
    return ["-o", f"Dir::Etc::SourceList={d}/sources.list",
            "-o", f"Dir::Etc::SourceParts={d}/sources.list.d",
            "-o", f"Dir::Etc::Preferences={d}/preferences",
            "-o", f"Dir::Etc::PreferencesParts={d}/preferences.d",
            "-o", f"Dir::State={d}/state", "-o", f"Dir::State::Lists={d}/lists",
            "-o", f"Dir::State::status={d}/status", "-o", f"Dir::Cache={d}/cache",
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "APT::Architecture=amd64", "-o", "APT::Architectures=amd64",
            "-o", "Acquire::Languages=none", "-o", "Acquire::Retries=2",
            "-o", "Acquire::http::Timeout=30", "-o", "Acquire::https::Timeout=30",
            "-q"]


def _apt_dir(suite: str, mirror: str) -> Path:
    d = CACHE / "apt" / suite
    for sub in ("sources.list.d", "preferences.d", "state", "lists/partial",
                "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "status").touch()
    (d / "preferences").touch()
    (d / "sources.list").write_text(
        f"deb [arch=amd64 signed-by={KEYRING}] {mirror} {suite} main\n")
    return d


def _show(d: Path, pkg: str) -> dict[str, str]:
    r = sh(["apt-cache", *_apt_opts(d), "show", "--no-all-versions", pkg], 60, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        raise Skip(f"no package {pkg} in the index: {r.stdout.strip()[-300:]}")
    fields: dict[str, str] = {}
    for line in r.stdout.splitlines():
        if not line.strip():
            break
        k, sep, v = line.partition(":")
        if sep and not line[0].isspace():
            fields[k.strip()] = v.strip()
    return fields


def resolve_kernel_package(suite: str) -> dict[str, str]:
    """{package, version, sha256, filename} of the suite's current amd64 kernel image."""
    mirror = apt_mirror()
    d = _apt_dir(suite, mirror)
    r = sh(["apt-get", *_apt_opts(d), "update"], 300, check=False)
    if r.returncode != 0 or "Err:" in r.stdout or "W: " in r.stdout:
        raise Skip(f"apt-get update for {suite} from {mirror} failed: "
                   f"{r.stdout.strip()[-400:]}")
    meta = _show(d, "linux-image-amd64")
    deps = [x.strip().split()[0] for x in meta.get("Depends", "").split(",")]
    images = [x for x in deps if re.fullmatch(r"linux-image-[0-9].*-amd64", x)]
    if not images:
        raise Skip(f"linux-image-amd64 in {suite} depends on no kernel image: "
                   f"{meta.get('Depends')}")
    info = _show(d, images[0])
    return {"package": images[0], "version": info["Version"], "sha256": info["SHA256"],
            "filename": info["Filename"], "mirror": mirror}


def _module_name(path: str) -> str:
    base = os.path.basename(path)
    base = re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", base)
    return base.replace("-", "_")


def _ko_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma

        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        r = subprocess.run(["zstd", "-q", "-d", "-c", str(path)], capture_output=True,
                           check=True, timeout=60)
        return r.stdout
    return data


def _modinfo_depends(path: Path) -> list[str]:
    m = re.search(rb"\0depends=([^\0]*)\0", _ko_bytes(path))
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def _extract_kernel(deb: Path, out: Path) -> tuple[str, list[str]]:
    """vmlinuz + the needed modules (decompressed, in load order) from the .deb into out."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract.", dir=CACHE))
    try:
        sh(["dpkg-deb", "-x", str(deb), str(tmp)], 300)
        vmlinuz = sorted((tmp / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise HarnessError(f"no /boot/vmlinuz-* in {deb.name}")
        release = vmlinuz[0].name.removeprefix("vmlinuz-")
        mdir = next((p for p in (tmp / "lib/modules" / release, tmp / "usr/lib/modules" / release)
                     if p.is_dir()), None)
        if mdir is None:
            raise HarnessError(f"no modules directory for {release} in {deb.name}")
        # The .deb ships no modules.dep (depmod makes it at install time): read each
        # module's "depends=" from its .modinfo strings instead.
        paths = {_module_name(str(p)): p for p in mdir.rglob("*.ko*")}
        builtin = {_module_name(x) for x in
                   (mdir / "modules.builtin").read_text().split()} \
            if (mdir / "modules.builtin").exists() else set()
        order: list[str] = []

        def add(name: str, required: bool) -> None:
            if name in builtin or any(name == _module_name(o) for o in order):
                return
            if name not in paths:
                if required:
                    raise HarnessError(f"module {name} is neither a module nor built in "
                                       f"({release})")
                return
            for dep in _modinfo_depends(paths[name]):
                add(dep, True)
            order.append(str(paths[name].relative_to(mdir)))

        for name in MODULES_REQUIRED:
            add(name, True)
        for name in MODULES_OPTIONAL:
            add(name, False)
        (out / "modules").mkdir(parents=True, exist_ok=True)
        plain = []
        for rel in order:
            src = mdir / rel
            dest_rel = re.sub(r"\.(xz|zst|gz)$", "", rel)
            dest = out / "modules" / dest_rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(_ko_bytes(src))
            plain.append(dest_rel)
        shutil.copyfile(vmlinuz[0], out / "vmlinuz")
        return release, plain
    finally:
        _rmtree(tmp)


def fetch_kernel(suite: str) -> KernelFiles:
    """The suite's kernel, fetched and extracted once (keyed by the package's sha256).

    The index is refreshed on every call; when the mirror cannot be reached the
    last kernel fetched for the suite is used (and said so); with none, Skip.
    """
    pointer = CACHE / "kernels" / f"{suite}.json"
    note = ""
    try:
        pkg = resolve_kernel_package(suite)
    except (Skip, HarnessError) as exc:
        if not pointer.exists():
            raise Skip(f"cannot fetch the {suite} kernel: {exc}") from None
        pkg = json.loads(pointer.read_text())
        note = f"index not reachable ({exc}); using the cached {pkg['package']}"
        log(f"{suite}: {note}")
    kdir = CACHE / "kernels" / pkg["sha256"][:16]
    meta_file = kdir / "meta.json"
    with locked(f"kernel-{suite}"):
        if not meta_file.exists():
            debs = CACHE / "debs"
            debs.mkdir(parents=True, exist_ok=True)
            deb = debs / os.path.basename(pkg["filename"])
            if not deb.exists() or sha256_file(deb) != pkg["sha256"]:
                log(f"{suite}: downloading {pkg['package']} {pkg['version']}")
                d = _apt_dir(suite, pkg["mirror"])
                part = debs / f"partial-{suite}"
                _rmtree(part)
                part.mkdir()
                try:
                    sh(["apt-get", *_apt_opts(d), "download", pkg["package"]], 600, cwd=part)
                except HarnessError as exc:
                    raise Skip(f"cannot download {pkg['package']}: {exc}") from None
                got = list(part.glob("*.deb"))
                if len(got) != 1 or sha256_file(got[0]) != pkg["sha256"]:
                    raise HarnessError(f"downloaded {got} does not match sha256 "
                                       f"{pkg['sha256']}")
                os.replace(got[0], deb)
                _rmtree(part)
            log(f"{suite}: extracting {deb.name}")
            kdir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{kdir.name}.", dir=CACHE / "kernels"))
            try:
                release, modules = _extract_kernel(deb, tmp)
                (tmp / "meta.json").write_text(json.dumps(
                    {**pkg, "release": release, "modules": modules}, indent=1))
                _rmtree(kdir)
                os.rename(tmp, kdir)
            finally:
                _rmtree(tmp)
        pointer.write_text(json.dumps(pkg, indent=1))
    meta = json.loads(meta_file.read_text())
    return KernelFiles(suite, meta["package"], meta["version"], meta["sha256"],
                       meta["release"], kdir, kdir / "vmlinuz", meta["modules"], note=note)


# ------------------------------------------------------------------ initramfs

INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "matrix-initramfs: $*"; sleep 1; poweroff -f; }
while read -r m; do
    insmod "/modules/$m" || echo "matrix-initramfs: insmod $m failed"
done < /modules.order
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda and /dev/vdb after 30 s"
    sleep 0.1
done
mount -t ext4 /dev/vda /newroot || fail "cannot mount the root disk"
mount -t ext4 /dev/vdb /newroot/mnt/work || fail "cannot mount the work disk"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /bin/sh /mnt/work/matrix/init.sh
"""


def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """entries: (name, mode, data, rdev). A newc archive as the kernel unpacks it."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], 1):
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
                  len(nb), 0)
        out.write(b"070701" + b"".join(f"{x:08x}".encode() for x in fields))
        out.write(nb)
        pad(110 + len(nb))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def build_initramfs(k: KernelFiles, init: str = INITRAMFS_INIT, prefix: str = "initrd") -> Path:
    """A busybox initramfs for kernel k whose /init is `init` (the matrix's by default;
    systemd_guest.py passes one that switch_roots into systemd), cached by content."""
    from uspawn.tree.busybox import find_busybox

    busybox = Path(find_busybox())
    key = key_of({"kernel": k.sha256, "busybox": sha256_file(busybox), "init": init,
                  "modules": k.modules, "code": source_of(_cpio_newc)})
    path = k.dir / f"{prefix}-{key}.gz"
    if path.exists():
        return path
    entries: list[tuple[str, int, bytes, int]] = [
        (d, 0o40755, b"", 0) for d in ("bin", "dev", "proc", "sys", "newroot", "modules")]
    entries.append(("dev/console", 0o20600, b"", os.makedev(5, 1)))
    entries.append(("bin/busybox", 0o100755, busybox.read_bytes(), 0))
    entries.append(("init", 0o100755, init.encode(), 0))
    entries.append(("modules.order", 0o100644, "".join(m + "\n" for m in k.modules).encode(),
                    0))
    dirs: set[str] = set()
    for m in k.modules:
        parts = m.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "modules/" + "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append((d, 0o40755, b"", 0))
        entries.append((f"modules/{m}", 0o100644, (k.dir / "modules" / m).read_bytes(), 0))
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ guest root


def _chroot(tree: Path, *cmd: str, timeout: float = 600, logfile: Path | None = None) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_CACHE_DIR": "1"}
    sh(["chroot", str(tree), *cmd], timeout, env=env, logfile=logfile)


def _wheels() -> Path:
    """pyseccomp (uspawn's only dependency) and wheel (to build uspawn without network)."""
    from importlib import metadata

    try:
        spec = f"pyseccomp=={metadata.version('pyseccomp')}"
    except metadata.PackageNotFoundError:
        spec = "pyseccomp>=0.1.2"
    specs = [spec, "wheel"]
    d = CACHE / "wheels" / key_of(specs)
    if not d.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".wheels.", dir=CACHE))
        try:
            sh([sys.executable, "-m", "pip", "download", "-q", "-d", str(tmp),
                *specs], 300)
            d.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, d)
        finally:
            _rmtree(tmp)
    return d


def _base_recipe(tree: Path, mirror: str, wheels: Path, logfile: Path) -> None:
    debs = CACHE / "debs" / "debootstrap"
    debs.mkdir(parents=True, exist_ok=True)
    sh(["debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
        f"--cache-dir={debs}", GUEST_SUITE, str(tree), mirror], 900,
       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, logfile=logfile)
    for p in ("mnt/work", "var/lib/uspawn"):
        (tree / p).mkdir(parents=True, exist_ok=True)
    (tree / "etc/hostname").write_text("matrix\n")
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("# no network in the matrix guest\n")
    shutil.copytree(wheels, tree / "tmp/wheels")
    _chroot(tree, "python3", "-m", "venv", GUEST_VENV, logfile=logfile)
    _chroot(tree, f"{GUEST_VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
            "/tmp/wheels", "pyseccomp", "wheel", logfile=logfile)
    _rmtree(tree / "tmp/wheels")
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*"):
        for leftover in tree.glob(pattern):
            leftover.unlink()


def guest_base() -> Path:
    """debootstrap + venv with the dependencies: keyed by the recipe, built once."""
    mirror = apt_mirror()
    wheels = _wheels()
    key = key_of({"suite": GUEST_SUITE, "packages": GUEST_PACKAGES, "mirror": mirror,
                  "venv": GUEST_VENV, "wheels": sorted(p.name for p in wheels.iterdir()),
                  "code": source_of(_base_recipe, _chroot)})
    return cached_tree("root-base", key, f"guest root: debootstrap {GUEST_SUITE} minbase",
                       lambda tmp, logfile: _base_recipe(tmp, mirror, wheels, logfile))


def cached_tree(prefix: str, key: str, what: str, build: Callable[[Path, Path], None],
                say: Callable[[str], None] = log, prune: bool = False) -> Path:
    """CACHE/<prefix>-<key>: made once, under a lock, by build(tmp dir, log file) in a
    temporary directory renamed into place whole (a half-built tree never has the final
    name). prune: remove the other keys' trees of this prefix afterwards."""
    final = CACHE / f"{prefix}-{key}"
    if final.is_dir():
        return final
    with locked(prefix):
        if final.is_dir():
            return final
        for stale in CACHE.glob(f".{prefix}-*"):
            _rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-{key}.", dir=CACHE))
        logfile = CACHE / f"{prefix}-{key}.build.log"
        logfile.write_text("")
        say(f"{what} (log {logfile})")
        t0 = time.monotonic()
        try:
            build(tmp, logfile)
            os.rename(tmp, final)
        except (HarnessError, OSError) as exc:
            raise HarnessError(f"{what}: build failed: {exc}") from None
        finally:
            _rmtree(tmp)
        say(f"{what}: built in {time.monotonic() - t0:.0f} s")
        for old in CACHE.glob(f"{prefix}-*") if prune else ():
            if old.is_dir() and old != final:
                _rmtree(old)
                old.with_name(old.name + ".build.log").unlink(missing_ok=True)
    return final


def source_key() -> str:
    """sha256 over what pip installs: src/ (no bytecode), bin/, pyproject.toml."""
    h = hashlib.sha256()
    paths = [SOURCE / "pyproject.toml"]
    for top in ("src", "bin"):
        for dirpath, dirnames, filenames in os.walk(SOURCE / top):
            dirnames[:] = sorted(d for d in dirnames
                                 if d != "__pycache__" and not d.endswith(".egg-info"))
            paths += [Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc")]
    for p in paths:
        h.update(str(p.relative_to(SOURCE)).encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _mkfs(img: Path, src: Path, size_mb: int, label: str, logfile: Path | None = None) -> None:
    img.unlink(missing_ok=True)
    with open(img, "wb") as f:
        f.truncate(size_mb << 20)
    # ^orphan_file: 5.10 cannot mount it (1.47 turns it on for large filesystems).
    sh(["mkfs.ext4", "-q", "-F", "-L", label, "-N", "65536", "-O", "^orphan_file",
        "-E", "root_owner=0:0", "-d", str(src), str(img)], 300, logfile=logfile)


def _du_mb(path: Path) -> int:
    r = sh(["du", "-sxm", str(path)], 120)
    return int(r.stdout.split()[0])


def guest_image() -> Path:
    """The root image: base + this source tree installed into the venv (keyed by both)."""
    base = guest_base()
    skey = source_key()
    img = CACHE / "images" / f"root-{base.name.removeprefix('root-base-')}-{skey}.img"
    if img.exists():
        os.utime(img)
        return img
    with locked("root-image"):
        if img.exists():
            return img
        img.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        log(f"guest root: installing source {skey} into a copy of {base.name}")
        tmp = Path(tempfile.mkdtemp(prefix=".root-src.", dir=CACHE))
        logfile = CACHE / "images" / f"{img.stem}.build.log"
        logfile.write_text("")
        try:
            tree = tmp / "root"
            sh(["cp", "-a", "--reflink=auto", str(base), str(tree)], 300)
            src = tree / "tmp/uspawn-src"
            src.mkdir()
            for top in ("src", "bin"):
                shutil.copytree(SOURCE / top, src / top,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc",
                                                              "*.egg-info"))
            shutil.copy2(SOURCE / "pyproject.toml", src)
            _chroot(tree, f"{GUEST_VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-build-isolation", "/tmp/uspawn-src", logfile=logfile)
            _rmtree(src)
            _chroot(tree, f"{GUEST_VENV}/bin/python", "-m", "compileall", "-q", GUEST_VENV,
                    logfile=logfile)
            (tree / "etc/uspawn-matrix.json").write_text(json.dumps(
                {"base": base.name, "source": skey}) + "\n")
            size = _du_mb(tree) * 13 // 10 + 128
            part = img.with_suffix(".tmp")
            _mkfs(part, tree, size, "matrixroot", logfile)
            os.replace(part, img)
        finally:
            _rmtree(tmp)
            img.with_suffix(".tmp").unlink(missing_ok=True)
        log(f"guest root: image {img.name} in {time.monotonic() - t0:.0f} s")
        # Keep the three newest images.
        for old in sorted((CACHE / "images").glob("root-*.img"),
                          key=lambda p: p.stat().st_mtime, reverse=True)[3:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".build.log").unlink(missing_ok=True)
    return img


# ------------------------------------------------------------------ work disk and boots

GUEST_INIT = r"""#!/bin/sh
# pid 1 of the matrix guest (after the initramfs): mounts, checks, power off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root
phase=main timeout=240
for w in $(cat /proc/cmdline); do
    case "$w" in matrix.phase=*) phase=${w#*=};; matrix.timeout=*) timeout=${w#*=};; esac
done
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount --bind /mnt/work/trees /var/lib/uspawn
hostname matrix
ctrl=$(cat /sys/fs/cgroup/cgroup.controllers)
echo "matrix-init: Linux $(uname -r), phase $phase, cgroup2 controllers: $ctrl"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
/opt/uspawn-venv/bin/python /mnt/work/matrix/guest_checks.py \
    --uspawn "/opt/uspawn-venv/bin/python -m uspawn" --trees /var/lib/uspawn \
    --plan /mnt/work/matrix/plan.json --phase "$phase" --timeout "$timeout" --out /dev/ttyS1
echo "matrix-init: checks exited $?"
sync
umount /var/lib/uspawn
mount -o remount,ro /mnt/work
busybox poweroff -f
echo o > /proc/sysrq-trigger
"""


def _build_trees(dest: Path, big: bool) -> None:
    from uspawn.tree.busybox import build_busybox_rootfs

    dest.mkdir(mode=0o700)
    build_busybox_rootfs(str(dest / "busybox"))
    (dest / "selftest").mkdir(mode=0o700)
    build_busybox_rootfs(str(dest / "selftest/busybox"))
    if big:
        build_busybox_rootfs(str(dest / "big"))
        ndirs, nfiles = BIG_TREE_FILES
        for i in range(ndirs):
            d = dest / "big/usr/share/filler" / f"d{i:03d}"
            d.mkdir(parents=True)
            for j in range(nfiles):
                (d / f"f{j:03d}").write_bytes(b"")
        # one setuid binary: the shift must restore its mode
        shutil.copy2(dest / "big/bin/busybox", dest / "big/usr/share/filler/suid")
        os.chmod(dest / "big/usr/share/filler/suid", 0o4755)


def build_work_disk(run: Path, k: Kernel, timeout: float) -> Path:
    work = run / "work"
    (work / "matrix").mkdir(parents=True)
    shutil.copy2(HERE / "guest_checks.py", work / "matrix/guest_checks.py")
    (work / "matrix/init.sh").write_text(GUEST_INIT)
    os.chmod(work / "matrix/init.sh", 0o755)
    # The guest mounts pure cgroup v2: doctor must see the unified layout and manage it.
    plan = {"kernel": k.name, "ownership": k.ownership,
            "doctor": {**k.doctor, "cgroups": "ok"}, "doctor_meaning": {"cgroups": "unified"}}
    (work / "matrix/plan.json").write_text(json.dumps(plan, indent=1))
    _build_trees(work / "trees", big=k.shift_test)
    img = run / "work.img"
    _mkfs(img, work, 512, "matrixwork")
    _rmtree(work)
    return img


@dataclass
class Boot:
    results: list[dict[str, Any]]
    seconds: float
    exit: str  # "poweroff", "killed at marker", "timeout", "exit N"


def boot(k: KernelFiles, root_img: Path, work_img: Path, run: Path, phase: str,
         timeout: float, console: Path, kill_on: str | None = None) -> Boot:
    """Boot the kernel once; return the JSON lines the guest wrote to ttyS1."""
    assert k.initrd is not None
    results = run / f"results-{phase}.jsonl"
    results.write_text("")
    check_timeout = max(60, int(timeout * 0.6))
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
           "-m", "1024", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-monitor", "none", "-kernel", str(k.vmlinuz), "-initrd", str(k.initrd),
           "-append", f"console=ttyS0 panic=-1 loglevel=4 matrix.phase={phase} "
           f"matrix.timeout={check_timeout}",
           "-drive", f"file={root_img},if=virtio,format=raw,snapshot=on,cache=unsafe",
           "-drive", f"file={work_img},if=virtio,format=raw,cache=writeback",
           "-serial", f"file:{run / 'console.part'}", "-serial", f"file:{results}"]
    env = dict(os.environ, TMPDIR=str(run))  # snapshot=on's temp file lives (and dies) there
    t0 = time.monotonic()
    with open(run / "qemu.stderr", "w") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
    how = ""
    try:
        while True:
            try:
                rc = p.wait(timeout=0.25)
                how = "poweroff" if rc == 0 else f"qemu exit {rc}"
                break
            except subprocess.TimeoutExpired:
                pass
            if kill_on and any(r.get("check") == kill_on and r.get("status") == "pass"
                               for r in _read_results(results)):
                how = f"killed (SIGKILL) after {kill_on}"
                break
            if time.monotonic() - t0 > timeout:
                how = f"timeout after {timeout:.0f} s: qemu killed"
                break
    finally:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        with open(console, "a") as out:
            out.write(f"===== {k.package} {k.version}, phase {phase}: {how} "
                      f"({time.monotonic() - t0:.1f} s) =====\n")
            out.write((run / "console.part").read_text(errors="replace")
                      if (run / "console.part").exists() else "")
            qerr = (run / "qemu.stderr").read_text(errors="replace")
            if qerr.strip():
                out.write(f"----- qemu stderr -----\n{qerr}")
    return Boot(_read_results(results), time.monotonic() - t0, how)


def _die_with_parent() -> None:
    """qemu gets SIGKILL when the harness dies (even by SIGKILL): no stray VMs."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def _remove_stale_runs() -> None:
    """Run directories of harness processes that died without cleaning up."""
    for d in CACHE.glob("run-*.*.*"):
        pid = d.name.split(".")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _rmtree(d)


def _read_results(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return out
    for line in text.replace("\r", "").splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


# ------------------------------------------------------------------ one kernel


@dataclass
class KernelResult:
    kernel: Kernel
    checks: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> status, detail
    release: str = ""
    package: str = ""
    skipped: str = ""  # the reason, when the whole kernel is skipped
    timings: dict[str, float] = field(default_factory=dict)
    console_log: str = ""
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        return [f"{n}: {d}" for n, (s, d) in self.checks.items() if s == "fail"]

    def cell(self, column: str) -> tuple[str, str]:
        if self.skipped:
            return "skipped", self.skipped
        if column == "shift-kill-resume":
            parts = [self.checks.get(c) for c in SHIFT_CHECKS]
            if not self.kernel.shift_test:
                return "n/a", "map"
            got = [p for p in parts if p is not None]
            if len(got) < len(SHIFT_CHECKS):
                return "fail", "not all shift checks reported"
            bad = [d for s, d in got if s != "pass"]
            return ("fail", "; ".join(bad)) if bad else ("pass", "")
        return self.checks.get(column, ("fail", "not reported (see the console log)"))


def _record(res: KernelResult, b: Boot, expected: tuple[str, ...]) -> None:
    for r in b.results:
        if "check" in r:
            res.checks[r["check"]] = (r["status"], r.get("detail", ""))
            res.timings[r["check"]] = r.get("seconds", 0.0)
        elif "kernel" in r:
            res.release = r["kernel"]
    for name in expected:
        if name not in res.checks:
            res.checks[name] = ("fail", f"not reported: guest {b.exit}, see {res.console_log}")


MAIN_CHECKS = ("selftest", "doctor", "run-devnull-nonroot", "run-mknod-eperm", "ownership-path",
               "limits", "oci-cgroups")


def run_vm_kernel(kern: Kernel, root_img: Path, kfiles: KernelFiles,
                  timeout: float = 240) -> KernelResult:
    res = KernelResult(kern, release=kfiles.release,
                       package=f"{kfiles.package} {kfiles.version}")
    if kfiles.note:
        res.notes.append(kfiles.note)
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = logs / f"{kern.name}.console.log"
    console.write_text("")
    res.console_log = str(console)
    tag = kern.name.replace(".", "_")
    run = Path(tempfile.mkdtemp(prefix=f"run-{tag}.{os.getpid()}.", dir=CACHE))
    try:
        t0 = time.monotonic()
        work = build_work_disk(run, kern, timeout)
        res.timings["work-disk"] = time.monotonic() - t0
        b = boot(kfiles, root_img, work, run, "main", timeout, console)
        res.timings["boot-main"] = b.seconds
        booted = any("kernel" in r for r in b.results)
        res.checks["boot"] = ("pass", f"{kfiles.release}: {b.exit} after {b.seconds:.0f} s") \
            if booted else ("fail", f"the guest never reported ({b.exit}); see {console}")
        _record(res, b, MAIN_CHECKS)
        if booted and b.exit != "poweroff":
            res.checks["boot"] = ("fail", f"{b.exit}; see {console}")
        if kern.shift_test and booted:
            b = boot(kfiles, root_img, work, run, "shift-kill", timeout, console,
                     kill_on="shift-started")
            res.timings["boot-shift-kill"] = b.seconds
            _record(res, b, SHIFT_CHECKS[:1])
            if res.checks["shift-started"][0] == "pass":
                b = boot(kfiles, root_img, work, run, "shift-resume", timeout, console)
                res.timings["boot-shift-resume"] = b.seconds
                _record(res, b, SHIFT_CHECKS[1:])
    finally:
        _rmtree(run)
    return res


def run_host_kernel(kern: Kernel, timeout: float = 240) -> KernelResult:
    """The same checks on the running kernel, natively, with this source tree."""
    res = KernelResult(kern, release=os.uname().release, package="(running kernel, no VM)")
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = logs / "host.console.log"
    res.console_log = str(console)
    # Trees on the cache's filesystem (ext4 here), in a 0700 directory of their own.
    run = Path(tempfile.mkdtemp(prefix=f"run-host.{os.getpid()}.", dir=CACHE))
    try:
        t0 = time.monotonic()
        trees = run / "trees"
        _build_trees(trees, big=False)
        plan = {"kernel": "host", "ownership": kern.ownership, "doctor": kern.doctor}
        out = run / "results.jsonl"
        env = dict(os.environ, PYTHONPATH=str(SOURCE / "src"))
        uspawn = shlex.join([sys.executable, "-m", "uspawn"])
        r = sh([sys.executable, str(HERE / "guest_checks.py"), "--uspawn", uspawn,
                "--trees", str(trees), "--plan", json.dumps(plan), "--phase", "main",
                "--out", str(out), "--timeout", str(int(timeout * 0.6))],
               timeout, env=env, check=False)
        console.write_text(f"===== host {res.release}: exit {r.returncode} =====\n{r.stdout}")
        b = Boot(_read_results(out), time.monotonic() - t0, f"exit {r.returncode}")
        res.timings["checks"] = b.seconds
        res.checks["boot"] = ("n/a", "no VM")
        _record(res, b, MAIN_CHECKS)
    finally:
        _rmtree(run)
    return res


# ------------------------------------------------------------------ the matrix


@dataclass
class Prepared:
    root_img: Path | None = None
    root_error: str = ""
    kernels: dict[str, KernelFiles | str] = field(default_factory=dict)  # files | skip reason
    seconds: float = 0.0


def prepare(names: list[str]) -> Prepared:
    """Tools, guest root image and the kernels, in parallel (network and disk bound)."""
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    prep = Prepared()
    _remove_stale_runs()
    vms = [k for k in KERNELS if k.name in names and k.suite]
    if not vms:
        return prep
    try:
        ensure_host_tools()
    except Skip as exc:
        for k in vms:
            prep.kernels[k.name] = f"skip: {exc}"
        return prep

    def kernel(k: Kernel) -> None:
        assert k.suite is not None
        try:
            kf = fetch_kernel(k.suite)
            kf.initrd = build_initramfs(kf)
            prep.kernels[k.name] = kf
        except Skip as exc:
            prep.kernels[k.name] = f"skip: {exc}"
        except (HarnessError, OSError) as exc:
            prep.kernels[k.name] = f"error: {exc}"
            log(f"{k.name}: {exc}")

    with ThreadPoolExecutor(max_workers=len(vms) + 1) as pool:
        futs = [pool.submit(kernel, k) for k in vms]
        try:
            prep.root_img = guest_image()
        except (HarnessError, OSError, Skip) as exc:
            prep.root_error = str(exc)
            log(f"guest root: {exc}")
        for f in futs:
            f.result()
    prune()
    prep.seconds = time.monotonic() - t0
    return prep


def prune() -> None:
    """Drop cached kernels, .debs and guest bases that no current key names."""
    kdir = CACHE / "kernels"
    keep = set()
    for pointer in kdir.glob("*.json"):
        with contextlib.suppress(ValueError, KeyError, OSError):
            pkg = json.loads(pointer.read_text())
            keep.add(pkg["sha256"][:16])
            keep.add(os.path.basename(pkg["filename"]))
    for d in kdir.iterdir() if kdir.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
            with locked("prune"):
                _rmtree(d)
    for deb in (CACHE / "debs").glob("linux-image-*.deb"):
        if deb.name not in keep:
            deb.unlink(missing_ok=True)
    images = sorted((CACHE / "images").glob("root-*.img"), key=lambda p: p.stat().st_mtime)
    if images:
        current = "root-base-" + images[-1].name.split("-")[1]
        for base in CACHE.glob("root-base-*"):
            if base.is_dir() and base.name != current:
                with locked("root-base"):
                    _rmtree(base)
                base.with_name(base.name + ".build.log").unlink(missing_ok=True)


def run_kernel(name: str, prep: Prepared, timeout: float = 240) -> KernelResult:
    kern = next(k for k in KERNELS if k.name == name)
    if kern.suite is None:
        return run_host_kernel(kern, timeout)
    got = prep.kernels.get(name)
    if isinstance(got, str):
        res = KernelResult(kern)
        if got.startswith("skip: "):
            res.skipped = got.removeprefix("skip: ")
        else:
            res.checks["boot"] = ("fail", f"preparation failed: {got}")
        return res
    if prep.root_img is None or got is None:
        res = KernelResult(kern)
        res.checks["boot"] = ("fail", f"no guest root image: {prep.root_error}")
        return res
    t0 = time.monotonic()
    log(f"{name}: booting {got.package} {got.version} ({got.release})")
    res = run_vm_kernel(kern, prep.root_img, got, timeout)
    res.timings["total"] = time.monotonic() - t0
    return res


def run_matrix(names: list[str], jobs: int = 1, timeout: float = 240,
               ) -> tuple[Prepared, list[KernelResult]]:
    prep = prepare(names)
    log(f"prepared in {prep.seconds:.0f} s")
    results: dict[str, KernelResult] = {}
    if "host" in names:
        t0 = time.monotonic()
        results["host"] = run_kernel("host", prep, timeout)
        results["host"].timings["total"] = time.monotonic() - t0
        log(f"host: done in {time.monotonic() - t0:.0f} s")
    vms = [k.name for k in KERNELS if k.name in names and k.suite]

    def one(name: str) -> None:
        results[name] = run_kernel(name, prep, timeout)
        log(f"{name}: done in {results[name].timings.get('total', 0):.0f} s")

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for f in [pool.submit(one, n) for n in vms]:
            f.result()
    return prep, [results[k.name] for k in KERNELS if k.name in results]


# ------------------------------------------------------------------ report

MARK = {"pass": "pass", "fail": "**FAIL**", "skipped": "skipped"}


def _cell_text(status: str, detail: str, column: str) -> str:
    if status == "pass":
        return "pass"
    if status == "n/a":
        return f"n/a ({detail})"
    reason = detail.replace("|", "\\|").replace("\n", " ")
    if len(reason) > 90 and status == "fail":
        reason = reason[:87] + "..."
    return f"{MARK.get(status, status)}: {reason}" if reason else MARK.get(status, status)


def table(results: list[KernelResult]) -> str:
    head = "| kernel | package | " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for r in results:
        cells = []
        for col, _ in COLUMNS:
            s, d = r.cell(col)
            if col == "ownership-path" and s == "pass":
                cells.append(f"pass ({r.kernel.ownership})")
            else:
                cells.append(_cell_text(s, d, col))
        lines.append(f"| {r.kernel.name} ({r.release or r.kernel.suite}) | {r.package or '-'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(results: list[KernelResult]) -> str:
    passed = sum(1 for r in results for c, _ in COLUMNS if r.cell(c)[0] == "pass")
    failed = sum(1 for r in results for c, _ in COLUMNS if r.cell(c)[0] == "fail")
    skipped = sum(1 for r in results for c, _ in COLUMNS if r.cell(c)[0] == "skipped")
    na = sum(1 for r in results for c, _ in COLUMNS if r.cell(c)[0] == "n/a")
    return f"{passed} passed, {failed} failed, {skipped} skipped ({na} not applicable)"


def details(results: list[KernelResult], prep: Prepared) -> str:
    out = []
    for r in results:
        out.append(f"### {r.kernel.name}: {r.release or r.kernel.suite}")
        out.append("")
        if r.skipped:
            out.append(f"Skipped: {r.skipped}")
            out.append("")
            continue
        want = ", ".join(f"`{k.replace('{trees}', 'TREES')}` {v}"
                         for k, v in r.kernel.doctor.items())
        out.append(f"Expected: ownership `{r.kernel.ownership}`; doctor {want}.")
        out.append(f"Console log: `{r.console_log}`.")
        for n in r.notes:
            out.append(f"Note: {n}")
        t = ", ".join(f"{k} {v:.1f} s" for k, v in r.timings.items())
        out.append(f"Timings: {t}.")
        out.append("")
        for name, (s, d) in r.checks.items():
            d = d.replace("\n", " ")
            out.append(f"- `{name}` {s}: {d}")
        out.append("")
    return "\n".join(out)


CHECK_DOCS = (
    ("boot", "the guest booted, ran the checks and powered off"),
    ("selftest", "`uspawn selftest --json`: every canary passed"),
    ("doctor verdicts", "`uspawn doctor --json --path /var/lib/uspawn` (ext4): `kernel`, "
     "`idmap DIR`, `idmap tmpfs`, `overlay-in-userns` have the verdicts this kernel must get "
     "(ok from 5.12, 5.12, 6.3 and 5.11, degraded before), `cgroups` is ok (in the guests: "
     "the unified layout), and no row is broken (exit 0)"),
    ("run: non-root /dev/null", "`uspawn run -v --user user`: uid 1000 writes /dev/null and "
     "reads /dev/zero"),
    ("run: mknod EPERM", "as container root `mknod c` and `mknod b` fail with EPERM and leave "
     "nothing; mkfifo works"),
    ("ownership path", "`uspawn run -v` prints `rootfs ownership: map` (idmapped, tree "
     "untouched) from 5.12 and `chown` (tree shifted into the container's range) before"),
    ("limits", "`uspawn run --memory 64M --pids 50 --cpus 1`: a 100M `dd` is OOM-killed "
     "while the init goes on, a fork bomb stops below 50 tasks, `uspawn set` raises "
     "MemoryMax and TasksMax of a running container (`status` shows them); on cgroup2 "
     "memory.max, pids.max, cpu.max and MemoryHigh's memory.high inside (docs/LIMITS.md)"),
    ("OCI cgroupsPath shapes", "`uspawn-runc create` with memory 48M and pids 21 for an "
     "absolute, a relative and a `slice:prefix:name` cgroupsPath: the container's cgroup "
     "has pids.max 21 and the memory limit, and none is left after `delete` (docs/OCI.md)"),
    ("chown shift killed + resumed", "kernels where uspawn takes the chown path: the VM is "
     "SIGKILLed in the middle of a `--private-users-ownership=chown` shift of a {files}-file "
     "tree (after a `sync`, so a half-shifted tree is on disk) and booted again: "
     "`uspawn check` shows the unfinished shift (`half-shift` degraded), the next `uspawn run` "
     "finishes it, then the tree has one ID range and no journal and `uspawn check` is ok"),
)

DOC_HEAD = """# Kernel matrix

Generated by `bash scripts/kernel-matrix.sh` (tests/kernels/matrix.py) on {date};
do not edit by hand. The same checks run under pytest as `tests/kernels/test_matrix.py`.

Each Debian kernel (`linux-image-amd64` of the suite, from the mirror of this
machine's apt sources) boots under qemu (TCG) with a bookworm guest root in which
the source tree under test is installed; the guest mounts pure cgroup v2 and keeps
container trees on ext4. The host row runs the same checks on the running kernel
without a VM, with the host's own cgroup layout. Source tree tested: `{source}`
(sha256 of src/, bin/, pyproject.toml; the key of the guest root image).

## How to run

    bash scripts/kernel-matrix.sh                  # all kernels, rewrites this file
    bash scripts/kernel-matrix.sh --only 5.10      # one kernel: host, 5.10, 6.1, 6.12
    bash scripts/kernel-matrix.sh --no-doc --jobs 2
    .venv/bin/python -m pytest -q tests/kernels    # the same, one test per kernel

As root. qemu-system-x86 and debootstrap are installed with apt when missing.
Everything is cached in `/var/cache/uspawn-kernels` (`USPAWN_KERNEL_CACHE`): kernel
packages and their extracted vmlinuz + modules (keyed by the package's sha256),
initramfs, the debootstrap guest base and the root image with the source installed
(keyed by recipe and source hash); a missing piece is rebuilt. Serial console logs:
`logs/<kernel>.console.log` there, the last table: `results.md`.
`USPAWN_MATRIX_SOURCE=DIR` tests another checkout (e.g. a candidate fix);
`USPAWN_SKIP_KERNEL_MATRIX=1` skips the pytest entry (a failure under
`USPAWN_MUST_WORK=1`). A kernel whose package cannot be fetched is `skipped` with the
reason; a check that did not run because the kernel lacks the feature is `n/a`.

{checks}

## Results

{table}

{summary}

Preparation (tools, kernels, initramfs, guest root): {prep:.0f} s in this run (cached
artifacts are reused; see tests/kernels/matrix.py for the cache keys).

## Details

{details}"""


LAST_RESULTS: list[KernelResult] = []  # filled by the pytest entry, printed by its conftest


def save_results(results: list[KernelResult]) -> None:
    """The table of the latest run, beside the cache (for CI logs and comparison)."""
    order = [r for k in KERNELS for r in results if r.kernel.name == k.name]
    with contextlib.suppress(OSError):
        (CACHE / "results.md").write_text(table(order) + "\n\n" + summary_line(order) + "\n")


def write_doc(results: list[KernelResult], prep: Prepared, path: Path) -> None:
    ndirs, nfiles = BIG_TREE_FILES
    checks = "| check | what passes |\n|---|---|\n" + "\n".join(
        f"| {t} | {d.format(files=ndirs * nfiles)} |" for t, d in CHECK_DOCS)
    text = DOC_HEAD.format(checks=checks, source=source_key(),
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           table=table(results), summary=summary_line(results),
                           prep=prep.seconds, details=details(results, prep),
                           files=ndirs * nfiles)
    path.write_text(text.rstrip() + "\n")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(k.name for k in KERNELS),
                   help="comma-separated kernels (default: all: "
                   + ",".join(k.name for k in KERNELS) + ")")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("USPAWN_KERNEL_JOBS", "1")),
                   help="VMs booted at once (default 1)")
    p.add_argument("--timeout", type=float, default=240,
                   help="per boot, seconds (qemu is killed after it; default 240)")
    p.add_argument("--no-doc", action="store_true", help="do not write docs/KERNELS.md")
    p.add_argument("--doc", default=str(REPO / "docs" / "KERNELS.md"))
    ns = p.parse_args(argv)
    names = [n.strip() for n in ns.only.split(",") if n.strip()]
    unknown = set(names) - {k.name for k in KERNELS}
    if unknown:
        p.error(f"unknown kernel(s) {sorted(unknown)}")
    if os.geteuid() != 0:
        print("kernel-matrix: needs root", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    prep, results = run_matrix(names, ns.jobs, ns.timeout)
    print(table(results))
    print()
    for r in results:
        for f in r.failures():
            print(f"FAIL {r.kernel.name}: {f}")
        if r.skipped:
            print(f"SKIP {r.kernel.name}: {r.skipped}")
    print(f"prepare {prep.seconds:.0f} s, total {time.monotonic() - t0:.0f} s")
    save_results(results)
    if not ns.no_doc:
        write_doc(results, prep, Path(ns.doc))
        print(f"wrote {ns.doc}")
    print(summary_line(results))
    return 1 if any(r.failures() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
