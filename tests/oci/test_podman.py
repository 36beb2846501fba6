"""podman 4.3 (Debian) drives the OCI runtime under test: the issue's "Must show" list.

`podman run --rm`, `run -d` + `exec` (+ `-t`, through a real pty too), `logs`, `stop`
(SIGTERM honoured, and escalation to SIGKILL), `rm`, and `--uidmap` user namespaces
(/dev/null writable by a non-root user inside, mknod EPERM). Every container runs with
`--network=none` (also the default in the session's containers.conf): no bridge, so no
netavark/iptables changes on the host.

Besides podman's outputs, each test checks the runtime command lines podman and conmon
issued (logged by the wrapper of podman_env.py): that proves the runtime under test was
really used, and pins the contract (e.g. signals arrive as numbers).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import termios
from collections.abc import Iterator

import pytest
from waits import IN_CLOSE_WRITE, IN_CREATE, IN_MODIFY, read_to_eof, read_until, wait_until

from .podman_env import IMAGE, PodmanEnv, PodmanResult, RuntimeCall, option_value

NONE = "--network=none"
USERNS = ("--uidmap", "0:100000:65536", "--gidmap", "0:100000:65536")
CID_RE = re.compile(r"^[0-9a-f]{64}$")


def calls_of(res: PodmanResult, sub: str) -> list[RuntimeCall]:
    return [c for c in res.calls if c.subcommand == sub]


def one_call(res: PodmanResult, sub: str) -> RuntimeCall:
    found = calls_of(res, sub)
    assert len(found) == 1, f"expected one `{sub}` call\n" + res.explain()
    return found[0]


def option(call: RuntimeCall, name: str) -> str | None:
    return option_value(call.sub_args, name)


def cid_of(res: PodmanResult) -> str:
    cid = res.stdout.strip()
    assert CID_RE.match(cid), res.explain()
    return cid


def inspect(penv: PodmanEnv, cid: str, fmt: str) -> str:
    return penv.ok("inspect", "--format", fmt, cid).stdout.strip()


def wait_logs(penv: PodmanEnv, cid: str, text: str, timeout: float = 10) -> str:
    """`podman logs` once the container printed text.

    conmon writes the container's output to its k8s-file log (HostConfig.LogConfig.Path),
    one `<time> <stream> <F|P> <text>` line per write: inotify on the log's directory
    (IN_MODIFY: conmon appends) re-reads the file; `podman logs` is asked once at the
    end, so what it shows is checked too."""
    path = inspect(penv, cid, "{{.HostConfig.LogConfig.Path}}")
    assert path, f"no LogPath for {cid}"

    def logged() -> bool:
        try:
            with open(path, errors="replace") as f:
                return any(text in line.split(" ", 3)[-1] for line in f)
        except FileNotFoundError:
            return False

    wait_until(logged, [os.path.dirname(path)], f"{text!r} in {path}", timeout,
               mask=IN_MODIFY | IN_CREATE | IN_CLOSE_WRITE)
    res = penv.ok("logs", cid)
    assert text in res.stdout, f"{text!r} in {path} but not in podman logs\n" + res.explain()
    return res.stdout


def wait_deleted(penv: PodmanEnv, cid: str, since: int) -> None:
    """`delete --force` may come after podman returned (conmon's exit command)."""
    call = penv.wait_for_call(lambda c: c.subcommand == "delete" and cid in c.args, since,
                              what=f"`delete` of {cid}")
    assert call.sub_args == ["--force", cid], call.line()


def runtime_list(penv: PodmanEnv) -> str:
    res = subprocess.run([penv.runtime, "list", "-q"], capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


# -- podman run ----------------------------------------------------------------------


def test_run_rm_echo(penv: PodmanEnv) -> None:
    since = penv.call_count()
    res = penv.ok("run", "--rm", NONE, "--name", "uspawn-t-echo", IMAGE, "echo", "hi")
    assert res.stdout == "hi\n", res.explain()
    create = one_call(res, "create")
    cid = create.sub_args[-1]
    assert CID_RE.match(cid), create.line()
    assert option(create, "--bundle") and option(create, "--pid-file"), create.line()
    assert "--console-socket" not in create.args, create.line()
    assert create.parent == "conmon", create.line()
    start = one_call(res, "start")
    assert start.sub_args == [cid], start.line()
    wait_deleted(penv, cid, since)
    assert penv.podman("container", "exists", "uspawn-t-echo").returncode == 1
    assert cid not in runtime_list(penv)


def test_run_exit_code_and_streams(penv: PodmanEnv) -> None:
    res = penv.podman("run", "--rm", NONE, IMAGE, "sh", "-c", "echo out; echo err >&2; exit 3")
    assert res.returncode == 3, res.explain()
    assert res.stdout == "out\n", res.explain()
    assert "err\n" in res.stderr, res.explain()


def test_run_stdin_pipe(penv: PodmanEnv) -> None:
    res = penv.ok("run", "--rm", "-i", NONE, IMAGE, "sh", "-c", "cat; echo end",
                  input="line1\nline2\n")
    assert res.stdout == "line1\nline2\nend\n", res.explain()


def test_run_tty(penv: PodmanEnv) -> None:
    res = penv.ok("run", "--rm", "-t", NONE, IMAGE, "sh", "-c", "tty; echo x")
    assert re.fullmatch(r"/dev/pts/\d+\r\nx\r\n", res.stdout), res.explain()
    create = one_call(res, "create")
    assert option(create, "--console-socket"), create.line()
    assert create.record["config"]["process"]["terminal"] is True


# -- a detached container: exec, exec -t, logs, pause ----------------------------------


@pytest.fixture(scope="module")
def running(penv: PodmanEnv) -> Iterator[str]:
    res = penv.ok("run", "-d", NONE, "--name", "uspawn-t-running", IMAGE,
                  "sh", "-c", "echo started; echo oops >&2; exec sleep 1000")
    cid = cid_of(res)
    assert calls_of(res, "create") and calls_of(res, "start"), res.explain()
    wait_logs(penv, cid, "started")
    yield cid
    penv.podman("rm", "-f", "-t", "0", cid)


def test_detached_is_child_of_conmon(penv: PodmanEnv, running: str) -> None:
    status, pid_s = inspect(penv, running, "{{.State.Status}} {{.State.Pid}}").split()
    assert status == "running"
    pid = int(pid_s)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert f.read() == b"sleep\x001000\x00"
    with open(f"/proc/{pid}/status") as f:
        ppid = int(next(ln for ln in f if ln.startswith("PPid:")).split()[1])
    with open(f"/proc/{ppid}/comm") as f:
        assert f.read().strip() == "conmon", "the container's init must be conmon's child"


def test_exec(penv: PodmanEnv, running: str) -> None:
    res = penv.ok("exec", running, "echo", "in")
    assert res.stdout == "in\n", res.explain()
    call = one_call(res, "exec")
    assert call.sub_args[-1] == running, call.line()
    assert "--detach" in call.sub_args and option(call, "--pid-file"), call.line()
    assert option(call, "--process") and "--tty" not in call.sub_args, call.line()
    assert call.record["process"]["args"] == ["echo", "in"]


def test_exec_user_env_cwd_exit_code(penv: PodmanEnv, running: str) -> None:
    res = penv.podman("exec", "-u", "1000", "-w", "/tmp", "-e", "FOO=bar", running,
                      "sh", "-c", "id -u; id -g; pwd; echo $FOO; exit 42")
    assert res.returncode == 42, res.explain()
    assert res.stdout == "1000\n1000\n/tmp\nbar\n", res.explain()


def test_exec_tty_without_terminal(penv: PodmanEnv, running: str) -> None:
    # podman exec -t needs no terminal on its own stdin: the pty is the container's.
    res = penv.ok("exec", "-t", running, "tty")
    assert re.fullmatch(r"/dev/pts/\d+\r\n", res.stdout), res.explain()
    call = one_call(res, "exec")
    assert "--tty" in call.sub_args and option(call, "--console-socket"), call.line()
    assert call.record["process"]["terminal"] is True


# The exec'd shell announces that podman's window size landed before it reads a line:
# podman sets the size by a resize (TIOCSWINSZ, then SIGWINCH to the foreground group)
# after the exec started. The trap ends the wait at that signal; the `stty size` check
# after the trap is set catches a resize that came before it.
# (busybox stty fails on a 0x0 window: no size is printed then; the shell's
# "Terminated" for the killed sleep goes to wait's stderr.)
TTY_SCRIPT = (
    "tty; trap 'kill $w 2>/dev/null' WINCH; sleep 100 & w=$!; "
    'case "$(stty size 2>/dev/null)" in ""|"0 0") ;; *) kill $w;; esac; '
    "wait $w 2>/dev/null; trap - WINCH; echo size-set; "
    "read line; stty size; echo got:$line; exit 5")


def test_exec_tty_interactive_pty(penv: PodmanEnv, running: str) -> None:
    """`podman exec -it` from a real terminal: input, echo, window size, exit code."""
    since = penv.call_count()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    proc = penv.popen("exec", "-it", running, "sh", "-c", TTY_SCRIPT,
                      stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    out, rc, failed = b"", None, ""
    try:
        # "hello" goes in only after the container said its window size is set.
        out = read_until(master, b"size-set\r\n", 15)
        os.write(master, b"hello\n")
        out += read_to_eof(master, 15)  # EIO once podman, the last slave holder, exited
        rc = proc.wait(timeout=5)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        failed = f"{exc}; "
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = out.decode(errors="replace")
    calls = "\n".join(f"  [{c.parent}] {c.line()}" for c in penv.calls()[since:])
    why = f"{failed}terminal output {text!r}; exit {rc}; runtime calls:\n{calls}"
    assert not failed and rc is not None, "podman exec -it: " + why
    assert re.fullmatch(r"/dev/pts/\d+\r\nsize-set\r\nhello\r\n33 101\r\ngot:hello\r\n",
                        text), why
    assert rc == 5, why


def test_logs(penv: PodmanEnv, running: str) -> None:
    res = penv.ok("logs", running)
    assert res.stdout == "started\n", res.explain()
    assert res.stderr == "oops\n", res.explain()


def test_pause_unpause(penv: PodmanEnv, running: str) -> None:
    res = penv.ok("pause", running)
    assert one_call(res, "pause").sub_args == [running]
    assert inspect(penv, running, "{{.State.Status}}") == "paused"
    res = penv.ok("unpause", running)
    assert one_call(res, "resume").sub_args == [running]
    assert inspect(penv, running, "{{.State.Status}}") == "running"
    assert penv.ok("exec", running, "echo", "alive").stdout == "alive\n"


# -- stop and rm -----------------------------------------------------------------------


def test_stop_sigterm_then_rm(penv: PodmanEnv) -> None:
    script = 'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 0.1; done'
    cid = cid_of(penv.ok("run", "-d", NONE, IMAGE, "sh", "-c", script))
    wait_logs(penv, cid, "ready")
    res = penv.ok("stop", cid)
    assert res.stdout.strip() == cid, res.explain()
    assert res.seconds < 5, f"stop took {res.seconds:.1f}s\n" + res.explain()
    kills = calls_of(res, "kill")
    assert [k.sub_args for k in kills] == [[cid, "15"]], res.explain()
    assert inspect(penv, cid, "{{.State.Status}} {{.State.ExitCode}}") == "exited 7"
    assert "got-term" in penv.ok("logs", cid).stdout

    # The runtime's `delete` comes from the cleanup after the container exited
    # (conmon's exit command) or from `rm`, whichever is first.
    res = penv.ok("rm", cid)
    assert res.stdout.strip() == cid, res.explain()
    assert penv.podman("container", "exists", cid).returncode == 1
    wait_deleted(penv, cid, 0)
    assert cid not in runtime_list(penv)


def test_stop_escalates_to_sigkill(penv: PodmanEnv) -> None:
    # sleep as PID 1 has no SIGTERM handler, so the kernel drops SIGTERM: podman must
    # fall back to SIGKILL after the timeout.
    cid = cid_of(penv.ok("run", "-d", NONE, IMAGE, "sleep", "1000"))
    res = penv.ok("stop", "-t", "1", cid)
    assert 0.9 < res.seconds < 8, f"stop took {res.seconds:.1f}s\n" + res.explain()
    kills = [k.sub_args for k in calls_of(res, "kill")]
    assert kills[:2] == [[cid, "15"], [cid, "9"]], res.explain()
    assert inspect(penv, cid, "{{.State.Status}} {{.State.ExitCode}}") == "exited 137"
    penv.ok("rm", cid)
    wait_deleted(penv, cid, 0)


# -- user namespaces -------------------------------------------------------------------


def test_uidmap_root_inside_cannot_mknod(penv: PodmanEnv) -> None:
    res = penv.ok("run", "--rm", NONE, *USERNS, IMAGE, "sh", "-c",
                  "cat /proc/self/uid_map /proc/self/gid_map; id -u; "
                  "mknod /tmp/x c 1 3; echo mknod=$?")
    lines = [ln.split() for ln in res.stdout.splitlines()]
    assert lines == [["0", "100000", "65536"], ["0", "100000", "65536"], ["0"], ["mknod=1"]], \
        res.explain()
    assert "mknod: /tmp/x: Operation not permitted" in res.stderr, res.explain()
    config = one_call(res, "create").record["config"]
    assert {"type": "user"} in [{"type": ns["type"]} for ns in config["linux"]["namespaces"]]
    assert config["linux"]["uidMappings"] == [
        {"containerID": 0, "hostID": 100000, "size": 65536}]


def test_uidmap_nonroot_user_dev_null(penv: PodmanEnv) -> None:
    res = penv.ok("run", "--rm", NONE, *USERNS, "--user", "1000", IMAGE, "sh", "-c",
                  "id -u; echo data > /dev/null && echo devnull-ok; "
                  "head -c 4 /dev/zero | wc -c; mknod /tmp/x c 1 3; echo mknod=$?")
    assert res.stdout.split() == ["1000", "devnull-ok", "4", "mknod=1"], res.explain()
    assert "mknod: /tmp/x: Operation not permitted" in res.stderr, res.explain()


def test_uidmap_host_view(penv: PodmanEnv) -> None:
    cid = cid_of(penv.ok("run", "-d", NONE, *USERNS, "--user", "1000", IMAGE,
                         "sleep", "1000"))
    try:
        pid = int(inspect(penv, cid, "{{.State.Pid}}"))
        with open(f"/proc/{pid}/status") as f:
            status = dict(ln.split(":", 1) for ln in f)
        assert status["Uid"].split() == ["101000"] * 4
        assert status["Gid"].split() == ["101000"] * 4
        with open(f"/proc/{pid}/uid_map") as f:
            assert f.read().split() == ["0", "100000", "65536"]
    finally:
        penv.podman("rm", "-f", "-t", "0", cid)
