"""A working directory outside the container's root (issue 19, "cwd outside the root").

The caller of uspawn passes a directory fd in (inherited by `uspawn run` and
`uspawn exec`, or preserved with `uspawn-runc --preserve-fds`); a cwd of
/proc/self/fd/N is a magic link to it, and a plain chdir() would start the
payload in that host directory, where it lists and reads host files. Every
front resolves the cwd with linux/workdir.py (openat2 RESOLVE_IN_ROOT |
RESOLVE_NO_MAGICLINKS, fchdir, getcwd check): each attack must end in one
clean line naming process.cwd and ELOOP, the host secret never shown.

ELOOP (not ENOENT) in the message is the proof that the fd did reach the
process that resolved the cwd: without it /proc/self/fd/N does not exist
(test_run_cwd_without_the_fd_is_enoent), so these tests cannot pass because
the fd was lost on the way.

Also the exec-sequence parity of issue 12: the cwd is entered before the
executable is looked up (`--chdir /app -- ./x` runs /app/x, as runc does),
and SIGPIPE/SIGXFSZ are default in the payload, through `run` and `exec`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Runner
from waits import wait_state

from uspawn.kernel.workdir import WorkdirError, enter_workdir

from .conftest import SECRET, TIMEOUT, HostGuard, assert_clean_error, assert_no_traceback

# The payload tries to show where it is and what is there.
SNOOP = "pwd; ls -a; cat secret.txt; cat sub/inner.txt"
ELOOP_MSG = "resolves outside the container (ELOOP)"


def with_dir_fd(directory: Path, fd: int, argv: list[str]) -> list[str]:
    """argv run with `directory` open (read-only) as fd number `fd`, inherited:
    what a caller passing a directory into the container does."""
    return ["/bin/sh", "-c", f'exec {fd}<"$0" && exec "$@"', str(directory), *argv]


def run_with_fd(argv: list[str], directory: Path, fd: int = 3,
                timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Output through temporary files: a container created by uspawn-runc keeps
    the runtime's stdio and would hold pipes open."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.run(with_dir_fd(directory, fd, argv), stdin=subprocess.DEVNULL,
                           stdout=out, stderr=err, timeout=timeout)
        out.seek(0)
        err.seek(0)
        r = subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())
    assert_no_traceback(r)
    return r


def assert_secret_unseen(r: subprocess.CompletedProcess[str]) -> None:
    for text in (r.stdout, r.stderr):
        assert SECRET.strip() not in text and "inner" not in text, r
        assert "secret.txt" not in text, r


# --- the function itself (no container: the test process's own root) ---------------


@pytest.fixture
def restore_cwd() -> Iterator[None]:
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield
    finally:
        os.fchdir(fd)
        os.close(fd)


def _refused(path: str) -> WorkdirError:
    with pytest.raises(WorkdirError) as info:
        enter_workdir(path)
    return info.value


def test_enter_workdir_refuses_magic_links(tmp_path: Path, restore_cwd: None) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "via-fd").symlink_to("/proc/self/cwd")
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(tmp_path)
        for path in (f"/proc/self/fd/{fd}", f"/proc/self/fd/{fd}/..", "/proc/self/cwd",
                     f"{tmp_path}/via-fd"):
            exc = _refused(path)
            assert exc.errno == errno.ELOOP
            assert str(exc) == f"process.cwd {path}: {ELOOP_MSG}"
            assert "magic link" in exc.hint
            assert os.getcwd() == str(tmp_path)  # not moved
    finally:
        os.close(fd)


def test_enter_workdir_errors_name_path_and_errno(tmp_path: Path, restore_cwd: None) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "loop").symlink_to("loop")
    cases = {"relative/dir": ("'relative/dir': not an absolute path (EINVAL)", errno.EINVAL),
             f"{tmp_path}/missing": ("No such file or directory (ENOENT)", errno.ENOENT),
             f"{tmp_path}/file": ("not a directory (ENOTDIR)", errno.ENOTDIR),
             f"{tmp_path}/loop": ("too many levels of symbolic links (ELOOP)", errno.ELOOP)}
    for path, (text, err) in cases.items():
        exc = _refused(path)
        assert str(exc).startswith("process.cwd ") and str(exc).endswith(text), exc
        assert exc.errno == err
        assert "\n" not in exc.with_hint() and "(hint: " in exc.with_hint()


def test_enter_workdir_follows_symlinks_inside_the_root(tmp_path: Path,
                                                       restore_cwd: None) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    enter_workdir(f"{tmp_path}/link")
    assert os.getcwd() == str(tmp_path / "real")
    enter_workdir("/")
    assert os.getcwd() == "/"


def test_verify_catches_a_cwd_outside_the_root(tmp_path: Path, need_root: None) -> None:
    """The getcwd check after fchdir: in a child whose root is a subdirectory
    and whose cwd stays outside it (chroot does not move the cwd)."""
    from uspawn.kernel import workdir

    (tmp_path / "jail").mkdir()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.chdir(tmp_path)
            os.chroot(tmp_path / "jail")
            try:
                workdir._verify_inside("/x")
                msg = "accepted"
            except WorkdirError as exc:
                msg = f"{exc.errno} {exc}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        got = f.read()
    os.waitpid(pid, 0)
    assert got == f"{errno.EXDEV} process.cwd /x: resolves outside the container " \
                  "(getcwd: unreachable)"


# --- uspawn run --chdir -----------------------------------------------------------------


@pytest.mark.parametrize("cwd", ["/proc/self/fd/3", "/proc/self/fd/3/sub", "/hostlink",
                                 "/hostlink/sub"])
def test_run_chdir_through_a_passed_fd_refused(uspawn: Runner, tree: Path, host: HostGuard,
                                               cwd: str) -> None:
    """`uspawn run` inherits the caller's fd 3 (a host directory with a secret);
    --chdir names it directly or through a symlink the hostile tree ships."""
    (tree / "hostlink").symlink_to("/proc/self/fd/3")
    r = run_with_fd(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--chdir", cwd,
                                "--", "sh", "-c", SNOOP), host.marker)
    assert_clean_error(r, f"process.cwd {cwd}: ", ELOOP_MSG)
    assert r.returncode == 126
    assert_secret_unseen(r)
    host.assert_untouched()


def test_run_cwd_without_the_fd_is_enoent(uspawn: Runner, tree: Path, host: HostGuard) -> None:
    """The control: with no fd 9 passed the same cwd is just missing, so ELOOP above
    means the magic link existed and was refused."""
    r = run_with_fd(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--chdir",
                                "/proc/self/fd/9", "--", "true"), host.marker, fd=3)
    assert_clean_error(r, "process.cwd /proc/self/fd/9: ", "(ENOENT)")
    host.assert_untouched()


# --- uspawn exec --chdir -----------------------------------------------------------------


@contextmanager
def running(uspawn: Runner, tree: Path, host: HostGuard) -> Iterator[str]:
    """A container that runs until the test is done with it; yields its name once
    `exec` can join it."""
    name = host.machine()
    # The payload ends (status 0) when its stdin closes: cat sees EOF.
    p = uspawn.popen("run", "-D", str(tree), "-M", name, "--", "cat",
                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
    try:
        wait_state(uspawn.state, name, p, timeout=TIMEOUT)  # written after the execve
        yield name
        _, err = p.communicate(timeout=TIMEOUT)  # closes the payload's stdin: EOF
        assert p.returncode == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("cwd", ["/proc/self/fd/3", "/proc/self/fd/3/..", "/hostlink"])
def test_exec_chdir_through_a_passed_fd_refused(uspawn: Runner, tree: Path, host: HostGuard,
                                                cwd: str) -> None:
    (tree / "hostlink").symlink_to("/proc/self/fd/3")
    with running(uspawn, tree, host) as name:
        r = run_with_fd(uspawn.argv("exec", name, "--chdir", cwd, "--", "sh", "-c", SNOOP),
                        host.marker)
        assert_clean_error(r, f"process.cwd {cwd}: ", ELOOP_MSG)
        assert r.returncode == 126
        assert_secret_unseen(r)
        # still usable: a cwd inside the root works
        ok = uspawn.run("exec", name, "--chdir", "/etc", "--", "pwd", timeout=TIMEOUT)
        assert (ok.returncode, ok.stdout) == (0, "/etc\n"), ok.stderr
    host.assert_untouched()


# --- issue 12: one exec sequence for run and exec ---------------------------------------


def _app(tree: Path) -> None:
    """/app/x only: a lookup made before the chdir would not find ./x."""
    (tree / "app").mkdir()
    (tree / "app" / "x").write_text("#!/bin/sh\necho \"x in $(pwd)\"\n")
    (tree / "app" / "x").chmod(0o755)
    assert not (tree / "x").exists()


def _ignored(status: str) -> set[int]:
    line = next(ln for ln in status.splitlines() if ln.startswith("SigIgn:"))
    mask = int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


SIGPIPE, SIGXFSZ = 13, 25


def test_run_relative_executable_and_signal_defaults(uspawn: Runner,
                                                     tree: Path, host: HostGuard) -> None:
    _app(tree)
    r = uspawn.run("run", "-D", str(tree), "-M", host.machine(), "--chdir", "/app", "--",
                   "./x", timeout=TIMEOUT)
    assert (r.returncode, r.stdout) == (0, "x in /app\n"), r.stderr
    r = uspawn.run("run", "-D", str(tree), "-M", host.machine(), "--", "cat",
                   "/proc/self/status", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert not _ignored(r.stdout) & {SIGPIPE, SIGXFSZ}
    host.assert_untouched()


def test_exec_relative_executable_and_signal_defaults(uspawn: Runner, tree: Path,
                                                      host: HostGuard) -> None:
    _app(tree)
    with running(uspawn, tree, host) as name:
        r = uspawn.run("exec", name, "--chdir", "/app", "--", "./x", timeout=TIMEOUT)
        assert (r.returncode, r.stdout) == (0, "x in /app\n"), r.stderr
        r = uspawn.run("exec", name, "--", "cat", "/proc/self/status", timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert not _ignored(r.stdout) & {SIGPIPE, SIGXFSZ}
        r = uspawn.run("exec", name, "--chdir", "/app", "--", "./nope", timeout=TIMEOUT)
        assert_clean_error(r, "./nope")
        assert r.returncode == 127
    host.assert_untouched()


# --- uspawn-runc: exec --cwd, process.json cwd, run/create --preserve-fds ----------------


def runc_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", "from uspawn.oci.cli import entry; entry()",
            "--root", str(root), *args]


class Runc:
    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str, fd_dir: Path | None = None,
                 ) -> subprocess.CompletedProcess[str]:
        if fd_dir is not None:
            return run_with_fd(runc_argv(self.root, *args), fd_dir)
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            p = subprocess.run(runc_argv(self.root, *args), stdin=subprocess.DEVNULL,
                               stdout=out, stderr=err, timeout=TIMEOUT)
            out.seek(0)
            err.seek(0)
            r = subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())
        assert_no_traceback(r)
        return r


@pytest.fixture
def runc(tmp_path: Path, need_root: None) -> Iterator[Runc]:
    rc = Runc(tmp_path / "oci-state")
    yield rc
    for cid in rc("list", "-q").stdout.split():
        rc("delete", "--force", cid)
    assert rc("list", "-q").stdout.strip() == "", "an OCI container was left"


def bundle(tmp_path: Path, tree: Path, args: list[str], cwd: str = "/") -> Path:
    from uspawn.oci.defaults import default_config

    b = tmp_path / "bundle"
    b.mkdir()
    os.rename(tree, b / "rootfs")
    cfg = default_config()
    proc = cfg["process"]
    linux = cfg["linux"]
    root = cfg["root"]
    assert isinstance(proc, dict) and isinstance(linux, dict) and isinstance(root, dict)
    proc.update(args=args, cwd=cwd, terminal=False)
    root["readonly"] = False
    m = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    if {"type": "user"} not in linux["namespaces"]:
        linux["namespaces"] = [*linux["namespaces"], {"type": "user"}]
    linux["uidMappings"] = m
    linux["gidMappings"] = m
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def assert_runc_refused(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r
    assert lines[0].startswith("uspawn-runc: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert_secret_unseen(r)


def test_runc_exec_cwd_through_a_passed_fd_refused(runc: Runc, tree: Path, tmp_path: Path,
                                                   host: HostGuard) -> None:
    b = bundle(tmp_path, tree, ["sh", "-c", "while [ ! -e /stop-now ]; do sleep 0.05; done"])
    (b / "rootfs" / "hostlink").symlink_to("/proc/self/fd/3")
    assert runc("run", "--detach", "--bundle", str(b), "x1").returncode == 0
    for cwd in ("/proc/self/fd/3", "/hostlink"):
        r = runc("exec", "--cwd", cwd, "x1", "sh", "-c", SNOOP, fd_dir=host.marker)
        assert_runc_refused(r, f"process.cwd {cwd}: ", ELOOP_MSG)
        proc = {"args": ["sh", "-c", SNOOP], "cwd": cwd, "env": ["PATH=/bin"]}
        (tmp_path / "p.json").write_text(json.dumps(proc))
        r = runc("exec", "--process", str(tmp_path / "p.json"), "x1", fd_dir=host.marker)
        assert_runc_refused(r, f"process.cwd {cwd}: ", ELOOP_MSG)
    r = runc("exec", "--cwd", "etc", "x1", "pwd")
    assert_runc_refused(r, "process.cwd 'etc': not an absolute path")
    r = runc("exec", "--cwd", "/etc", "x1", "pwd")
    assert (r.returncode, r.stdout) == (0, "/etc\n"), r.stderr
    (b / "rootfs" / "stop-now").write_text("")
    host.assert_untouched()


@pytest.mark.parametrize("cwd", ["/proc/self/fd/3", "/proc/self/fd/3/sub"])
def test_runc_preserved_fd_as_process_cwd_refused(runc: Runc, tree: Path, tmp_path: Path,
                                                  host: HostGuard, cwd: str) -> None:
    """The caller preserves fd 3 (a host directory) for the container; the config's
    process.cwd names it. run fails at once; create succeeds and start fails."""
    b = bundle(tmp_path, tree, ["sh", "-c", SNOOP], cwd=cwd)
    r = runc("run", "--preserve-fds", "1", "--bundle", str(b), "p1", fd_dir=host.marker)
    assert_runc_refused(r, f"process.cwd {cwd}: ", ELOOP_MSG)
    assert runc("state", "p1").returncode != 0  # run removed it
    r = runc("create", "--preserve-fds", "1", "--bundle", str(b), "p2", fd_dir=host.marker)
    assert r.returncode == 0, r.stderr
    r = runc("start", "p2")
    assert_runc_refused(r, f"process.cwd {cwd}: ", ELOOP_MSG)
    runc("delete", "--force", "p2")
    host.assert_untouched()


# --- the executable through a passed fd (the other half of CVE-2024-21626) ---------------


def _host_binary(tmp_path: Path, tree: Path) -> Path:
    """A host directory holding a static binary (a copy of the tree's probe), and a
    hostile tree whose /bin/pwn is a symlink to it through /proc/self/fd/3."""
    d = tmp_path / "host-bin"
    d.mkdir()
    shutil.copy2(tree / "bin" / "probe", d / "hostprobe")
    (tree / "bin" / "pwn").symlink_to("/proc/self/fd/3/hostprobe")
    return d


def test_run_executable_through_a_passed_fd_not_run(uspawn: Runner, tree: Path,
                                                    tmp_path: Path, host: HostGuard) -> None:
    """Close-on-exec is not enough: the fd is still open while execve walks the
    path. Every fd the container is not given is closed before the lookup."""
    hostdir = _host_binary(tmp_path, tree)
    for cmd in ("pwn", "/proc/self/fd/3/hostprobe"):
        r = run_with_fd(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--",
                                    cmd, "syscall", "39"), hostdir)
        assert_clean_error(r, cmd)
        assert r.returncode == 127 and "ok" not in r.stdout
    host.assert_untouched()


def test_exec_executable_through_a_passed_fd_not_run(uspawn: Runner, tree: Path,
                                                     tmp_path: Path, host: HostGuard) -> None:
    hostdir = _host_binary(tmp_path, tree)
    with running(uspawn, tree, host) as name:
        for cmd in ("pwn", "/proc/self/fd/3/hostprobe"):
            r = run_with_fd(uspawn.argv("exec", name, "--", cmd, "syscall", "39"), hostdir)
            assert_clean_error(r, cmd)
            assert r.returncode == 127 and "ok" not in r.stdout
    host.assert_untouched()
