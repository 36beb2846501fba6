"""Child side: the ordered setup steps inside the new namespaces, then execve.

Two forked processes run this code (no exec, so no second interpreter start):

  stage A (real root, host user namespace): unshares a mount namespace of its
      own (owned by the host user namespace), clones the init into the new
      user/pid/net/... namespaces, attaches the rootfs and the spec's mounts in
      config order (the parent's /dev, binds and rootfs; proc, sysfs, mqueue,
      devpts and cgroup2 made by a short-lived helper in the init's
      namespaces), hands the rootfs to the init and exits.
  stage B ("container init", pid 1 inside): unshares its mount namespace from
      A's, which locks every mount A made; mounts what lies below proc and
      sysfs, pivots, sysctls, masks, verifies /dev, waits for START, drops
      privileges, applies seccomp last, and execve()s.

After execve nothing of Python remains in the container. Constraints: stdlib +
uspawn.kernel only, everything imported before pivot_root (the host's Python
library directory is gone afterwards). Errors go back over the channel as one
line with errno; these processes never unwind into the caller (os._exit).
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import struct
import termios

from uspawn.base import faults, timing
from uspawn.engine import channel as chan
from uspawn.engine import execseq
from uspawn.engine import plan as planmod
from uspawn.engine.hooks import HookError, run_hook
from uspawn.kernel import devices, mounts, network, nsfs
from uspawn.kernel import sig as signal
from uspawn.kernel import syscalls as sc

InitPlan = planmod.InitPlan



InitError = execseq.InitError
_step = execseq.step_error


def _report_and_exit(ch: chan.Channel, exc: BaseException) -> None:
    """Forked children never unwind into the caller: report, then _exit."""
    code = 125
    try:
        if isinstance(exc, InitError):
            ch.send_error(str(exc), exc.errno, exc.exit_code)
            code = exc.exit_code
        elif isinstance(exc, devices.DeviceCheckError):
            ch.send_error(str(exc), exc.errno)
        elif isinstance(exc, OSError):
            ch.send_error(str(exc), exc.errno or 0)
        elif isinstance(exc, chan.ProtocolError | chan.ChildError):
            code = 125  # the parent is gone or confused: nothing to tell it
        else:
            ch.send_error(f"internal error in container setup: {exc!r}")
    except BaseException:
        pass
    os._exit(code)


# --- stage A ---------------------------------------------------------------


def stage_a(plan: InitPlan, ch: chan.Channel, wait_cgroup: bool) -> None:
    """Real root in the host user namespace: build the container's mounts, clone the init.

    The mounts are attached in a mount namespace of our own, owned by the host
    user namespace; the init is cloned into the new user namespace and later
    unshares its mount namespace from ours, which locks every mount made here
    (MNT_LOCK_READONLY & co., MNT_LOCKED): container root, with CAP_SYS_ADMIN in
    its own namespaces, can neither remount them writable nor unmount them.
    """
    try:
        # If the parent dies from here on, so do we (and the init sees EOF).
        sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != plan.parent_pid:
            os._exit(125)
        # Namespaces given by path (OCI linux.namespaces[].path, e.g. a netns
        # podman prepared) belong to the host: join them while still real root;
        # the init inherits them.
        pid_ns_path = ""
        for nstype, path in plan.join_namespaces:
            if nstype == "pid" and plan.join_userns_fd >= 0:
                # Joined by the helper that clones the init (_clone_in_userns):
                # a pid namespace joined here would be the helper's own.
                pid_ns_path = path
                continue
            # Checked again here (the path may have changed since planning):
            # an nsfs file of that type, never a FIFO or device opened by root.
            try:
                fd = nsfs.open_ns(path, nstype)
            except (nsfs.NsPathError, OSError) as exc:
                raise InitError(f"join {nstype} namespace {path}: {exc}") from None
            try:
                sc.setns(fd, _NS_JOIN_FLAGS[nstype])
            except OSError as exc:
                raise _step(f"join {nstype} namespace {path}", exc) from None
            finally:
                os.close(fd)
        try:  # after the joins: a joined mount namespace has its own root
            os.chdir(plan.root_path)
        except OSError as exc:
            raise _step(f"enter rootfs {plan.root_path}", exc) from None
        if wait_cgroup:
            # 1-2: the parent moves us into the (v1) cgroups; the init is born there.
            ch.userns_ready()
            ch.expect(chan.MAPPED, timeout=None)
        if plan.mount_ns:
            try:
                sc.unshare(sc.CLONE_NEWNS)
                # Before anything is mounted: nothing may propagate back to the
                # host (on a systemd host / is shared).
                mounts.make_rslave_root(sc.MS_SLAVE)
            except OSError as exc:
                raise _step("unshare the setup mount namespace", exc) from None
        # else the spec asked for the host's mount namespace (no "mount" entry)
        # or joined one by path: the mounts go there, as with runc.
        timing.mark("A: joins, chdir, unshare the setup mount namespace")
        if plan.time_ns:
            # Takes effect for children only (the init is born in it); its clocks
            # start with no offsets.
            try:
                sc.unshare(sc.CLONE_NEWTIME)
            except OSError as exc:
                raise _step("unshare time namespace", exc) from None
        link, init_link = chan.Channel.pair()
        flags = plan.unshare_flags & ~sc.CLONE_NEWNS
        if plan.join_userns_fd >= 0:
            pid = _clone_in_userns(plan, flags, pid_ns_path, ch, link, init_link)
        else:
            if plan.userns:
                flags |= sc.CLONE_NEWUSER
            try:
                pid = sc.clone(flags)
            except OSError as exc:
                raise _step("clone the container init into its namespaces", exc) from None
            if pid == 0:
                link.close()
                stage_b(plan, ch, init_link)
                os._exit(125)  # not reached
        init_link.close()
        timing.mark("A: clone the init into its namespaces")
        faults.kill_point("child-userns")
        # 3. the init exists (its user namespace is unmapped until the parent
        #    writes the maps), 4. the host-made mounts arrive as fds.
        ch.init_pid(pid)
        msg = ch.expect(chan.MOUNTS, timeout=None)
        fds = _labelled_fds(msg)
        remount = msg.data.get("remount")
        remount = remount if isinstance(remount, dict) else {}
        timing.mark("A: waits for MOUNTS")
        fds.update(ns_bound_mounts(plan, pid))
        timing.mark("A: proc & co. made by a helper in the init's namespaces")
        rootfd = build_host_side(plan, fds, remount)
        timing.mark("A: attaches the mounts")
        faults.kill_point("child-forked")
        # Hand the rest to the init; our exit tells it we are done.
        labels = ["rootfs", *fds]  # what is left: the exec FIFO, binds below proc/sysfs
        link.send(chan.MOUNTS, fds=[rootfd, *fds.values()], labels=labels,
                  state=msg.data.get("state"),
                  remount={k: v for k, v in remount.items() if k in fds})
        os._exit(0)
    except BaseException as exc:
        _report_and_exit(ch, exc)


def _clone_in_userns(plan: InitPlan, flags: int, pid_ns_path: str, ch: chan.Channel,
                     link: chan.Channel, init_link: chan.Channel) -> int:
    """Clone the init into an existing user namespace (a pod's); return its pid.

    We must stay real root in the host user namespace (the mounts are ours to
    make), and the namespaces the init gets new (pid, uts, cgroup, ...) must be
    owned by the joined user namespace, as they would be had the init created
    it: container root needs its capabilities over them. So a helper joins the
    user namespace (and a pid namespace given by path, which setns would make
    ours for children) and clones the init with CLONE_PARENT: the init is our
    child, as the init cloned by us directly is, and the helper exits.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    helper = os.fork()
    if helper == 0:
        try:
            os.close(r)
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            if pid_ns_path:
                try:
                    fd = nsfs.open_ns(pid_ns_path, "pid")
                    try:
                        sc.setns(fd, sc.CLONE_NEWPID)
                    finally:
                        os.close(fd)
                except (nsfs.NsPathError, OSError) as exc:
                    raise InitError(f"join pid namespace {pid_ns_path}: {exc}",
                                    getattr(exc, "errno", 0) or 0) from None
            try:
                sc.setns(plan.join_userns_fd, sc.CLONE_NEWUSER)
            except OSError as exc:
                raise _step("join the pod's user namespace", exc) from None
            os.close(plan.join_userns_fd)
            try:
                pid = sc.clone(flags | sc.CLONE_PARENT)
            except OSError as exc:
                raise _step("clone the container init into its namespaces", exc) from None
            if pid == 0:
                os.close(w)
                link.close()
                stage_b(plan, ch, init_link)
                os._exit(125)  # not reached
            os.write(w, str(pid).encode())
        except BaseException as exc:
            err = exc.errno if isinstance(exc, OSError | InitError) else 0
            try:
                os.write(w, f"error {err or 0} {exc}".encode())
            except BaseException:
                pass
        finally:
            os._exit(0)
    os.close(w)
    os.close(plan.join_userns_fd)
    try:
        data = b""
        while chunk := os.read(r, 4096):
            data += chunk
    finally:
        os.close(r)
        _reap(helper)
    text = data.decode(errors="replace")
    if text.isdigit():
        return int(text)
    if text.startswith("error "):
        _, code, msg = text.split(" ", 2)
        raise InitError(msg, int(code) if code.isdigit() else 0)
    raise InitError("clone the container init into the pod's user namespace: the helper "
                    "died without an answer")


def _labelled_fds(msg: chan.Message) -> dict[str, int]:
    labels = msg.data.get("labels")
    if not isinstance(labels, list) or len(labels) != len(msg.fds):
        raise InitError("mount fd labels do not match the fds received")
    return dict(zip((str(x) for x in labels), msg.fds, strict=True))


def build_host_side(plan: InitPlan, fds: dict[str, int], remount: dict[str, int]) -> int:
    """Stage A: attach the rootfs on the tree's directory and the mounts onto it
    in config order; make the root read-only last. Returns the rootfs fd (it
    names the attached mount)."""
    rootfd = fds.pop("rootfs")
    try:
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mounts.attach(rootfd, here)
        finally:
            os.close(here)
        if "rootfs" in remount:
            mounts.remount_attached(rootfd, remount["rootfs"])
    except OSError as exc:
        raise _step(f"attach rootfs on {plan.root_path}", exc) from None
    if plan.userns:
        # Mount targets are created as container root (through an idmapped
        # rootfs they land as its root, in a chowned tree they belong to it),
        # keeping root's override of permission bits to reach them.
        try:
            sc.set_fs_ids(*plan.root_ids)
            _eff, permitted, inheritable = sc.capget()
            sc.capset(permitted, permitted, inheritable)
        except OSError as exc:
            raise _step("switch to container root's file IDs", exc) from None
    for op in plan.host_mounts:
        try:
            op.execute(rootfd, fds, remount)
        except OSError as exc:
            raise _step(f"mount {op.describe()}", exc) from None
    if plan.rootfs_readonly:
        # Last, so that missing mount points could still be created (runc's order).
        try:
            deferred = mounts.set_attrs_or_defer(rootfd, sc.MOUNT_ATTR_RDONLY)
            if deferred:
                mounts.remount_attached(
                    rootfd, deferred | mounts.remount_flags(remount.get("rootfs", sc.MS_NODEV)))
        except OSError as exc:
            raise _step("make the rootfs read-only", exc) from None
    return rootfd


def ns_bound_mounts(plan: InitPlan, init_pid: int) -> dict[str, int]:
    """proc, sysfs, mqueue, devpts and cgroup2 instances of the init's namespaces,
    by label, made by a helper.

    Each of these filesystems takes its namespace from the process that creates
    it (proc: its pid namespace, which only a child forked after setns has;
    sysfs: its network namespace; ...), and the superblock belongs to that
    namespace's user namespace whoever makes it. The helper stays real root in
    the host user namespace, so stage A can attach its mounts in config order
    with the others and they are locked with them.
    """
    ops = [op for op in plan.host_mounts if isinstance(op, planmod.FsMount) and op.label]
    if not ops:
        return {}
    ns = {name: os.open(f"/proc/{init_pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
          for name in ("pid", "net", "ipc", "cgroup")}
    here, there = chan.Channel.pair()
    try:
        try:
            sc.setns(ns["pid"], sc.CLONE_NEWPID)  # for children: the helper is born there
        except OSError as exc:
            raise _step("join the container's pid namespace", exc) from None
        helper = os.fork()
        if helper == 0:
            here.close()
            _ns_helper(ops, ns, there)
        there.close()
        try:
            fds = _labelled_fds(here.expect(chan.MOUNTS, timeout=chan.DEFAULT_TIMEOUT))
        except chan.ChildError as exc:
            raise InitError(str(exc), exc.errno, exc.exit_code) from None
        finally:
            _reap(helper)
        return fds
    finally:
        here.close()
        for fd in ns.values():
            os.close(fd)


def _ns_helper(ops: list[planmod.FsMount], ns: dict[str, int], ch: chan.Channel) -> None:
    try:
        for name, flag in (("net", sc.CLONE_NEWNET), ("ipc", sc.CLONE_NEWIPC),
                           ("cgroup", sc.CLONE_NEWCGROUP)):
            try:
                sc.setns(ns[name], flag)
            except OSError as exc:
                raise _step(f"join the container's {name} namespace", exc) from None
        made: dict[str, int] = {}
        for op in ops:
            try:
                made[op.label] = op.make()
            except OSError as exc:
                raise _step(f"mount {op.describe()}", exc) from None
        ch.send(chan.MOUNTS, fds=list(made.values()), labels=list(made))
        os._exit(0)
    except BaseException as exc:
        _report_and_exit(ch, exc)


def _reap(pid: int) -> None:
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:
            return
        except InterruptedError:
            continue


# --- stage B ---------------------------------------------------------------


def stage_b(plan: InitPlan, ch: chan.Channel, link: chan.Channel) -> None:
    try:
        # 4'. stage A hands over the rootfs and the mounts that only we can
        # place, then exits; its EOF means we now belong to the runtime.
        msg = link.expect(chan.MOUNTS, timeout=None)
        fds = _labelled_fds(msg)
        if link.recv(timeout=None) is not None:
            raise InitError("unexpected message from the setup process")
        link.close()
        timing.mark("B: waits for stage A")
        os.setsid()
        fifo = fds.pop("fifo", -1)
        state = msg.data.get("state")
        state_json = state if isinstance(state, str) else ""
        remount = msg.data.get("remount")
        deferred = remount if isinstance(remount, dict) else {}
        if plan.userns:
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        setup_rootfs(plan, fds, deferred, state_json)
        timing.mark("B: rootfs mounts, pivot_root")
        finish_in_root(plan, ch)
        timing.mark("B: sysctls, masks, verify /dev")
        if plan.new_keyring:
            join_session_keyring()
        # Stage A's EOF comes before the kernel reparents us (exit_files runs
        # before exit_notify): a PDEATHSIG set then fires at A's death. The
        # parent says when it has reaped A; until then the guardian covers us.
        ch.expect(chan.ADOPTED, timeout=None)
        timing.mark("B: waits for ADOPTED")
        if plan.die_with_parent:
            sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
            if ch.peer_gone():  # the runtime died before the line above
                os._exit(125)
        # 6. set up and waiting.
        faults.kill_point("init-set-up")
        ch.send(chan.CREATED)
        # 7. wait for START (no timeout: create and start may be far apart).
        if plan.start_fifo:
            ch = _wait_fifo(fifo)
        elif not plan.auto_start:
            ch.wait_start()
        for path, args, env, timeout in plan.start_hooks:
            try:
                run_hook(path, args, env, timeout, state_json, "startContainer")
            except HookError as exc:
                raise InitError(str(exc)) from None
        exec_payload(plan, ch)
    except BaseException as exc:
        _report_and_exit(ch, exc)


# A joined pid namespace applies to children (pid_for_children): the init,
# cloned right after, is born in it (not as its pid 1).
_NS_JOIN_FLAGS = {"network": sc.CLONE_NEWNET, "ipc": sc.CLONE_NEWIPC, "uts": sc.CLONE_NEWUTS,
                  "cgroup": sc.CLONE_NEWCGROUP, "time": sc.CLONE_NEWTIME,
                  "pid": sc.CLONE_NEWPID, "mount": sc.CLONE_NEWNS}


class _FifoReporter(chan.Channel):
    """After an OCI `start` the only one listening is the `start` process on the
    exec FIFO: errors (a failed execve) go there as text."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send_error(self, message: str, err: int = 0, exit_code: int = 125) -> None:
        os.write(self.fd, f"error {exit_code} {message}".encode())

    def send(self, kind: str, fds: list[int] | None = None, **data: object) -> None:
        raise InitError("no channel after start")


def _wait_fifo(fifo_path_fd: int) -> chan.Channel:
    """Block until `start` opens the exec FIFO, then tell it we go (runc's exec.fifo).

    The FIFO lives in the host's state directory, reachable only through the
    O_PATH fd the parent passed; /proc/self/fd reopens it for writing.
    """
    fd = os.open(f"/proc/self/fd/{fifo_path_fd}", os.O_WRONLY | os.O_CLOEXEC)
    os.close(fifo_path_fd)
    os.write(fd, b"0")
    return _FifoReporter(fd)


def join_session_keyring() -> None:
    """A fresh anonymous session keyring, so the container never shares the
    caller's (runc does the same unless --no-new-keyring)."""
    try:
        sc.keyctl_join_session_keyring()
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            raise _step("join a new session keyring", exc) from None


def setup_rootfs(plan: InitPlan, fds: dict[str, int], remount: dict[str, int],
                 state_json: str = "") -> None:
    """Our own mount namespace (stage A's mounts, locked), the mounts below proc
    and sysfs, createContainer hooks, pivot_root.

    The hooks run here, as runc runs them: in the container's namespaces with
    every mount in place, before pivot_root, so their path resolves in the
    runtime's root (runtime-spec config.md) and what they change in the tree
    is what the payload sees.

    The rootfs fd from stage A names a mount in A's namespace: we enter it
    (fchdir) before unsharing, and unshare carries the cwd into the copy, so
    no host path above the tree (often 0700) is walked with our IDs.
    """
    rootfd = fds.pop("rootfs")
    if not plan.mount_ns:
        _enter_rootfs_shared(plan, rootfd, fds, remount, state_json)
        return
    try:
        os.fchdir(rootfd)
    except OSError as exc:
        raise _step(f"enter rootfs {plan.root_path}", exc) from None
    finally:
        os.close(rootfd)
    try:
        sc.unshare(sc.CLONE_NEWNS)
    except OSError as exc:
        raise _step("unshare mount namespace", exc) from None
    try:
        locked = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Our copy of the rootfs is locked onto its host parent, and
            # pivot_root refuses a locked mount: stack a recursive clone (ours,
            # its submounts still locked) on it and pivot into that.
            rootfd = mounts.clone_tree("", recursive=True, dirfd=locked)
            mounts.attach(rootfd, locked)
        finally:
            os.close(locked)
    except OSError as exc:
        raise _step(f"clone rootfs {plan.root_path}", exc) from None
    try:
        _init_mounts_and_hooks(plan, rootfd, fds, remount, state_json)
        try:
            mounts.pivot_into(rootfd)
        except OSError as exc:
            raise _step(f"pivot_root into {plan.root_path}", exc) from None
    finally:
        os.close(rootfd)


def _init_mounts_and_hooks(plan: InitPlan, rootfd: int, fds: dict[str, int],
                           remount: dict[str, int], state_json: str) -> None:
    for dest, attrs in plan.readonly_later:
        try:
            _make_mount_readonly(rootfd, dest, attrs)
        except OSError as exc:
            raise _step(f"make {dest} read-only", exc) from None
    for op in plan.mounts:
        try:
            op.execute(rootfd, fds, remount)
        except OSError as exc:
            raise _step(f"mount {op.describe()}", exc) from None
    for path, args, env, timeout in plan.container_hooks:
        try:
            run_hook(path, args, env, timeout, state_json, "createContainer")
        except HookError as exc:
            raise InitError(str(exc)) from None


def _enter_rootfs_shared(plan: InitPlan, rootfd: int, fds: dict[str, int],
                         remount: dict[str, int], state_json: str) -> None:
    """No mount namespace of our own (the host's, or one joined by path): the
    mounts stay where stage A made them and the init enters the rootfs with
    chroot, as runc does; pivot_root would move the root of every process in
    that namespace. Only without a user namespace (plan.build refuses it with one)."""
    try:
        _init_mounts_and_hooks(plan, rootfd, fds, remount, state_json)
        try:
            os.fchdir(rootfd)
            os.chroot(".")
            os.chdir("/")
        except OSError as exc:
            raise _step(f"chroot into {plan.root_path}", exc) from None
    finally:
        os.close(rootfd)


def _make_mount_readonly(rootfd: int, dest: str, attrs: int) -> None:
    """The mount at dest (stage A's, locked but writable) becomes read-only: ours
    to lift again, as when the init mounted proc and sysfs itself."""
    target = mounts.open_in_root(rootfd, dest)
    try:
        deferred = mounts.set_attrs_or_defer(target, sc.MOUNT_ATTR_RDONLY)
        if deferred:
            # A classic remount must repeat the flags the lock keeps.
            mounts.remount_attached(target, deferred | mounts.attrs_to_ms(attrs))
    finally:
        os.close(target)


def finish_in_root(plan: InitPlan, ch: chan.Channel) -> None:
    """Sysctls, masks and read-only paths are the init's, in its own mount
    namespace: a proc or sysfs instance can be mounted again inside (nested
    containers, systemd's ProtectProc=) only while every locked mount on the
    visible one covers an empty directory (the kernel's mount_too_revealing),
    so these stay unlocked, as with runc, crun and systemd-nspawn. What they
    hide belongs to host root either way."""
    for key, value in plan.sysctl.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            raise _step(f"sysctl {key}", exc) from None
    root = os.open("/", os.O_PATH | os.O_CLOEXEC)
    null_fd = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
    try:
        for path in plan.masked_paths:
            try:
                mounts.mask_path(root, path, null_fd)
            except OSError as exc:
                raise _step(f"mask {path}", exc) from None
        for path in plan.readonly_paths:
            try:
                mounts.make_readonly(root, path)
            except OSError as exc:
                raise _step(f"make {path} read-only", exc) from None
    finally:
        os.close(null_fd)
        os.close(root)
    if plan.hostname is not None:
        sc.sethostname(plan.hostname)
    if plan.domainname is not None:
        sc.setdomainname(plan.domainname)
    if plan.loopback:
        try:
            network.loopback_up()
        except OSError as exc:
            raise _step("bring up lo", exc) from None
    # Every node must open before the payload runs (the 2018 lesson).
    nodes = [] if faults.active("dev-nodev") else list(plan.verify_devices)
    try:
        devices.verify_nodes(nodes)
        if plan.verify_ptmx:
            fd = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
            os.close(fd)
    except OSError as exc:
        raise InitError(f"device node /dev/ptmx cannot be opened: {exc.strerror}",
                        exc.errno or 0) from None
    if plan.terminal:
        setup_console(plan, ch)
    try:
        if plan.mount_ns:  # else / is the host's rootfs directory, not ours to change
            # The last mount change: after pivot_root (a shared new root makes it
            # fail with EINVAL) and after every clone of a mount (masks, the
            # console), which an unbindable / would refuse.
            mounts.make_rslave_root(plan.root_propagation)
    except OSError as exc:
        raise _step("set the propagation of /", exc) from None
    for name, soft, hard in plan.rlimits:
        try:
            resource.setrlimit(planmod.RLIMITS[name], (soft, hard))
        except (OSError, ValueError) as exc:
            raise InitError(f"setrlimit {name}: {exc}") from None


def setup_console(plan: InitPlan, ch: chan.Channel) -> None:
    """Allocate the pty inside the container's devpts; the master goes to the parent.

    Opening the peer with TIOCGPTPEER (Linux 4.13) avoids a path lookup of
    /dev/pts/N that a hostile tree could race.
    """
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, sc.TIOCSPTLCK, b"\0\0\0\0")
    slave = fcntl.ioctl(master, sc.TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    try:  # the process user's terminal, as runc makes it (the gid stays devpts' tty)
        os.fchown(slave, plan.uid, -1)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL):  # runc ignores these too
            raise InitError(f"chown the console to uid {plan.uid}: {exc.strerror}",
                            exc.errno or 0) from None
    if plan.console_size:
        rows, cols = plan.console_size
        fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(rows, cols))
    # /dev/console is the pty too (systemd and getty write there).
    if os.path.exists("/dev/console"):
        mounts.attach_at(mounts.clone_tree("", dirfd=slave), "/dev/console")
    fcntl.ioctl(slave, sc.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)
    ch.send(chan.CONSOLE, fds=[master])
    os.close(master)


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


def exec_payload(plan: InitPlan, ch: chan.Channel) -> None:
    """The init's payload, through the one exec sequence (engine/execseq.py)."""
    execseq.exec_process(execseq.Process(
        plan.args, plan.env, plan.cwd, plan.uid, plan.gid, plan.additional_gids, plan.umask,
        plan.caps_bounding, (plan.caps_effective, plan.caps_permitted, plan.caps_inheritable,
                             plan.caps_ambient),
        plan.no_new_privileges, plan.seccomp_bpf, plan.preserve_fds),
        ch.fd if isinstance(ch, _FifoReporter) else ch.fileno())
