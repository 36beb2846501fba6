"""`uspawn doctor` against the real kernel (as root).

Each verdict is compared with the fact measured independently here, mostly with
util-linux's unshare/mount instead of uspawn's own code. Then capabilities are
taken away (user namespaces disabled in a nested namespace, a seccomp filter
refusing unshare, a filesystem without idmapping) and doctor must say so with the
right fix. Probes that crash or hang become broken rows.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import host_mount_count, skip_or_fail

from uspawn.diag import doctor
from uspawn.diag.report import Row
from uspawn.kernel import mounts, seccomp, syscalls

Rows = dict[str, dict[str, str]]
DOCTOR_PY = "import sys, json; from uspawn.diag.doctor import run_doctor; " \
            "sys.exit(run_doctor(True, sys.stdout, {path!r}, {probes!r}))"


@pytest.fixture(autouse=True)
def _root(need_root: None) -> None:
    pass


def as_rows(text: str) -> Rows:
    return {r["name"]: r for r in json.loads(text)["checks"]}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trees")


@pytest.fixture(scope="module")
def report(trees: Path, need_root: None) -> Rows:
    out = io.StringIO()
    doctor.run_doctor(True, out, str(trees))
    return as_rows(out.getvalue())


def sh(script: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def facts(r: dict[str, str]) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in r["detail"].split() if "=" in kv)


# --- each verdict against the fact measured here ---------------------------------


def test_every_probe_reports_and_nothing_is_broken_here(report: Rows) -> None:
    assert {"kernel", "userns", "mknod-in-userns", "dev-nodes", "idmap tmpfs",
            "idmap overlayfs", "overlay-in-userns", "seccomp", "mount-api", "openat2",
            "clone3", "pidfd", "cgroups", "rootless", "nesting", "trees-dir"} <= set(report)
    broken = {n: r["meaning"] for n, r in report.items() if r["verdict"] == "broken"}
    assert broken == {}
    assert all(r["fix"] for r in report.values() if r["verdict"] != "ok")


def _children() -> set[int]:
    out: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out.update(int(p) for p in f.read().split())
    return out


def test_nothing_is_left_behind(trees: Path) -> None:
    mounts_before = host_mount_count()
    children_before = _children()  # a session fixture's daemon is not doctor's
    doctor.run_doctor(True, io.StringIO(), str(trees))
    assert host_mount_count() == mounts_before
    # Every probe and helper was reaped: not even a zombie of doctor's is left.
    assert _children() <= children_before
    assert list(trees.iterdir()) == []


def test_monitor_row_matches_the_binary(report: Rows) -> None:
    from uspawn.machine import monitor

    exe = monitor.binary()
    assert (report["monitor"]["verdict"] == "ok") == (exe is not None)
    if exe is not None:
        assert exe in report["monitor"]["meaning"]


def test_kernel_row_names_the_release(report: Rows) -> None:
    assert os.uname().release in report["kernel"]["meaning"]


def test_userns_verdict_matches_unshare(report: Rows) -> None:
    works = sh("unshare --user --map-root-user id -u").stdout.strip() == "0"
    assert (report["userns"]["verdict"] == "ok") == works
    limit = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    assert f"max_user_namespaces={limit}" in report["userns"]["detail"]


def test_mknod_verdict_matches_mknod_in_a_fresh_userns(report: Rows) -> None:
    r = sh("unshare --user --map-root-user --mount sh -c "
           "'mount -t tmpfs t /mnt && mknod /mnt/n c 1 3 && echo made'")
    refused = "Operation not permitted" in r.stderr and "made" not in r.stdout
    row = report["mknod-in-userns"]
    assert (row["verdict"] == "ok") == refused
    assert (facts(row)["mknod"] == "EPERM") == refused


def test_dev_nodes_verdict_matches_each_way(report: Rows) -> None:
    got = facts(report["dev-nodes"])
    # A bind-mounted host node inside a userns (bubblewrap's way). mode=755: in a
    # sticky world-writable directory, O_CREAT on another user's device node is
    # refused (may_create_in_sticky), which is not what is measured here.
    bind = sh("unshare -Urm sh -c 'mount -t tmpfs -o mode=755 t /mnt && touch /mnt/null && "
              "mount --bind /dev/null /mnt/null && echo x > /mnt/null && echo ok'")
    assert (got["bind-host-node"] == "ok") == (bind.stdout.strip() == "ok")
    # A tmpfs mounted by real root in the host user namespace (uspawn's way).
    host = sh("unshare -m sh -c 'mount -t tmpfs t /mnt && mknod -m 666 /mnt/null c 1 3 && "
              "unshare -Ur sh -c \"echo x > /mnt/null && echo ok\"'")
    assert (got["host-tmpfs"] == "ok") == (host.stdout.strip() == "ok")
    # A tmpfs mounted inside a userns: real root makes the node, nobody can open it.
    p = subprocess.Popen(["unshare", "-Urm", "sh", "-c",
                          "mount -t tmpfs t /mnt && echo ready && read x"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        node = f"/proc/{p.pid}/root/mnt/null"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        try:
            os.close(os.open(node, os.O_RDWR))
            opened = "ok"
        except OSError as exc:
            opened = errno.errorcode[exc.errno or 0]
    finally:
        p.kill()
        p.wait()
    assert got["userns-tmpfs-host-open"] == opened
    assert (report["dev-nodes"]["verdict"] == "ok") == (host.stdout.strip() == "ok")


def _userns_fd() -> int:
    """A user namespace mapped 0 -> 2147352576 by this test itself."""
    # The maps can be written once unshare has made the namespace: its shell's
    # line says so (it runs in the new namespace).
    p = subprocess.Popen(["unshare", "--user", "sh", "-c", "echo in; exec sleep 30"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline() == "in\n"
        assert os.stat(f"/proc/{p.pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        for name in ("uid_map", "gid_map"):
            Path(f"/proc/{p.pid}/{name}").write_text("0 2147352576 65536\n")
        return os.open(f"/proc/{p.pid}/ns/user", os.O_RDONLY)
    finally:
        p.kill()
        p.wait()


def _idmaps(make_mount: int, ufd: int) -> bool:
    try:
        mounts.set_attrs(make_mount, userns_fd=ufd)
        return os.fstat(make_mount).st_uid == 2147352576
    except OSError:
        return False
    finally:
        os.close(make_mount)


def test_idmap_verdicts_match_an_idmapped_mount(report: Rows, trees: Path) -> None:
    ufd = _userns_fd()
    try:
        on_trees = _idmaps(mounts.clone_tree(str(trees)), ufd)
        on_tmpfs = _idmaps(mounts.make_fs("tmpfs", []), ufd)
    finally:
        os.close(ufd)
    assert (report[f"idmap {trees}"]["verdict"] == "ok") == on_trees
    assert (report["idmap tmpfs"]["verdict"] == "ok") == on_tmpfs


def test_cgroup_layout_matches_mountinfo(report: Rows) -> None:
    fstype = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype[fields[4]] = fields[fields.index("-") + 1]
    if fstype.get("/sys/fs/cgroup") == "cgroup2":
        layout = "unified"
    elif fstype.get("/sys/fs/cgroup/unified") == "cgroup2":
        layout = "hybrid"
    else:
        layout = "legacy"
    assert facts(report["cgroups"])["layout"] == layout
    assert report["cgroups"]["meaning"].startswith(f"{layout} layout")
    leftovers = [d for d in os.listdir("/sys/fs/cgroup/unified" if layout == "hybrid" else
                                       "/sys/fs/cgroup") if d.startswith("doctor-")]
    assert leftovers == []


def test_seccomp_verdict_matches_loading_the_policy(report: Rows) -> None:
    bpf = seccomp.compile_bpf(seccomp.default_policy(userns=True))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
            syscalls.seccomp_set_mode_filter(bpf)
            try:
                os.mknod("/tmp/never", stat.S_IFCHR | 0o600, os.makedev(1, 3))
                os.write(w, b"made")
            except OSError as exc:
                os.write(w, errno.errorcode[exc.errno or 0].encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode()
    os.waitpid(pid, 0)
    assert (report["seccomp"]["verdict"] == "ok") == (got == "EPERM")


def test_nesting_and_rootless_match_the_files(report: Rows) -> None:
    identity = Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    manager = os.path.exists("/run/host/container-manager")
    assert (report["nesting"]["verdict"] == "ok") == (identity and not manager)
    user = os.environ.get("SUDO_USER") or "root"
    subuid = sum(int(ln.split(":")[2]) for ln in Path("/etc/subuid").read_text().splitlines()
                 if ln.split(":")[0] == user)
    assert facts(report["rootless"])["subuid"] == str(subuid)
    if subuid < 65536:
        assert report["rootless"]["verdict"] == "degraded"
        assert "usermod --add-subuids" in report["rootless"]["fix"]


def test_world_traversable_trees_dir_with_setuid_files(tmp_path: Path) -> None:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="uspawn-doctor-", dir="/var/tmp"))
    try:
        d.chmod(0o755)
        (d / "t/bin").mkdir(parents=True)
        (d / "t/bin/su").write_text("")
        (d / "t/bin/su").chmod(0o4755)
        out = io.StringIO()
        assert doctor.run_doctor(True, out, str(d), ["trees-dir"]) == 0
        r = as_rows(out.getvalue())["trees-dir"]
        assert r["verdict"] == "degraded" and f"{d}/t/bin/su" in r["meaning"]
        assert r["fix"] == f"chmod 0700 {d}"
        d.chmod(0o700)
        out = io.StringIO()
        doctor.run_doctor(True, out, str(d), ["trees-dir"])
        assert as_rows(out.getvalue())["trees-dir"]["verdict"] == "ok"
    finally:
        shutil.rmtree(d)


# --- capabilities taken away ---------------------------------------------------------


def run_doctor_subprocess(argv_prefix: list[str], path: str | None = None,
                          probes: list[str] | None = None, **kw: object
                          ) -> tuple[int, Rows]:
    code = DOCTOR_PY.format(path=path, probes=probes)
    p = subprocess.run([*argv_prefix, sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=120, **kw)  # type: ignore[call-overload]
    assert p.stdout, p.stderr
    return p.returncode, as_rows(p.stdout)


def test_user_namespaces_disabled_in_a_nested_namespace() -> None:
    # max_user_namespaces is per user namespace: 0 in a nested one only.
    code, rows = run_doctor_subprocess(
        ["unshare", "--user", "--map-root-user", "sh", "-c",
         'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"])
    assert code == 1
    r = rows["userns"]
    assert r["verdict"] == "broken"
    assert "ENOSPC" in r["detail"] and "max_user_namespaces=0" in r["detail"]
    assert "sysctl -w user.max_user_namespaces=" in r["fix"]
    assert rows["nesting"]["verdict"] == "degraded"  # the uid_map gives it away


def test_seccomp_filter_refusing_unshare() -> None:
    policy = seccomp.Policy(seccomp.ALLOW, [seccomp.Rule(("unshare",),
                                                         seccomp.ERRNO(errno.EPERM))])
    bpf = seccomp.compile_bpf(policy)

    def load_filter() -> None:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        syscalls.seccomp_set_mode_filter(bpf)

    code, rows = run_doctor_subprocess([], probes=["userns", "mknod"], preexec_fn=load_filter)
    assert code == 1
    r = rows["userns"]
    assert r["verdict"] == "broken" and "EPERM" in r["detail"]
    assert "seccomp filter" in r["fix"] and "unshare(CLONE_NEWUSER)" in r["fix"]
    assert rows["mknod-in-userns"]["verdict"] == "degraded"  # cannot test without userns


def test_filesystem_without_idmapped_mounts(tmp_path: Path) -> None:
    d = tmp_path / "ramfs"
    d.mkdir()
    code, rows = run_doctor_subprocess(
        ["unshare", "--mount", "sh", "-c", f'mount -t ramfs ramfs {d} && exec "$@"', "sh"],
        path=str(d), probes=["idmap"])
    r = rows[f"idmap {d}"]
    if r["verdict"] == "ok":
        skip_or_fail("this kernel idmaps ramfs")
    assert r["verdict"] == "degraded" and "fstype=ramfs" in r["detail"]
    assert "falls back to chown" in r["meaning"]
    assert code == 0  # the fallback works: containers still start


def test_the_4_18_mknod_behaviour_is_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    # No current kernel lets mknod succeed in a userns; feed the probe that fact.
    monkeypatch.setattr(doctor, "call", lambda *a, **kw: {"mknod": "ok", "open": "EACCES"})
    [r] = doctor.probe_mknod(doctor.Ctx("/var/lib/machines"))
    assert r["verdict"] == "broken"
    assert "4.18" in r["meaning"] and "PrivateDevices=" in r["meaning"]
    assert "seccomp policy refuses device mknod" in r["meaning"]


# --- probes that hang or crash ---------------------------------------------------------


def test_hanging_probe_is_killed_and_reported() -> None:
    def hang(ctx: doctor.Ctx) -> list[Row]:
        signal.pause()  # until killed: no handler will ever run
        return []

    t0 = time.monotonic()
    [r] = doctor.run_probe("hang", hang, doctor.Ctx("/"), timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert r["name"] == "hang" and r["verdict"] == "broken" and "timed out" in r["meaning"]


def test_crashing_probes_are_reported() -> None:
    def segv(ctx: doctor.Ctx) -> list[Row]:
        import faulthandler

        faulthandler.disable()  # pytest's handler would print a traceback for the crash
        os.kill(os.getpid(), signal.SIGSEGV)
        return []

    def raises(ctx: doctor.Ctx) -> list[Row]:
        raise OSError(errno.EIO, "boom")

    [r] = doctor.run_probe("segv", segv, doctor.Ctx("/"))
    assert r["verdict"] == "broken" and "killed by SIGSEGV" in r["meaning"]
    [r] = doctor.run_probe("raises", raises, doctor.Ctx("/"))
    assert r["verdict"] == "broken" and "boom" in r["meaning"] and r["detail"] == "EIO"


def test_table_output_is_aligned() -> None:
    out = io.StringIO()
    code = doctor.run_doctor(False, out, probes=["kernel", "nesting", "rootless"])
    lines = out.getvalue().splitlines()
    col = lines[0].index("VERDICT")
    rows = [ln for ln in lines[1:lines.index("")] if ln[:1].strip()]
    assert [ln.split()[0] for ln in rows] == ["kernel", "rootless", "nesting"]  # probe order
    assert all(ln[col:].split()[0] in ("ok", "degraded", "broken") for ln in rows)
    ok, degraded, broken = (int(w) for w in lines[-1].replace(",", "").split()[:5:2])
    assert ok + degraded + broken == len(rows)
    assert code == (1 if broken else 0)
