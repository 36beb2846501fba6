"""`uspawn doctor`: what this kernel and host will do to user-namespaced containers.

Every probe measures a fact for real (unshare, write ID maps, mknod, mount,
mount_setattr, load the seccomp policy, mkdir a cgroup ...) instead of trusting
version numbers or sysctls: distribution kernels backport and revert. Each probe
runs in its own forked child with a timeout, so a probe that crashes, hangs or is
killed by a seccomp filter becomes a `broken` row, never a doctor crash. Probes
that need a user namespace fork a helper that unshares; the probe, still real root
in the host namespaces, writes its ID maps, as uspawn's parent does.

Verdicts: ok; degraded (containers work, with a fallback or without an extra);
broken (default containers will fail). run_doctor() returns 0 when no row is
broken, else 1. docs/DOCTOR.md lists every row with its verdicts and fixes.
Nothing persists: test mounts live in private mount namespaces or stay detached,
the test cgroup is removed. json, socket, select, textwrap load lazily.
"""

from __future__ import annotations

import errno
import os
import signal
import stat

from uspawn.base import read_text as _read
from uspawn.diag.report import BROKEN, DEGRADED, OK, Row, report, row
from uspawn.kernel import cgroups, mounts, userns
from uspawn.kernel import syscalls as sc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TextIO

PROBE_BASE = 2147352576  # 32767 * 65536: container-like, far above uspawn's allocator
PROBE_SIZE = 65536
DEFAULT_TREES = ("/var/lib/machines", "/var/lib/uspawn")
DEFAULT_TIMEOUT = 10.0
CHOWN_FALLBACK = ("uspawn falls back to chown (--private-users-ownership=auto): the first "
                  "start shifts every file once, and the tree then belongs to that ID range")
NEWER_KERNEL = "boot a kernel >= 5.12"


class Ctx:
    """What the probes are told: where container trees live."""

    def __init__(self, trees: str) -> None:
        self.trees = trees


def pick(name: str, good: bool, ok_meaning: str, bad: tuple[str, str, str],
         detail: str = "") -> Row:
    """The ok row, or the (verdict, meaning, fix) row for a failed measurement."""
    return row(name, OK, ok_meaning, "", detail) if good else row(name, *bad, detail)


def errname(exc: BaseException) -> str:
    if isinstance(exc, HelperError) and exc.errno_name:
        return exc.errno_name
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class HelperError(Exception):
    """A forked child failed; carries its errno name (as text) when it had one."""

    def __init__(self, msg: dict[str, Any]) -> None:
        super().__init__(str(msg.get("error", "unknown failure")))
        self.errno_name = str(msg.get("errno", ""))


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": str(exc) or type(exc).__name__, "errno": errname(exc)}


# --- forked children -----------------------------------------------------------


class Peer:
    """JSON messages over one end of a SEQPACKET socketpair (STYLE.md: one pair
    per pair of processes; SEQPACKET keeps message boundaries)."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def send(self, **msg: object) -> None:
        import json

        self.sock.send(json.dumps(msg).encode())

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next message; EOFError when the other side died, TimeoutError."""
        import json

        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError
        msg: dict[str, Any] = json.loads(data)
        if "error" in msg:
            raise HelperError(msg)
        return msg


def spawn(body: Callable[[Peer], None], userns_flags: int | None = None,
          base: int = PROBE_BASE) -> tuple[int, Peer]:
    """Fork a child that runs body(peer) and never unwinds into the caller: an
    exception is sent as {"error", "errno"} and the child os._exit()s (STYLE.md).

    With userns_flags, the child first unshares CLONE_NEWUSER|userns_flags and we
    write its ID maps (0 -> base, 65536 IDs), as uspawn's parent does; body then
    runs as that namespace's root. The caller reaps the child with reap(pid).
    """
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            a.close()
            peer = Peer(b)
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlives its probe
            if userns_flags is not None:
                sc.unshare(sc.CLONE_NEWUSER | userns_flags)
                peer.send(step="unshared")
                peer.recv(30)
                # Become the namespace's root, as a container's init does: until then
                # our host uid 0 is unmapped here and creating files fails (EOVERFLOW).
                os.setgroups([])
                os.setresgid(0, 0, 0)
                os.setresuid(0, 0, 0)
                sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)  # a uid change cleared it
            body(peer)
        except BaseException as exc:
            code = 1
            try:
                Peer(b).send(**_error(exc))
            except BaseException:
                pass
        os._exit(code)
    b.close()
    peer = Peer(a)
    if userns_flags is not None:
        try:
            peer.recv()
            userns.write_id_maps(pid, [(0, base, PROBE_SIZE)], [(0, base, PROBE_SIZE)])
            peer.send(step="mapped")
        except BaseException:
            reap(pid)
            raise
    return pid, peer


def reap(pid: int) -> int:
    """Kill (if still running) and wait for a child; its wait status."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return os.waitpid(pid, 0)[1]


def call(body: Callable[[Peer], None], userns_flags: int | None = None,
         timeout: float = 5.0) -> dict[str, Any]:
    """spawn() a child that sends one report; return it. TimeoutError when it
    takes longer (the child is killed); HelperError naming the signal when it
    dies without a report (a crash, a seccomp kill)."""
    pid, peer = spawn(body, userns_flags)
    try:
        return peer.recv(timeout)
    except EOFError:
        status, pid = reap(pid), 0
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        why = (f"killed by {signal.Signals(sig).name}" if sig else
               f"exited with status {os.waitstatus_to_exitcode(status)}")
        seccomp = " (SIGSYS: a seccomp filter killed it)" if sig == signal.SIGSYS else ""
        raise HelperError({"error": f"{why} without a report{seccomp}"}) from None
    finally:
        if pid:
            reap(pid)


def userns_fd() -> int:
    """An fd of a fresh user namespace mapped like a container (for MOUNT_ATTR_IDMAP)."""
    pid, _peer = spawn(lambda peer: peer.sock.recv(1) and None, 0)  # holds the ns open
    try:
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        reap(pid)


def try_open(path: str, dir_fd: int | None = None) -> str:
    """"ok" when path opens read-write and takes a write, else the errno name."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
    except OSError as exc:
        return errname(exc)
    return "ok"


def _private_tmpfs_on_tmp() -> None:
    """In a fresh mount namespace: stop propagation, put a tmpfs on /tmp."""
    mounts.make_rslave_root(sc.MS_PRIVATE)
    mounts.attach_at(mounts.make_fs("tmpfs", [("mode", "0755")]), "/tmp")


def _mknod_null(path: str, dir_fd: int | None = None) -> None:
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3), dir_fd=dir_fd)
    os.chmod(path, 0o666, dir_fd=dir_fd)


def _nested_hint() -> str:
    uid_map = " ".join((_read("/proc/self/uid_map") or "").split())
    return "" if uid_map == "0 0 4294967295" else (
        "; this process is inside a user namespace (see nesting): run uspawn as host root")


# --- probes: each returns its rows; run_probe() runs it in a forked child ---------


def probe_kernel(ctx: Ctx) -> list[Row]:
    rel = os.uname().release
    ver = tuple(int(x) for x in rel.split("-")[0].split(".")[:2] if x.isdigit())
    if ver >= (5, 12):
        return [row("kernel", OK, f"Linux {rel} has every interface uspawn uses (fd mount API "
                    "5.2, openat2 5.6, idmapped mounts 5.12); the rows below are measured, "
                    "not inferred from the version", detail=rel)]
    mknod = (" Linux 4.18-4.20 also let mknod succeed in user namespaces for nodes that "
             "cannot be opened." if (4, 18) <= ver < (5, 0) else "")
    return [row("kernel", DEGRADED if ver >= (5, 6) else BROKEN, f"Linux {rel} predates "
                "idmapped mounts (5.12) and maybe openat2 (5.6) or the fd mount API (5.2), "
                f"unless backported: see the measured rows below.{mknod}", NEWER_KERNEL, rel)]


def probe_userns(ctx: Ctx) -> list[Row]:
    ctl = {name: _read(f"/proc/sys/{path}") or "absent" for name, path in (
        ("max_user_namespaces", "user/max_user_namespaces"),
        ("unprivileged_userns_clone", "kernel/unprivileged_userns_clone"),
        ("apparmor_restrict_unprivileged_userns",
         "kernel/apparmor_restrict_unprivileged_userns"))}
    detail = " ".join(f"{k}={v}" for k, v in ctl.items())
    try:
        call(lambda p: p.send(uid=os.getuid()), 0)
        rows = [row("userns", OK, "user namespaces can be created and mapped (the probe's "
                    f"root was host uid {PROBE_BASE})", detail=detail)]
    except (HelperError, OSError) as exc:
        err = errname(exc)
        status = _read("/proc/self/status") or ""
        if err == "ENOSPC" or ctl["max_user_namespaces"] == "0":
            fix = ("raise the limit: sysctl -w user.max_user_namespaces=15000 (and in "
                   "/etc/sysctl.d/); it is 0 or used up in this namespace")
        elif "\nSeccomp:\t2" in status:
            fix = ("a seccomp filter on this process refuses unshare(CLONE_NEWUSER): the "
                   "container manager or service that started uspawn blocks it (docker: "
                   "--security-opt seccomp=unconfined; systemd: RestrictNamespaces=, "
                   "SystemCallFilter=)")
        else:
            fix = ("an LSM policy or the kernel configuration (CONFIG_USER_NS) refuses user "
                   "namespaces; allow them for root" + _nested_hint())
        rows = [row("userns", BROKEN, f"cannot create a user namespace ({exc}): no container "
                    "can start", fix, f"{detail} errno={err}")]

    def unprivileged(peer: Peer) -> None:  # what rootless tools get
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        sc.unshare(sc.CLONE_NEWUSER)
        peer.send(ok=True)

    try:
        res = "ok" if call(unprivileged) else "?"
    except (HelperError, OSError) as exc:
        res = errname(exc)
    rows.append(pick("userns-unprivileged", res == "ok", "unprivileged users can create user "
                     "namespaces too (rootless tools work)", (DEGRADED, f"unprivileged users "
                     f"cannot ({res}): uspawn as root is unaffected; rootless mode, rootless "
                     "podman and bubblewrap are", "Debian: sysctl kernel.unprivileged_userns_"
                     "clone=1; Ubuntu: an AppArmor profile for the tool, or sysctl kernel."
                     "apparmor_restrict_unprivileged_userns=0"), detail))
    return rows


def probe_mknod(ctx: Ctx) -> list[Row]:
    def body(peer: Peer) -> None:
        mnt = mounts.make_fs("tmpfs", [])  # owned by this user namespace
        try:
            _mknod_null("null", mnt)
            peer.send(mknod="ok", open=try_open("null", mnt))
        except OSError as exc:
            peer.send(mknod=errname(exc), open="-")

    name = "mknod-in-userns"
    try:
        res = call(body, sc.CLONE_NEWNS)
    except (HelperError, OSError) as exc:
        return [row(name, DEGRADED, f"could not test ({exc})", "see the userns row")]
    detail = f"mknod={res['mknod']} open={res['open']}"
    if res["mknod"] == "EPERM":
        return [row(name, OK, "mknod of device nodes is refused in a user namespace (EPERM): "
                    "systemd's PrivateDevices= and friends take their bind-mount fallback",
                    detail=detail)]
    if res["mknod"] == "ok" and res["open"] != "ok":
        return [row(name, BROKEN, "mknod of a character device inside a user namespace "
                    "SUCCEEDED but the node cannot be opened: the Linux 4.18-4.20 behaviour. "
                    "systemd's PrivateDevices=, nspawn and LXC fall back only on EPERM, so their "
                    "services get 'permission denied' on /dev/null. uspawn's containers are "
                    "covered (its seccomp policy refuses device mknod with EPERM on every "
                    "kernel); other user-namespace tools on this host are not",
                    "boot a kernel with the revert (94f82008ce30, Linux 5.0); until then run "
                    "userns containers only under a seccomp policy that refuses device mknod "
                    "(uspawn's default)", detail)]
    return [row(name, DEGRADED, f"mknod gave {res['mknod']} (open: {res['open']}), not EPERM: "
                "fallbacks that only catch EPERM may misbehave; uspawn's seccomp policy returns "
                "EPERM anyway", "report this kernel behaviour", detail)]


def probe_dev_nodes(ctx: Ctx) -> list[Row]:
    facts: dict[str, str] = {}

    # 1. A tmpfs mounted inside a userns: real root makes a node there through
    # /proc/PID/root, and neither it nor the helper may open it (SB_I_NODEV).
    # Host root must be mapped in that namespace (base 0, like `unshare -Ur`),
    # else creating an inode it owns fails with EOVERFLOW.
    def inside(peer: Peer) -> None:
        _private_tmpfs_on_tmp()
        peer.send(step="mounted")
        peer.recv(10)
        peer.send(open=try_open("/tmp/null"))

    try:
        pid, peer = spawn(inside, sc.CLONE_NEWNS, base=0)
        try:
            peer.recv()
            _mknod_null(f"/proc/{pid}/root/tmp/null")
            facts["userns-tmpfs-host-open"] = try_open(f"/proc/{pid}/root/tmp/null")
            peer.send(step="go")
            facts["userns-tmpfs"] = peer.recv()["open"]
        finally:
            reap(pid)
    except (HelperError, OSError) as exc:
        facts["userns-tmpfs"] = errname(exc)
    # 2. uspawn's way (and crun's): a tmpfs made in the host namespace, nodes made there.
    try:
        mnt = mounts.make_fs("tmpfs", [("mode", "0755")])
        _mknod_null("null", mnt)
        facts["host-tmpfs"] = call(lambda p: p.send(open=try_open("null", mnt)), 0)["open"]
    except (HelperError, OSError) as exc:
        facts["host-tmpfs"] = errname(exc)

    # 3. The bubblewrap/runc way: bind-mount the host's node onto an empty file.
    def bind(peer: Peer) -> None:
        _private_tmpfs_on_tmp()
        os.close(os.open("/tmp/null", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
        sc.mount("/dev/null", "/tmp/null", None, sc.MS_BIND)
        peer.send(open=try_open("/tmp/null"))

    try:
        facts["bind-host-node"] = call(bind, sc.CLONE_NEWNS)["open"]
    except (HelperError, OSError) as exc:
        facts["bind-host-node"] = errname(exc)
    ways = ", ".join(k for k in ("host-tmpfs", "bind-host-node") if facts[k] == "ok") or "none"
    odd = ("" if facts["userns-tmpfs"] != "ok" else " Nodes on a tmpfs mounted inside a user "
           "namespace open too (no SB_I_NODEV): unusual; uspawn does not rely on it.")
    return [pick("dev-nodes", facts["host-tmpfs"] == "ok", "uspawn's /dev works: nodes made by "
                 "real root on a tmpfs created in the host namespace open inside a user "
                 "namespace; nodes on a tmpfs mounted inside one do not (SB_I_NODEV). Working "
                 f"ways: {ways}.{odd}", (BROKEN, "nodes on a tmpfs made in the host namespace "
                 f"cannot be opened in a user namespace, so uspawn's /dev fails. Working ways: "
                 f"{ways}.", "run uspawn as real root in the initial namespaces; if it is, "
                 "report this kernel" + _nested_hint()),
                 " ".join(f"{k}={v}" for k, v in facts.items()))]


def _fs_type(path: str) -> str:
    dev = os.stat(path).st_dev
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == f"{os.major(dev)}:{os.minor(dev)}":
                return fields[fields.index("-") + 1]
    return "?"


def _idmap_try(make: Callable[[], int], ufd: int) -> tuple[bool, str]:
    """Idmap a detached mount; True when its root's owner then shows shifted."""
    try:
        mnt = make()
    except OSError as exc:
        return False, f"setup: {exc}"
    try:
        orig = os.fstat(mnt).st_uid
        mounts.set_attrs(mnt, userns_fd=ufd)
        seen = os.fstat(mnt).st_uid
        return seen == (PROBE_BASE + orig if orig < PROBE_SIZE else 65534), \
            f"owner {orig} shows as {seen}"
    except OSError as exc:
        return False, str(exc)
    finally:
        os.close(mnt)


def probe_idmap(ctx: Ctx) -> list[Row]:
    ufd = userns_fd()
    path = ctx.trees
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    fstype = _fs_type(path)
    good, detail = _idmap_try(lambda: mounts.clone_tree(path), ufd)
    rows = [pick(f"idmap {path}", good, f"trees on this {fstype} are idmapped: O(1) start, "
                 "host tree untouched", (DEGRADED, f"this {fstype} cannot be idmapped here: "
                 + CHOWN_FALLBACK, "keep trees on ext4, xfs or btrfs (Linux >= 5.12/5.15)"),
                 f"fstype={fstype} {detail}")]
    good, detail = _idmap_try(lambda: mounts.make_fs("tmpfs", []), ufd)
    rows.append(pick("idmap tmpfs", good, "tmpfs can be idmapped (binds from tmpfs keep "
                     "container owners)", (DEGRADED, "tmpfs cannot be idmapped (Linux < 6.3): "
                     "trees on tmpfs are chowned, --bind sources on tmpfs keep their host owners "
                     "(nobody inside)", "Linux >= 6.3, or :noidmap binds with matching owners"),
                     detail))
    # overlayfs: the overlay mount itself, and an overlay over idmapped layers (5.19).
    sc.unshare(sc.CLONE_NEWNS)  # as real root; made private before anything is mounted
    _private_tmpfs_on_tmp()
    for d in ("l", "u", "w", "u2", "w2", "idm"):
        os.mkdir(f"/tmp/{d}")
    os.close(os.open("/tmp/l/f", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    def overlay(lower: str, n: str = "") -> int:
        return mounts.make_fs("overlay", [("lowerdir", lower), ("upperdir", f"/tmp/u{n}"),
                                          ("workdir", f"/tmp/w{n}")])

    good, detail = _idmap_try(lambda: overlay("/tmp/l"), ufd)
    try:
        lower = mounts.clone_tree("/tmp/l")
        mounts.set_attrs(lower, userns_fd=ufd)
        mounts.attach(lower, os.open("/tmp/idm", os.O_PATH | os.O_CLOEXEC))
        layers = os.stat("f", dir_fd=overlay("/tmp/idm", "2")).st_uid == PROBE_BASE
    except OSError:
        layers = False
    rows.append(pick("idmap overlayfs", good, "an overlayfs mount can be idmapped",
                     (DEGRADED, "an overlayfs mount cannot be idmapped itself: a tree that is an "
                      "overlay is chowned, which copies every file up" + (
                          " (overlays over idmapped layers do work here)" if layers else ""),
                      "pass the lower tree itself as -D, not an overlay of it"),
                     f"{detail}; over-idmapped-layers={'yes' if layers else 'no'}"))
    return rows


def probe_overlay(ctx: Ctx) -> list[Row]:
    def body(peer: Peer) -> None:
        _private_tmpfs_on_tmp()  # a tmpfs this namespace owns, for all three layers
        for d in ("l", "u", "w"):
            os.mkdir(f"/tmp/{d}")
        os.close(os.open("/tmp/l/f", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
        ovl = mounts.make_fs("overlay", [("lowerdir", "/tmp/l"), ("upperdir", "/tmp/u"),
                                         ("workdir", "/tmp/w")])
        os.close(os.open("f", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC, dir_fd=ovl))
        peer.send(copied_up=os.path.exists("/tmp/u/f"))

    try:
        fail = "" if call(body, sc.CLONE_NEWNS)["copied_up"] else "no copy-up"
    except (HelperError, OSError) as exc:
        fail = str(exc)
    return [pick("overlay-in-userns", not fail, "overlayfs mounts (and copies up) inside a user "
                 "namespace: podman, buildah or docker inside a container can use it",
                 (DEGRADED, f"overlayfs cannot be used inside a user namespace ({fail}); uspawn "
                  "does not need it, image builders inside fall back to vfs or fuse-overlayfs",
                  "Linux >= 5.11 allows overlayfs in user namespaces"))]


def probe_seccomp(ctx: Ctx) -> list[Row]:
    from uspawn.kernel import seccomp

    try:
        bpf = seccomp.policy_bpf(seccomp.default_policy(userns=True))
        mnt = mounts.make_fs("tmpfs", [])  # before the filter, which may refuse fsopen
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
        sc.seccomp_set_mode_filter(bpf)
    except Exception as exc:
        return [row("seccomp", BROKEN, f"uspawn's default seccomp policy cannot be compiled or "
                    f"loaded ({exc}): no container can start", "install libseccomp2 and "
                    "pyseccomp; the kernel needs CONFIG_SECCOMP_FILTER" + _nested_hint())]
    res: dict[str, str] = {}
    for what, mode in (("mknod-chr", stat.S_IFCHR), ("mkfifo", stat.S_IFIFO)):
        try:
            os.mknod(what, mode | 0o666, os.makedev(1, 3), dir_fd=mnt)
            res[what] = "ok"
        except OSError as exc:
            res[what] = errname(exc)
    return [pick("seccomp", res == {"mknod-chr": "EPERM", "mkfifo": "ok"}, "the default policy "
                 "loads; under it device mknod fails with EPERM and FIFOs work, on any kernel",
                 (BROKEN, "the default policy loads but does not refuse device mknod with EPERM "
                  "(or refuses FIFOs): PrivateDevices= fallbacks are not guaranteed",
                  "report this: the compiled policy is wrong for this libseccomp"),
                 f"instructions={len(bpf) // 8} " + " ".join(f"{k}={v}" for k, v in res.items()))]


def probe_apis(ctx: Ctx) -> list[Row]:
    rows = []
    step = "unshare(CLONE_NEWNS)"
    try:  # as real root, in a private copy of the mount namespace
        sc.unshare(sc.CLONE_NEWNS)
        mounts.make_rslave_root(sc.MS_PRIVATE)
        step = "fsopen/fsconfig/fsmount"
        mnt = mounts.make_fs("tmpfs", [("size", "1m")])
        step = "mount_setattr"
        setattr_ok = True
        try:
            mounts.set_attrs(mnt, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            setattr_ok = False  # Linux < 5.12: the init remounts instead (degraded)
        step = "open_tree"
        os.close(mounts.clone_tree("/"))
        step = "move_mount"
        mounts.attach(mnt, os.open("/tmp", os.O_PATH | os.O_CLOEXEC))
        step = ""
    except OSError as exc:
        step += f": {exc}"
    if step:
        rows.append(row("mount-api", BROKEN, f"{step}: uspawn builds every mount with the fd "
                        "mount API (5.2) and resolves paths with openat2 (5.6)", NEWER_KERNEL))
    elif not setattr_ok:
        rows.append(row("mount-api", DEGRADED, "fsopen, fsmount, open_tree and move_mount work; "
                        "mount_setattr (5.12) is missing: no idmapped mounts (trees are chowned)"
                        " and read-only/nodev attributes are set by classic remounts in the "
                        "container", NEWER_KERNEL))
    else:
        rows.append(row("mount-api", OK, "fsopen, fsmount, open_tree, move_mount and "
                        "mount_setattr work: uspawn builds mounts detached and attaches them "
                        "onto fds resolved inside the rootfs"))
    try:
        os.close(mounts.open_in_root(os.open("/", os.O_PATH | os.O_CLOEXEC), "etc"))
        res = "ok"
    except OSError as exc:
        res = str(exc)
    rows.append(pick("openat2", res == "ok", "openat2(RESOLVE_IN_ROOT) works: symlinks in a tree "
                     "cannot redirect uspawn's mounts to the host", (BROKEN, f"openat2 failed "
                     f"({res}): uspawn resolves every path inside a rootfs with it",
                     NEWER_KERNEL)))
    # clone3(CLONE_INTO_CGROUP) with a non-cgroup fd: EBADF proves both exist
    # without forking; ENOSYS = no clone3, EINVAL = no CLONE_INTO_CGROUP (< 5.7).
    try:
        if sc.fork_into_cgroup(os.open("/", os.O_RDONLY | os.O_CLOEXEC)) == 0:
            os._exit(0)  # not reached: "/" is no cgroup
        res = "forked"
    except OSError as exc:
        res = errname(exc)
    rows.append(pick("clone3", res in ("EBADF", "forked"), "clone3(CLONE_INTO_CGROUP) exists: "
                     "containers are born in their cgroup (no 10-15 ms migration)",
                     (DEGRADED, f"clone3 into a cgroup is unavailable ({res}): uspawn forks and "
                      "moves the child (10-15 ms slower start)", "Linux >= 5.7 with cgroup2"),
                     res))
    child = os.fork()
    if child == 0:
        try:
            signal.pause()
        finally:
            os._exit(0)
    try:
        import select

        pfd = sc.pidfd_open(child)
        sc.pidfd_send_signal(pfd, signal.SIGKILL)
        res = "ok" if select.select([pfd], [], [], 5)[0] else "not readable after exit"
    except OSError as exc:
        res = str(exc)
    finally:
        reap(child)
    rows.append(pick("pidfd", res == "ok", "pidfd_open, pidfd_send_signal and polling a pidfd "
                     "work: no signal reaches a recycled PID", (BROKEN, f"pidfds do not work "
                     f"({res}): uspawn waits on and signals the container's init through one",
                     NEWER_KERNEL)))
    return rows


def probe_cgroups(ctx: Ctx) -> list[Row]:
    layout, unified = cgroups.detect_layout()
    with open("/proc/self/mountinfo") as f:
        v1 = [ln.split()[4] for ln in f if ln.split(" - ")[-1].startswith("cgroup ")]
    ctrl = (_read(f"{unified}/cgroup.controllers") or "none") if unified else "-"
    facts = [f"layout={layout}", f"cgroup2={unified or '-'}", f"v2-controllers={ctrl}",
             "v1=" + (",".join(os.path.basename(p) for p in v1) or "none")]
    hier = unified or next((p for p in v1 if p.endswith("/pids")), v1[0] if v1 else None)
    if hier is None:
        return [row("cgroups", BROKEN, "no cgroup hierarchy is mounted: uspawn run cannot "
                    "create the container's cgroup", "mount cgroup2 on /sys/fs/cgroup",
                    " ".join(facts))]
    # The test cgroup goes where uspawn puts containers (<hierarchy>/uspawn) when
    # that exists, else at the root: creating uspawn/ here would make
    # cgroups.create() skip its controller delegation later.
    parent = os.path.join(hier, cgroups.PARENT)
    test = os.path.join(parent if os.path.isdir(parent) else hier, f"doctor-{os.getpid()}")
    try:
        os.mkdir(test)
        err = ""
    except OSError as exc:
        err = f"mkdir {test}: {exc.strerror}"
    if not err and hier == unified:
        fd = os.open(test, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pid = sc.fork_into_cgroup(fd)
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            facts.append("clone3-into-test-cgroup=ok")
        except OSError as exc:
            facts.append(f"clone3-into-test-cgroup={errname(exc)}")
        finally:
            os.close(fd)
    if not err:
        cgroups.Cgroup("doctor", layout, unified, [test]).destroy(2.0)
    where = {"unified": "cgroup2", "hybrid": "cgroup2 (unified) plus v1 hierarchies for "
             "limits", "legacy": "v1 hierarchies"}[layout]
    return [pick("cgroups", not err, f"{layout} layout: containers get a cgroup in {where}; "
                 f"cgroup2 controllers: {ctrl}; a test cgroup was created and removed",
                 (BROKEN, f"cannot create a cgroup ({err}): uspawn run creates one per "
                  "container", "run as root with /sys/fs/cgroup writable (inside a container: "
                  "give it a delegated cgroup subtree)"), " ".join(facts))]


def probe_rootless(ctx: Ctx) -> list[Row]:
    import pwd
    import shutil

    user = os.environ.get("SUDO_USER") or "root"
    try:
        names = (user, str(pwd.getpwnam(user).pw_uid))
    except KeyError:
        names = (user, user)
    facts, missing = [], []
    for path in ("/etc/subuid", "/etc/subgid"):
        n = sum(int(p[2]) for p in (ln.split(":") for ln in (_read(path) or "").splitlines())
                if len(p) == 3 and p[0] in names and p[2].isdigit())
        facts.append(f"{os.path.basename(path)}={n}")
        if n < PROBE_SIZE:
            missing.append(f"{path} has {n} IDs for {user} (65536 needed)")
    for tool in ("newuidmap", "newgidmap"):
        found = shutil.which(tool) or f"/usr/bin/{tool}"
        try:
            st = os.stat(found)
            how = "setuid" if st.st_mode & stat.S_ISUID and st.st_uid == 0 else "no-privilege"
            if how != "setuid" and "security.capability" in os.listxattr(found):
                how = "file-caps"
        except OSError:
            how = "missing"
        facts.append(f"{tool}={how}")
        if how in ("missing", "no-privilege"):
            missing.append(f"{tool} is {how}")
    return [pick("rootless", not missing, f"rootless prerequisites for {user} are in place "
                 "(subordinate IDs; newuidmap/newgidmap setuid or with file capabilities)",
                 (DEGRADED, f"rootless containers for {user} would fail: {'; '.join(missing)}. "
                  "uspawn as root is unaffected", f"usermod --add-subuids 100000-165535 "
                  f"--add-subgids 100000-165535 {user}; apt-get install uidmap"), " ".join(facts))]


def probe_nesting(ctx: Ctx) -> list[Row]:
    signs = []
    manager = _read("/run/host/container-manager") or _read("/run/systemd/container")
    if manager:
        signs.append(f"manager={manager}")
    try:
        with open("/proc/1/environ", "rb") as f:
            signs += ["pid1-" + v.decode(errors="replace") for v in f.read().split(b"\0")
                      if v.startswith(b"container=")]
    except OSError as exc:  # unreadable when pid 1 is not dumpable: no sign either way
        unread = f"pid1-environ={errname(exc)}"
    else:
        unread = ""
    uid_map = " ".join((_read("/proc/self/uid_map") or "?").split())
    if uid_map != "0 0 4294967295":
        signs.append(f"uid_map='{uid_map}'")
    return [pick("nesting", not signs, "uspawn runs on the host, not inside another container",
                 (DEGRADED, f"uspawn runs inside a container ({', '.join(signs)}): what works "
                  "depends on the outer manager; a user namespace around uspawn breaks its /dev "
                  "and idmapped mounts (see the rows above)", "run uspawn on the host, or give "
                  "the outer container real root (privileged, no user namespace)"),
                 " ".join([*signs, unread]).strip() or "no signs")]


def probe_trees_dir(ctx: Ctx) -> list[Row]:
    from uspawn.diag.check import find_setuid, traverse_blocker

    path = ctx.trees
    if not os.path.isdir(path):
        return [row("trees-dir", OK, f"{path} does not exist yet; create it with mode 0700")]
    blocker = traverse_blocker(path)
    found = None if blocker else find_setuid(path, budget=3.0)
    what = (f"it holds setuid files (e.g. {found})" if found else "no setuid files now, but")
    return [pick("trees-dir", blocker is not None, f"other users cannot traverse to {path} "
                 f"({blocker}): setuid files in trees stay out of their reach",
                 (DEGRADED, f"every user can traverse to {path}; {what} in an idmapped tree, "
                  "files the container's root creates are owned by host root, so a setuid binary"
                  " planted inside is a host setuid-root binary for every local user",
                  f"chmod 0700 {path}"), blocker or found or "world-traversable")]


def probe_limits(ctx: Ctx) -> list[Row]:
    """Which resource limits (--memory, --cpus, --pids, --property) this host can apply."""
    missing = {prop: why for prop, key in cgroups.SYSTEMD_KEYS.items()
               if (why := cgroups.why_not(key)) is not None}
    places = {prop: cgroups.placement(key) for prop, key in cgroups.SYSTEMD_KEYS.items()}
    detail = " ".join(f"{p}={w[0] if w else '-'}" for p, w in places.items())
    core = [p for p in ("MemoryMax", "CPUQuota", "TasksMax") if p in missing]
    if core:
        return [row("limits", DEGRADED, f"{', '.join(core)} cannot be applied here "
                    f"({missing[core[0]]}): --memory/--cpus/--pids are refused",
                    "enable the memory, cpu and pids controllers (cgroup_enable=memory, "
                    "or a cgroup2 host)", detail)]
    if missing:
        return [row("limits", DEGRADED, "--memory, --cpus and --pids work; refused here: "
                    + "; ".join(f"{p} ({why})" for p, why in missing.items()),
                    "a pure cgroup v2 host (systemd.unified_cgroup_hierarchy=1) applies every "
                    "property", detail)]
    return [row("limits", OK, "every resource property uspawn takes (MemoryMax, MemoryHigh, "
                "MemorySwapMax, CPUQuota, CPUWeight, AllowedCPUs, TasksMax, IOWeight) has a "
                "cgroup controller here", "", detail)]


def probe_lxcfs(ctx: Ctx) -> list[Row]:
    """lxcfs: /proc views inside machines that match their limits."""
    from uspawn.kernel import lxcfs

    lost = ("inside machines free, top, uptime and /proc/cpuinfo show the host's memory, "
            "CPUs and uptime, not the machine's limits (nginx's worker_processes auto, "
            "JVM heap sizing and the like size themselves for the whole host)")
    exe = lxcfs.binary()
    mnt = lxcfs.find()
    if mnt is None:
        if exe is None:
            return [row("lxcfs", DEGRADED, f"lxcfs is not installed: {lost}",
                        "apt install lxcfs", "not installed")]
        return [row("lxcfs", OK, f"{exe} is installed, not running: `uspawn boot` starts it on "
                    f"{lxcfs.MOUNTPOINT} (with --enable-cfs) and bind-mounts its files", "",
                    "installed")]
    args = _lxcfs_args()
    if args is not None and "--enable-cfs" not in args:
        return [row("lxcfs", DEGRADED, f"lxcfs runs on {mnt} without --enable-cfs: memory and "
                    "uptime views follow the limits, but cpuinfo and cpu/online show the "
                    "cpuset only, not --cpus/CPUQuota", "restart lxcfs with --enable-cfs "
                    "(Debian: a drop-in for lxcfs.service)", " ".join(args))]
    return [row("lxcfs", OK, f"lxcfs runs on {mnt}: machines see their own memory, CPUs and "
                "uptime in /proc", "", " ".join(args or []))]


def probe_monitor(ctx: Ctx) -> list[Row]:
    """uspawn-monitor: what a running machine costs the host (docs/ARCHITECTURE.md)."""
    from uspawn.base import natives

    exe = natives.find(natives.MONITOR)
    if exe is None:
        return [row("monitor", DEGRADED, f"{natives.MONITOR} is not built: every running "
                    "machine (boot --detach, the systemd unit) keeps a Python supervisor and "
                    "guardian on the host, about 9 MB each instead of about 0.2 MB",
                    "bash scripts/setup.sh (builds it with gcc), or install it in "
                    f"{natives.LIBEXEC[0]} (root-owned, not group/other-writable)",
                    "not found")]
    if os.environ.get("USPAWN_MONITOR") == "off":
        return [row("monitor", DEGRADED, f"{exe} is there, but USPAWN_MONITOR=off in this "
                    "environment: machines started from it keep a Python supervisor and "
                    "guardian (about 9 MB each)", "unset USPAWN_MONITOR", exe)]
    return [row("monitor", OK, f"{exe}: running machines are watched by it (about 0.2 MB "
                "each on the host)", "", exe)]


def _lxcfs_args() -> list[str] | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if (_read(f"/proc/{entry}/comm") or "").strip() == "lxcfs":
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
    return None


PROBES: list[tuple[str, Callable[[Ctx], list[Row]]]] = [
    ("kernel", probe_kernel), ("userns", probe_userns), ("mknod", probe_mknod),
    ("dev-nodes", probe_dev_nodes), ("idmap", probe_idmap), ("overlay", probe_overlay),
    ("seccomp", probe_seccomp), ("apis", probe_apis), ("cgroups", probe_cgroups),
    ("rootless", probe_rootless), ("nesting", probe_nesting), ("trees-dir", probe_trees_dir),
    ("limits", probe_limits), ("lxcfs", probe_lxcfs), ("monitor", probe_monitor),
]


# --- running and reporting -------------------------------------------------------


def run_probe(name: str, probe: Callable[[Ctx], list[Row]], ctx: Ctx,
              timeout: float = DEFAULT_TIMEOUT) -> list[Row]:
    """One probe in a forked child; a hang or a crash becomes a broken row."""
    try:
        rows: list[Row] = call(lambda peer: peer.send(rows=probe(ctx)), None, timeout)["rows"]
        return rows
    except TimeoutError:
        return [row(name, BROKEN, f"the probe timed out after {timeout:g} s and was killed: "
                    "something it needs hangs on this host",
                    "look for a stuck mount or cgroup operation (dmesg, hung tasks)",
                    "timed out")]
    except HelperError as exc:
        return [row(name, BROKEN, f"the probe failed: {exc}", "a refusal uspawn doctor does "
                    "not know yet; please report it with this line", errname(exc))]


def run_doctor(as_json: bool, out: TextIO, path: str | None = None,
               probes: list[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Probe this host; write a table (or JSON) to out. 0 = default containers
    work, 1 = something they need is broken. path: where container trees live
    (default /var/lib/machines, else /var/lib/uspawn); probes: names to run."""
    trees = path or next((p for p in DEFAULT_TREES if os.path.isdir(p)), DEFAULT_TREES[0])
    ctx = Ctx(os.path.abspath(trees))
    if os.geteuid() != 0:  # every probe does what uspawn does as root: all would fail
        rows = [row("root", BROKEN, f"doctor runs as uid {os.geteuid()}; its probes do what "
                    "uspawn does as root", "sudo uspawn doctor")]
    else:
        rows = [r for name, probe in PROBES if probes is None or name in probes
                for r in run_probe(name, probe, ctx, timeout)]
    return report(rows, as_json, out, {})
