"""Hostile payloads: what a process running as the container's root tries from inside.

The payload is container root with the default (nspawn-like) capability set, so it
holds CAP_SYS_ADMIN in its own user namespace and may unmount or remount anything in
its own mount namespace. Each test therefore also tries the "lift the mask first"
variant: the host must stay untouched because the kernel's user-namespace checks,
seccomp and the missing host objects say no, not only because a path is masked.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import processes_in_cgroup_named
from waits import tty_pending, wait_exit, wait_state

from .conftest import REFUSED, SECRET, TIMEOUT, assert_no_traceback, results

if TYPE_CHECKING:
    from conftest import Runner

    from .conftest import Attacker, HostGuard


def _refused(rep: dict[str, str], prefix: str) -> None:
    keys = [k for k in rep if k.startswith(prefix)]
    assert keys, f"the payload reported nothing for {prefix!r}"
    for k in keys:
        assert rep[k] in REFUSED, f"{k}: {rep[k]} (expected a refusal)"


# --- fds, cwd, environment ---------------------------------------------------------


def test_no_leaked_fds_or_host_paths(attack: Attacker, host: HostGuard, tree: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """CVE-2024-21626: the payload (pid 1, right after execve) holds stdio and nothing
    else, and none of its fds, its cwd or its root names a host path."""
    monkeypatch.setenv("USPAWN_ATTACK_HOST_ENV", "leaked")
    assert attack.ok("ls", "/proc/self/fd").split() == ["0", "1", "2", "3"]  # 3: ls's dir
    out = attack.ok("ls", "-l", "/proc/self/fd/", "/proc/self/cwd", "/proc/self/root",
                    "/proc/self/exe")
    links = {ln.split()[-3].rsplit("/", 1)[-1]: ln.split()[-1]
             for ln in out.splitlines() if " -> " in ln}
    assert sorted(links) == ["0", "1", "2", "cwd", "exe", "root"], out  # fd 3: ls's, gone
    for n in ("0", "1", "2"):
        assert re.fullmatch(r"pipe:\[\d+\]", links[n]), links
    assert links["cwd"] == links["root"] == "/"
    assert links["exe"] == "/bin/busybox"
    # A long-running init: what it still holds later, and what its children see.
    rep = results(attack.sh("sleep 0.1; echo \"init: $(ls -l /proc/1/fd/ | grep -c -- '->')\"; "
                            "echo \"cwd: $(readlink /proc/1/cwd) $(readlink /proc/1/root)\"; "
                            "echo \"env: $(env | cut -d= -f1 | sort | tr '\\n' ' ')\""))
    assert rep["cwd"] == "/ /"
    assert "USPAWN_ATTACK_HOST_ENV" not in rep["env"]
    assert set(rep["env"].split()) <= {"PATH", "HOME", "container", "PWD", "SHLVL"}
    assert str(host.tmp_path) not in out and str(tree) not in out
    host.assert_untouched()


# --- /proc/sys, /sys, sysrq ----------------------------------------------------------

GLOBAL_SYSCTLS = {"kernel/core_pattern": "|/uspawn-attack-core %p",
                  "kernel/hostname": "uspawn-attack", "kernel/domainname": "uspawn-attack",
                  "kernel/sysrq": "1", "vm/overcommit_ratio": "1"}
NET_SYSCTLS = {"net/ipv4/ip_forward": "1", "net/ipv4/ping_group_range": "0 1"}


def test_proc_sys_writes_refused(attack: Attacker, host: HostGuard) -> None:
    writes = {**GLOBAL_SYSCTLS, **NET_SYSCTLS}
    phase1 = "; ".join(f'echo "w1 {k}: $(attackprobe write /proc/sys/{k} \'{v}\')"'
                       for k, v in writes.items())
    # Lift the read-only mount (container root owns its mount namespace) and mount
    # a fresh proc: only the kernel's own checks are left.
    lift = "umount /proc/sys; mkdir -p /tmp/p; mount -t proc proc /tmp/p"
    phase2 = "; ".join(
        f'echo "w2 {k}: $(attackprobe write /proc/sys/{k} \'{v}\')"; '
        f'echo "w3 {k}: $(attackprobe write /tmp/p/sys/{k} \'{v}\')"'
        for k, v in GLOBAL_SYSCTLS.items())
    net = "; ".join(f'echo "net {k}: $(attackprobe write /proc/sys/{k} \'{v}\')"'
                    for k, v in NET_SYSCTLS.items())
    rep = results(attack.sh(f"{phase1}; {lift}; {phase2}; {net}; "
                            "echo \"hostname: $(hostname)\""))
    for k in writes:  # read-only mount (EROFS) or not the host's root (EACCES)
        assert rep[f"w1 {k}"] in ("EROFS", "EACCES", "ENOENT"), (k, rep[f"w1 {k}"])
    _refused(rep, "w2 ")
    _refused(rep, "w3 ")
    # The container's own network namespace is its to tune; the host's stays as it was.
    assert {rep[f"net {k}"] for k in NET_SYSCTLS} <= {"ok", *REFUSED}
    host.assert_untouched()


def test_sys_writes_refused(attack: Attacker, host: HostGuard) -> None:
    files = {"/sys/kernel/rcu_expedited": "1",
             "/sys/module/printk/parameters/ignore_loglevel": "Y",
             "/sys/fs/cgroup/cgroup.procs": "0",
             "/sys/fs/cgroup/cgroup.subtree_control": "+pids",
             "/sys/fs/cgroup/cgroup.max.descendants": "0",
             "/sys/class/net/lo/mtu": "1280"}
    phase1 = "; ".join(f'echo "w1 {f}: $(attackprobe write {f} \'{v}\')"'
                       for f, v in files.items())
    lift = ("umount /sys/fs/cgroup; umount /sys; mkdir -p /tmp/s /tmp/c; "
            "mount -t sysfs sysfs /tmp/s; mount -t cgroup2 none /tmp/c")
    phase2 = "; ".join(
        [f'echo "w2 {f}: $(attackprobe write /tmp/s/{f} \'{v}\')"'
         for f, v in (("kernel/rcu_expedited", "1"),
                      ("module/printk/parameters/ignore_loglevel", "Y"))]
        + [f'echo "w3 {f}: $(attackprobe write /tmp/c/{f} \'{v}\')"'
           for f, v in (("cgroup.procs", "0"), ("cgroup.subtree_control", "+pids"),
                        ("cgroup.max.descendants", "0"))])
    rep = results(attack.sh(f"{phase1}; echo \"touch: $(touch /sys/kernel/x 2>/dev/null "
                            f"&& echo ok || echo refused)\"; {lift}; {phase2}"))
    for f in files:
        assert rep[f"w1 {f}"] in ("EROFS", "EACCES", "ENOENT"), (f, rep[f"w1 {f}"])
    assert rep["touch"] == "refused"
    _refused(rep, "w2 ")
    _refused(rep, "w3 ")
    host.assert_untouched()


def test_sysrq_trigger_refused(attack: Attacker, host: HostGuard) -> None:
    """Only the harmless 'h' (help) is ever written; the host may lack the file."""
    on_host = os.path.exists("/proc/sysrq-trigger")
    rep = results(attack.sh(
        "echo \"w1: $(attackprobe write /proc/sysrq-trigger h)\"; "
        "umount /proc/sysrq-trigger 2>/dev/null; mkdir -p /tmp/p; mount -t proc proc /tmp/p; "
        "echo \"w2: $(attackprobe write /proc/sysrq-trigger h)\"; "
        "echo \"w3: $(attackprobe write /tmp/p/sysrq-trigger h)\""))
    _refused(rep, "w")
    if on_host:
        assert rep["w1"] == "EROFS"
    else:
        assert set(rep.values()) == {"ENOENT"}
    host.assert_untouched()


# --- devices --------------------------------------------------------------------------


def _host_disk() -> tuple[int, int]:
    st = os.stat(__file__)
    return os.major(st.st_dev), os.minor(st.st_dev)


def test_mknod_char_and_block_refused(attack: Attacker, host: HostGuard, tree: Path) -> None:
    maj, mnr = _host_disk()
    nodes = {"mem": "c 1 1", "kmsg": "c 1 11", "tun": "c 10 200", "null": "c 1 3",
             "loop0": "b 7 0", "disk": f"b {maj} {mnr}"}
    script = "; ".join(f'echo "{d} {n}: $(attackprobe mknod {d}/{n} {spec})"'
                       for d in ("/tmp", "/root", "/dev") for n, spec in nodes.items())
    rep = results(attack.sh(script + "; mknod /root/m c 1 1 2>/dev/null; "
                            "echo \"busybox: $?\"; mkfifo /root/fifo && "
                            "echo \"fifo: $(stat -c %F /root/fifo)\""))
    for d in ("/tmp", "/root", "/dev"):
        for n in nodes:
            assert rep[f"{d} {n}"] == "EPERM", (d, n, rep[f"{d} {n}"])
    assert rep["busybox"] != "0"
    assert rep["fifo"] == "fifo"  # other file types still work
    assert not any((tree / "root" / n).exists() for n in nodes)
    host.assert_untouched()


def test_mount_host_block_device_refused(attack: Attacker, host: HostGuard) -> None:
    maj, mnr = _host_disk()
    rep = results(attack.sh(
        "echo \"blockdevs: $(find / -xdev -type b 2>/dev/null | wc -l)\"; "
        "echo \"devblock: $(find /dev -type b | wc -l)\"; "
        "echo \"loopctl: $(test -e /dev/loop-control && echo present || echo absent)\"; "
        f"echo \"mknod: $(attackprobe mknod /tmp/vda b {maj} {mnr})\"; "
        "echo \"m ext4: $(attackprobe mount /dev/vda /mnt ext4 -)\"; "
        "echo \"m ext4 null: $(attackprobe mount /dev/null /mnt ext4 -)\"; "
        "echo \"m xfs: $(attackprobe mount /dev/vda /mnt xfs -)\"; "
        "echo \"m btrfs: $(attackprobe mount /dev/vda /mnt btrfs -)\"; "
        "echo \"fs ext4: $(attackprobe fsmount ext4 /dev/vda)\"; "
        "echo \"fs vfat: $(attackprobe fsmount vfat /dev/vda)\"; "
        "dd if=/dev/zero of=/tmp/img bs=1024 count=2048 2>/dev/null; "
        "mount -o loop -t ext2 /tmp/img /mnt 2>/dev/null; echo \"loopmount: $?\"; "
        "echo \"mounted: $(grep -c -E ' - (ext[234]|xfs|btrfs|vfat) ' /proc/self/mountinfo)\""))
    assert rep["blockdevs"] == "0" and rep["devblock"] == "0"
    assert rep["loopctl"] == "absent"
    assert rep["mknod"] == "EPERM"
    _refused(rep, "m ")
    _refused(rep, "fs ")
    assert rep["loopmount"] != "0"
    assert rep["mounted"] == "1"  # only the rootfs itself (the host's ext4, idmapped)
    host.assert_untouched()


# --- cgroups ----------------------------------------------------------------------------


def test_cgroup_v1_release_agent(attack: Attacker, host: HostGuard) -> None:
    """CVE-2022-0492 and the classic release_agent escape: no v1 hierarchy is mounted
    in the container; the ones it may mount itself (existing hierarchies, through its
    cgroup namespace) are owned by host root and refuse every write."""
    hierarchies = ["memory", "name=systemd", "pids", "devices", "cpu"]
    script = [
        "echo \"v1mounts: $(grep -c ' - cgroup ' /proc/self/mountinfo)\"",
        "echo \"ra-visible: $(find /sys/fs/cgroup -name release_agent | wc -l)\"",
        "echo \"newhier: $(mkdir -p /tmp/n; "
        "attackprobe mount cgroup /tmp/n cgroup none,name=uspawnattack)\"",
    ]
    for i, h in enumerate(hierarchies):
        d = f"/tmp/cg{i}"
        script.append(
            f"mkdir -p {d}; r=$(attackprobe mount none {d} cgroup {h}); echo \"mount {h}: $r\"; "
            f"if [ \"$r\" = ok ]; then "
            f"for f in release_agent:/uspawn-attack-agent notify_on_release:1 cgroup.procs:0; "
            f"do n=${{f%%:*}}; v=${{f#*:}}; test -e {d}/$n && "
            f"echo \"write {h}/$n: $(attackprobe write {d}/$n $v)\"; done; "
            f"mkdir {d}/uspawn-attack 2>/dev/null && echo \"mkdir {h}: ok\" "
            f"|| echo \"mkdir {h}: EACCES\"; fi")
    try:
        rep = results(attack.sh("; ".join(script)))
    finally:
        for base in Path("/sys/fs/cgroup").glob("*/uspawn-attack"):
            base.rmdir()
    assert rep["v1mounts"] == "0"
    assert rep["ra-visible"] == "0"
    assert rep["newhier"] == "EPERM"
    for h in hierarchies:
        assert rep[f"mount {h}"] in {"ok", *REFUSED}
    _refused(rep, "write ")  # release_agent, notify_on_release, cgroup.procs
    _refused(rep, "mkdir ")
    assert not list(Path("/sys/fs/cgroup").glob("*/uspawn-attack"))
    host.assert_untouched()


# --- keyrings -------------------------------------------------------------------------


_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
_SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217}


def test_keyring_not_reachable(uspawn: Runner, tree: Path, host: HostGuard) -> None:
    """The runtime's session keyring holds a secret key (as a host login session
    would): the payload can neither use keyctl/add_key/request_key nor see the key
    in /proc/keys, even after unmasking it."""
    arch = platform.machine()
    if arch not in _SYS_KEYCTL:
        pytest.skip(f"syscall numbers for {arch} not listed")
    desc = f"uspawn-attack-{uuid.uuid4().hex[:8]}"

    def with_secret_key() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_KEYCTL[arch], 1, desc.encode() + b"-ring") < 0:  # JOIN_SESSION
            os._exit(99)
        if libc.syscall(_SYS_ADD_KEY[arch], b"user", desc.encode(), b"topsecret", 9, -3) < 0:
            os._exit(98)

    script = (f"echo \"session: $(attackprobe keyctl-session)\"; "
              f"echo \"user: $(attackprobe keyctl-user)\"; "
              f"echo \"join: $(attackprobe keyctl-join {desc}-2)\"; "
              f"echo \"add: $(attackprobe add-key {desc}-3)\"; "
              f"echo \"request: $(attackprobe request-key {desc})\"; "
              "echo \"masked: $(wc -c < /proc/keys)\"; "
              "umount /proc/keys; cat /proc/keys; mkdir -p /tmp/p; "
              "mount -t proc proc /tmp/p && cat /tmp/p/keys /tmp/p/key-users")
    r = subprocess.run(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--", "sh",
                                   "-c", script),
                       capture_output=True, text=True, input="", timeout=TIMEOUT,
                       preexec_fn=with_secret_key)
    assert_no_traceback(r)
    assert r.returncode == 0, r.stderr
    rep = results(r.stdout)
    for k in ("session", "user", "join", "add", "request"):
        assert rep[k] == "EPERM", (k, rep[k])  # seccomp: keyrings are not namespaced
    assert rep["masked"] == "0"
    assert desc not in r.stdout and "topsecret" not in r.stdout
    host.assert_untouched()


# --- processes: ptrace, /proc/<pid>, signals -------------------------------------------


def test_ptrace_and_signal_host_processes(uspawn: Runner, tree: Path, host: HostGuard) -> None:
    """Host pids (pytest, the uspawn runtime, their parent) are not visible inside;
    PTRACE_ATTACH and kill(pid, 0) on them find nothing."""
    p = uspawn.popen("run", "-D", str(tree), "-M", host.machine(), "--", "sh", "-c",
                     "read pids; for p in $pids; do "
                     "echo \"visible $p: $(test -d /proc/$p && echo yes || echo no)\"; "
                     "echo \"ptrace $p: $(attackprobe ptrace $p)\"; "
                     "echo \"kill0 $p: $(attackprobe kill0 $p)\"; done; "
                     "echo \"pids: $(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' ')\"; "
                     "echo \"init: $(cat /proc/1/comm)\"",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    host_pids = [os.getpid(), p.pid, os.getppid()]
    try:
        out, err = p.communicate(" ".join(map(str, host_pids)) + "\n", timeout=TIMEOUT)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err
    rep = results(out)
    for pid in host_pids:
        assert rep[f"visible {pid}"] == "no"
        assert rep[f"ptrace {pid}"] == "ESRCH"
        assert rep[f"kill0 {pid}"] == "ESRCH"
    inside = [int(x) for x in rep["pids"].split()]
    assert inside and max(inside) < 100 and not set(inside) & set(host_pids)
    assert rep["init"] == "sh"  # pid 1 is the container's init, not the host's
    host.assert_untouched()


def test_escape_via_proc_pid_root(uspawn: Runner, tree: Path, host: HostGuard) -> None:
    """/proc/1/root, /proc/self/root and /proc/<runtime pid>/root lead nowhere outside."""
    m = host.marker
    p = uspawn.popen("run", "-D", str(tree), "-M", host.machine(), "--", "sh", "-c",
                     "read rpid; "
                     f"echo \"p1root: $(cat /proc/1/root{m}/secret.txt 2>&1)\"; "
                     f"echo \"selfroot: $(cat /proc/self/root{m}/secret.txt 2>&1)\"; "
                     f"echo \"p1cwd: $(cat /proc/1/cwd/..{m}/secret.txt 2>&1)\"; "
                     f"echo \"direct: $(cat {m}/secret.txt 2>&1)\"; "
                     "echo \"runtime: $(ls /proc/$rpid/root/ 2>&1 >/dev/null | wc -l)"
                     " $(ls /proc/$rpid/root/ 2>/dev/null | wc -l)\"; "
                     "echo \"rootlist: $(ls /proc/1/root/ | tr '\\n' ' ')\"; "
                     "echo \"slash: $(ls / | tr '\\n' ' ')\"",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(f"{p.pid}\n", timeout=TIMEOUT)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0, err
    rep = results(out)
    assert SECRET.strip() not in out
    for k in ("p1root", "selfroot", "p1cwd", "direct"):
        assert "No such file" in rep[k], (k, rep[k])
    assert rep["runtime"] == "1 0"  # one error line, no entries
    assert rep["rootlist"] == rep["slash"]
    host.assert_untouched()


# --- filesystem escapes: chroot, pivot_root, open_by_handle_at ------------------------


CHROOT_PIVOT = r"""
M=$1
echo "chroot: $(attackprobe chroot-escape /tmp/jail $M/secret.txt | tr '\n' '|')"
echo "slash: $(ls / | sort | tr '\n' ' ')"
unshare -m sh -c 'mkdir -p /tmp/new && mount -t tmpfs none /tmp/new && mkdir /tmp/new/old &&
  cd /tmp/new && pivot_root . old && echo "pivot:" $(ls /old) &&
  cat "/old$0/secret.txt" 2>/dev/null' "$M"
echo "pivot-rc: $?"
unshare -m sh -c 'mount --rbind / /mnt && echo "rbind:" $(ls /mnt) &&
  cat "/mnt$0/secret.txt" 2>/dev/null' "$M"
echo "rbind-rc: $?"
echo "nsenter: $(nsenter -t 1 -m -- cat $M/secret.txt 2>&1 | grep -c "host secret")"
"""


def test_chroot_and_pivot_root_tricks(attack: Attacker, host: HostGuard) -> None:
    """The classic chroot escape, a pivot_root in a nested mount namespace and an
    rbind of / all end at the container's own root: the host's old root was detached."""
    rep = results(attack.script(CHROOT_PIVOT, str(host.marker)))
    assert SECRET.strip() not in str(rep)
    chroot_ls, reach, _ = rep["chroot"].split("|")
    assert chroot_ls.startswith("ok ")
    assert sorted(chroot_ls.split()[1:]) == sorted(rep["slash"].split())
    assert reach == "ENOENT"
    container_root = set(rep["slash"].split())
    assert set(rep["pivot"].split()) == container_root
    assert set(rep["rbind"].split()) == container_root
    assert rep["pivot-rc"] != "0" and rep["rbind-rc"] != "0"  # the final cat failed
    assert rep["nsenter"] == "0"
    host.assert_untouched()


def test_open_by_handle_at_shocker(attack: Attacker, host: HostGuard) -> None:
    """The rootfs is the host's own ext4: a guessed handle for inode 2 would open the
    host's real root directory. open_by_handle_at is refused (seccomp, and it needs
    CAP_DAC_READ_SEARCH in the initial namespace)."""
    rep = results(attack.sh("echo \"shocker: $(attackprobe shocker)\""))
    assert rep["shocker"] == "EPERM"
    host.assert_untouched()


# --- masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("who", [("--user", "user"), ("--drop-capability", "CAP_SYS_ADMIN")])
def test_masks_hold_without_cap_sys_admin(attack: Attacker, host: HostGuard,
                                          who: tuple[str, str]) -> None:
    """Masked and read-only paths cannot be lifted by a payload without CAP_SYS_ADMIN
    (container root with it can: see docs/SECURITY.md)."""
    rep = results(attack.sh(
        "umount /proc/keys /proc/timer_list /proc/sys /sys/firmware 2>/dev/null; "
        "mount -o remount,rw /proc/sys 2>/dev/null; mkdir -p /tmp/p; "
        "mount -t proc proc /tmp/p 2>/dev/null; echo \"newproc: $?\"; "
        "echo \"keys: $(cat /proc/keys | wc -c)\"; "
        "echo \"timer_list: $(cat /proc/timer_list | wc -c)\"; "
        "echo \"firmware: $(ls -A /sys/firmware | wc -l)\"; "
        "echo \"procsys: $(attackprobe write /proc/sys/net/ipv4/ip_forward 1)\"", extra=who))
    assert rep["newproc"] != "0"
    assert rep["keys"] == "0" and rep["timer_list"] == "0" and rep["firmware"] == "0"
    assert rep["procsys"] in ("EROFS", "EACCES")
    host.assert_untouched()


# --- exec: a process joining the container (CVE-2019-5736) ------------------------------


def test_exec_joining_process_is_not_reachable(uspawn: Runner, tree: Path,
                                               host: HostGuard) -> None:
    """While `uspawn exec` joins, the payload scans /proc and opens every /proc/PID/exe
    it can: it must never get a host binary (the runtime's python), and the joined
    process holds only stdio."""
    name = host.machine()
    p = uspawn.popen("run", "-D", str(tree), "--machine", name, "--",
                     "attackprobe", "watch-exe", "120", "/tmp/watch-stop",
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    last: subprocess.Popen[str] | None = None
    try:
        wait_state(uspawn.state, name, p, TIMEOUT)  # from now on exec can join
        joined = 0
        fds: list[str] = []
        for _ in range(5):
            r = uspawn.run("exec", name, "--", "sh", "-c",
                           "ls /proc/self/fd | sort -n | tr '\\n' ' '; sleep 0.2",
                           timeout=TIMEOUT, input="")
            assert_no_traceback(r)
            assert r.returncode == 0, r.stderr
            joined += 1
            fds.append(r.stdout.strip())
        # The last one joins, tells the scanner to stop and stays until the scanner's
        # final full scan is over (its exit ends the container): seen for certain. It
        # says so before the touch: the scanner's exit kills it, and on a loaded host
        # that once came between the touch and an echo after it (a CI run).
        last = uspawn.popen("exec", name, "--", "sh", "-c",
                            "echo stopping; touch /tmp/watch-stop; read x || :",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        assert last.stdout is not None
        line = last.stdout.readline()
        if line != "stopping\n":  # say why: the joining exec's own error, the payload's
            last.kill()
            _, last_err = last.communicate()
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"last exec printed {line!r}, exit {last.returncode}: "
                                 f"{last_err!r}; payload: {out[-500:]!r} {err[-500:]!r}")
        out, err = p.communicate(timeout=TIMEOUT)
    finally:
        p.kill()
        p.wait()
        if last is not None:
            last.kill()
            _, last_err = last.communicate()
            assert "Traceback" not in last_err
    assert joined == 5
    assert set(fds) == {"0 1 2 3"}
    assert p.returncode == 0, err
    lines = out.splitlines()
    assert not [ln for ln in lines if ln.startswith("foreign")], out
    seen = int(lines[-1].split()[1])
    assert seen > 0  # the scanner did see the joined processes (as busybox)
    host.assert_untouched()


def _status(text: str) -> dict[str, str]:
    """/proc/PID/status lines (`Key:<tab>value`) -> dict."""
    return {k: v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines())}


def test_exec_does_not_regain_dropped_capabilities(uspawn: Runner, tree: Path,
                                                   host: HostGuard) -> None:
    name = host.machine()
    p = uspawn.popen("run", "-D", str(tree), "--machine", name, "--drop-capability",
                     "CAP_SYS_ADMIN,CAP_SYS_PTRACE", "--no-new-privileges", "--", "sh", "-c",
                     "grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status; read x || :",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        init = _status(p.stdout.readline() + p.stdout.readline())
        r = uspawn.run("exec", name, "--", "grep", "-E", "^(CapBnd|CapEff|NoNewPrivs)",
                       "/proc/self/status", timeout=TIMEOUT, input="")
        p.communicate(timeout=TIMEOUT)  # EOF on its stdin: it ends (and cleans up) on its own
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert_no_traceback(r)
    assert r.returncode == 0, r.stderr
    joined = _status(r.stdout)
    assert not int(init["CapBnd"], 16) & (1 << 21)
    assert int(joined["CapBnd"], 16) & ~int(init["CapBnd"], 16) == 0, (init, joined)
    assert int(joined["CapEff"], 16) & ((1 << 21) | (1 << 19)) == 0
    assert joined["NoNewPrivs"] == "1"
    host.assert_untouched()


# --- terminals and stdio: TIOCSTI, host files behind fds 0-2 -----------------------------


class _Running:
    """A container running `sleep` in the background, for `uspawn exec` into it."""

    def __init__(self, uspawn: Runner, tree: Path, host: HostGuard, seconds: int = 25) -> None:
        self.uspawn = uspawn
        self.name = host.machine()
        self.p = uspawn.popen("run", "-D", str(tree), "--machine", self.name, "--", "sleep",
                              str(seconds), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # state.json is written once the payload runs: from then on exec can join.
        wait_state(uspawn.state, self.name, self.p, TIMEOUT)

    def exec(self, *cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        r = subprocess.run(self.uspawn.argv("exec", self.name, "--", *cmd), text=True,
                           timeout=TIMEOUT, **kw)  # type: ignore[call-overload]
        _no_traceback(r)
        return r  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(15)
        try:
            self.p.communicate(timeout=TIMEOUT)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()


def _host_pid(name: str, inner: int) -> int:
    """The host pid of the container's process that is pid inner in its namespace."""
    for pid in processes_in_cgroup_named(name):
        try:
            with open(f"/proc/{pid}/status") as f:
                nspid = next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if len(nspid) > 1 and int(nspid[-1]) == inner:
            return pid
    raise AssertionError(f"no process {inner} in container {name}")


def _no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in (r.stdout or "") + (r.stderr or ""), r.stderr


def _readable(fd: int) -> bytes:
    """What a pty side has for a reader right now (raw mode: a partial line counts).

    Everything written to the other side before this call is there: a non-blocking
    tty read flushes the pty's buffer work first (waits.tty_pending)."""
    import termios
    import tty

    tty.setraw(fd, termios.TCSANOW)
    return tty_pending(fd)


def _tiocsti_report(out: str) -> dict[str, dict[str, str]]:
    """`attackprobe tiocsti` runs prefixed "host " (our pty slave) and "own " (a pty the
    payload made itself) -> {"host": {...}, "own": {...}}."""
    rep: dict[str, dict[str, str]] = {"host": {}, "own": {}}
    for line in out.splitlines():
        which, _, rest = line.partition(" ")
        key, sep, value = rest.partition(": ")
        if which in rep and sep:
            rep[which][key] = value.strip()
    return rep


TIOCSTI_SCRIPT = ("attackprobe tiocsti 0 | sed 's/^/host /'; "
                  "attackprobe tiocsti | sed 's/^/own /'")


def _assert_tiocsti_refused(rep: dict[str, dict[str, str]]) -> None:
    # Our tty never reaches the payload: its stdin is a pipe we relay.
    assert rep["host"]["isatty"] == "no", rep
    assert rep["host"]["sctty"] == "ENOTTY"
    assert rep["host"]["sti"] == rep["host"]["sti_high"] == "EPERM"
    # A tty it does control (its own pty, taken as controlling tty) refuses
    # injection too: seccomp, whatever the request's high bits say.
    own = rep["own"]
    assert own["isatty"] == "yes" and own["sctty"] == "ok", rep
    assert own["sti"] == own["sti_high"] == own["linux"] == "EPERM", rep
    assert own["tcgets"] == "ok" and own["queued"] == "0", rep


def test_tiocsti_into_a_host_tty_nobody_controls(uspawn: Runner, tree: Path,
                                                 host: HostGuard) -> None:
    """CVE-2017-5226 shape: our stdin is a pty slave that is nobody's controlling tty
    (legacy_tiocsti=1 on this kernel). The payload, a session leader, would take it
    with TIOCSCTTY and push a command into the input of whoever reads that tty.
    Nothing may arrive: not as input on the slave, not as echo on the master."""
    master, slave = os.openpty()
    try:
        r = subprocess.run(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--",
                                       "sh", "-c", TIOCSTI_SCRIPT),
                           stdin=slave, capture_output=True, text=True, timeout=TIMEOUT)
        assert_no_traceback(r)
        assert r.returncode == 0, r.stderr
        _assert_tiocsti_refused(_tiocsti_report(r.stdout))
        assert _readable(master) == b""  # no echo of injected input
        assert _readable(slave) == b""  # no injected input
    finally:
        os.close(master)
        os.close(slave)
    host.assert_untouched()


def test_tiocsti_from_exec(uspawn: Runner, tree: Path, host: HostGuard) -> None:
    """The same through `uspawn exec` (it takes the container's seccomp policy) and
    `uspawn exec -t` (its pty is the container's own: our tty stays out)."""
    running = _Running(uspawn, tree, host)
    master, slave = os.openpty()
    try:
        r = running.exec("sh", "-c", TIOCSTI_SCRIPT, stdin=slave)
        assert r.returncode == 0, r.stderr
        _assert_tiocsti_refused(_tiocsti_report(r.stdout))
        r = subprocess.run(uspawn.argv("exec", "-t", running.name, "--", "sh", "-c",
                                       "echo \"dev: $(stat -L -c %d /proc/self/fd/0)\"; "
                                       "attackprobe tiocsti 0"),
                           stdin=slave, capture_output=True, text=True, timeout=TIMEOUT)
        assert_no_traceback(r)
        assert r.returncode == 0, r.stderr
        rep = results(r.stdout)
        assert rep["isatty"] == "yes" and rep["dev"] != str(os.fstat(slave).st_dev), rep
        assert rep["sti"] == rep["sti_high"] == rep["linux"] == "EPERM", rep
        assert _readable(master) == b"" and _readable(slave) == b""
    finally:
        os.close(master)
        os.close(slave)
        running.stop()
    host.assert_untouched()


def test_exec_daemon_cannot_read_stdin_after_exec_returns(uspawn: Runner, tree: Path,
                                                          host: HostGuard) -> None:
    """`uspawn exec NAME -- CMD` with our tty on stdin: CMD leaves a daemon holding its
    stdin and exits. What the admin types after exec returned must stay ours: the
    daemon reads EOF (runc's pipes), the typed line is still there for the host."""
    running = _Running(uspawn, tree, host)
    master, slave = os.openpty()
    try:
        t0 = time.monotonic()
        # The daemon holds stdin from the fork on (fd 3): it need not have run yet.
        r = running.exec("sh", "-c", "exec 3<&0; cat <&3 >/tmp/stolen 2>&1 & "
                         "echo \"started $!\"", stdin=slave)
        assert r.returncode == 0 and r.stdout.startswith("started "), r.stderr
        assert time.monotonic() - t0 < TIMEOUT / 2  # a daemon holding stderr: bounded
        daemon = _host_pid(running.name, int(r.stdout.split()[1]))
        os.write(master, b"typed-by-the-admin\n")
        # It reads EOF and ends (a daemon reading our tty would wait for more): once
        # it has exited, /tmp/stolen holds all it ever read.
        wait_exit([daemon], TIMEOUT, "the daemon holding exec's stdin")
        r = running.exec("sh", "-c", "echo \"stolen: [$(cat /tmp/stolen)]\"; "
                         "echo \"readers: $(grep -l '(cat) [^Z]' /proc/[0-9]*/stat | wc -l)\"",
                         stdin=subprocess.DEVNULL)
        rep = results(r.stdout)
        assert rep["stolen"] == "[]", rep
        assert rep["readers"] == "0", rep  # it got EOF and ended
        assert _readable(slave) == b"typed-by-the-admin\n"
    finally:
        os.close(master)
        os.close(slave)
        running.stop()
    host.assert_untouched()


SECRET_LINE = "previous log line: host secret 4f1c\n"


@pytest.mark.parametrize("how", ["run", "exec"])
def test_stdout_host_file_cannot_be_reopened(uspawn: Runner, tree: Path, host: HostGuard,
                                             tmp_path: Path, how: str) -> None:
    """`uspawn run ... >> /root/log`: /proc/self/fd/1 would reopen the host file itself,
    to read what was there before, or to truncate it (and fd 1 to ftruncate it)."""
    log = tmp_path / "host.log"
    log.write_text(SECRET_LINE)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    running = _Running(uspawn, tree, host) if how == "exec" else None
    cmd = ("sh", "-c", "attackprobe reopen 1; echo payload-output")
    try:
        if running is not None:
            r = running.exec(*cmd, stdin=subprocess.DEVNULL, stdout=fd)
        else:
            r = subprocess.run(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--",
                                           *cmd), stdin=subprocess.DEVNULL, stdout=fd,
                               stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    finally:
        os.close(fd)
        if running is not None:
            running.stop()
    _no_traceback(r)
    assert r.returncode == 0, r.stderr
    rep = results(r.stderr)
    assert rep["type"] == "fifo", rep
    assert "4f1c" not in r.stderr and rep["read"] in REFUSED, rep
    assert rep["trunc"] in REFUSED and rep["ftruncate"] in REFUSED, rep
    assert log.read_text() == SECRET_LINE + "payload-output\n"
    host.assert_untouched()


def test_stdin_host_file_is_not_handed_over(uspawn: Runner, tree: Path,
                                            host: HostGuard) -> None:
    """`uspawn run ... < FILE`: reopened through /proc/self/fd/0 for writing, FILE could
    be truncated. The payload gets the bytes of FILE through a pipe instead."""
    fd = os.open(host.secret, os.O_RDONLY)
    try:
        r = subprocess.run(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--",
                                       "sh", "-c", "attackprobe reopen 0; "
                                       "echo \"stdin: $(wc -c)\" >&2"),
                           stdin=fd, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        os.close(fd)
    _no_traceback(r)
    assert r.returncode == 0, r.stderr
    rep = results(r.stderr)
    assert rep["type"] == "fifo", rep
    assert rep["read"] in REFUSED and rep["trunc"] in REFUSED, rep
    assert rep["ftruncate"] in REFUSED, rep
    assert rep["stdin"] == str(len(SECRET))  # the stream itself still arrives
    host.assert_untouched()


def test_device_on_stdin_is_not_handed_over(uspawn: Runner, tree: Path,
                                            host: HostGuard) -> None:
    """A device node on stdio (here /dev/zero) is the device itself: reopened through
    /proc/self/fd it is opened with whatever mode the payload asks. The payload gets a
    pipe that carries the device's bytes. (A directory on fd 0-2 never gets this far:
    Python refuses to start with one.)"""
    fd = os.open("/dev/zero", os.O_RDONLY)
    try:
        r = subprocess.run(uspawn.argv("run", "-D", str(tree), "-M", host.machine(), "--",
                                       "sh", "-c", "attackprobe reopen 0; "
                                       "echo \"stdin: $(head -c 100000 | wc -c)\" >&2"),
                           stdin=fd, capture_output=True, text=True, timeout=TIMEOUT)
    finally:
        os.close(fd)
    _no_traceback(r)
    assert r.returncode == 0, r.stderr
    rep = results(r.stderr)
    assert rep["type"] == "fifo" and rep["fchdir"] == "ENOTDIR", rep
    assert rep["read"] in REFUSED and rep["trunc"] in REFUSED, rep
    assert rep["stdin"] == "100000"
    host.assert_untouched()


@pytest.mark.parametrize("userns", [True, False], ids=["userns", "no-userns"])
def test_tiocsti_from_an_oci_config_without_seccomp(tmp_path: Path, tree: Path,
                                                    userns: bool) -> None:
    """uspawn-runc: a config.json with no seccomp section (its own choice, or a
    privileged one without a user namespace) still gets TIOCSTI/TIOCLINUX refused:
    the caller's tty is handed over as it is (runc `run` in the foreground)."""
    import json

    from test_oci import make_bundle, runtime_cmd

    bundle = make_bundle(tmp_path, tree, ["/bin/attackprobe", "tiocsti", "0"], userns=userns)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["linux"].pop("seccomp", None)
    if not userns:
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"]
                                      if n["type"] != "user"]
        cfg["linux"].pop("uidMappings", None)
        cfg["linux"].pop("gidMappings", None)
    (bundle / "config.json").write_text(json.dumps(cfg))
    master, slave = os.openpty()
    try:
        r = subprocess.run([*runtime_cmd(), "--root", str(tmp_path / "state"), "run", "-b",
                            str(bundle), f"tiocsti-{uuid.uuid4().hex[:8]}"],
                           stdin=slave, capture_output=True, text=True, timeout=TIMEOUT)
        assert_no_traceback(r)
        assert r.returncode == 0, r.stderr
        rep = results(r.stdout)
        assert rep["sti"] == rep["sti_high"] == "EPERM", rep
        assert _readable(master) == b"" and _readable(slave) == b""
    finally:
        os.close(master)
        os.close(slave)
