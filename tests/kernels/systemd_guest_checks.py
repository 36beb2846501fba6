"""The checks of the systemd guest (tests/kernels/systemd_guest.py), run inside it.

Runs as the guest unit sdguest-checks.service (after multi-user.target) under the
guest's systemd, with the Debian fixture machine at /var/lib/machines/debian and
uspawn installed in /opt/uspawn-venv (/usr/local/bin/uspawn). Stdlib only. Each
result is one JSON line on /dev/ttyS1 (the host reads it from qemu's stdout) as
soon as it is known:

    {"check": NAME, "status": "pass"|"fail", "detail": TEXT, "seconds": S}
    {"info": NAME, "value": ...}

Every wait is an event with a deadline: a command's exit (subprocess timeout),
a journal entry (`journalctl --follow` read through select()), or a pidfd. One
exception: detached-registered polls `uspawn list` once a second (with the same
deadline) for the machine its supervisor rebooted, which writes no journal entry.

Phase 1 (sdguest.phase=1 on the kernel command line): install the units as an
admin would, then start/ready, the console in the journal, the machine's own
journal, `systemctl reboot` inside, `systemctl restart`, `systemctl kill` (main
only; SIGKILL to all; the default), stop with nothing left, `uspawn enable`, and
`systemctl reboot` of the guest. Phase 2: the enabled machine came up on its
own; it was stopped cleanly at the guest's shutdown; `uspawn disable`; stop;
`systemctl reboot` of the guest. Phase 3: the disabled machine stayed down.
"""

from __future__ import annotations

import glob
import json
import os
import re
import select
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from typing import Any

NAME = "debian"
UNIT = f"uspawn@{NAME}.service"
UNITS_SRC = "/mnt/work/sdguest/units"
UNIT_DIR = "/etc/systemd/system"
STATE_ROOT = "/run/uspawn"
START_TIMEOUT = 600.0  # a machine boot under TCG with a busy host

# systemd's MESSAGE_IDs (sd-messages.h, systemd 252).
MSG_STARTED = "39f53479d3a045ac8e11786248231fbf"
MSG_STOPPED = "9d1aaa27d60140bd96365438aad20286"
MSG_RESTART_SCHEDULED = "5eb03494b6584870a536b337290809b3"
MSG_UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"
MSG_UNIT_FAILURE = "d9b373ed55a64feb8242e02dbe79a49c"
MSG_PROCESS_EXIT = "98e322203f7a4ed290d09fe03c09fe15"


def cmdline(key: str, default: str) -> str:
    with open("/proc/cmdline") as f:
        for w in f.read().split():
            if w.startswith(f"sdguest.{key}="):
                return w.split("=", 1)[1]
    return default


class Out:
    def __init__(self) -> None:
        try:
            fd = os.open("/dev/ttyS1", os.O_WRONLY | os.O_NOCTTY)
            attrs = termios.tcgetattr(fd)
            attrs[1] &= ~termios.OPOST  # oflag: no \n -> \r\n
            attrs[3] &= ~(termios.ECHO | termios.ICANON)
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            self.fd: int | None = fd
        except OSError as exc:
            print(f"sdguest: no /dev/ttyS1: {exc}", flush=True)
            self.fd = None

    def emit(self, obj: dict[str, Any]) -> None:
        line = json.dumps(obj, sort_keys=True)
        print(f"sdguest: {line}", flush=True)
        if self.fd is not None:
            data = (line + "\n").encode()
            while data:
                data = data[os.write(self.fd, data):]
            termios.tcdrain(self.fd)

    def info(self, name: str, value: Any) -> None:
        self.emit({"info": name, "value": value})

    def check(self, name: str, fn: Callable[[], tuple[bool, str]]) -> bool:
        t0 = time.monotonic()
        try:
            ok, detail = fn()
        except subprocess.TimeoutExpired as exc:
            ok, detail = False, f"timed out after {exc.timeout:.0f} s: {exc.cmd}"
        except Exception as exc:  # every failure is a result
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.emit({"check": name, "status": "pass" if ok else "fail", "detail": detail,
                   "seconds": round(time.monotonic() - t0, 1)})
        return ok


def run(cmd: list[str], timeout: float = 120, check: bool = False,
        ) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: "
                           f"{(r.stdout + r.stderr).strip()[-600:]}")
    return r


def out(cmd: list[str], timeout: float = 120) -> str:
    return run(cmd, timeout).stdout.strip()


def show(prop: str, unit: str = UNIT) -> str:
    return out(["systemctl", "show", "-p", prop, "--value", unit])


def uspawn(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(["/usr/local/bin/uspawn", *args], timeout)


def machine_state() -> str:
    """The machine's own systemd, asked from inside (running/degraded once booted)."""
    r = uspawn("exec", NAME, "--", "systemctl", "is-system-running", timeout=60)
    return (r.stdout.strip() or r.stderr.strip()[-200:]) or f"exit {r.returncode}"


def row() -> dict[str, Any] | None:
    r = uspawn("list", "--json")
    if r.returncode != 0:
        return None
    for x in json.loads(r.stdout):
        if x.get("name") == NAME:
            return dict(x)
    return None


def cursor() -> str:
    r = run(["journalctl", "-n", "1", "--show-cursor", "-q", "-o", "cat"])
    for line in r.stdout.splitlines():
        if line.startswith("-- cursor: "):
            return line.removeprefix("-- cursor: ").strip()
    return ""


def journal(after: str, unit: str = UNIT, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    cmd = ["journalctl", "-o", "json", "-u", unit, *extra]
    if after:
        cmd += ["--after-cursor", after]
    return [json.loads(x) for x in out(cmd).splitlines() if x.startswith("{")]


def wait_journal(after: str, want: list[Callable[[dict[str, Any]], bool]], timeout: float,
                 unit: str = UNIT) -> list[dict[str, Any]]:
    """Follow the unit's journal after `after` until each predicate in `want` has
    matched an entry, in order; the matching entries (a TimeoutError otherwise)."""
    cmd = ["journalctl", "-f", "-o", "json", "-u", unit, "--no-tail"]
    if after:
        cmd += ["--after-cursor", after]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert p.stdout is not None
    got: list[dict[str, Any]] = []
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while len(got) < len(want):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"journal: {len(got)} of {len(want)} events in "
                                   f"{timeout:.0f} s; got {[messages(got)]}")
            ready, _, _ = select.select([p.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("journalctl -f exited")
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                if not raw.startswith(b"{"):
                    continue
                e = json.loads(raw)
                if len(got) < len(want) and want[len(got)](e):
                    got.append(e)
    finally:
        p.kill()
        p.wait()
    return got


def message(e: dict[str, Any]) -> str:
    """MESSAGE as text: journalctl -o json gives it as a list of byte values when it
    holds control characters (a console line ends in \\r: the pty's onlcr)."""
    m = e.get("MESSAGE", "")
    if isinstance(m, list):
        return bytes(b & 0xFF for b in m if isinstance(b, int)).decode(errors="replace")
    return str(m)


def messages(entries: list[dict[str, Any]]) -> list[str]:
    return [message(e).strip()[:120] for e in entries]


def msg_id(mid: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("MESSAGE_ID") == mid


def wait_started(after: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    return wait_journal(after, [lambda e: e.get("MESSAGE_ID") == MSG_STARTED
                                and e.get("JOB_RESULT") == "done"], timeout)[0]


def machine_ready() -> tuple[bool, str]:
    st = machine_state()
    active = out(["systemctl", "is-active", UNIT])
    r = row()
    ready = bool(r and r.get("ready"))
    ok = active == "active" and st in ("running", "degraded") and ready
    return ok, f"unit {active}, machine's systemd {st}, uspawn list ready={ready}"


def leftovers() -> list[str]:
    """What a stopped machine must not leave: cgroups, state, veth, processes."""
    left = []
    for d in glob.glob("/sys/fs/cgroup/**/", recursive=True):
        base = os.path.basename(d.rstrip("/"))
        if NAME in base and base != "system-uspawn.slice":
            left.append(f"cgroup {d}")
    if os.path.isdir("/sys/fs/cgroup/uspawn") and os.listdir("/sys/fs/cgroup/uspawn"):
        subs = [e for e in os.listdir("/sys/fs/cgroup/uspawn")
                if os.path.isdir(f"/sys/fs/cgroup/uspawn/{e}")]
        left += [f"cgroup /sys/fs/cgroup/uspawn/{e}" for e in subs]
    cdir = f"{STATE_ROOT}/containers"
    if os.path.isdir(cdir) and os.listdir(cdir):
        left.append(f"state {cdir}: {sorted(os.listdir(cdir))}")
    links = out(["ip", "-o", "link", "show"])
    left += [f"link {m}" for m in re.findall(r"^\d+: (ve-[^:@ ]+)", links, re.M)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        text = b" ".join(argv).decode(errors="replace")
        if "uspawn" in text and "systemd_guest_checks" not in text and "lxcfs" not in text:
            left.append(f"process {pid}: {text[:100]}")
    r = row()
    if r is not None:
        left.append(f"uspawn list: {r.get('name')} {r.get('state')}")
    if registered():
        left.append(f"machinectl: {NAME} still registered")
    return left


# ------------------------------------------------------------------ phase 1


def install_units() -> tuple[bool, str]:
    for unit in ("uspawn@.service", "uspawn-machines.target"):
        with open(f"{UNITS_SRC}/{unit}", "rb") as src, open(f"{UNIT_DIR}/{unit}", "wb") as dst:
            dst.write(src.read())
    run(["systemctl", "daemon-reload"], check=True)
    v = out(["systemd-analyze", "verify", UNIT, "uspawn-machines.target"])
    return True, f"installed; systemd-analyze verify: {v or 'clean'}"


def check_start() -> tuple[bool, str]:
    c = cursor()
    t0 = time.monotonic()
    r = run(["systemctl", "start", UNIT], START_TIMEOUT)
    took = time.monotonic() - t0
    if r.returncode != 0:
        return False, f"systemctl start exited {r.returncode}: {r.stderr.strip()[-400:]}; " \
            f"journal: {messages(journal(c))[-15:]}"
    ok, detail = machine_ready()
    # Active only once the machine's own systemd finished its boot transaction: the
    # host unit entered `active` after the machine reached multi-user.target, within
    # moments of the machine manager's FinishTimestamp (systemd sends READY=1 as its
    # last jobs finish, just before it takes that timestamp). One CLOCK_MONOTONIC:
    # the container has no time namespace.
    active_at = int(show("ActiveEnterTimestampMonotonic") or 0)
    r2 = uspawn("exec", NAME, "--", "systemctl", "show", "-p", "FinishTimestampMonotonic",
                "--value", timeout=60)
    r3 = uspawn("exec", NAME, "--", "systemctl", "show", "-p", "ActiveEnterTimestampMonotonic",
                "--value", "multi-user.target", timeout=60)
    finished_at = int(r2.stdout.strip() or 0)
    target_at = int(r3.stdout.strip() or 0)
    order = 0 < target_at <= active_at and abs(active_at - finished_at) < 2_000_000
    status = show("StatusText")
    return ok and order, (f"systemctl start returned 0 after {took:.1f} s; {detail}; in the "
                          f"machine multi-user.target reached at {target_at / 1e6:.3f} s and "
                          f"startup finished at {finished_at / 1e6:.3f} s, the host unit active "
                          f"at {active_at / 1e6:.3f} s (CLOCK_MONOTONIC); Type={show('Type')}, "
                          f"StatusText={status!r}")


def check_console_journal() -> tuple[bool, str]:
    """The machine's console in the unit's journal: its boot messages, and a line
    written to /dev/console in the running machine (waited for in the journal)."""
    text = out(["journalctl", "-u", UNIT, "-o", "cat", "--no-pager"])
    found = {w: w in text for w in ("Welcome to", "Reached target")}
    from_machine = [x for x in text.splitlines() if not x.startswith(("uspawn", "Started",
                                                                      "Starting"))]
    seen, how = console_marker("")
    if not seen:  # is it console-getty's agetty (vhangup of the console)?
        run(["/usr/local/bin/uspawn", "exec", NAME, "--", "systemctl", "stop",
             "console-getty.service"], 60)
        seen2, how2 = console_marker("-2")
        how += f"; after `systemctl stop console-getty` in the machine: {seen2}, {how2}"
    return all(found.values()) and seen, (
        f"journalctl -u {UNIT}: boot messages {found}, {len(from_machine)} lines not from "
        f"systemd or uspawn (e.g. {from_machine[:2]}); a line written to /dev/console in "
        f"the machine reached the journal within 30 s: {seen} ({how})")


def console_marker(tag: str) -> tuple[bool, str]:
    c = cursor()
    marker = f"sdguest-console-marker{tag}-{os.getpid()}"
    # A line of its own: the leading newline ends whatever partial line is on the
    # console (console-getty's "debian login: " prompt), which journald, being
    # line-based, holds until a newline comes.
    r = uspawn("exec", NAME, "--", "sh", "-c", f"printf '\\n%s\\n' {marker} > /dev/console",
               timeout=60)
    try:
        wait_journal(c, [lambda e: marker in message(e)], 30)
        return True, f"exec exit {r.returncode}"
    except TimeoutError:
        tail = journal("", extra=("-n", "4"))
        return False, (f"exec exit {r.returncode}; journal tail "
                       f"{[(e.get('_PID'), message(e)[-70:]) for e in tail]}")


def check_machine_journal() -> tuple[bool, str]:
    """The machine's own journal, read from the host through the tree (persistent
    journal: /var/log/journal exists in the fixture)."""
    d = f"/var/lib/machines/{NAME}/var/log/journal"
    r = run(["journalctl", "-D", d, "-b", "0", "-o", "cat", "-n", "400", "--no-pager"])
    lines = r.stdout.splitlines()
    hit = [x for x in lines if "Startup finished" in x or "Reached target" in x]
    ok = r.returncode == 0 and bool(hit)
    mr = run(["journalctl", "-M", NAME, "-n", "3", "-o", "cat", "--no-pager"])
    return ok, (f"journalctl -D {d}: {len(lines)} lines, e.g. {hit[-1:] or lines[-2:]}; "
                f"journalctl -M {NAME}: exit {mr.returncode} "
                f"{(mr.stdout + mr.stderr).strip()[-160:]!r}")


def registered() -> dict[str, str]:
    """machinectl show NAME: machined's properties of the machine ({} if none)."""
    r = run(["machinectl", "show", NAME, "--no-pager"], 60)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line) \
        if r.returncode == 0 else {}


def machine_shell(command: str, timeout: float = 120) -> tuple[int, str]:
    """`machinectl shell NAME /bin/sh -c COMMAND`: stdin an open pipe (EOF would hang
    the pty up), the output read until it exits."""
    rfd, wfd = os.pipe()
    try:
        p = subprocess.Popen(["machinectl", "shell", "-q", NAME, "/bin/sh", "-c", command],
                             stdin=rfd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        os.close(rfd)
        rfd = -1
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            output, _ = p.communicate()
        return p.returncode, output.decode(errors="replace")
    finally:
        os.close(wfd)
        if rfd >= 0:
            os.close(rfd)


def check_machined() -> tuple[bool, str]:
    """Registered with systemd-machined for its unit, as nspawn --keep-unit: machinectl
    list/status/shell and journalctl -M work."""
    r = row() or {}
    props = registered()
    listed = out(["machinectl", "list", "--no-legend", "--no-pager"])
    status = out(["machinectl", "status", NAME, "--no-pager", "-n", "0"])
    code, shell = machine_shell("echo shell-ok-$((40+2)); id -u; cat /proc/self/uid_map")
    jm = run(["journalctl", "-M", NAME, "-n", "5", "-o", "cat", "--no-pager"], 60)
    with open(f"/proc/{r.get('pid')}/cgroup") as f:
        init_cg = f.read().strip()
    ok = (props.get("Unit") == UNIT and props.get("Leader") == str(r.get("pid"))
          and props.get("Class") == "container" and props.get("Service") == "uspawn"
          and re.search(rf"^{NAME}\s+container\s+uspawn", listed, re.M) is not None
          and f"Unit: {UNIT}" in status and "shell-ok-42" in shell and code == 0
          and jm.returncode == 0 and len(jm.stdout.splitlines()) == 5
          and init_cg.endswith(f"/{UNIT}/payload/init.scope"))
    return ok, (f"machinectl show: Unit={props.get('Unit')} Leader={props.get('Leader')} "
                f"(record pid {r.get('pid')}) Class={props.get('Class')} "
                f"Service={props.get('Service')} RootDirectory={props.get('RootDirectory')}; "
                f"list: {listed.strip()!r}; status head: {status.splitlines()[:4]}; "
                f"init cgroup {init_cg}; shell exit {code}: {shell.strip()[-200:]!r}; "
                f"journalctl -M exit {jm.returncode}: {jm.stdout.splitlines()[-2:]} "
                f"{jm.stderr.strip()[-150:]!r}")


def check_detached_registered() -> tuple[bool, str]:
    """`uspawn boot --detach` outside any unit: the machine gets a transient
    uspawn-NAME.scope (machine.slice, Delegate=yes) and is registered for it; a
    reboot inside registers the new leader; `uspawn stop` leaves nothing (scope,
    registration, cgroups, state)."""
    scope = f"uspawn-{NAME}.scope"
    r = uspawn("boot", "--detach", "--network=veth", "--ready-timeout", str(START_TIMEOUT),
               NAME, timeout=START_TIMEOUT + 30)
    if r.returncode != 0:
        return False, f"boot --detach exit {r.returncode}: {r.stderr.strip()[-300:]}"
    first = dict(registered())
    rec = row() or {}
    code, shell = machine_shell("echo detached-ok")
    slice_ = show("Slice", scope)
    rb = uspawn("exec", NAME, "--", "systemctl", "reboot", timeout=60)
    deadline = time.monotonic() + START_TIMEOUT
    again: dict[str, Any] = {}
    while time.monotonic() < deadline:
        again = row() or {}
        if again.get("restarts") == 1 and again.get("ready"):
            break
        time.sleep(1)
    second = dict(registered())
    st = uspawn("stop", NAME, timeout=200)
    left = leftovers()
    scope_state = out(["systemctl", "is-active", scope])
    ok = (first.get("Unit") == scope and first.get("Leader") == str(rec.get("pid"))
          and slice_ == "machine.slice" and code == 0 and "detached-ok" in shell
          and second.get("Unit") == scope and second.get("Leader") == str(again.get("pid"))
          and second.get("Leader") != first.get("Leader") and again.get("restarts") == 1
          and st.returncode == 0 and not left and scope_state != "active")
    return ok, (f"boot --detach: Unit={first.get('Unit')} Leader={first.get('Leader')} "
                f"(record pid {rec.get('pid')}), Slice={slice_}; shell exit {code} "
                f"{shell.strip()[-60:]!r}; reboot inside (exec exit {rb.returncode}): "
                f"restarts={again.get('restarts')}, Unit={second.get('Unit')} "
                f"Leader={second.get('Leader')} (record pid {again.get('pid')}); stop exit "
                f"{st.returncode}; scope {scope_state}; left: {left or 'nothing'}")


def check_machined_after_reboot() -> tuple[bool, str]:
    """After `systemctl reboot` inside: registered again, with the new leader."""
    r = row() or {}
    props = registered()
    ok = props.get("Unit") == UNIT and props.get("Leader") == str(r.get("pid"))
    return ok, f"Unit={props.get('Unit')} Leader={props.get('Leader')} record pid {r.get('pid')}"


def check_reboot_inside() -> tuple[bool, str]:
    before = row() or {}
    pid_before = show("MainPID")
    restarts_before = int(show("NRestarts") or 0)
    c = cursor()
    run(["systemd-analyze", "log-level", "debug"])  # "Main process exited" is debug on success
    try:
        r = uspawn("exec", NAME, "--", "systemctl", "reboot", timeout=60)
        ev = wait_journal(c, [
            lambda e: e.get("EXIT_STATUS") == "133" or "status=133" in message(e),
            msg_id(MSG_RESTART_SCHEDULED),
            lambda e: e.get("MESSAGE_ID") == MSG_STARTED and e.get("JOB_RESULT") == "done",
        ], START_TIMEOUT)
    finally:
        run(["systemd-analyze", "log-level", "info"])
    failed = [e for e in journal(c) if e.get("MESSAGE_ID") == MSG_UNIT_FAILURE]
    ok, detail = machine_ready()
    after = row() or {}
    same = {k: (before.get(k), after.get(k)) for k in ("uid_base", "addresses", "rootfs")}
    same_ok = all(a == b for a, b in same.values())
    restarts = int(show("NRestarts") or 0)
    return ok and same_ok and not failed and restarts == restarts_before + 1, (
        f"exec reboot exit {r.returncode}; journal: {messages(ev)}; failures {messages(failed)}; "
        f"MainPID {pid_before} -> {show('MainPID')}, NRestarts {restarts_before} -> "
        f"{restarts}; {detail}; before/after {same}")


def check_restart() -> tuple[bool, str]:
    before = row() or {}
    c = cursor()
    t0 = time.monotonic()
    r = run(["systemctl", "restart", UNIT], START_TIMEOUT)
    took = time.monotonic() - t0
    entries = journal(c)
    bad = [e for e in entries if e.get("MESSAGE_ID") == MSG_UNIT_FAILURE]
    clean = any(e.get("MESSAGE_ID") == MSG_UNIT_SUCCESS for e in entries)
    ok, detail = machine_ready()
    after = row() or {}
    return r.returncode == 0 and ok and clean and not bad, (
        f"systemctl restart exit {r.returncode} after {took:.1f} s; old run deactivated "
        f"successfully: {clean}; failures {messages(bad)}; {detail}; uid_base "
        f"{before.get('uid_base')} -> {after.get('uid_base')}")


def check_kill_main() -> tuple[bool, str]:
    """SIGTERM to uspawn only: a clean poweroff, the unit inactive (not restarted)."""
    c = cursor()
    run(["systemctl", "kill", "--kill-whom=main", UNIT], check=True)
    ev = wait_journal(c, [lambda e: e.get("MESSAGE_ID") in (MSG_UNIT_SUCCESS, MSG_UNIT_FAILURE,
                                                           MSG_RESTART_SCHEDULED)], 180)
    state = out(["systemctl", "is-active", UNIT])
    left = leftovers()
    return (ev[0].get("MESSAGE_ID") == MSG_UNIT_SUCCESS and state == "inactive" and not left,
            f"journal: {messages(ev)}; unit {state}, Result={show('Result')}, "
            f"ExecMainStatus={show('ExecMainStatus')}; left: {left or 'nothing'}")


def check_kill_all() -> tuple[bool, str]:
    """SIGKILL to every process of the unit: Restart=on-failure boots it again, and
    what the killed run left (cgroup, record, veth, leases) is reclaimed."""
    r = run(["systemctl", "start", UNIT], START_TIMEOUT)
    if r.returncode != 0:
        return False, f"systemctl start exited {r.returncode}: {r.stderr.strip()[-300:]}"
    c = cursor()
    n0 = int(show("NRestarts") or 0)
    run(["systemctl", "kill", "-s", "SIGKILL", UNIT], check=True)
    ev = wait_journal(c, [
        msg_id(MSG_UNIT_FAILURE), msg_id(MSG_RESTART_SCHEDULED),
        lambda e: e.get("MESSAGE_ID") == MSG_STARTED and e.get("JOB_RESULT") == "done",
    ], START_TIMEOUT)
    ok, detail = machine_ready()
    links = re.findall(r"^\d+: (ve-[^:@ ]+)", out(["ip", "-o", "link"]), re.M)
    records = os.listdir(f"{STATE_ROOT}/containers")
    old = sorted(os.listdir("/sys/fs/cgroup/uspawn")) if os.path.isdir(
        "/sys/fs/cgroup/uspawn") else []
    old = [x for x in old if os.path.isdir(f"/sys/fs/cgroup/uspawn/{x}")]
    unit_cg = f"/sys/fs/cgroup/machine.slice/{UNIT}"
    cg = sorted(e.name for e in os.scandir(unit_cg) if e.is_dir()) \
        if os.path.isdir(unit_cg) else []
    one = links == [f"ve-{NAME}"] and len(records) == 1 and cg == ["payload", "supervisor"] \
        and not old
    return ok and one and int(show("NRestarts") or 0) == n0 + 1, (
        f"journal: {messages(ev)}; {detail}; veths {links}, records {records}, "
        f"cgroups {unit_cg}/{cg}, /sys/fs/cgroup/uspawn/{old}")


def check_kill_default() -> tuple[bool, str]:
    """`systemctl kill` as typed (SIGTERM to every process of the unit): what happens
    must be a clean end (inactive, nothing left) or a restart to a ready machine."""
    c = cursor()
    run(["systemctl", "kill", UNIT], check=True)
    ev = wait_journal(c, [lambda e: e.get("MESSAGE_ID") in (
        MSG_UNIT_SUCCESS, MSG_UNIT_FAILURE, MSG_RESTART_SCHEDULED)], 180)
    mid = ev[0].get("MESSAGE_ID")
    if mid == MSG_UNIT_SUCCESS:
        state = out(["systemctl", "is-active", UNIT])
        left = leftovers()
        return state == "inactive" and not left, (
            f"clean poweroff: {messages(ev)}; unit {state}; left: {left or 'nothing'}")
    more = wait_journal(c, [msg_id(MSG_RESTART_SCHEDULED), lambda e: e.get(
        "MESSAGE_ID") == MSG_STARTED and e.get("JOB_RESULT") == "done"], START_TIMEOUT)
    ok, detail = machine_ready()
    run(["systemctl", "stop", UNIT], START_TIMEOUT)
    return ok, f"restarted: {messages(ev + more)}; {detail}"


def check_stop() -> tuple[bool, str]:
    if out(["systemctl", "is-active", UNIT]) != "active":
        r = run(["systemctl", "start", UNIT], START_TIMEOUT)
        if r.returncode != 0:
            return False, f"systemctl start exited {r.returncode}: {r.stderr.strip()[-300:]}"
    c = cursor()
    t0 = time.monotonic()
    r = run(["systemctl", "stop", UNIT], 200)
    took = time.monotonic() - t0
    state = out(["systemctl", "is-active", UNIT])
    entries = journal(c)
    clean = any(e.get("MESSAGE_ID") == MSG_UNIT_SUCCESS for e in entries)
    powered_off = [m for m in messages(entries) if "Power" in m or "Reached target" in m][-2:]
    left = leftovers()
    return r.returncode == 0 and state == "inactive" and clean and not left, (
        f"systemctl stop exit {r.returncode} after {took:.1f} s; unit {state}, "
        f"Result={show('Result')}, ExecMainStatus={show('ExecMainStatus')}, deactivated "
        f"successfully: {clean}; console: {powered_off}; left: {left or 'nothing'}")


def check_enable() -> tuple[bool, str]:
    r = uspawn("enable", NAME)
    en = out(["systemctl", "is-enabled", UNIT])
    target = out(["systemctl", "is-enabled", "uspawn-machines.target"])
    # Started through the target (what boot does), and left running for the reboot.
    s = run(["systemctl", "start", "uspawn-machines.target"], START_TIMEOUT)
    active = out(["systemctl", "is-active", UNIT])
    return (r.returncode == 0 and en == "enabled" and target == "enabled"
            and s.returncode == 0 and active == "active"), (
        f"uspawn enable exit {r.returncode}: {(r.stdout + r.stderr).strip()!r}; "
        f"is-enabled {UNIT}: {en}, uspawn-machines.target: {target}; start of the "
        f"target: exit {s.returncode}, {UNIT} {active}")


# ------------------------------------------------------------------ phase 2


def check_autostart() -> tuple[bool, str]:
    ok, detail = machine_ready()
    since = show("ActiveEnterTimestamp")
    wanted = out(["systemctl", "show", "-p", "Wants", "--value", "uspawn-machines.target"])
    return ok, f"{detail}; active since {since}; uspawn-machines.target wants: {wanted}"


def check_stopped_at_shutdown() -> tuple[bool, str]:
    entries = [json.loads(x) for x in out(
        ["journalctl", "-b", "-1", "-o", "json", "-u", UNIT]).splitlines() if x.startswith("{")]
    # The last run of the unit in that boot (the one the shutdown stopped): after its
    # "Started", a successful deactivation and no failure.
    ids = [e.get("MESSAGE_ID") for e in entries]
    last = len(ids) - ids[::-1].index(MSG_STARTED) if MSG_STARTED in ids else 0
    clean = MSG_UNIT_SUCCESS in ids[last:] and MSG_UNIT_FAILURE not in ids[last:]
    tail = messages(entries[last:])
    return clean, f"previous boot's journal for {UNIT}: ... {tail}"


def check_disable() -> tuple[bool, str]:
    r = uspawn("disable", NAME)
    en = out(["systemctl", "is-enabled", UNIT])
    link = f"{UNIT_DIR}/uspawn-machines.target.wants/{UNIT}"
    active = out(["systemctl", "is-active", UNIT])
    return r.returncode == 0 and en == "disabled" and not os.path.lexists(link), (
        f"uspawn disable exit {r.returncode}: {(r.stdout + r.stderr).strip()!r}; "
        f"is-enabled: {en}; {link} exists: {os.path.lexists(link)}; unit still {active} "
        "(disable does not stop, as machinectl disable)")


def check_not_autostarted() -> tuple[bool, str]:
    """Phase 3, after `uspawn disable` and a reboot: the machine stays down."""
    active = out(["systemctl", "is-active", UNIT])
    enabled = out(["systemctl", "is-enabled", UNIT])
    this_boot = out(["journalctl", "-b", "0", "-u", UNIT, "-o", "cat", "-q"])
    r = row()
    return active == "inactive" and enabled == "disabled" and not this_boot and r is None, (
        f"after the reboot: {UNIT} {active}, is-enabled {enabled}; its journal in this boot: "
        f"{this_boot.splitlines()[:2] or 'empty'}; uspawn list: {r or 'no machine'}")


# ------------------------------------------------------------------ main


def boot_info(o: Out) -> tuple[bool, str]:
    r = run(["systemctl", "is-system-running", "--wait"], 600)
    fs = out(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"])
    ver = out(["systemctl", "--version"]).splitlines()[0]
    failed = out(["systemctl", "list-units", "--failed", "--plain", "--no-legend"])
    uptime = open("/proc/uptime").read().split()[0]
    o.info("guest", {"kernel": os.uname().release, "systemd": ver, "cgroupfs": fs,
                     "pid1": os.readlink("/proc/1/exe"), "uptime": uptime})
    return (r.stdout.strip() in ("running", "degraded") and fs == "cgroup2fs"
            and os.readlink("/proc/1/exe").endswith("/systemd")), (
        f"is-system-running: {r.stdout.strip()} after {uptime} s; /sys/fs/cgroup: {fs}; "
        f"pid 1 {os.readlink('/proc/1/exe')}; {ver}; failed units: {failed or 'none'}")


def main() -> int:
    o = Out()
    phase = cmdline("phase", "1")
    o.info("phase", phase)
    o.check("guest-boot", lambda: boot_info(o))
    if phase == "console":  # a short boot to look at the console alone
        o.check("install-units", install_units)
        if o.check("start-ready", check_start):
            o.check("console-in-journal", check_console_journal)
        return finish(o, "poweroff")
    if phase == "machined":  # a short boot for machined registration alone
        o.check("install-units", install_units)
        if o.check("start-ready", check_start):
            o.check("machined", check_machined)
            if o.check("reboot-inside", check_reboot_inside):
                o.check("machined-after-reboot", check_machined_after_reboot)
        if o.check("stop-clean", check_stop):
            o.check("detached-registered", check_detached_registered)
        return finish(o, "poweroff")
    if phase == "1":
        if not o.check("install-units", install_units):
            return finish(o, "poweroff")
        if o.check("start-ready", check_start):
            o.check("console-in-journal", check_console_journal)
            o.check("machine-journal", check_machine_journal)
            o.check("machined", check_machined)
            if o.check("reboot-inside", check_reboot_inside):
                o.check("machined-after-reboot", check_machined_after_reboot)
            o.check("restart", check_restart)
            o.check("kill-main", check_kill_main)
            o.check("kill-sigkill-all", check_kill_all)
            o.check("kill-default", check_kill_default)
        if o.check("stop-clean", check_stop):
            o.check("detached-registered", check_detached_registered)
        o.check("enable", check_enable)
        return finish(o, "reboot")
    if phase == "3":
        o.check("not-autostarted", check_not_autostarted)
        return finish(o, "poweroff")
    o.check("autostart", check_autostart)
    o.check("stopped-at-shutdown", check_stopped_at_shutdown)
    o.check("disable", check_disable)
    o.check("stop-clean", check_stop)
    return finish(o, "reboot")


def finish(o: Out, how: str) -> int:
    o.info("rebooting" if how == "reboot" else "powering-off", int(time.monotonic()))
    os.sync()
    subprocess.run(["systemctl", "--no-block", how], check=False, timeout=60)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # the host must hear about it
        print(f"sdguest: {type(exc).__name__}: {exc}", flush=True)
        subprocess.run(["systemctl", "--no-block", "poweroff"], check=False, timeout=60)
        sys.exit(1)
