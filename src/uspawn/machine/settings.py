"""systemd.nspawn(5) settings files, read natively (issue 16).

`uspawn boot NAME`, `uspawn boot -M NAME` and `uspawn run -M NAME` find the
tree in /var/lib/machines/NAME when -D is not given, then read NAME.nspawn as
systemd-nspawn does (src/nspawn/nspawn.c load_settings/merge_settings):

  - the first of /etc/systemd/nspawn/NAME.nspawn and /run/systemd/nspawn/NAME.nspawn
    is *trusted*: every setting takes effect;
  - otherwise NAME.nspawn next to the tree (/var/lib/machines/NAME.nspawn, or
    beside the -D directory) is *untrusted*: it came with an image, so the
    settings that elevate privileges or reach host resources are ignored with a
    warning (Capability=, Bind=/BindReadOnly=/TemporaryFileSystem=, every
    [Network] setting, Port=, PrivateUsers=/PrivateUsersOwnership=, Limit*=,
    and uspawn's resource section), exactly nspawn's list for these keys.
  - `--settings=no|yes|trusted|override` as nspawn's: off; on (default);
    trust the file wherever it is; let the file win over the command line
    (systemd-nspawn@.service runs with `--settings=override`).

Command-line options override the file by groups, as nspawn's settings mask:
any --bind/--bind-ro/--tmpfs replaces all of the file's mounts, --setenv all
of its Environment=, --capability/--drop-capability both capability keys, -U
or --private-users-ownership both user-namespace keys, --network the network
keys; a command after `run NAME --` replaces Boot=/Parameters=.

Unknown sections and keys, and nspawn keys uspawn does not implement, get one
warning each naming file, line and key; a section whose name starts with `X-`
is skipped silently (as systemd's conf-parser does). A value uspawn cannot
parse for a key it implements is an error naming file, line and key: booting
without a Bind= or ReadOnly= the admin wrote is worse than not booting.

Resource limits live in `[X-Uspawn-Resources]` with systemd's resource-control
names (MemoryMax=, CPUQuota=, ...). systemd-nspawn skips `X-` sections without
a word, so the same file still loads there. They are parsed here into
`Settings.properties` (name -> value string, unvalidated) and left on the
namespace as `ns.resource_properties`; machine/limits.py validates and applies
them (command-line --memory/--cpus/--pids/--property win per key).
"""

from __future__ import annotations

import os

from uspawn.base.errors import SpecError, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import types
    from collections.abc import Callable

    from uspawn.engine import spec as S

TRUSTED_DIRS = ("/etc/systemd/nspawn", "/run/systemd/nspawn")
MACHINES_DIR = "/var/lib/machines"
# Tests (and only tests) move the search: a colon-separated list of trusted
# directories, and the directory machine trees are looked up in.
ENV_TRUSTED_DIRS = "USPAWN_NSPAWN_DIRS"
ENV_MACHINES_DIR = "USPAWN_MACHINES_DIR"
MAX_FILE_SIZE = 1 << 20  # an untrusted file comes with an image: bound what we read

RESOURCES_SECTION = "X-Uspawn-Resources"
RESOURCE_KEYS = ("MemoryMax", "MemoryHigh", "MemorySwapMax", "CPUQuota", "CPUWeight",
                 "AllowedCPUs", "TasksMax", "IOWeight")
SECTIONS = ("Exec", "Files", "Network", RESOURCES_SECTION)

# nspawn keys uspawn reads but does not implement: a warning, never silence.
UNSUPPORTED = frozenset({
    "Exec.Ephemeral", "Exec.ProcessTwo", "Exec.AmbientCapability", "Exec.Personality",
    "Exec.MachineID", "Exec.PivotRoot", "Exec.NotifyReady", "Exec.SystemCallFilter",
    "Exec.OOMScoreAdjust", "Exec.CPUAffinity", "Exec.LinkJournal", "Exec.SuppressSync",
    "Files.Inaccessible", "Files.Overlay", "Files.OverlayReadOnly", "Files.BindUser",
    "Files.BindUserShell", "Network.Interface", "Network.MACVLAN", "Network.IPVLAN",
    "Network.VirtualEthernetExtra", "Network.Zone",
})

RLIMITS = ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NOFILE", "AS", "NPROC",
           "MEMLOCK", "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")
_RLIMIT_BYTES = ("FSIZE", "DATA", "STACK", "CORE", "RSS", "AS", "MEMLOCK", "MSGQUEUE")
RLIM_INFINITY = 2**64 - 1

# Groups of settings, nspawn's SettingsMask: the command-line options that
# replace the whole group, and whether an untrusted file may set it.
#   group: (ns fields given on the command line, privileged)
GROUPS: dict[str, tuple[tuple[str, ...], bool]] = {
    "start": (("cmd",), False),
    "chdir": (("chdir",), False),
    "env": (("setenv",), False),
    "user": (("user",), False),
    "caps": (("capability", "drop_capability"), False),  # Capability= alone is privileged
    "kill_signal": (("kill_signal",), False),
    "nnp": (("no_new_privileges",), False),
    "hostname": (("hostname",), False),
    "read_only": (("read_only",), False),
    "mounts": (("bind", "bind_ro", "tmpfs"), True),
    "network": (("network",), True),
    "ports": (("port",), True),
    "userns": (("private_users", "private_users_ownership"), True),
    "rlimits": ((), True),
    "resources": ((), True),
}

# Defaults of the options whose cli.py default is None so that "given" can be told
# from "not given"; filled in by apply() once the file had its say.
DEFAULTS: dict[str, object] = {
    "private_users": "pick", "private_users_ownership": "auto", "chdir": "/",
    "network": "private",
}
_TRUE = ("1", "yes", "y", "true", "t", "on")
_FALSE = ("0", "no", "n", "false", "f", "off")


class Settings:
    """One parsed .nspawn file: what each group sets, before trust and merge."""

    def __init__(self, path: str, trusted: bool) -> None:
        self.path = path
        self.trusted = trusted
        self.groups: dict[str, dict[str, object]] = {}  # group -> ns field -> value
        self.where: dict[str, str] = {}  # group -> "FILE:LINE: Key=" of its last key
        self.boot: bool | None = None
        self.parameters: list[str] | None = None
        self.add_caps: list[str] = []
        self.drop_caps: list[str] = []
        self.rlimits: dict[str, tuple[int, int]] = {}
        self.properties: dict[str, str] = {}
        self.warnings: list[str] = []

    def set(self, group: str, where: str, **values: object) -> None:
        self.groups.setdefault(group, {}).update(values)
        self.where[group] = where


# --- finding the tree and the file ---------------------------------------------------------------


def machines_dir() -> str:
    return os.environ.get(ENV_MACHINES_DIR) or MACHINES_DIR


def trusted_dirs() -> tuple[str, ...]:
    env = os.environ.get(ENV_TRUSTED_DIRS)
    return tuple(d for d in env.split(":") if d) if env is not None else TRUSTED_DIRS


def machine_tree(name: str) -> str:
    """The tree of machine NAME in /var/lib/machines (a directory; raw images are not
    supported)."""
    from uspawn.machine.claims import check_name

    check_name(name)
    path = os.path.join(machines_dir(), name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path + ".raw"):
        raise SpecError(f"machine {name}: {path}.raw is a disk image; uspawn boots directory "
                        "trees only", f"unpack it into {path}/")
    raise SpecError(f"machine {name}: no tree at {path}",
                    "give the tree with -D DIR, or put it in " + machines_dir())


def find_file(name: str, directory: str, mode: str) -> tuple[str, bool] | None:
    """(path, trusted) of NAME.nspawn, or None. mode is --settings's value."""
    if mode == "no":
        return None
    fn = name + ".nspawn"
    for d in trusted_dirs():
        p = os.path.join(d, fn)
        if os.path.lexists(p):
            return p, True
    # Next to the tree as it was named (nspawn's file_in_same_dir), not its realpath.
    parent = os.path.dirname(os.path.normpath(os.path.abspath(directory)))
    p = os.path.join(parent, fn)
    if parent != "/" and os.path.lexists(p):
        return p, mode == "trusted"
    return None


def read_text(path: str) -> str:
    """A settings file's text: a regular file (a FIFO would block), bounded, UTF-8."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if st.st_size > MAX_FILE_SIZE:
                raise OSError(errno.EFBIG, f"larger than {MAX_FILE_SIZE} bytes")
            data = os.read(fd, MAX_FILE_SIZE + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SpecError(f"settings file {path}: {exc.strerror}") from None
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise SpecError(f"settings file {path}: not UTF-8 (byte {exc.start})") from None


def check_owner(path: str, log: Callable[[str], None]) -> bool:
    """A trusted file must be root's and not writable by others: otherwise whoever can
    write it could grant a machine host binds and capabilities. Demoted, with a warning."""
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return False
    if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log(f"warning: {path}: not owned by root or writable by group/others; "
            "reading it as untrusted (privileged settings ignored)")
        return False
    return True


# --- parsing ---------------------------------------------------------------------------------


def split_words(value: str, where: str) -> list[str]:
    """Whitespace-separated words with '...'/"..." quoting and backslash escapes
    (systemd's extract_first_word with EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE, the common part)."""
    words: list[str] = []
    cur: list[str] = []
    quote = ""
    in_word = False
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            cur.append(value[i + 1])
            in_word = True
            i += 2
            continue
        if quote:
            if ch == quote:
                quote = ""
            else:
                cur.append(ch)
        elif ch in "'\"":
            quote = ch
            in_word = True
        elif ch in " \t":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(ch)
            in_word = True
        i += 1
    if quote:
        raise SpecError(f"{where} unterminated quote")
    if in_word:
        words.append("".join(cur))
    return words


def _bool(value: str, where: str) -> bool:
    v = value.lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise SpecError(f"{where} {value!r} is not a boolean", "use yes or no")


def _rlimit(name: str, value: str, where: str) -> tuple[int, int]:
    """Limit*= SOFT[:HARD]: a number (K/M/G/T for the byte limits) or infinity."""
    from uspawn.base import cmdline

    def one(v: str) -> int:
        if v == "infinity":
            return RLIM_INFINITY
        try:
            if name in _RLIMIT_BYTES:
                return cmdline.size(v, where, maximum=RLIM_INFINITY)
            return cmdline.uint(v, where, maximum=RLIM_INFINITY)
        except UsageError as exc:
            raise SpecError(str(exc), "a number or infinity, SOFT:HARD for both") from None

    soft_s, colon, hard_s = value.partition(":")
    soft = one(soft_s)
    hard = one(hard_s) if colon else soft
    if soft > hard:
        raise SpecError(f"{where} soft limit {soft_s} is above the hard limit {hard_s}")
    return soft, hard


def _caps(value: str, where: str) -> list[str]:
    from uspawn.kernel import caps

    out: list[str] = []
    for word in split_words(value, where):
        if word == "all":
            out += list(caps.CAP_NUMBERS)
            continue
        try:
            out.append(caps.normalize(word))
        except caps.CapabilityError as exc:
            raise SpecError(f"{where} {exc}") from None
    return out


def _assign(s: Settings, section: str, key: str, value: str, where: str, boot: bool) -> None:
    """One `Key=value` of a known section into s (errors and warnings name `where`)."""
    if section == RESOURCES_SECTION:
        if key not in RESOURCE_KEYS:
            s.warnings.append(f"{where} unknown resource key, ignored "
                              f"(known: {', '.join(RESOURCE_KEYS)})")
            return
        s.properties[key] = value
        s.where["resources"] = where
        return
    full = f"{section}.{key}"
    if full in UNSUPPORTED:
        s.warnings.append(f"{where} not supported by uspawn, ignored")
        return
    handler = _HANDLERS.get(full)
    if handler is None:
        if key.startswith("X-"):
            return  # systemd ignores X- keys in known sections too
        s.warnings.append(f"{where} unknown key, ignored")
        return
    handler(s, value, where, boot)


def _h_boot(s: Settings, value: str, where: str, boot: bool) -> None:
    s.boot = _bool(value, where)
    s.where["start"] = where


def _h_parameters(s: Settings, value: str, where: str, boot: bool) -> None:
    words = split_words(value, where)
    s.parameters = [] if not words else (s.parameters or []) + words
    s.where["start"] = where


def _h_environment(s: Settings, value: str, where: str, boot: bool) -> None:
    words = split_words(value, where)
    for w in words:
        if "=" not in w or w.startswith("="):
            raise SpecError(f"{where} {w!r} is not KEY=VALUE")
    old = s.groups.get("env", {}).get("setenv")
    prev = old if isinstance(old, list) and words else []
    s.set("env", where, setenv=prev + words)


def _h_user(s: Settings, value: str, where: str, boot: bool) -> None:
    if boot:
        s.warnings.append(f"{where} not supported by uspawn boot (the init runs as root), "
                          "ignored")
        return
    s.set("user", where, user=value)


def _h_chdir(s: Settings, value: str, where: str, boot: bool) -> None:
    if not value.startswith("/"):
        raise SpecError(f"{where} {value!r} must be an absolute path")
    if boot:
        s.warnings.append(f"{where} not supported by uspawn boot, ignored")
        return
    s.set("chdir", where, chdir=value)


def _h_capability(s: Settings, value: str, where: str, boot: bool) -> None:
    s.add_caps += _caps(value, where)
    s.where["caps"] = where
    s.where["caps+"] = where


def _h_drop_capability(s: Settings, value: str, where: str, boot: bool) -> None:
    s.drop_caps += _caps(value, where)
    s.where["caps"] = where


def _h_kill_signal(s: Settings, value: str, where: str, boot: bool) -> None:
    from uspawn.kernel import sig

    try:
        sig.parse_signal(value)
    except UsageError as exc:
        raise SpecError(f"{where} {exc}") from None
    s.set("kill_signal", where, kill_signal=value)


def _h_nnp(s: Settings, value: str, where: str, boot: bool) -> None:
    s.set("nnp", where, no_new_privileges=_bool(value, where))


def _h_hostname(s: Settings, value: str, where: str, boot: bool) -> None:
    if not value or len(value) > 64 or not all(c.isascii() and (c.isalnum() or c in "-.")
                                                for c in value):
        raise SpecError(f"{where} {value!r} is not a valid hostname")
    s.set("hostname", where, hostname=value)


def _h_noop_mode(s: Settings, value: str, where: str, boot: bool) -> None:
    """ResolvConf=/Timezone=: uspawn never writes the tree's /etc (docs/SECURITY.md), which
    is what `off` says and what nspawn's `auto` does for a machine with its own network."""
    if value not in ("off", "auto"):
        s.warnings.append(f"{where} {value!r} not supported by uspawn (only off and auto, "
                          "which leave the tree's file alone), ignored")


def _h_rlimit(name: str) -> Callable[[Settings, str, str, bool], None]:
    def handler(s: Settings, value: str, where: str, boot: bool) -> None:
        s.rlimits[name] = _rlimit(name, value, where)
        s.where["rlimits"] = where
    return handler


def _h_read_only(s: Settings, value: str, where: str, boot: bool) -> None:
    s.set("read_only", where, read_only=_bool(value, where))


def _h_volatile(s: Settings, value: str, where: str, boot: bool) -> None:
    # An error, not a warning: booting a tree the admin asked to be volatile as a
    # persistent one would keep every write it expected thrown away.
    if value.lower() not in _FALSE:
        raise SpecError(f"{where} {value!r}: volatile machines are not supported by uspawn",
                        "remove Volatile= (the tree is used as it is) or use systemd-nspawn")


def _mounts(s: Settings) -> dict[str, object]:
    g = s.groups.setdefault("mounts", {"bind": [], "bind_ro": [], "tmpfs": []})
    return g


def _h_bind(field: str) -> Callable[[Settings, str, str, bool], None]:
    def handler(s: Settings, value: str, where: str, boot: bool) -> None:
        from uspawn.machine import presets

        # Checked now, so an error names the file and line (the source must exist).
        try:
            presets.parse_bind(value, field == "bind_ro", where)
        except (UsageError, SpecError) as exc:
            raise SpecError(str(exc), exc.hint) from None
        lst = _mounts(s)[field]
        assert isinstance(lst, list)
        lst.append(value)
        s.where["mounts"] = where
    return handler


def _h_tmpfs(s: Settings, value: str, where: str, boot: bool) -> None:
    from uspawn.machine import presets

    try:
        presets.parse_tmpfs(value)
    except UsageError as exc:
        raise SpecError(f"{where} {exc}", exc.hint) from None
    lst = _mounts(s)["tmpfs"]
    assert isinstance(lst, list)
    lst.append(value)
    s.where["mounts"] = where


def _network(s: Settings, where: str, **kv: object) -> None:
    s.set("network", where, **kv)


def _h_private(s: Settings, value: str, where: str, boot: bool) -> None:
    _network(s, where, private=_bool(value, where))


def _h_veth(s: Settings, value: str, where: str, boot: bool) -> None:
    _network(s, where, veth=_bool(value, where))


def _h_bridge(s: Settings, value: str, where: str, boot: bool) -> None:
    if not value or len(value) > 15 or "/" in value or value in (".", ".."):
        raise SpecError(f"{where} {value!r} is not an interface name")
    _network(s, where, bridge=value)


def _h_port(s: Settings, value: str, where: str, boot: bool) -> None:
    from uspawn.net.pool import parse_port

    try:
        parse_port(value)
    except UsageError as exc:
        raise SpecError(f"{where} {exc}") from None
    old = s.groups.get("ports", {}).get("port")
    s.set("ports", where, port=(old if isinstance(old, list) else []) + [value])


def _h_private_users(s: Settings, value: str, where: str, boot: bool) -> None:
    from uspawn.machine import presets

    if value == "managed":
        raise SpecError(f"{where} 'managed' (systemd-nsresourced) is not supported",
                        "use pick or BASE[:SIZE]")
    try:
        presets.parse_private_users(value)
    except UsageError as exc:
        raise SpecError(f"{where} {exc}") from None
    s.set("userns", where, private_users=value)


_OWNERSHIP = ("auto", "map", "chown", "off")


def _h_ownership(s: Settings, value: str, where: str, boot: bool) -> None:
    if value not in _OWNERSHIP:
        raise SpecError(f"{where} {value!r} is not one of {', '.join(_OWNERSHIP)}")
    s.set("userns", where, private_users_ownership=value)


def _h_chown(s: Settings, value: str, where: str, boot: bool) -> None:
    # PrivateUsersChown= is nspawn's older spelling of PrivateUsersOwnership=chown|off.
    s.set("userns", where, private_users_ownership="chown" if _bool(value, where) else "off")


_HANDLERS: dict[str, Callable[[Settings, str, str, bool], None]] = {
    "Exec.Boot": _h_boot,
    "Exec.Parameters": _h_parameters,
    "Exec.Environment": _h_environment,
    "Exec.User": _h_user,
    "Exec.WorkingDirectory": _h_chdir,
    "Exec.Capability": _h_capability,
    "Exec.DropCapability": _h_drop_capability,
    "Exec.NoNewPrivileges": _h_nnp,
    "Exec.KillSignal": _h_kill_signal,
    "Exec.PrivateUsers": _h_private_users,
    "Exec.Hostname": _h_hostname,
    "Exec.ResolvConf": _h_noop_mode,
    "Exec.Timezone": _h_noop_mode,
    **{f"Exec.Limit{r}": _h_rlimit(r) for r in RLIMITS},
    "Files.ReadOnly": _h_read_only,
    "Files.Volatile": _h_volatile,
    "Files.Bind": _h_bind("bind"),
    "Files.BindReadOnly": _h_bind("bind_ro"),
    "Files.TemporaryFileSystem": _h_tmpfs,
    "Files.PrivateUsersOwnership": _h_ownership,
    "Files.PrivateUsersChown": _h_chown,
    "Network.Private": _h_private,
    "Network.VirtualEthernet": _h_veth,
    "Network.Bridge": _h_bridge,
    "Network.Port": _h_port,
}


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) with trailing-backslash continuations joined and
    comment lines (# and ;) dropped, as systemd.syntax(7)."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if pending and line.startswith(("#", ";")):
            continue  # a comment inside a continuation is skipped, as systemd does
        if not pending:
            start = n
            if not line or line.startswith(("#", ";")):
                continue
        if line.endswith("\\"):
            pending.append(line[:-1] + " ")
            continue
        out.append((start, "".join(pending) + line))
        pending = []
    if pending:
        out.append((start, "".join(pending).rstrip()))
    return out


def parse(text: str, path: str, trusted: bool, boot: bool) -> Settings:
    """Parse the text of a settings file (no trust or merge applied yet)."""
    from uspawn.base.textsafe import printable

    s = Settings(path, trusted)
    section: str | None = None
    skipping = False  # inside an unknown section: its keys are not reported again
    for n, line in _logical_lines(text):
        loc = f"{path}:{n}:"
        if line.startswith("["):
            if not line.endswith("]"):
                raise SpecError(f"{loc} invalid section header {printable(line, 80)!r}")
            name = line[1:-1]
            section = name if name in SECTIONS else None
            skipping = section is None
            if skipping and not name.startswith("X-"):
                s.warnings.append(f"{loc} unknown section [{printable(name, 80)}], ignored")
            continue
        if section is None:
            if not skipping:
                s.warnings.append(f"{loc} assignment outside of a section, ignored")
            continue
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SpecError(f"{loc} {printable(line, 80)!r} is not Key=value")
        _assign(s, section, key, value.strip(), f"{loc} {printable(key, 80)}=", boot)
    return s


# --- merging into the command line --------------------------------------------------------------


def _given(ns: types.SimpleNamespace, field: str) -> bool:
    v = getattr(ns, field, None)
    return bool(v) if isinstance(v, list | bool) else v is not None


def _network_value(g: dict[str, object]) -> str:
    """nspawn's settings_private_network/settings_network_veth -> --network."""
    bridge = g.get("bridge")
    if isinstance(bridge, str):
        return f"bridge:{bridge}"
    if g.get("veth") is True:
        return "veth"
    return "private" if g.get("private") is True else "host"


def merge(s: Settings, ns: types.SimpleNamespace, command: str, override: bool,
          log: Callable[[str], None]) -> None:
    """Copy the file's groups into ns where the command line left them unset (all of
    them with override); privileged groups only from a trusted file."""
    for w in s.warnings:
        log(f"warning: {w}")
    for group, (fields, privileged) in GROUPS.items():
        where = s.where.get(group)
        if where is None:
            continue
        if not override and any(_given(ns, f) for f in fields):
            continue
        if group == "caps":
            _merge_caps(s, ns, log)
            continue
        if privileged and not s.trusted:
            log(f"warning: {where} ignored: the file is not trusted (copy it to "
                f"{trusted_dirs()[0] if trusted_dirs() else '/etc/systemd/nspawn'}, "
                "or pass --settings=trusted)")
            continue
        if group == "start":
            _merge_start(s, ns, command)
        elif group == "network":
            ns.network = _network_value(s.groups["network"])
        elif group == "rlimits":
            ns.settings_rlimits = dict(s.rlimits)
        elif group == "resources":
            ns.resource_properties = dict(s.properties)
        else:
            for field, value in s.groups.get(group, {}).items():
                setattr(ns, field, value)


def _merge_caps(s: Settings, ns: types.SimpleNamespace, log: Callable[[str], None]) -> None:
    if s.add_caps and not s.trusted:
        log(f"warning: {s.where['caps+']} ignored: the file is not trusted")
    elif s.add_caps:
        ns.capability = [",".join(s.add_caps)]
    if s.drop_caps:  # dropping is always allowed, as in nspawn
        ns.drop_capability = [",".join(s.drop_caps)]


def _merge_start(s: Settings, ns: types.SimpleNamespace, command: str) -> None:
    where = s.where["start"]
    if command == "boot":
        if s.boot is False:
            raise SpecError(f"{where} Boot=no: uspawn boot always boots the tree's init",
                            "use `uspawn run -M NAME` for a single command")
        ns.parameters = list(s.parameters or [])
        return
    if s.boot:
        raise SpecError(f"{where} Boot=yes: `uspawn run` runs one command",
                        "use `uspawn boot NAME`, or give the command after --")
    if s.parameters:
        ns.cmd = list(s.parameters)


# --- the entry point cli.py calls --------------------------------------------------------------


def apply(command: str, ns: types.SimpleNamespace, log: Callable[[str], None]) -> None:
    """Resolve the tree (-D, a NAME or path positional, or -M in /var/lib/machines), read
    NAME.nspawn, merge it under the command line; fill in the defaults."""
    mode = getattr(ns, "settings", None) or "yes"
    positional = getattr(ns, "machine", None)
    if positional:
        if "/" in positional:  # a directory path, as systemd-nspawn's -D
            if ns.directory:
                raise UsageError(f"{command}: both -D and a directory {positional!r} given")
            ns.directory = positional
        elif ns.name and ns.name != positional:
            raise UsageError(f"{command}: machine {positional!r} and -M {ns.name!r} differ")
        else:
            ns.name = positional
    if not ns.directory:
        if not ns.name:
            raise UsageError(f"{command}: -D/--directory is required without a machine name",
                             f"uspawn {command} -D DIR, or -M NAME for {machines_dir()}/NAME")
        ns.directory = machine_tree(ns.name)
    for field in ("setenv", "capability", "drop_capability", "bind", "bind_ro", "tmpfs",
                  "port"):
        if getattr(ns, field, None) is None:
            setattr(ns, field, [])
    for field in ("no_new_privileges", "read_only"):
        if getattr(ns, field, None) is None:
            setattr(ns, field, False)
    ns.parameters = []
    ns.settings_rlimits = {}
    ns.resource_properties = {}
    ns.settings_file = None
    if mode not in ("yes", "no", "trusted", "override"):
        raise UsageError(f"--settings: invalid value {mode!r}", "yes, no, trusted or override")
    from uspawn.machine.presets import machine_name

    name = ns.name
    if not name:
        try:
            name = machine_name(os.path.realpath(ns.directory))
        except OSError as exc:  # a link on the way that root may not follow (/proc/1/root)
            raise UsageError(f"-D/--directory: {ns.directory}: {exc.strerror}") from None
        except ValueError:  # NUL
            raise UsageError(f"-D/--directory: {ns.directory!r} is not a valid path") from None
    found = find_file(name, ns.directory, mode)
    if found is not None:
        path, trusted = found
        if trusted and mode != "trusted":
            trusted = check_owner(path, log)
        ns.settings_file = path  # machine/limits.py names it in errors about its keys
        s = parse(read_text(path), path, trusted, command == "boot")
        if ns.verbose or getattr(ns, "debug", False):
            log(f"settings: {path} ({'trusted' if trusted else 'untrusted'})")
        merge(s, ns, command, mode == "override", log)
    for field, default in DEFAULTS.items():
        if getattr(ns, field, None) is None:
            setattr(ns, field, default)


def add_rlimits(spec: S.Spec, ns: types.SimpleNamespace) -> None:
    """Limit*= of the settings file into the Spec's process.rlimits (set by the init)."""
    from uspawn.engine import spec as S

    got = getattr(ns, "settings_rlimits", None) or {}
    if spec.process is not None and got:
        spec.process.rlimits = [S.Rlimit(type=f"RLIMIT_{k}", soft=soft, hard=hard)
                                for k, (soft, hard) in got.items()]
