"""End-to-end: `uspawn run` against the real kernel, as root.

Each test drives the CLI on a fresh copy of the busybox rootfs (with the static
probe in /bin/probe) and asserts what the payload saw and what the host kept.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import Runner, cgroup_dirs, drain_pty, mounts_under
from waits import (
    IN_ATTRIB,
    IN_CLOSE_WRITE,
    IN_MODIFY,
    Inotify,
    children,
    open_pidfds,
    running,
    wait_pidfds,
    wait_until,
)


def run_ok(uspawn: Runner, rootfs: Path, *cmd: str, extra: tuple[str, ...] = ()) -> str:
    r = uspawn.run("run", "-D", str(rootfs), *extra, "--", *cmd)
    assert r.returncode == 0, f"rc={r.returncode} stderr={r.stderr}"
    return r.stdout


def assert_no_leftovers(uspawn: Runner, name: str, rootfs: Path) -> None:
    assert cgroup_dirs(name) == []
    containers = uspawn.state / "containers"
    assert not containers.exists() or list(containers.iterdir()) == []
    ranges = uspawn.state / "ranges"
    assert not ranges.exists() or [p.name for p in ranges.iterdir()] == []
    # Every mount is made in the container's own namespace; a leak would show
    # up on the host at the rootfs (propagation) or the state directory.
    assert mounts_under(rootfs) == [] and mounts_under(uspawn.state) == []


# --- /dev, mknod, seccomp ------------------------------------------------------


def test_devices_usable_by_unprivileged_user(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "id -u; echo x > /dev/null && echo null-ok; "
                 "head -c 16 /dev/zero | wc -c; head -c 16 /dev/urandom | wc -c; "
                 "echo y > /dev/full; echo full-rc=$?",
                 extra=("--user", "user"))
    lines = out.split()
    assert lines[0] == "1000"
    assert "null-ok" in lines
    assert lines.count("16") == 2
    assert "full-rc=1" in lines  # ENOSPC from the real full device


def test_device_nodes_are_owned_by_container_root(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c", "stat -c '%u:%g %t:%T %n' /dev/null /dev/zero")
    assert out.splitlines() == ["0:0 1:3 /dev/null", "0:0 1:5 /dev/zero"]


def test_mknod_devices_refused_fifo_allowed(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "probe mknod /tmp/c c 1 3; probe mknod /tmp/b b 8 0; "
                 "mkfifo /tmp/f && test -p /tmp/f && echo fifo-ok")
    assert out.split() == ["EPERM", "EPERM", "fifo-ok"]


def test_unknown_syscall_is_enosys(uspawn: Runner, rootfs: Path) -> None:
    # 1000 is no syscall on any architecture: the policy must answer ENOSYS
    # (glibc falls back only on ENOSYS), and kexec_load is refused with EPERM.
    out = run_ok(uspawn, rootfs, "sh", "-c", "probe syscall 1000; probe syscall 246")
    assert out.splitlines() == ["-1 ENOSYS", "-1 EPERM"]


def test_no_host_block_devices_and_ro_proc_sys(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "find /dev -type b | wc -l; "
                 "echo 1 > /proc/sys/kernel/domainname 2>/dev/null; echo procsys=$?; "
                 "touch /sys/kernel/x 2>/dev/null; echo sys=$?; "
                 "cat /proc/timer_list 2>/dev/null | wc -c; "
                 "probe open /proc/sys/net/ipv4/ip_forward")
    lines = out.split()
    assert lines[0] == "0"
    assert "procsys=1" in lines and "sys=1" in lines
    assert lines[3] == "0"  # masked: /dev/null over /proc/timer_list
    assert lines[4] == "EROFS"


# --- ownership --------------------------------------------------------------


def test_map_ownership_leaves_host_tree_untouched(uspawn: Runner, rootfs: Path) -> None:
    before = {p: p.lstat().st_uid for p in rootfs.rglob("*")}
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "stat -c %u /bin/busybox /etc/passwd; touch /root/made-inside; "
                 "stat -c %u /root/made-inside",
                 extra=("--private-users-ownership=map", "-v"))
    assert out.split() == ["0", "0", "0"]
    made = rootfs / "root" / "made-inside"
    assert made.stat().st_uid == 0  # container root == host root on disk via idmap
    made.unlink()
    after = {p: p.lstat().st_uid for p in rootfs.rglob("*")}
    assert before == after


def test_chown_ownership_shifts_to_base(uspawn: Runner, rootfs: Path) -> None:
    base = 0x20000000
    r = uspawn.run("run", "-D", str(rootfs), f"--private-users={base}",
                   "--private-users-ownership=chown", "-v", "--", "sh", "-c",
                   "stat -c %u /bin/busybox; touch /root/new; stat -c %u:%g /home/user")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1000:1000"]
    assert "ownership: chown" in r.stderr
    assert (rootfs / "bin" / "busybox").stat().st_uid == base
    assert (rootfs / "root" / "new").stat().st_uid == base
    assert (rootfs / "home" / "user").stat().st_uid == base + 1000
    # A second start keeps the shift (auto picks the tree's base again).
    r2 = uspawn.run("run", "-D", str(rootfs), "-v", "--", "stat", "-c", "%u", "/bin/busybox")
    assert r2.returncode == 0 and r2.stdout.strip() == "0", r2.stderr
    assert "ownership: chown" in r2.stderr


def test_chown_killed_mid_shift_is_finished_next_start(uspawn: Runner, rootfs: Path) -> None:
    # A tree big enough that the shift takes a while.
    big = rootfs / "var" / "big"
    for i in range(200):
        d = big / f"d{i}"
        d.mkdir(parents=True)
        for j in range(250):
            (d / f"f{j}").touch()
    originals = {p: (p.lstat().st_uid, p.lstat().st_gid) for p in rootfs.rglob("*")}
    originals[rootfs] = (rootfs.lstat().st_uid, rootfs.lstat().st_gid)
    base = 0x21000000
    proc = uspawn.popen("run", "-D", str(rootfs), f"--private-users={base}",
                        "--private-users-ownership=chown", "--", "true",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The shift has begun once one of these directories is chowned: an IN_ATTRIB
    # event on it (a watch per directory, set up before anything could change).
    watched = [big / f"d{i}" for i in range(0, 200, 20)]
    killed = False
    kids: list[int] = []
    with Inotify(watched, IN_ATTRIB) as ino:
        pidfd = os.pidfd_open(proc.pid)
        try:
            while not killed:
                ready = select.select([ino.fd, pidfd], [], [], 30)[0]
                assert ready, "no chown and no exit within 30 s"
                if any(d.lstat().st_uid == base for d in watched):
                    kids = open_pidfds(children(proc.pid))  # its guardian, if any yet
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                elif pidfd in ready:
                    break
                ino.drain()
        finally:
            os.close(pidfd)
    proc.wait()
    if not killed:
        pytest.skip("the shift finished before it could be interrupted")
    shifted = sum(1 for p in originals if p.lstat().st_uid >= base)
    assert 0 < shifted < len(originals), "expected a half-shifted tree after SIGKILL"
    # Once the runtime's children are gone nothing holds the range: start again.
    wait_pidfds(kids, 30, "the killed runtime's children")
    r = uspawn.run("run", "-D", str(rootfs), f"--private-users={base}",
                   "--private-users-ownership=chown", "--", "true")
    assert r.returncode == 0, r.stderr
    for p, (uid, gid) in originals.items():
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (uid + base, gid + base), p


def test_bind_mount_is_idmapped(uspawn: Runner, rootfs: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hostfile").write_text("hi")
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "stat -c %u /mnt/shared/hostfile; cat /mnt/shared/hostfile; echo; "
                 "touch /mnt/shared/fromcontainer",
                 extra=("--bind", f"{shared}:/mnt/shared:idmap"))  # only on request
    assert out.split() == ["0", "hi"]
    assert (shared / "fromcontainer").stat().st_uid == 0
    ro = run_ok(uspawn, rootfs, "sh", "-c", "touch /mnt/ro/x 2>/dev/null; echo rc=$?",
                extra=("--bind-ro", f"{shared}:/mnt/ro"))
    assert ro.strip() == "rc=1"


# --- namespaces, identity -----------------------------------------------------


def test_namespaces_hostname_and_network(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "hostname; echo $$; cat /proc/self/uid_map; "
                 "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; "
                 "cat /sys/class/net/lo/operstate /sys/class/net/lo/flags; echo $container",
                 extra=("--hostname", "box1"))
    lines = out.split("\n")
    assert lines[0] == "box1"
    assert lines[1] == "1"  # pid 1 in its own pid namespace
    inside, outside, size = lines[2].split()
    assert (inside, size) == ("0", "65536") and int(outside) >= 0x80000
    assert lines[3] == "lo"  # only loopback
    assert int(lines[5], 16) & 1  # IFF_UP
    assert lines[6] == "uspawn"


def test_network_host_shares_interfaces(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c", "cat /proc/net/dev | wc -l",
                 extra=("--network=host",))
    with open("/proc/net/dev") as f:
        assert int(out) == len(f.readlines())


def test_two_concurrent_containers_get_distinct_ranges(uspawn: Runner, rootfs: Path) -> None:
    # Each runs until its stdin closes: both hold their range while the other starts.
    a = uspawn.popen("run", "-D", str(rootfs), "--", "sh", "-c",
                     "cat /proc/self/uid_map; read x || :", stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE)
    b = uspawn.popen("run", "-D", str(rootfs), "--", "sh", "-c",
                     "cat /proc/self/uid_map; read x || :", stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE)
    assert a.stdout is not None and b.stdout is not None
    line_a, line_b = a.stdout.readline(), b.stdout.readline()
    out_a = line_a + a.communicate(timeout=30)[0]
    out_b = line_b + b.communicate(timeout=30)[0]
    assert a.returncode == 0 and b.returncode == 0
    assert out_a.split()[1] != out_b.split()[1]


def test_private_users_no_and_fixed_range(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "cat", "/proc/self/uid_map", extra=("--private-users=no",))
    assert out.split() == ["0", "0", "4294967295"]
    out = run_ok(uspawn, rootfs, "cat", "/proc/self/uid_map",
                 extra=("--private-users=0x30000000:65536",))
    assert out.split() == ["0", str(0x30000000), "65536"]


def test_capabilities_env_cwd_nnp(uspawn: Runner, rootfs: Path) -> None:
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status; pwd; echo $FOO",
                 extra=("--drop-capability", "CAP_SYS_ADMIN", "--capability", "SYS_TIME",
                        "--no-new-privileges", "--chdir", "/etc", "--setenv", "FOO=bar"))
    status = dict(line.split(":\t") for line in out.splitlines()[:2])
    bnd = int(status["CapBnd"], 16)
    assert not bnd & (1 << 21)  # CAP_SYS_ADMIN dropped
    assert bnd & (1 << 25)  # CAP_SYS_TIME added
    assert bnd & (1 << 12)  # CAP_NET_ADMIN kept with a private network
    assert status["NoNewPrivs"] == "1"
    assert out.splitlines()[2:] == ["/etc", "bar"]


# --- exit codes, signals, tty ---------------------------------------------------


def test_exit_code_and_signal_death(uspawn: Runner, rootfs: Path) -> None:
    assert uspawn.run("run", "-D", str(rootfs), "--", "sh", "-c", "exit 42").returncode == 42
    # The kernel shields a pid namespace's init from SIGKILL sent inside it, so
    # the signal comes from the host, as `kill` by an admin would.
    p = uspawn.popen("run", "-D", str(rootfs), "--machine", "sigdeath", "--", "sh", "-c",
                     "echo up; exec sleep 100", stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    with open(os.path.join(cgroup_dirs("sigdeath")[0], "cgroup.procs")) as f:
        init_pid = int(f.read().split()[0])
    os.kill(init_pid, signal.SIGKILL)
    assert p.wait(timeout=20) == 128 + signal.SIGKILL


def test_signals_are_forwarded(uspawn: Runner, rootfs: Path) -> None:
    script = ("trap 'echo got-term; exit 7' TERM; trap 'echo got-usr1' USR1; "
              "echo ready; while :; do sleep 0.05; done")
    p = uspawn.popen("run", "-D", str(rootfs), "--machine", "sig", "--", "sh", "-c", script,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGUSR1)
    assert p.stdout.readline().strip() == "got-usr1"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    assert out.strip() == "got-term"
    assert p.returncode == 7, err
    assert_no_leftovers(uspawn, "sig", rootfs)


def test_tty_through_a_pty(uspawn: Runner, rootfs: Path) -> None:
    import pty

    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execvp(uspawn.argv()[0], uspawn.argv(
                "run", "-D", str(rootfs), "-t", "--", "sh", "-c",
                "probe open /dev/tty; tty; stty size; test -t 0 && echo stdin-tty"))
        finally:
            os._exit(127)
    import fcntl
    import struct
    import termios

    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
    text, code = drain_pty(master, pid)
    assert code == 0, text
    lines = [ln for ln in text.split("\n") if ln]
    assert lines[0] == "ok"
    assert lines[1].startswith("/dev/pts/")
    assert lines[2] == "33 111"
    assert lines[3] == "stdin-tty"


# --- cleanup and bad input ------------------------------------------------------


def test_no_leftovers_after_normal_exit(uspawn: Runner, rootfs: Path) -> None:
    run_ok(uspawn, rootfs, "true", extra=("--machine", "clean"))
    assert_no_leftovers(uspawn, "clean", rootfs)


def test_no_leftovers_after_sigkill_of_uspawn(uspawn: Runner, rootfs: Path) -> None:
    p = uspawn.popen("run", "-D", str(rootfs), "--machine", "killme", "--", "sh", "-c",
                     "echo $$ > /dev/null; echo up; exec sleep 1000",
                     stdout=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "up"
    cg = cgroup_dirs("killme")
    assert cg, "container cgroup should exist while it runs"
    with open(os.path.join(cg[0], "cgroup.procs")) as f:
        pids = [int(x) for x in f.read().split()]
    assert pids
    # The guardian (a child of uspawn) cleans up after a killed uspawn, then exits:
    # once it and the container's processes are gone, the cleanup is over.
    fds = open_pidfds(children(p.pid) + pids)
    p.kill()
    p.wait()
    wait_pidfds(fds, 10, "the guardian and the container")
    assert not any(running(x) for x in pids)
    assert_no_leftovers(uspawn, "killme", rootfs)


def test_no_leftovers_after_failed_start(uspawn: Runner, rootfs: Path) -> None:
    r = uspawn.run("run", "-D", str(rootfs), "--machine", "fail", "--", "/no/such/cmd")
    assert r.returncode == 127
    assert r.stderr.count("\n") == 1 and "/no/such/cmd" in r.stderr
    assert "Traceback" not in r.stderr
    assert_no_leftovers(uspawn, "fail", rootfs)


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("-D", "/nonexistent/tree", "--", "true"), 125, "rootfs /nonexistent/tree"),
        (("-D", "/etc/passwd", "--", "true"), 125, "not a directory"),
        (("-D", "{rootfs}", "--private-users=abc", "--", "true"), 2, "--private-users"),
        (("-D", "{rootfs}", "--", "nosuchcmd"), 127, "nosuchcmd"),
        (("-D", "{rootfs}", "--user", "ghost", "--", "true"), 125, "ghost"),
        (("-D", "{rootfs}", "--capability", "CAP_BOGUS", "--", "true"), 2, "CAP_BOGUS"),
        (("-D", "{rootfs}", "--bind", "/nonexistent:/x", "--", "true"), 125, "/nonexistent"),
        (("-D", "{rootfs}", "--bogus-flag", "--", "true"), 2, "--bogus-flag"),
    ],
)
def test_bad_input_one_line_error(uspawn: Runner, rootfs: Path, args: tuple[str, ...],
                                  code: int, needle: str) -> None:
    argv = [a.replace("{rootfs}", str(rootfs)) for a in args]
    r = uspawn.run("run", *argv)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert lines[0].startswith("uspawn: ")


def test_range_in_use_is_refused(uspawn: Runner, rootfs: Path) -> None:
    base = "0x31000000"
    p = uspawn.popen("run", "-D", str(rootfs), f"--private-users={base}", "--", "sh", "-c",
                     "echo up; sleep 1000", stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline().strip() == "up"
    try:
        r = uspawn.run("run", "-D", str(rootfs), f"--private-users={base}", "--", "true")
        assert r.returncode == 125
        assert "already used" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        p.kill()
        p.wait()


def test_device_nodes_shipped_in_the_tree_cannot_be_opened(uspawn: Runner, rootfs: Path) -> None:
    # A hostile tree may carry device nodes (here /dev/null's numbers, owned by
    # root, which the idmap maps to container root): the rootfs is nodev.
    os.mknod(rootfs / "root" / "null2", 0o20666, os.makedev(1, 3))
    os.mknod(rootfs / "root" / "disk", 0o60600, os.makedev(7, 0))
    out = run_ok(uspawn, rootfs, "sh", "-c",
                 "probe open /root/null2; probe open /root/disk; probe open /dev/null")
    assert out.split() == ["EACCES", "EACCES", "ok"]


def test_warns_when_an_idmapped_tree_is_reachable_by_others(uspawn: Runner, rootfs: Path,
                                                           tmp_path: Path) -> None:
    r = uspawn.run("run", "-D", str(rootfs), "--", "true")
    assert r.returncode == 0 and "reachable by unprivileged" not in r.stderr  # 0700 tmp dirs
    open_dir = Path("/tmp") / f"uspawn-open-{os.getpid()}"
    open_dir.mkdir(mode=0o755)
    try:
        os.rename(rootfs, open_dir / "tree")
        r = uspawn.run("run", "-D", str(open_dir / "tree"), "--", "true")
        assert r.returncode == 0
        assert "reachable by unprivileged host users" in r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(open_dir)], check=False)


# --- stdio: host files reach the payload as relayed pipes (issue 19) -------------


def _pipe_inode(link: str) -> int:
    assert link.startswith("pipe:["), link
    return int(link[len("pipe:["):-1])


def test_pipes_and_dev_null_pass_through(uspawn: Runner, rootfs: Path) -> None:
    """Nothing to relay: the payload holds our very pipe and /dev/null (no copying)."""
    p = uspawn.popen("run", "-D", str(rootfs), "--", "sh", "-c",
                     "readlink /proc/self/fd/0; readlink /proc/self/fd/1",
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    ours = os.fstat(p.stdout.fileno()).st_ino
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    fd0, fd1 = out.split()
    assert fd0 == "/dev/null"
    assert _pipe_inode(fd1) == ours


def test_host_files_are_relayed(uspawn: Runner, rootfs: Path, tmp_path: Path) -> None:
    """stdin, stdout and stderr regular files: the payload sees pipes, the bytes and
    the exit code are what they would be with the files themselves."""
    src, out, err = tmp_path / "in", tmp_path / "out", tmp_path / "err"
    src.write_bytes(os.urandom(3 << 20))  # more than a pipe holds: no deadlock
    with open(src, "rb") as i, open(out, "wb") as o, open(err, "wb") as e:
        r = subprocess.run(uspawn.argv("run", "-D", str(rootfs), "--", "sh", "-c",
                                       "for n in 0 1 2; do readlink /proc/self/fd/$n; done "
                                       ">&2; cat; echo done >&2; exit 42"),
                           stdin=i, stdout=o, stderr=e, timeout=60)
    assert r.returncode == 42
    assert out.read_bytes() == src.read_bytes()
    lines = err.read_text().splitlines()
    assert [_pipe_inode(x) > 0 for x in lines[:3]] == [True] * 3
    assert lines[3] == "done"


def test_relay_with_a_payload_that_never_reads(uspawn: Runner, rootfs: Path,
                                               tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"x" * (1 << 20))
    with open(src, "rb") as i:
        r = subprocess.run(uspawn.argv("run", "-D", str(rootfs), "--", "sh", "-c",
                                       "sleep 0.2; echo bye"),
                           stdin=i, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "bye\n", r.stderr


def test_one_file_for_stdout_and_stderr_keeps_the_order(uspawn: Runner, rootfs: Path,
                                                        tmp_path: Path) -> None:
    """`> log 2>&1`: one pipe for both, so lines stay in the order they were written."""
    log = tmp_path / "log"
    with open(log, "wb") as f:
        r = subprocess.run(uspawn.argv("run", "-D", str(rootfs), "--", "sh", "-c",
                                       "for i in 1 2 3 4 5; do echo out$i; echo err$i >&2; "
                                       "done"),
                           stdin=subprocess.DEVNULL, stdout=f, stderr=f, timeout=60)
    assert r.returncode == 0
    lines = [ln for ln in log.read_text().splitlines() if not ln.startswith("uspawn:")]
    assert lines == [f"{s}{i}" for i in range(1, 6) for s in ("out", "err")]


def test_signals_are_forwarded_with_relayed_stdio(uspawn: Runner, rootfs: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as o:
        p = uspawn.popen("run", "-D", str(rootfs), "--machine", "sigrelay", "--", "sh", "-c",
                         "trap 'echo got-term; exit 7' TERM; echo ready; "
                         "while :; do sleep 0.05; done",
                         stdin=subprocess.DEVNULL, stdout=o, stderr=subprocess.PIPE)
    wait_until(lambda: out.read_text() == "ready\n", [tmp_path], "ready in the output",
               proc=p, mask=IN_MODIFY | IN_CLOSE_WRITE)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 7, err
    assert out.read_text() == "ready\ngot-term\n"
    assert_no_leftovers(uspawn, "sigrelay", rootfs)


def test_tty_mode_never_hands_over_the_host_tty(uspawn: Runner, rootfs: Path) -> None:
    """With -t, fds 0-2 of the payload are the container's own pty (its devpts), not
    the terminal uspawn runs on."""
    import pty

    host_devpts = os.stat("/dev/pts/ptmx").st_dev
    pid, master = pty.fork()
    if pid == 0:
        try:
            os.execvp(uspawn.argv()[0], uspawn.argv(
                "run", "-D", str(rootfs), "-t", "--", "sh", "-c",
                "stat -L -c 'dev %d' /proc/1/fd/0 /proc/1/fd/1 /proc/1/fd/2 /dev/pts/ptmx"))
        finally:
            os._exit(127)
    text, code = drain_pty(master, pid)
    assert code == 0, text
    devs = {ln.split()[1] for ln in text.splitlines() if ln.startswith("dev ")}
    assert len(devs) == 1 and devs != {str(host_devpts)}, text
