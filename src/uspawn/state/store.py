"""State directory: container records, name locks and UID-range leases.

Layout under the state root (default /run/uspawn, `--root` or $USPAWN_STATE_DIR):

    containers/<name>/         one directory per live container
        lock                   flock held by the process that owns the container
        state.json             what `list`/`status`/OCI `state` read

UID-range leases live host-wide in /run/uspawn/ranges/<base>-<size>.lock,
whatever the state root, so instances with different --root never share a
range. A lease or a name is held by an flock on its file, so it is released by the
kernel the moment its holders die (kill -9 included): no stale allocation can
survive a crash. The file content (owner pid + its start time) lets a holder
that hands the container to another process (detached machines, OCI create)
keep the claim alive: a range is in use while its flock is held OR its
recorded owner is still alive. Two concurrent starts serialise on an flock
of the ranges directory, so they never get the same range.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from uspawn.base import faults
from uspawn.base.errors import StateError

DEFAULT_STATE_DIR = "/run/uspawn"
RANGE_SIZE = 65536
# Same window as systemd-nspawn's --private-users=pick (0x00080000..0x6FFF0000):
# far above regular users, below the IDs systemd reserves for itself.
PICK_FIRST = 0x00080000
PICK_LAST = 0x6FFF0000


def state_root(override: str | None = None) -> str:
    """--root, else $USPAWN_STATE_DIR, else /run/uspawn; checked by usable_dir."""
    if override is not None:
        return usable_dir(override, "--root")
    env = os.environ.get("USPAWN_STATE_DIR")
    if env is not None:
        return usable_dir(env, "USPAWN_STATE_DIR")
    return usable_dir(DEFAULT_STATE_DIR, "state directory")


def usable_dir(path: str, field: str) -> str:
    """path if it is a directory we can search and read, or does not exist yet (it is
    created on first use, parents included); otherwise one StateError naming it.

    Checked up front so that `--root /etc/passwd` or `--root /proc/1/root` is one
    line naming the state directory, not an OSError about some file below it.
    """
    hint = f"pass {field} a directory that root owns and can write"
    if not path:
        raise StateError(f"{field}: empty path", hint)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path  # created when a container starts; nothing in it to list
    except (OSError, ValueError) as exc:  # ValueError: NUL in the path
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StateError(f"state directory {path}: {reason}", hint) from None
    import stat

    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"state directory {path}: not a directory", hint)
    if not os.access(path, os.R_OK | os.X_OK):
        raise StateError(f"state directory {path}: permission denied", hint)
    return path


def _mkdir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and ')': split after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def proc_starttime(pid: int) -> int | None:
    """Start time of pid (clock ticks since boot), or None when it is gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def proc_running(pid: int, starttime: object) -> bool:
    """pid exists, is the process that started at starttime, and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != b"Z" and int(fields[19]) == starttime


_PF_EXITING = 0x4  # task flag: set as do_exit begins, before the process's fds close


def owner_alive(record: dict[str, object]) -> bool:
    """The recorded owner runs: same pid and start time, neither exiting nor a zombie.

    A killed owner's flocks drop while it exits, before its parent reaps it (maybe
    much later): its record must not keep the claim alive in between.
    """
    pid = record.get("pid")
    start = record.get("starttime")
    if not isinstance(pid, int) or pid <= 0:
        return False
    fields = _stat_fields(pid)
    return (fields is not None and int(fields[19]) == start and fields[0] not in (b"Z", b"X")
            and not int(fields[6]) & _PF_EXITING)


def dumps(obj: object) -> str:
    """JSON for the flat records uspawn writes (str/int/float/bool/None, lists, dicts).

    Not json.dumps: `json` imports `re` (~4 ms) on every start; the C string
    escaper it uses underneath is reused here.
    """
    from _json import encode_basestring_ascii as enc

    if obj is None:
        return "null"
    if obj is True:
        return "true"
    if obj is False:
        return "false"
    if isinstance(obj, str):
        return str(enc(obj))
    if isinstance(obj, int | float):
        return repr(obj)
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(dumps(v) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{enc(str(k))}: {dumps(v)}" for k, v in obj.items()) + "}"
    raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


class _ScanContext:
    """What _json's C scanner reads from json.JSONDecoder, without `json` (and `re`)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"),
                "-Infinity": float("-inf")}[name]


class JSONError(ValueError):
    """Invalid JSON, with the line and column (1-based) where the parser stopped."""

    def __init__(self, msg: str, text: str, pos: int) -> None:
        line = text.count("\n", 0, pos) + 1
        col = pos - text.rfind("\n", 0, pos)
        super().__init__(f"not JSON: {msg} at line {line} column {col}")
        self.lineno = line
        self.colno = col


def loads(text: str | bytes) -> object:
    """json.loads for uspawn's files (state records, config.json) on the C scanner
    alone (no `re`). Every failure is a JSONError (a ValueError) naming the line
    and column; too deep nesting is one too, not a RecursionError."""
    from _json import make_scanner

    if isinstance(text, bytes):
        try:
            s = text.decode()
        except UnicodeDecodeError as exc:
            head = text[: exc.start].decode()
            raise JSONError("invalid UTF-8", head, len(head)) from None
    else:
        s = text
    i = len(s) - len(s.lstrip(" \t\n\r"))
    try:
        obj, end = make_scanner(_ScanContext())(s, i)  # type: ignore[arg-type]  # duck-typed ctx
    except (StopIteration, ValueError, RecursionError, SystemError):
        # The C scanner reports errors through json.decoder, which is not imported
        # here (SystemError "returned NULL without setting an exception" on 3.11):
        # on the error path only, let `json` find the position and the reason.
        return _loads_slow(s, i)
    rest = len(s) - len(s[end:].lstrip(" \t\n\r"))
    if rest < len(s):
        raise JSONError("extra data after the JSON value", s, rest)
    return obj


def _loads_slow(s: str, start: int) -> object:
    import json

    try:
        return json.loads(s, parse_constant=_ScanContext.parse_constant)
    except json.JSONDecodeError as exc:
        msg = exc.msg.removesuffix(" at")  # "Invalid control character at"
        raise JSONError(msg[:1].lower() + msg[1:], s, exc.pos) from None
    except RecursionError:
        raise JSONError("nested too deeply", s, start) from None


def write_atomic(path: str, data: str, mode: int = 0o600) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Lease:
    """An flock-held claim on a file; released by close() or by process death."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd

    def record(self, **info: object) -> None:
        """Store who owns the claim so a hand-over to another process keeps it."""
        data = dumps(info).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self, remove: bool = True) -> None:
        if self.fd < 0:
            return
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = -1


def try_lock(path: str) -> Lease | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    # The file may have been unlinked by its previous holder between our open
    # and our flock; a lock on an unlinked inode protects nothing.
    try:
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            os.close(fd)
            return None
    except FileNotFoundError:
        os.close(fd)
        return None
    # A released-but-handed-over claim: its recorded owner still lives.
    try:
        raw = os.pread(fd, 4096, 0)
        record = loads(raw) if raw else {}
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and owner_alive(record):
        os.close(fd)
        return None
    return Lease(path, fd)


def _host_id_ranges() -> list[tuple[int, int]]:
    """IDs the host already uses: users, groups and subordinate ranges."""
    used: list[tuple[int, int]] = []
    for path, col in (("/etc/passwd", 2), ("/etc/group", 2)):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split(":")
                    if len(parts) > col and parts[col].isdigit():
                        used.append((int(parts[col]), 1))
        except OSError:
            pass
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        used.append((int(parts[1]), int(parts[2])))
        except OSError:
            pass
    return used


def _overlaps(base: int, size: int, used: list[tuple[int, int]]) -> bool:
    return any(start < base + size and base < start + n for start, n in used)


RANGES_DIR = "/run/uspawn/ranges"


class RangeAllocator:
    """UID-range leases, host-wide: every uspawn (whatever its --root state
    directory) takes them from one directory, so two instances never hand out
    the same range ($USPAWN_RANGES_DIR overrides it, for tests of the allocator)."""

    def __init__(self, ranges_dir: str | None = None) -> None:
        self.dir = ranges_dir or os.environ.get("USPAWN_RANGES_DIR") or RANGES_DIR

    def _lock_dir(self) -> int:
        _mkdir(self.dir)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _held(self) -> list[tuple[int, int, str]]:
        """(base, size, file name) of every lease file: BASE-SIZE.lock, and
        BASE-SIZE@TAG.lock for a co-owner of that range (share())."""
        held = []
        for name in os.listdir(self.dir):
            if name.endswith(".lock"):
                base, _, size = name[:-5].partition("@")[0].partition("-")
                if base.isdigit() and size.isdigit():
                    held.append((int(base), int(size), name))
        return held

    def _claim(self, base: int, size: int) -> Lease | None:
        mine = f"{base}-{size}.lock"
        for other_base, other_size, name in self._held():
            if name != mine and _overlaps(base, size, [(other_base, other_size)]):
                other = try_lock(os.path.join(self.dir, name))
                if other is None:
                    return None
                other.release()  # stale file of a dead owner
        return try_lock(os.path.join(self.dir, mine))

    def share(self, base: int, size: int, tag: str) -> Lease:
        """A co-owner's claim on a range that another lease holds (each container of
        a CRI pod shares its sandbox's, oci/pods.py): nobody picks the range while
        any of its holders lives, whichever of them dies first."""
        if not tag or "/" in tag or "\0" in tag or tag.startswith(".") or len(tag) > 200:
            import hashlib  # an OCI id may be 255 characters long, or start with "."

            tag = hashlib.sha256(tag.encode(errors="surrogateescape")).hexdigest()
        dirfd = self._lock_dir()
        try:
            lease = try_lock(os.path.join(self.dir, f"{base}-{size}@{tag}.lock"))
        finally:
            os.close(dirfd)
        if lease is None:
            raise StateError(f"UID range {base}:{size} is already held for {tag!r}",
                             "a container of that id is still running")
        return lease

    def lease(self, base: int, size: int = RANGE_SIZE) -> Lease:
        """Claim an explicit range (--private-users=BASE[:SIZE])."""
        dirfd = self._lock_dir()
        try:
            lease = self._claim(base, size)
        finally:
            os.close(dirfd)
        if lease is None:
            raise StateError(
                f"UID range {base}:{size} is already used by a running container",
                "pick another base or use --private-users=pick",
            )
        return lease

    def pick(self, size: int = RANGE_SIZE, prefer: int | None = None) -> tuple[int, Lease]:
        """Claim the first free range, trying `prefer` (e.g. a tree's current base) first."""
        dirfd = self._lock_dir()
        try:
            used = _host_id_ranges()
            candidates = range(PICK_FIRST, PICK_LAST, RANGE_SIZE)
            order = [prefer, *candidates] if prefer else list(candidates)
            for base in order:
                if base is None or _overlaps(base, size, used):
                    continue
                lease = self._claim(base, size)
                if lease is not None:
                    return base, lease
        finally:
            os.close(dirfd)
        raise StateError("no free UID range left to pick", "stop some containers")


class NameClaim:
    """The per-container directory, held by an flock on its `lock` file."""

    def __init__(self, root: str, name: str, lease: Lease) -> None:
        self.dir = os.path.join(root, "containers", name)
        self.name = name
        self.lease = lease

    def write_state(self, state: dict[str, object]) -> None:
        write_atomic(os.path.join(self.dir, "state.json"), dumps(state))

    def release(self) -> None:
        """Remove the container's directory (ours alone), then drop the lock."""
        _remove_contents(self.dir, keep="lock")
        self.lease.release(remove=True)
        if faults.active("slow-release"):
            # Widens the window between the lock's removal and the directory's, in
            # which `uspawn stop` once returned (tests/test_stop.py).
            time.sleep(1)
        try:
            os.rmdir(self.dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                raise


def _remove_contents(path: str, keep: str = "") -> None:
    """rm -r of what is inside path, never following symlinks."""
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name == keep:
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                _remove_contents(e.path)
                os.rmdir(e.path)
            else:
                os.unlink(e.path)
        except FileNotFoundError:
            pass


def claim_name(root: str, name: str) -> NameClaim | None:
    """Claim a container name; None if a live container holds it."""
    cdir = os.path.join(root, "containers", name)
    try:
        _mkdir(cdir)
        lease = try_lock(os.path.join(cdir, "lock"))
    except OSError as exc:  # a file where a directory belongs, a read-only root...
        raise StateError(f"state directory {root}: cannot claim {name!r}: "
                         f"{exc.strerror or exc} ({exc.filename})",
                         "pass --root a directory uspawn can write") from None
    if lease is None:
        return None
    return NameClaim(root, name, lease)


def read_states(root: str) -> list[dict[str, object]]:
    """State of every container whose owner is alive (stale records are skipped)."""
    out: list[dict[str, object]] = []
    cdir = os.path.join(root, "containers")
    try:
        names = sorted(os.listdir(cdir))
    except FileNotFoundError:
        return out
    except OSError as exc:  # a file, a link loop...: the state directory is not ours
        raise StateError(f"state directory {root}: {cdir}: {exc.strerror}",
                         "pass --root a directory made by uspawn") from None
    for name in names:
        state = _live_record(os.path.join(cdir, name))
        if state is not None:
            out.append(state)
    return out


def _live_record(cdir: str) -> dict[str, object] | None:
    """cdir/state.json if cdir's lock is held (by a live owner), else None.

    Whatever is found is skipped, never raised: a state directory may hold
    crash leftovers, foreign files, FIFOs (opened non-blocking, read only when
    regular) or corrupted records."""
    try:
        fd = os.open(os.path.join(cdir, "lock"), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it: stale leftovers of a crash
        except BlockingIOError:
            pass
        except OSError:
            return None
        state = _read_record(os.path.join(cdir, "state.json"))
        return state if isinstance(state, dict) else None
    finally:
        os.close(fd)


def _read_record(path: str) -> object:
    try:
        return loads(read_record(path))
    except (OSError, ValueError):
        return None


def read_record(path: str, limit: int = 16 << 20) -> bytes:
    """The bytes of a state file, which must be a regular file of at most `limit` bytes.

    Opened non-blocking and not through a symlink: a FIFO put where a record belongs
    would block open() forever, a device could be anything. OSError otherwise
    (FileNotFoundError when it is missing)."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        return os.read(fd, st.st_size + 1)
    finally:
        os.close(fd)
