"""Parent side: create, start, wait for and destroy one container.

The parent stays real root in the host namespaces and does the host-only
work: ID maps, the cgroup, the /dev tmpfs on a host-owned superblock, the
idmapped (or chowned) rootfs and bind sources. Those arrive in the child as
detached-mount fds. The sync points 1..8 are described in channel.py.

Nothing is left behind: every step registers its undo in Container.destroy(),
which runs on failure, on normal exit, and, when the runtime itself is killed
with SIGKILL, in a small guardian process forked before anything else (the
container init dies with the runtime through PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import errno
import os
import time

from uspawn.base import faults, timing
from uspawn.base.errors import ExecError, SetupError, SpecError, UspawnError, hint_for
from uspawn.engine import channel as chan
from uspawn.engine import plan as planmod
from uspawn.engine.init import stage_a
from uspawn.engine.request import START_AUTO, Request
from uspawn.kernel import cgroups, devices, mounts, userns
from uspawn.kernel import sig as signal
from uspawn.kernel import syscalls as sc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from uspawn.engine import spec as S
    from uspawn.state.store import Lease, NameClaim


class Guardian:
    """Cleans up after a runtime that died without doing it (kill -9).

    Forked before the container, it holds copies of the name/range leases and
    learns the cgroup and init pid through a pipe. EOF without a final `done`
    line means the runtime died: wait for the init to go (it gets SIGKILL via
    PDEATHSIG), remove the cgroup and the state, release the leases.
    """

    def __init__(self) -> None:
        self.pid = 0
        self.wfd = -1

    def spawn(self, claim: NameClaim | None, lease: Lease | None) -> None:
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            try:
                os.close(wfd)
                os.setsid()
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                            signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
                    signal.set_handler(sig, signal.SIG_IGN)
                # Hold only what it must clean: other inherited fds (network leases)
                # would keep those claims alive after the runtime died.
                keep = {0, 1, 2, rfd, *(x.fd for x in (claim.lease if claim else None, lease)
                                        if x is not None)}
                for name in os.listdir("/proc/self/fd"):
                    if int(name) not in keep:
                        try:
                            os.close(int(name))
                        except OSError:
                            pass
                _guard(rfd, claim, lease)
            finally:
                os._exit(0)
        os.close(rfd)
        self.pid, self.wfd = pid, wfd

    def tell(self, line: str) -> None:
        if self.wfd >= 0:
            os.write(self.wfd, (line + "\n").encode())

    def dismiss(self, wait: bool = False) -> None:
        if self.wfd < 0:
            return
        self.tell("done")
        os.close(self.wfd)
        self.wfd = -1
        # Reap it if it is already gone; else it exits on its own right away
        # (and init reaps it once we are gone): no need to wait here.
        try:
            os.waitpid(self.pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            pass


def _guard(rfd: int, claim: NameClaim | None, lease: Lease | None) -> None:
    buf = b""
    init_pidfd = -1
    while True:
        chunk = os.read(rfd, 4096)
        if not chunk:
            break
        buf += chunk
        if init_pidfd < 0 and b"init " in buf:
            # Pin the init now, while the runtime (its reaper) lives: a pid
            # read later could already belong to another process.
            for line in buf.decode().splitlines():
                key, _, value = line.partition(" ")
                if key == "init" and value.isdigit():
                    try:
                        init_pidfd = sc.pidfd_open(int(value))
                    except OSError:
                        pass
    lines = buf.decode().splitlines()
    if "done" in lines:
        return
    import json

    cg = None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == "cgroup":
            cg = cgroups.Cgroup.from_json(json.loads(value))
    if init_pidfd >= 0:
        # The runtime died before handing the container over: it must go. (A
        # foreground init already got SIGKILL through PDEATHSIG; an OCI one
        # waiting for `start` has none.)
        import select

        try:
            sc.pidfd_send_signal(init_pidfd, signal.SIGKILL)
        except OSError:
            pass
        select.select([init_pidfd], [], [], 10.0)
        os.close(init_pidfd)
    if cg is not None:
        try:
            cg.destroy()
        except cgroups.CgroupError:
            pass
    if claim is not None:
        claim.release()
    if lease is not None:
        lease.release()
    from uspawn.net import pool as netpool

    if os.path.isdir(netpool.NET_DIR):
        try:
            netpool.cleanup_stale()  # the network leases of a runtime that died
        except Exception:
            pass


class Container:
    """A created container: init is set up and waits for start()."""

    def __init__(self, spec: S.Spec, req: Request) -> None:
        self.spec = spec
        self.req = req
        # Released by destroy() (once); what undoes host-side setup, newest last.
        self.claim = req.claim
        self.range_lease = req.range_lease
        self.undo: list[Callable[[], None]] = list(req.undo)
        self.init_pid = 0
        self.pidfd = -1
        self.ch: chan.Channel | None = None
        self.console_master = -1
        self.cgroup: cgroups.Cgroup | None = None
        self.guardian = Guardian()
        self.ownership_used = "off"
        self.started_at = 0.0
        self.exit_status: int | None = None
        # label -> MS_* flags the init applies by classic remount (Linux < 5.12).
        self.deferred_remounts: dict[str, int] = {}
        # Without a mount namespace of its own the container's mounts land on
        # the host's rootfs directory: the mount ID found there before, so
        # destroy (or `uspawn-runc delete`) detaches exactly what was added.
        self.host_root_mnt = 0

    # --- create ------------------------------------------------------------

    def create(self) -> None:
        spec, req = self.spec, self.req
        timing.mark("Container.create")
        host, init = planmod.build(spec, req)
        timing.mark("plan (spec -> host/init plans)")
        if req.debug:
            for line in init.describe():
                req.say(f"plan: {line}")
        linux = spec.linux
        uid_maps = [(m.container_id, m.host_id, m.size)
                    for m in (linux.uid_mappings if linux else [])]
        gid_maps = [(m.container_id, m.host_id, m.size)
                    for m in (linux.gid_mappings if linux else [])]
        root_uid, root_gid = init.root_ids

        if not init.mount_ns and not any(t == "mount" for t, _ in init.join_namespaces):
            root = init.root_path
            try:
                self.host_root_mnt = before = mounts.mount_id(root)
            except OSError as exc:
                raise SetupError(f"root.path: {root}: {exc.strerror}") from None
            self.undo.append(lambda: (mounts.detach_if_covered(root, before), None)[1])
        # The container's processes become our children when stage A exits.
        sc.prctl(sc.PR_SET_CHILD_SUBREAPER, 1)
        self.guardian.spawn(self.claim, self.range_lease)
        timing.mark("fork guardian")
        pid_a = 0
        try:
            try:
                self.cgroup = cgroups.create(req.name, self._v1_controllers(), req.cgroup_path)
            except (cgroups.CgroupError, OSError) as exc:
                raise SetupError(f"create cgroup: {exc}") from None
            from uspawn.state.store import dumps

            self.guardian.tell("cgroup " + dumps(self.cgroup.to_json()))
            faults.kill_point("parent-cgroup")
            if req.delegate_cgroup and init.userns:
                try:
                    self.cgroup.delegate(root_uid, root_gid)
                except OSError as exc:
                    raise SetupError(f"delegate cgroup to the container: {exc}") from None
            timing.mark("cgroup create")
            self._apply_resources()
            parent_ch, child_ch = chan.Channel.pair()
            self.ch = parent_ch
            pid_a, joined = self._fork_in_cgroup()
            if pid_a:
                timing.mark("fork stage A (clone3 into the cgroup)")
            # Stage A must be in every cgroup before it clones the init.
            wait_cgroup = not joined or bool(self._v1_controllers())
            if pid_a:
                faults.kill_point("parent-forked")
            if pid_a == 0:
                # Never unwind into the caller from a forked child.
                try:
                    # Close what the container must never hold: our channel end
                    # and the guardian pipe (else the guardian never sees EOF).
                    parent_ch.close()
                    os.close(self.guardian.wfd)
                    if req.stdio is not None:
                        for target, fd in enumerate(req.stdio):
                            if fd != target:
                                os.dup2(fd, target)
                    for fd in req.close_in_child:
                        os.close(fd)
                    stage_a(init, child_ch, wait_cgroup)
                except BaseException as exc:  # stage_a reports its own errors
                    os.write(2, f"uspawn: internal error before container setup: {exc!r}\n"
                             .encode())
                finally:
                    os._exit(125)
            child_ch.close()
            fds: dict[str, int] = {}
            try:
                try:
                    self._handshake(pid_a, uid_maps, gid_maps, init, joined, wait_cgroup, host, fds)
                except BaseException:
                    # Stage A may be waiting (no timeout) on a channel we still
                    # hold open: end it, or the reap below waits forever.
                    try:
                        os.kill(pid_a, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    _reap(pid_a)
                    raise
                labels = list(fds)
                state = (req.state_json(self.init_pid, "created")
                         if req.state_json else "")
                self.ch.send(chan.MOUNTS, fds=[fds[k] for k in labels], labels=labels,
                             state=state, remount=self.deferred_remounts)  # 4
            finally:
                for fd in fds.values():
                    os.close(fd)
            timing.mark("sync 4 MOUNTS sent")
            self._await_stage_a(pid_a)
            timing.mark("stage A attaches mounts, exits; reaped")
            pid_a = 0  # reaped
            self.ch.send(chan.ADOPTED)
            if init.terminal:
                msg = self.ch.expect(chan.CONSOLE)
                if len(msg.fds) != 1:
                    raise SetupError("console: expected one pty master fd from the container")
                self.console_master = msg.fds[0]
            faults.kill_point("parent-mounts-sent")
            self.ch.wait_created()
            timing.mark("sync 6 CREATED (init: pivot_root, masks, verify /dev)")
            faults.kill_point("parent-created")
        except chan.ChildError as exc:
            self.destroy()
            _reap(pid_a)
            raise SetupError(str(exc), _hint_errno(str(exc), exc.errno)) from None
        except chan.ProtocolError as exc:
            self.destroy()
            _reap(pid_a)
            raise SetupError(f"container setup: {exc}") from None
        except BaseException:
            self.destroy()
            _reap(pid_a)
            raise

    def _await_stage_a(self, pid_a: int) -> None:
        """Stage A exits once it handed the mounts to the init; reap it (bounded).

        A non-zero exit means it failed and said why on the channel (or was killed)."""
        import select

        assert self.ch is not None
        pidfd = sc.pidfd_open(pid_a)
        try:
            if not select.select([pidfd], [], [], chan.DEFAULT_TIMEOUT)[0]:
                raise SetupError(f"container setup: stage A did not finish within "
                                 f"{chan.DEFAULT_TIMEOUT:.0f}s")
        finally:
            os.close(pidfd)
        _pid, status = os.waitpid(pid_a, 0)
        if status != 0:
            self.ch.recv(timeout=1.0)  # its ERROR raises ChildError here
            raise SetupError("container setup: the setup process died "
                             f"({_describe_status(status)})")

    def _v1_controllers(self) -> tuple[str, ...]:
        """v1 hierarchies to join on hybrid/legacy hosts: only those with limits
        (each v1 migration costs an RCU grace period)."""
        wanted: list[str] = []
        for key in self._limits():
            ctrl = "cpuset" if key in ("cpu.cpus", "cpu.mems") else key.split(".")[0]
            if ctrl not in wanted:
                wanted.append(ctrl)
        return tuple(wanted)

    def _limits(self) -> dict[str, int | str | bool]:
        """linux.resources as cgroups.set_limits takes them, in the order the
        kernel needs (memory before memory+swap, the CFS period before the quota)."""
        res = self.spec.linux.resources if self.spec.linux else None
        out: dict[str, int | str | bool] = {}
        if res is None:
            out.update(self.req.cgroup_limits)
            return out
        m, c = res.memory, res.cpu
        for key, value in (
                ("memory.limit", m.limit if m else None),
                ("memory.reservation", m.reservation if m else None),
                ("memory.swap", m.swap if m else None),
                ("memory.swappiness", m.swappiness if m else None),
                ("memory.disableOOMKiller", m.disable_oom_killer or None if m else None),
                ("pids.limit", res.pids.limit if res.pids else None),
                ("cpu.shares", c.shares or None if c else None),
                ("cpu.period", c.period if c else None),
                ("cpu.quota", c.quota if c else None),
                ("cpu.cpus", c.cpus or None if c else None),
                ("cpu.mems", c.mems or None if c else None)):
            if value is not None:
                out[key] = value
        for i, h in enumerate(res.hugepage_limits):
            if not cgroups.hugepage_size_known(h.page_size):
                raise SpecError(f"linux.resources.hugepageLimits[{i}].pageSize: "
                                f"{h.page_size!r} is not a huge page size of this host",
                                "see /sys/kernel/mm/hugepages")
            out[f"hugetlb.{h.page_size}"] = h.limit
        out.update(self.req.cgroup_limits)
        return out

    def _device_policy(self, host: planmod.HostPlan) -> None:
        """Only the configured device nodes open in the container, wherever a node is."""
        v2 = self.cgroup.v2_dir if self.cgroup is not None else None
        if v2 is None:
            return  # legacy v1-only host: no device policy yet (docs/SECURITY.md)
        from uspawn.kernel import devcgroup

        nodes = [("b" if n.kind == "b" else "c", n.major, n.minor, devcgroup.access_mask(n.access))
                 for n in host.dev_nodes if n.kind != "p" and n.access]
        try:
            devcgroup.attach(v2, nodes)
        except OSError as exc:
            raise SetupError(f"device cgroup policy on {v2}: {exc}") from None

    def _fork_in_cgroup(self) -> tuple[int, bool]:
        """Fork stage A, born in the v2 cgroup when the kernel allows (no migration)."""
        assert self.cgroup is not None
        v2 = self.cgroup.v2_dir
        if v2 is not None:
            fd = os.open(v2, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return sc.fork_into_cgroup(fd), True
            except OSError as exc:
                if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
            finally:
                os.close(fd)
        return os.fork(), False

    def _host_side_after_init(self, fds: dict[str, int]) -> None:
        """oom_score_adj (needs host privilege to lower), the start FIFO, create hooks."""
        proc = self.spec.process
        if proc is not None and proc.oom_score_adj is not None:
            try:
                with open(f"/proc/{self.init_pid}/oom_score_adj", "w") as f:
                    f.write(str(proc.oom_score_adj))
            except OSError as exc:
                raise SetupError(f"process.oomScoreAdj: {exc.strerror}") from None
        if self.req.network_setup is not None:
            self.req.network_setup(self.init_pid, self.undo)
        if self.req.exec_fifo is not None:
            # The init reopens it through /proc/self/fd (the path is not
            # reachable from inside); only the parent can see the state dir.
            fds["fifo"] = os.open(self.req.exec_fifo, os.O_PATH | os.O_CLOEXEC)
        if self.req.create_hooks and self.req.state_json is not None:
            from uspawn.engine.hooks import HookError, run_hook

            state = self.req.state_json(self.init_pid, "creating")
            for path, args, env, timeout in self.req.create_hooks:
                try:
                    run_hook(path, args, env, timeout, state, "createRuntime")
                except HookError as exc:
                    raise SetupError(str(exc)) from None

    def handover(self) -> None:
        """OCI `create` done: leave the init running for `start`, forget it here."""
        if self.ch is not None:
            self.ch.close()
            self.ch = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        # Reap the guardian: once we exit, an unreaped child would be handed
        # to the caller's subreaper (conmon), which expects only the init.
        self.guardian.dismiss(wait=True)

    def _apply_resources(self) -> None:
        limits = self._limits()
        if not limits or self.cgroup is None:
            return
        try:
            for warning in self.cgroup.set_limits(limits):
                self.req.say(f"warning: {warning}")
        except cgroups.CgroupError as exc:
            raise SetupError(str(exc)) from None
        except OSError as exc:
            raise SetupError(f"linux.resources: cannot apply limits: {exc}",
                             hint_for(exc)) from None

    def _handshake(self, pid_a: int, uid_maps: list[tuple[int, int, int]],
                   gid_maps: list[tuple[int, int, int]], init: planmod.InitPlan,
                   joined: bool, wait_cgroup: bool, host: planmod.HostPlan,
                   fds: dict[str, int]) -> None:
        """Sync points 1-3 with stage A (its death ends every wait at once), then
        the host-side work on the init's namespaces; fills fds for MOUNTS."""
        assert self.ch is not None and self.cgroup is not None
        # The device policy goes on the cgroup first: before the init exists, so
        # before it can open any node, and while stage A unshares and clones (the
        # BPF load and attach, ~1.5 ms, overlap with that instead of following it).
        self._device_policy(host)
        timing.mark("device policy (while stage A works)")
        pidfd_a = sc.pidfd_open(pid_a)
        try:
            if wait_cgroup:
                self.ch.wait_userns_ready(pidfd_a)  # 1
                timing.mark("sync 1 USERNS_READY")
                try:
                    self.cgroup.add(pid_a, skip_v2=joined)
                except OSError as exc:
                    raise SetupError(f"join cgroup {self.cgroup.dirs[0]}: "
                                     f"{exc.strerror}") from None
                self.ch.mapped()  # 2
                timing.mark("sync 2 MAPPED (v1 cgroups joined)")
            self.init_pid = self.ch.wait_init_pid(pidfd_a)  # 3
            timing.mark("sync 3 INIT_PID (stage A: unshare, clone init)")
        finally:
            os.close(pidfd_a)
        self.pidfd = sc.pidfd_open(self.init_pid)
        self.guardian.tell(f"init {self.init_pid}")
        faults.kill_point("parent-init-pid")
        userns_fd = -1
        try:
            if init.userns:
                if init.join_userns_fd < 0:  # a joined one (a pod's) has its maps
                    try:
                        userns.write_id_maps(self.init_pid, uid_maps, gid_maps)
                    except OSError as exc:
                        raise SetupError(f"write uid/gid map of pid {self.init_pid}: "
                                         f"{exc.strerror}",
                                         "the range may overlap another mapping") from None
                userns_fd = os.open(f"/proc/{self.init_pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            faults.kill_point("parent-mapped")
            timing.mark("id maps")
            self._build_mounts(host, userns_fd, *init.root_ids, fds)
        finally:
            if userns_fd >= 0:
                os.close(userns_fd)
        self._host_side_after_init(fds)
        timing.mark("host side after init (network, hooks)")

    def _build_mounts(self, host: planmod.HostPlan, userns_fd: int, root_uid: int,
                      root_gid: int, fds: dict[str, int]) -> None:
        """Detached mounts for the init, by label; the caller closes them."""
        fds["rootfs"] = self._rootfs_mount(host, userns_fd, root_uid, root_gid)
        timing.mark("rootfs mount (clone, idmap, hard-link scan)")
        if host.host_dev:
            try:
                fds["dev"] = devices.build_dev_tmpfs(
                    host.dev_nodes, root_uid, root_gid, console=host.console,
                    broken_nodev=faults.active("dev-nodev"), params=host.dev_params,
                    attrs=host.dev_attrs, source=host.dev_source)
                deferred = mounts.set_attrs_or_defer(fds["dev"],
                                                     host.dev_attrs & sc.MOUNT_ATTR_RDONLY)
                if deferred:
                    self.deferred_remounts["dev"] = deferred
            except OSError as exc:
                raise SetupError(f"build /dev on the host: {exc}", hint_for(exc)) from None
        timing.mark("/dev tmpfs (mknod on the host)")
        for b in host.binds:
            fds[b.label] = self._bind_mount(b, userns_fd)
        if host.binds:
            timing.mark("bind mounts")

    def _rootfs_mount(self, host: planmod.HostPlan, userns_fd: int, root_uid: int,
                      root_gid: int) -> int:
        path = host.rootfs
        mode = host.ownership
        try:
            mnt = mounts.clone_tree(path, recursive=False)
        except OSError as exc:
            raise SetupError(f"open rootfs {path}: {exc}", hint_for(exc)) from None
        try:
            if mode in ("map", "auto"):
                try:
                    mounts.set_attrs(mnt, userns_fd=userns_fd)
                    mode = "map"
                except OSError as exc:
                    from uspawn.kernel import overlay

                    if (mode == "map" and exc.errno == errno.EINVAL
                            and overlay.is_overlay_mountpoint(path)):
                        # An overlay (containerd's rootfs for uspawn-runc-pods): its
                        # layers can be idmapped. Only when `map` was asked for: `auto`
                        # keeps its chown fallback, as before.
                        os.close(mnt)
                        mnt = -1
                        mnt = _idmapped_overlay(path, userns_fd, (root_uid, root_gid))
                        mode = "map"
                    elif mode == "map" or not mounts.idmap_supported_error(exc):
                        raise SetupError(f"idmap rootfs {path}: {exc}", hint_for(exc)) from None
                    else:
                        self.req.say(f"idmapped mount of {path} not possible here "
                                     f"({exc.strerror}); falling back to chown")
                        os.close(mnt)
                        mnt = -1
                        mode = "chown"
            if mode == "map":
                # An idmapped rootfs hands every inode of the clone to container root,
                # also one hard-linked to a host file (issue 19). The clone is still
                # detached and ours alone; scanning it (not the path) sees exactly what
                # the container would, covered directories included. In `auto` too:
                # a chown fallback would re-own the tree on disk behind the admin's back
                # and leave such files unshifted (nobody inside), so the choice is theirs.
                from uspawn.kernel import hardlinks

                try:
                    found = hardlinks.scan_cached(mnt, 1)
                except OSError as exc:
                    raise SetupError(f"rootfs {path}: scan for hard links: {exc}",
                                     "the tree is deeper than the fd limit; raise ulimit -n"
                                     if exc.errno == errno.EMFILE else None) from None
                if found.files:
                    f, more = found.files[0], found.total - 1
                    raise SetupError(
                        f"rootfs {path}: {f.path} is hard-linked from outside the tree "
                        f"({f.nlink} links, {f.inside} inside)"
                        + (f", and {more} more such files" if more else ""),
                        "remove the extra link, or use --private-users-ownership=chown, "
                        "which leaves such files alone")
            if mode == "chown":
                self._chown_rootfs(path, root_uid)
                if mnt < 0:
                    mnt = mounts.clone_tree(path, recursive=False)
            # nodev: a device node shipped in a (hostile) tree must not open,
            # whatever its owner maps to; /dev is a separate host-made mount.
            # Private: a clone stays in its source's peer group, and a mount
            # made on it would appear on the host (and pivot_root refuses a
            # shared root). Read-only comes last, from stage A.
            deferred = mounts.make_private(mnt)
            deferred |= mounts.set_attrs_or_defer(mnt, sc.MOUNT_ATTR_NODEV)
            if deferred:
                self.deferred_remounts["rootfs"] = deferred
        except BaseException:
            if mnt >= 0:
                os.close(mnt)
            raise
        self.ownership_used = mode
        if self.req.verbose:
            self.req.say(f"rootfs ownership: {mode}"
                          + (f" (container root = host uid {root_uid})" if mode != "off" else ""))
        return mnt

    def _chown_rootfs(self, path: str, base: int) -> None:
        import sys

        from uspawn.kernel import idshift

        progress = idshift.TerminalProgress() if sys.stderr.isatty() else None
        try:
            res = idshift.shift_tree(path, base, progress=progress)
        except idshift.ShiftError as exc:
            raise SetupError(str(exc)) from None
        if linked := res.outside_links:
            shown = ", ".join(linked[:3]) + (f" and {len(linked) - 3} more" if len(linked) > 3
                                             else "")
            self.req.say(f"warning: rootfs {path}: left unshifted, as they are hard-linked "
                          f"from outside the tree (nobody inside): {shown}")
        if self.req.verbose:
            self.req.say(f"chown: shifted {res.files_changed} inodes from base {res.from_base} "
                          f"to {res.to_base}" + (" (resumed an interrupted shift)"
                                                 if res.resumed else ""))

    def _bind_mount(self, b: planmod.HostBind, userns_fd: int) -> int:
        try:
            mnt = mounts.clone_tree(b.source, recursive=b.recursive)
        except OSError as exc:
            raise SetupError(f"bind source {b.source}: {exc}", hint_for(exc)) from None
        try:
            # Out of the source's peer group before anything can be mounted on
            # it (mounts inside would appear on the host); slave only if asked.
            private = mounts.make_private(mnt, b.propagation, b.recursive)
            if b.idmap != "no" and userns_fd >= 0:
                try:
                    mounts.set_attrs(mnt, userns_fd=userns_fd, recursive=b.recursive)
                except OSError as exc:
                    if b.idmap == "yes" or not mounts.idmap_supported_error(exc):
                        raise SetupError(f"idmap bind {b.source}: {exc}", hint_for(exc)) from None
                    self.req.say(f"bind {b.source}: idmapped mount not possible "
                                  f"({exc.strerror}); files keep their host owners")
            deferred = private | mounts.set_attrs_or_defer(mnt, b.attr_set, b.recursive)
            if deferred:
                self.deferred_remounts[b.label] = deferred
        except OSError as exc:
            os.close(mnt)
            raise SetupError(f"bind {b.source}: {exc}", hint_for(exc)) from None
        except BaseException:
            os.close(mnt)
            raise
        return mnt

    # --- start / wait ------------------------------------------------------

    def start(self) -> None:
        """Release init to execve the payload; return once it did (8)."""
        assert self.ch is not None
        if self.req.start != START_AUTO:
            self.ch.start()  # 7
        try:
            msg = self.ch.recv(timeout=60)
        except chan.ChildError as exc:
            raise ExecError(str(exc), not_found=exc.exit_code == 127) from None
        except chan.ProtocolError as exc:
            raise SetupError(f"start: {exc}") from None
        if msg is not None:
            raise SetupError(f"start: unexpected message {msg.kind!r} from the container")
        timing.mark("sync 8 exec (init: caps, seccomp, execve)")
        self.started_at = time.time()
        self.ch.close()
        self.ch = None

    def signal(self, sig: int) -> None:
        if self.pidfd >= 0 and self.exit_status is None:
            try:
                sc.pidfd_send_signal(self.pidfd, sig)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise

    def wait(self) -> int:
        """Block until init exits; return its status as a shell exit code."""
        while self.exit_status is None:
            try:
                _pid, status = os.waitpid(self.init_pid, 0)
            except ChildProcessError:
                self.exit_status = 125
                break
            self.exit_status = _exit_code(status)
        timing.mark("wait (payload runs, exits)")
        return self.exit_status

    def poll_exit(self) -> int | None:
        if self.exit_status is None:
            pid, status = os.waitpid(self.init_pid, os.WNOHANG)
            if pid:
                self.exit_status = _exit_code(status)
        return self.exit_status

    # --- destroy -----------------------------------------------------------

    def destroy(self) -> None:
        """Kill what is left and remove every trace; safe to call twice."""
        errors: list[str] = []
        if self.ch is not None:
            self.ch.close()
            self.ch = None
        if self.init_pid and self.exit_status is None:
            self.signal(signal.SIGKILL)
            self.wait()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.console_master >= 0:
            os.close(self.console_master)
            self.console_master = -1
        while self.undo:
            undo = self.undo.pop()
            try:
                undo()
            except Exception as exc:  # keep cleaning up; report it apart
                errors.append(str(exc))
        if self.cgroup is not None:
            try:
                self.cgroup.destroy()
            except cgroups.CgroupError as exc:
                errors.append(str(exc))
            self.cgroup = None
        if self.claim is not None:
            self.claim.release()
            self.claim = None
        if self.range_lease is not None:
            self.range_lease.release()
            self.range_lease = None
        self.guardian.dismiss()
        timing.mark("teardown (cgroup, leases, guardian)")
        if errors:
            # Cleanup trouble is reported apart from the primary error.
            self.req.say("cleanup: " + "; ".join(errors))


def _idmapped_overlay(path: str, userns_fd: int, fs_ids: tuple[int, int]) -> int:
    """The overlay mounted at path rebuilt from idmapped layers (kernel/overlay.py)."""
    from uspawn.kernel import overlay

    try:
        return overlay.idmapped_overlay(overlay.read_layers(path), userns_fd, fs_ids)
    except overlay.OverlayError as exc:
        raise SetupError(f"idmap rootfs: {exc}") from None
    except OSError as exc:
        raise SetupError(f"idmap rootfs {path} (an overlay, rebuilt from idmapped layers): "
                         f"{exc}", "overlayfs takes idmapped layers as file descriptors "
                         "from Linux 6.15 on" if exc.errno == errno.EINVAL else hint_for(exc)
                         ) from None


def _reap(pid: int) -> None:
    if pid <= 0:  # never waitpid(0): that reaps any child of the group
        return
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _hint_errno(message: str, err: int) -> str | None:
    if err in (errno.EACCES, errno.EPERM) and "device node" in message:
        return ("the kernel refuses to open this node in a user namespace; "
                "run `uspawn doctor`")
    return None


def create_container(c: Container) -> None:
    """c.create() with OS errors turned into one-line SetupErrors."""
    _create(c)


def _create(c: Container) -> None:
    try:
        c.create()
    except UspawnError:
        raise
    except OSError as exc:
        raise SetupError(f"create container: {exc}", hint_for(exc)) from None


def create(spec: S.Spec, req: Request) -> Container:
    """A created container whose init waits for start() (the OCI `create`)."""
    c = Container(spec, req)
    _create(c)
    return c
