"""uspawn@.service under a real systemd (issue 17): a Debian bookworm guest under
qemu whose init is systemd, running the Debian fixture machine as a unit.

    bash scripts/systemd-vm.sh [--timeout S] [--keep-logs]

This host has no systemd as PID 1, so the unit is driven by the guest's systemd.
The guest boots the kernel matrix's bookworm kernel (tests/kernels/matrix.py:
fetched from the mirror of this machine's apt sources, cached in
/var/cache/uspawn-kernels) under qemu TCG, with pure cgroup v2 (systemd 252's
default), the root on a virtio disk, the console on ttyS0 and the checks'
results (JSON lines) on ttyS1, which is qemu's stdout here: every wait of the
harness is a select() on that pipe and on qemu's pidfd, with a deadline.

Cached under /var/cache/uspawn-kernels (USPAWN_KERNEL_CACHE), keyed by content,
rebuilt when missing:

- sdguest-base-<key>/: debootstrap bookworm minbase + systemd, systemd-sysv,
  systemd-container, dbus, udev, kmod, iproute2, lxcfs, python3 (+venv) and
  libseccomp2, plus a venv with pyseccomp (the matrix's wheel cache);
- images/sdguest-<key>.img: that tree plus the kernel's modules (all but the
  hardware drivers a VM has no use for; depmod run), this source tree installed
  into the venv with the C monitor built on the host (root, 0755, next to the
  interpreter), /usr/local/bin/uspawn, the Debian fixture tree
  (tests/fixtures/debian_tree.py) at /var/lib/machines/debian, and the guest
  unit that runs the checks; an ext4 image made with `mkfs.ext4 -d` (nothing
  is mounted on the host). The key covers the base, the kernel package, the
  source (src/, bin/, pyproject.toml), the fixture's recipe key and this
  recipe's code;
- kernels/<sha>/sdinitrd-<key>.gz: a busybox initramfs that loads virtio and
  ext4 and switch_roots into /lib/systemd/systemd.

A run writes a small per-run disk (the checks script and dist/systemd/, which
the guest installs as an admin would: cp + daemon-reload) and a qcow2 overlay
of the root image, so that the guest's own reboot keeps its state: phase 1
(start/ready, reboot inside, restart, kill, stop, journal, enable) ends with
`systemctl reboot` of the VM (qemu runs with -no-reboot and exits), and phase 2
boots the same disk again and checks that the enabled machine came up on its
own, then disables and stops it and reboots; phase 3 checks that the disabled
machine stayed down. Every boot is killed at its deadline. The
run directory is removed afterwards; the console log is kept in
logs/systemd-guest.console.log.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from kernels import matrix  # noqa: E402
from kernels.matrix import (  # noqa: E402
    CACHE,
    GUEST_VENV,
    HarnessError,
    KernelFiles,
    Skip,
    _chroot,
    _die_with_parent,
    _du_mb,
    _mkfs,
    _rmtree,
    key_of,
    locked,
    sh,
    source_key,
    source_of,
)

SOURCE = matrix.SOURCE
SUITE = "bookworm"
MACHINE = "debian"
PACKAGES = ("systemd", "systemd-sysv", "systemd-container", "dbus", "udev", "kmod",
            "iproute2", "procps", "lxcfs", "python3", "python3-venv", "libseccomp2")
# Kernel module directories a VM has no use for (saves ~300 MB of image).
MODULES_SKIP = ("kernel/sound", "kernel/drivers/gpu", "kernel/drivers/media",
                "kernel/drivers/net/wireless", "kernel/drivers/net/ethernet",
                "kernel/drivers/infiniband", "kernel/drivers/staging", "kernel/drivers/scsi",
                "kernel/drivers/usb", "kernel/drivers/iio", "kernel/drivers/hid",
                "kernel/drivers/input", "kernel/drivers/bluetooth", "kernel/drivers/isdn",
                "kernel/drivers/mtd", "kernel/drivers/video", "kernel/drivers/hwmon",
                "kernel/drivers/platform", "kernel/drivers/thunderbolt", "kernel/drivers/misc",
                "kernel/drivers/net/can", "kernel/drivers/net/usb", "kernel/drivers/net/wwan",
                "kernel/drivers/ata", "kernel/drivers/leds", "kernel/net/bluetooth",
                "kernel/net/wireless", "kernel/net/mac80211")
# Units that only slow a TCG guest down (the guest has no network and no VTs).
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
          "e2scrub_reap.service", "getty@tty1.service", "serial-getty@ttyS0.service",
          "systemd-networkd-wait-online.service", "man-db.timer", "fstrim.timer")

CHECKS_UNIT = """[Unit]
Description=uspawn systemd-guest checks
After=multi-user.target
RequiresMountsFor=/mnt/work

[Service]
Type=exec
ExecStart=/opt/uspawn-venv/bin/python /mnt/work/sdguest/systemd_guest_checks.py
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
"""

INITRAMFS_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "sdguest-initramfs: $*"; sleep 1; poweroff -f; }
while read -r m; do
    insmod "/modules/$m" || echo "sdguest-initramfs: insmod $m failed"
done < /modules.order
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda after 30 s"
    sleep 0.1
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the root disk"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /lib/systemd/systemd
"""

_t0 = time.monotonic()


def log(msg: str) -> None:
    sys.stderr.write(f"[systemd-vm {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# ------------------------------------------------------------------ base tree


def _wheels() -> Path:
    """uspawn's dependencies (pyproject.toml) at the versions of this checkout's
    venv, and wheel (to install uspawn without network): fetched once."""
    from importlib import metadata

    specs = []
    for dist, floor in (("pyseccomp", "0.1.2"), ("pyroute2", "0.9")):
        try:
            specs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            specs.append(f"{dist}>={floor}")
    specs.append("wheel")
    d = CACHE / "wheels" / key_of(specs)
    if not d.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".wheels.", dir=CACHE))
        try:
            sh([sys.executable, "-m", "pip", "download", "-q", "-d", str(tmp), *specs], 300)
            d.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, d)
        finally:
            _rmtree(tmp)
    return d


def _base_recipe(tree: Path, mirror: str, wheels: Path, logfile: Path) -> None:
    debs = CACHE / "debs" / "debootstrap"
    debs.mkdir(parents=True, exist_ok=True)
    sh(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}",
        f"--cache-dir={debs}", SUITE, str(tree), mirror], 1500,
       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}, logfile=logfile)
    (tree / "etc/hostname").write_text("sdguest\n")
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("# no network in the systemd guest\n")
    # An empty machine-id: systemd makes one at first boot (and keeps it: the root
    # is a writable overlay for both boots of a run).
    (tree / "etc/machine-id").write_text("")
    shutil.copytree(wheels, tree / "tmp/wheels")
    _chroot(tree, "python3", "-m", "venv", GUEST_VENV, logfile=logfile)
    _chroot(tree, f"{GUEST_VENV}/bin/pip", "install", "-q", "--no-index", "--find-links",
            "/tmp/wheels", "pyseccomp", "pyroute2", "wheel", logfile=logfile)
    _rmtree(tree / "tmp/wheels")
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*"):
        for leftover in tree.glob(pattern):
            leftover.unlink()


def guest_base() -> Path:
    from fixtures.debian_tree import apt_mirror

    mirror = apt_mirror()
    wheels = _wheels()
    key = key_of({"suite": SUITE, "packages": PACKAGES, "mirror": mirror, "venv": GUEST_VENV,
                  "wheels": sorted(p.name for p in wheels.iterdir()),
                  "code": source_of(_base_recipe, _chroot)})
    return matrix.cached_tree("sdguest-base", key,
                              f"guest base: debootstrap {SUITE} minbase + systemd",
                              lambda tmp, logfile: _base_recipe(tmp, mirror, wheels, logfile),
                              say=log, prune=True)


# ------------------------------------------------------------------ kernel


def kernel_deb(k: KernelFiles) -> Path:
    """The kernel's .deb (for its modules), downloaded again if the cache lost it."""
    meta = json.loads((k.dir / "meta.json").read_text())
    deb = CACHE / "debs" / os.path.basename(str(meta["filename"]))
    if deb.exists() and matrix.sha256_file(deb) == meta["sha256"]:
        return deb
    with locked(f"kernel-{k.suite}"):
        d = matrix._apt_dir(k.suite, meta["mirror"])
        part = Path(tempfile.mkdtemp(prefix=".sdguest-deb.", dir=CACHE))
        try:
            sh(["apt-get", *matrix._apt_opts(d), "download", meta["package"]], 600, cwd=part)
            got = list(part.glob("*.deb"))
            if len(got) != 1 or matrix.sha256_file(got[0]) != meta["sha256"]:
                raise HarnessError(f"downloaded {got} does not match sha256 {meta['sha256']}")
            deb.parent.mkdir(parents=True, exist_ok=True)
            os.replace(got[0], deb)
        finally:
            _rmtree(part)
    return deb


def build_initramfs(k: KernelFiles) -> Path:
    """The matrix's initramfs, with an /init that switch_roots into systemd."""
    return matrix.build_initramfs(k, INITRAMFS_INIT, "sdinitrd")


# ------------------------------------------------------------------ root image


def build_monitor(dest: Path) -> None:
    """uspawn's C monitor, built here (the guest has no compiler): root, 0755."""
    src = SOURCE / "src/uspawn/native/monitor.c"
    sh(["gcc", "-O2", "-o", str(dest), str(src)], 300)
    os.chown(dest, 0, 0)
    os.chmod(dest, 0o755)


def _image_recipe(tree: Path, k: KernelFiles, deb: Path, fixture: Path, logfile: Path) -> None:
    # The kernel's modules (veth, nf_tables, fuse, ...), loaded by the guest's udev
    # and by the kernel's request_module (kmod's modprobe).
    ext = tree / "tmp/kernel"
    sh(["dpkg-deb", "-x", str(deb), str(ext)], 300)
    mdir = next(p for p in (ext / "lib/modules" / k.release, ext / "usr/lib/modules" / k.release)
                if p.is_dir())
    for rel in MODULES_SKIP:
        _rmtree(mdir / rel)
    dest = tree / "lib/modules" / k.release
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(mdir), str(dest))
    _rmtree(ext)
    _chroot(tree, "depmod", "-a", k.release, logfile=logfile)
    # This source tree in the venv, and the C monitor next to its interpreter.
    src = tree / "tmp/uspawn-src"
    src.mkdir()
    for top in ("src", "bin"):
        shutil.copytree(SOURCE / top, src / top,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    shutil.copy2(SOURCE / "pyproject.toml", src)
    _chroot(tree, f"{GUEST_VENV}/bin/pip", "install", "-q", "--no-index", "--no-deps",
            "--no-build-isolation", "/tmp/uspawn-src", logfile=logfile)
    _rmtree(src)
    _chroot(tree, f"{GUEST_VENV}/bin/python", "-m", "compileall", "-q", GUEST_VENV,
            logfile=logfile)
    build_monitor(tree / GUEST_VENV.lstrip("/") / "bin/uspawn-monitor")
    link = tree / "usr/local/bin/uspawn"
    link.unlink(missing_ok=True)
    link.symlink_to(f"{GUEST_VENV}/bin/uspawn")
    # The machine: the fixture tree, owned by host root as debootstrap made it.
    machines = tree / "var/lib/machines"
    machines.mkdir(parents=True, exist_ok=True)
    os.chmod(machines, 0o700)
    sh(["cp", "-a", "--reflink=auto", str(fixture), str(machines / MACHINE)], 600)
    # The guest: a persistent journal, the work disk, the checks unit, no gettys.
    (tree / "var/log/journal").mkdir(parents=True, exist_ok=True)
    (tree / "mnt/work").mkdir(parents=True, exist_ok=True)
    (tree / "etc/fstab").write_text(
        "/dev/vda / ext4 rw,errors=remount-ro 0 0\n"
        "/dev/vdb /mnt/work ext4 ro,nofail,x-systemd.device-timeout=60s 0 0\n")
    sysd = tree / "etc/systemd/system"
    (sysd / "sdguest-checks.service").write_text(CHECKS_UNIT)
    wants = sysd / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "sdguest-checks.service").unlink(missing_ok=True)
    (wants / "sdguest-checks.service").symlink_to("/etc/systemd/system/sdguest-checks.service")
    for unit in MASKED:
        (sysd / unit).unlink(missing_ok=True)
        (sysd / unit).symlink_to("/dev/null")
    (tree / "etc/uspawn-sdguest.json").write_text(json.dumps(
        {"source": source_key(), "kernel": k.release, "fixture": fixture.name}) + "\n")


def guest_image(k: KernelFiles) -> Path:
    sys.path.insert(0, str(HERE.parent))
    from fixtures.debian_tree import debian_tree

    base = guest_base()
    fixture = debian_tree()
    deb = kernel_deb(k)
    key = key_of({"base": base.name, "kernel": k.sha256, "source": source_key(),
                  "fixture": fixture.name, "modules_skip": MODULES_SKIP, "masked": MASKED,
                  "unit": CHECKS_UNIT,
                  "code": source_of(_image_recipe, build_monitor, _mkfs)})
    img = CACHE / "images" / f"sdguest-{key}.img"
    if img.exists():
        os.utime(img)
        return img
    with locked("sdguest-image"):
        if img.exists():
            return img
        img.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        log(f"guest image: {base.name} + kernel {k.release} modules + source {source_key()} "
            f"+ {fixture.name}")
        tmp = Path(tempfile.mkdtemp(prefix=".sdguest-image.", dir=CACHE))
        logfile = img.with_suffix(".build.log")
        logfile.write_text("")
        part = img.with_suffix(".tmp")
        try:
            tree = tmp / "root"
            sh(["cp", "-a", "--reflink=auto", str(base), str(tree)], 600)
            _image_recipe(tree, k, deb, fixture, logfile)
            size = _du_mb(tree) * 12 // 10 + 1024  # room for journals, postgres, the overlay
            _mkfs(part, tree, size, "sdguestroot", logfile)
            os.replace(part, img)
        finally:
            _rmtree(tmp)
            part.unlink(missing_ok=True)
        log(f"guest image: {img.name} in {time.monotonic() - t0:.0f} s")
        for old in sorted((CACHE / "images").glob("sdguest-*.img"),
                          key=lambda p: p.stat().st_mtime, reverse=True)[2:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".build.log").unlink(missing_ok=True)
    return img


def work_disk(run: Path) -> Path:
    work = run / "work"
    (work / "sdguest/units").mkdir(parents=True)
    shutil.copy2(HERE / "systemd_guest_checks.py", work / "sdguest/systemd_guest_checks.py")
    for unit in ("uspawn@.service", "uspawn-machines.target"):
        shutil.copy2(SOURCE / "dist/systemd" / unit, work / "sdguest/units" / unit)
    img = run / "work.img"
    _mkfs(img, work, 64, "sdguestwork")
    _rmtree(work)
    return img


# ------------------------------------------------------------------ boots


@dataclass
class Boot:
    phase: str
    results: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    exit: str = ""


def boot(k: KernelFiles, initrd: Path, overlay: Path, work: Path, run: Path, phase: str,
         timeout: float, console: Path) -> Boot:
    """One boot of the guest; results are the JSON lines it writes to ttyS1 (our pipe)."""
    b = Boot(phase)
    part = run / f"console-{phase}.log"
    cmd = ["qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
           "-m", "2048", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-monitor", "none", "-kernel", str(k.vmlinuz), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 loglevel=4 sdguest.phase={phase} "
           f"sdguest.timeout={int(timeout)} systemd.show_status=yes",
           "-drive", f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
           "-drive", f"file={work},if=virtio,format=raw,readonly=on",
           "-serial", f"file:{part}", "-serial", "stdio"]
    t0 = time.monotonic()
    err = open(run / f"qemu-{phase}.stderr", "w")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                         start_new_session=True, preexec_fn=_die_with_parent)
    assert p.stdout is not None
    pidfd = os.pidfd_open(p.pid)
    buf = b""
    try:
        eof = False
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                b.exit = f"timeout after {timeout:.0f} s: qemu killed"
                break
            fds = [pidfd] + ([] if eof else [p.stdout.fileno()])
            ready, _, _ = select.select(fds, [], [], left)
            if p.stdout.fileno() in ready:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    eof = True
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    _take(b, raw)
            if pidfd in ready and eof:
                rc = p.wait()
                b.exit = "qemu exited (guest powered off or rebooted)" if rc == 0 \
                    else f"qemu exit {rc}"
                break
            if pidfd in ready and not eof:
                # qemu is gone: drain what is left of the pipe, then stop.
                rest = p.stdout.read() or b""
                for raw in (buf + rest).split(b"\n"):
                    _take(b, raw)
                buf = b""
                rc = p.wait()
                b.exit = "qemu exited (guest powered off or rebooted)" if rc == 0 \
                    else f"qemu exit {rc}"
                break
    finally:
        os.close(pidfd)
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        p.stdout.close()
        err.close()
        b.seconds = time.monotonic() - t0
        with open(console, "a") as out:
            out.write(f"===== phase {phase}: {b.exit} ({b.seconds:.1f} s) =====\n")
            out.write(part.read_text(errors="replace") if part.exists() else "")
            qerr = (run / f"qemu-{phase}.stderr").read_text(errors="replace")
            if qerr.strip():
                out.write(f"----- qemu stderr -----\n{qerr}")
    return b


def _take(b: Boot, raw: bytes) -> None:
    line = raw.decode(errors="replace").strip().strip("\r")
    if not (line.startswith("{") and line.endswith("}")):
        return
    try:
        obj = json.loads(line)
    except ValueError:
        return
    b.results.append(obj)
    if "check" in obj:
        log(f"{b.phase}: {obj['check']}: {obj['status']} ({obj.get('seconds', 0):.1f} s) "
            f"{obj.get('detail', '')[:400]}")
    elif "info" in obj:
        log(f"{b.phase}: {obj['info']}: {str(obj.get('value', ''))[:400]}")


# ------------------------------------------------------------------ the run

PHASE1 = ("guest-boot", "install-units", "start-ready", "console-in-journal", "machine-journal",
          "machined", "reboot-inside", "machined-after-reboot", "restart", "kill-main",
          "kill-sigkill-all", "kill-default", "stop-clean", "detached-registered", "enable")
PHASE2 = ("guest-boot", "autostart", "stopped-at-shutdown", "disable", "stop-clean")
PHASE3 = ("guest-boot", "not-autostarted")


@dataclass
class Result:
    checks: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    infos: list[tuple[str, str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    console: str = ""

    def failures(self) -> list[str]:
        return [f"{ph}/{n}: {d}" for ph, n, s, d, _ in self.checks if s != "pass"]


def _collect(res: Result, b: Boot, expected: tuple[str, ...]) -> None:
    got = set()
    for r in b.results:
        if "check" in r:
            res.checks.append((b.phase, r["check"], r["status"], r.get("detail", ""),
                               float(r.get("seconds", 0.0))))
            got.add(r["check"])
        elif "info" in r:
            res.infos.append((b.phase, r["info"], r.get("value")))
    for name in expected:
        if name not in got:
            res.checks.append((b.phase, name, "fail",
                               f"not reported: {b.exit}; see {res.console}", 0.0))


def run(timeout1: float = 1500, timeout2: float = 900, only: str | None = None) -> Result:
    res = Result()
    t0 = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    matrix.ensure_host_tools()
    if not shutil.which("gcc"):
        raise Skip("gcc is not installed (the C monitor is built on the host)")
    k = matrix.fetch_kernel(SUITE)
    initrd = build_initramfs(k)
    img = guest_image(k)
    res.timings["prepare"] = time.monotonic() - t0
    log(f"prepared in {res.timings['prepare']:.0f} s: {img.name}, kernel {k.release}")
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    console = logs / "systemd-guest.console.log"
    console.write_text("")
    res.console = str(console)
    for d in CACHE.glob("run-sdguest.*.*"):
        pid = d.name.split(".")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _rmtree(d)
    rundir = Path(tempfile.mkdtemp(prefix=f"run-sdguest.{os.getpid()}.", dir=CACHE))
    try:
        overlay = rundir / "root.qcow2"
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img),
            str(overlay)], 60)
        work = work_disk(rundir)
        if only:
            b = boot(k, initrd, overlay, work, rundir, only, timeout1, console)
            res.timings[f"phase {only}"] = b.seconds
            _collect(res, b, ("guest-boot",))
            return res
        b1 = boot(k, initrd, overlay, work, rundir, "1", timeout1, console)
        res.timings["phase 1"] = b1.seconds
        _collect(res, b1, PHASE1)
        rebooted = any(r.get("info") == "rebooting" for r in b1.results)
        if rebooted and b1.exit.startswith("qemu exited"):
            b2 = boot(k, initrd, overlay, work, rundir, "2", timeout2, console)
            res.timings["phase 2"] = b2.seconds
            _collect(res, b2, PHASE2)
            if any(r.get("info") == "rebooting" for r in b2.results) \
                    and b2.exit.startswith("qemu exited"):
                b3 = boot(k, initrd, overlay, work, rundir, "3", timeout2, console)
                res.timings["phase 3"] = b3.seconds
                _collect(res, b3, PHASE3)
            else:
                res.checks += [("3", n, "fail", f"not run: phase 2 did not end in a reboot "
                                f"({b2.exit})", 0.0) for n in PHASE3]
        else:
            for name in PHASE2:
                res.checks.append(("2", name, "fail",
                                   f"not run: phase 1 did not end in a reboot ({b1.exit})", 0.0))
    finally:
        _rmtree(rundir)
    res.timings["total"] = time.monotonic() - t0
    return res


def report(res: Result) -> str:
    lines = ["| phase | check | result | seconds | detail |", "|---|---|---|---:|---|"]
    for ph, n, s, d, sec in res.checks:
        d = d.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {ph} | {n} | {'pass' if s == 'pass' else '**' + s.upper() + '**'} "
                     f"| {sec:.1f} | {d} |")
    passed = sum(1 for c in res.checks if c[2] == "pass")
    lines.append("")
    lines.append(f"{passed} passed, {len(res.checks) - passed} failed; "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in res.timings.items()))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--timeout", type=float, default=1500,
                   help="deadline of the first boot, seconds (qemu is killed; default 1500)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--phase", help="boot once with this guest phase (e.g. console) and "
                   "print what it reports (debugging)")
    ns = p.parse_args(argv)
    if os.geteuid() != 0:
        print("systemd-vm: needs root", file=sys.stderr)
        return 2
    try:
        res = run(ns.timeout, ns.timeout * 0.6, only=ns.phase)
    except Skip as exc:
        print(f"systemd-vm: skipped: {exc}", file=sys.stderr)
        return 77
    print(report(res))
    print(f"console log: {res.console}")
    for ph, name, value in res.infos:
        print(f"info {ph}/{name}: {value}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(
            {"checks": res.checks, "infos": res.infos, "timings": res.timings}, indent=1))
    return 1 if res.failures() else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
