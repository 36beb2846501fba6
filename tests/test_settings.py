"""systemd.nspawn(5) settings files (issue 16): machine/settings.py.

Fast unit tests of the parser, the search and the merge; busybox containers for
what a file does to a real `run`; one Debian machine booted from a real
/run/systemd/nspawn/NAME.nspawn (private users, Bind=, Port=, Environment=)
checked inside and on the host.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Runner, skip_or_fail

from uspawn.base.errors import SpecError, UsageError
from uspawn.machine import settings

# --- parser ------------------------------------------------------------------------------------


def _parse(text: str, boot: bool = False, trusted: bool = True) -> settings.Settings:
    return settings.parse(text, "/x/web.nspawn", trusted, boot)


def test_keys_sections_comments_continuations_and_quotes() -> None:
    s = _parse("# comment\n; other comment\n\n[Exec]\n"
               'Environment=A=1 "B=two words" C=x\\ y\n'
               "Environment=D=4\n"
               "Parameters=--one \\\n  'two three'\n"
               "Hostname=web\nKillSignal=SIGRTMIN+4\nNoNewPrivileges=yes\n"
               "LimitNOFILE=1024:4096\nLimitCORE=infinity\nLimitFSIZE=1M\n"
               "[Files]\nReadOnly=on\nTemporaryFileSystem=/var/tmp:size=10M\n"
               "PrivateUsersOwnership=chown\n"
               "[Network]\nVirtualEthernet=yes\nPort=tcp:8080:80\nPort=udp:53\n")
    assert s.warnings == []
    assert s.groups["env"]["setenv"] == ["A=1", "B=two words", "C=x y", "D=4"]
    assert s.parameters == ["--one", "two three"]
    assert s.groups["hostname"] == {"hostname": "web"}
    assert s.groups["kill_signal"] == {"kill_signal": "SIGRTMIN+4"}
    assert s.groups["nnp"] == {"no_new_privileges": True}
    assert s.rlimits == {"NOFILE": (1024, 4096), "CORE": (2**64 - 1, 2**64 - 1),
                         "FSIZE": (1 << 20, 1 << 20)}
    assert s.groups["read_only"] == {"read_only": True}
    assert s.groups["mounts"]["tmpfs"] == ["/var/tmp:size=10M"]
    assert s.groups["userns"] == {"private_users_ownership": "chown"}
    assert s.groups["network"] == {"veth": True}
    assert s.groups["ports"]["port"] == ["tcp:8080:80", "udp:53"]
    assert s.where["ports"] == "/x/web.nspawn:22: Port="


def test_empty_assignment_resets_a_list() -> None:
    s = _parse("[Exec]\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\nParameters=a\n"
               "Parameters=\n")
    assert s.groups["env"]["setenv"] == ["B=2"]
    assert s.parameters == []


def test_unknown_and_unsupported_keys_warn_with_file_line_and_key() -> None:
    s = _parse("[Exec]\nFrobnicate=1\nPersonality=x86\nX-Mine=1\n"
               "[Network]\nZone=z\n[Resources]\nMemoryMax=1G\n"
               "[X-Anything]\nWhatever=1\n[X-Uspawn-Resources]\nMemoryMax=1G\nNope=2\n"
               "ResolvConf=copy-host\n[Exec]\nResolvConf=bind-host\nTimezone=auto\n"
               "Volatile=yes\n")
    assert s.warnings == [
        "/x/web.nspawn:2: Frobnicate= unknown key, ignored",
        "/x/web.nspawn:3: Personality= not supported by uspawn, ignored",
        "/x/web.nspawn:6: Zone= not supported by uspawn, ignored",
        "/x/web.nspawn:7: unknown section [Resources], ignored",
        "/x/web.nspawn:13: Nope= unknown resource key, ignored (known: MemoryMax, "
        "MemoryHigh, MemorySwapMax, CPUQuota, CPUWeight, AllowedCPUs, TasksMax, IOWeight)",
        "/x/web.nspawn:14: ResolvConf= unknown resource key, ignored (known: MemoryMax, "
        "MemoryHigh, MemorySwapMax, CPUQuota, CPUWeight, AllowedCPUs, TasksMax, IOWeight)",
        "/x/web.nspawn:16: ResolvConf= 'bind-host' not supported by uspawn (only off and "
        "auto, which leave the tree's file alone), ignored",
        "/x/web.nspawn:18: Volatile= unknown key, ignored",
    ]
    assert s.properties == {"MemoryMax": "1G"}


def test_user_and_working_directory_warn_for_boot() -> None:
    s = _parse("[Exec]\nUser=www\nWorkingDirectory=/srv\n", boot=True)
    assert [w.split(": ", 1)[0] for w in s.warnings] == ["/x/web.nspawn:2",
                                                         "/x/web.nspawn:3"]
    assert "user" not in s.groups and "chdir" not in s.groups


@pytest.mark.parametrize(("text", "message"), [
    ("[Exec]\nBoot=maybe\n", ":2: Boot= 'maybe' is not a boolean"),
    ("[Files]\nVolatile=state\n", ":2: Volatile= 'state': volatile machines are not supported"),
    ("[Exec]\nEnvironment=NOVALUE\n", ":2: Environment= 'NOVALUE' is not KEY=VALUE"),
    ("[Exec]\nEnvironment=\"A=1\n", ":2: Environment= unterminated quote"),
    ("[Exec]\nCapability=CAP_FLY\n", ":2: Capability= unknown capability"),
    ("[Exec]\nKillSignal=SIGNOPE\n", ":2: KillSignal= unknown signal"),
    ("[Exec]\nPrivateUsers=managed\n", ":2: PrivateUsers= 'managed'"),
    ("[Exec]\nPrivateUsers=0:65536\n", ":2: PrivateUsers= --private-users: range"),
    ("[Exec]\nLimitNOFILE=2048:1024\n", ":2: LimitNOFILE= soft limit 2048 is above"),
    ("[Exec]\nLimitNOFILE=lots\n", ":2: LimitNOFILE=: 'lots' is not a number"),
    ("[Exec]\nHostname=a_b\n", ":2: Hostname= 'a_b' is not a valid hostname"),
    ("[Exec]\nWorkingDirectory=srv\n", ":2: WorkingDirectory= 'srv' must be an absolute path"),
    ("[Files]\nBind=relative\n", ":2: Bind=: 'relative': paths must be absolute"),
    ("[Files]\nBind=/no/such/dir/anywhere\n", ":2: Bind=: source /no/such/dir/anywhere"),
    ("[Files]\nTemporaryFileSystem=/proc\n", ":2: TemporaryFileSystem= --tmpfs: /proc"),
    ("[Files]\nPrivateUsersOwnership=shift\n", ":2: PrivateUsersOwnership= 'shift'"),
    ("[Network]\nPort=http\n", ":2: Port= --port http"),
    ("[Exec\n", ":1: invalid section header"),
    ("[Exec]\nnovalue\n", ":2: 'novalue' is not Key=value"),
])
def test_bad_values_are_errors_naming_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        _parse(text)
    assert message in e.value.one_line(), e.value.one_line()
    assert e.value.one_line().startswith("/x/web.nspawn:")


def test_split_words() -> None:
    assert settings.split_words("a 'b c' \"d e\" f\\ g  ", "w") == ["a", "b c", "d e", "f g"]
    assert settings.split_words("", "w") == []
    assert settings.split_words("''", "w") == [""]


# --- search and trust --------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    d = types.SimpleNamespace(etc=tmp_path / "etc", run=tmp_path / "run",
                              machines=tmp_path / "machines")
    for p in (d.etc, d.run, d.machines / "web"):
        p.mkdir(parents=True)
    monkeypatch.setenv(settings.ENV_TRUSTED_DIRS, f"{d.etc}:{d.run}")
    monkeypatch.setenv(settings.ENV_MACHINES_DIR, str(d.machines))
    return d


def test_search_precedence_and_trust(dirs: types.SimpleNamespace) -> None:
    tree = str(dirs.machines / "web")
    assert settings.find_file("web", tree, "yes") is None
    (dirs.machines / "web.nspawn").write_text("")
    assert settings.find_file("web", tree, "yes") == (str(dirs.machines / "web.nspawn"), False)
    assert settings.find_file("web", tree, "trusted") == (str(dirs.machines / "web.nspawn"),
                                                          True)
    assert settings.find_file("web", tree, "no") is None
    (dirs.run / "web.nspawn").write_text("")
    assert settings.find_file("web", tree, "yes") == (str(dirs.run / "web.nspawn"), True)
    (dirs.etc / "web.nspawn").write_text("")
    assert settings.find_file("web", tree, "yes") == (str(dirs.etc / "web.nspawn"), True)
    # Named after the machine, not the directory: -M other looks for other.nspawn.
    assert settings.find_file("other", tree, "yes") is None


def test_writable_trusted_file_is_demoted(dirs: types.SimpleNamespace) -> None:
    f = dirs.etc / "web.nspawn"
    f.write_text("")
    lines: list[str] = []
    os.chmod(f, 0o644)
    assert settings.check_owner(str(f), lines.append) and lines == []
    os.chmod(f, 0o664)
    assert not settings.check_owner(str(f), lines.append)
    assert len(lines) == 1 and "reading it as untrusted" in lines[0]


def test_a_fifo_is_refused_not_waited_for(dirs: types.SimpleNamespace) -> None:
    f = dirs.etc / "web.nspawn"
    os.mkfifo(f)
    with pytest.raises(SpecError, match="not a regular file"):
        settings.read_text(str(f))


def _ns(**kw: object) -> types.SimpleNamespace:
    base: dict[str, object] = dict(
        directory=None, name=None, machine=None, settings=None, verbose=False, debug=False,
        private_users=None, private_users_ownership=None, hostname=None, user=None,
        chdir=None, setenv=[], capability=[], drop_capability=[], no_new_privileges=False,
        bind=[], bind_ro=[], network=None, port=[], tmpfs=[], read_only=False, tty=False,
        kill_signal=None, cmd=[])
    base.update(kw)
    return types.SimpleNamespace(**base)


FULL = ("[Exec]\nEnvironment=FROM=file\nHostname=filehost\nCapability=CAP_SYS_MODULE\n"
        "DropCapability=CAP_MKNOD\nLimitNOFILE=100\nPrivateUsers=no\n"
        "Parameters=/bin/echo from-file\n"
        "[Files]\nBind=/tmp:/mnt\nPrivateUsersOwnership=off\n"
        "[Network]\nVirtualEthernet=yes\nPort=8080:80\n"
        "[X-Uspawn-Resources]\nMemoryMax=1G\nTasksMax=50\n")


def _apply(dirs: types.SimpleNamespace, where: str, text: str, command: str = "run",
           **kw: object) -> tuple[types.SimpleNamespace, list[str]]:
    (getattr(dirs, where) / "web.nspawn").write_text(text)
    ns = _ns(name="web", **kw)
    lines: list[str] = []
    settings.apply(command, ns, lines.append)
    return ns, lines


def test_trusted_file_fills_what_the_command_line_left(dirs: types.SimpleNamespace) -> None:
    ns, lines = _apply(dirs, "etc", FULL)
    assert lines == []
    assert ns.directory == str(dirs.machines / "web")
    assert ns.setenv == ["FROM=file"] and ns.hostname == "filehost"
    assert ns.capability == ["CAP_SYS_MODULE"] and ns.drop_capability == ["CAP_MKNOD"]
    assert ns.settings_rlimits == {"NOFILE": (100, 100)}
    assert (ns.private_users, ns.private_users_ownership) == ("no", "off")
    assert ns.bind == ["/tmp:/mnt"] and ns.network == "veth" and ns.port == ["8080:80"]
    assert ns.cmd == ["/bin/echo", "from-file"]
    assert ns.resource_properties == {"MemoryMax": "1G", "TasksMax": "50"}
    assert ns.settings_file == str(dirs.etc / "web.nspawn")
    assert ns.chdir == "/"  # defaults filled in where neither said anything


def test_command_line_wins_group_by_group(dirs: types.SimpleNamespace) -> None:
    ns, _ = _apply(dirs, "etc", FULL, setenv=["CLI=1"], hostname="clihost",
                   drop_capability=["CAP_CHOWN"], private_users="pick", tmpfs=["/srv"],
                   network="private", cmd=["/bin/true"])
    assert ns.setenv == ["CLI=1"] and ns.hostname == "clihost"
    # --drop-capability replaces both capability keys, as nspawn's SETTING_CAPABILITY.
    assert ns.capability == [] and ns.drop_capability == ["CAP_CHOWN"]
    # -U replaces PrivateUsersOwnership= too (one group); --tmpfs replaces Bind=.
    assert (ns.private_users, ns.private_users_ownership) == ("pick", "auto")
    assert ns.bind == [] and ns.tmpfs == ["/srv"]
    assert ns.network == "private" and ns.port == ["8080:80"]
    assert ns.cmd == ["/bin/true"]


def test_override_lets_the_file_win(dirs: types.SimpleNamespace) -> None:
    ns, _ = _apply(dirs, "etc", FULL, settings="override", setenv=["CLI=1"],
                   network="private")
    assert ns.setenv == ["FROM=file"] and ns.network == "veth"


def test_untrusted_file_keeps_only_unprivileged_settings(dirs: types.SimpleNamespace) -> None:
    ns, lines = _apply(dirs, "machines", FULL)
    assert ns.setenv == ["FROM=file"] and ns.hostname == "filehost"
    assert ns.drop_capability == ["CAP_MKNOD"] and ns.capability == []
    assert ns.bind == [] and ns.network == "private" and ns.port == []
    assert (ns.private_users, ns.private_users_ownership) == ("pick", "auto")
    assert ns.settings_rlimits == {} and ns.resource_properties == {}
    assert ns.cmd == ["/bin/echo", "from-file"]
    ignored = sorted(ln.split(": ")[2].split("=")[0] for ln in lines)
    assert ignored == ["Bind", "Capability", "LimitNOFILE", "Port", "PrivateUsersOwnership",
                       "TasksMax", "VirtualEthernet"], lines
    assert all("not trusted" in ln for ln in lines)
    ns, lines = _apply(dirs, "machines", FULL, settings="trusted")
    assert lines == [] and ns.bind == ["/tmp:/mnt"]


@pytest.mark.parametrize(("keys", "network"), [
    ("Private=yes", "private"), ("Private=no", "host"), ("VirtualEthernet=yes", "veth"),
    ("VirtualEthernet=no", "host"), ("Private=no\nBridge=br0", "bridge:br0"),
])
def test_network_keys_as_nspawn_combines_them(dirs: types.SimpleNamespace, keys: str,
                                               network: str) -> None:
    ns, _ = _apply(dirs, "etc", f"[Network]\n{keys}\n")
    assert ns.network == network


def test_boot_takes_parameters_and_refuses_boot_no(dirs: types.SimpleNamespace) -> None:
    ns, _ = _apply(dirs, "etc", "[Exec]\nBoot=yes\nParameters=systemd.unit=rescue.target\n",
                   command="boot")
    assert ns.parameters == ["systemd.unit=rescue.target"]
    with pytest.raises(SpecError, match="Boot=no: uspawn boot always boots"):
        _apply(dirs, "etc", "[Exec]\nBoot=no\n", command="boot")
    with pytest.raises(SpecError, match="Boot=yes: `uspawn run` runs one command"):
        _apply(dirs, "etc", "[Exec]\nBoot=yes\n")


def test_machine_positional_name_or_path(dirs: types.SimpleNamespace) -> None:
    ns = _ns(machine="web")
    settings.apply("boot", ns, print)
    assert (ns.name, ns.directory) == ("web", str(dirs.machines / "web"))
    ns = _ns(machine=str(dirs.machines / "web"))
    settings.apply("boot", ns, print)
    assert ns.directory == str(dirs.machines / "web") and ns.name is None
    with pytest.raises(UsageError, match="differ"):
        settings.apply("boot", _ns(machine="web", name="db"), print)
    with pytest.raises(SpecError, match="no tree at"):
        settings.apply("boot", _ns(machine="db"), print)
    with pytest.raises(UsageError, match="invalid container name"):
        settings.apply("boot", _ns(machine="..."), print)
    (dirs.machines / "img.raw").write_text("")
    with pytest.raises(SpecError, match="disk image"):
        settings.apply("boot", _ns(machine="img"), print)
    with pytest.raises(UsageError, match="-D/--directory is required"):
        settings.apply("run", _ns(), print)


# --- busybox containers ---------------------------------------------------------------------------


@pytest.fixture
def machine_env(rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                ) -> types.SimpleNamespace:
    """The busybox tree as MACHINES/bb, a trusted directory for bb.nspawn."""
    machines = tmp_path / "machines"
    machines.mkdir(mode=0o700)
    os.rename(rootfs, machines / "bb")
    trusted = tmp_path / "nspawn"
    trusted.mkdir()
    monkeypatch.setenv(settings.ENV_MACHINES_DIR, str(machines))
    monkeypatch.setenv(settings.ENV_TRUSTED_DIRS, str(trusted))
    return types.SimpleNamespace(machines=machines, trusted=trusted)


SHOW = "echo $FOO; pwd; hostname; ulimit -n; cat /mnt/data/f; touch /x 2>/dev/null; echo rw=$?"


def test_run_by_name_with_a_trusted_file(uspawn: Runner, machine_env: types.SimpleNamespace,
                                         tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("from-host\n")
    (machine_env.trusted / "bb.nspawn").write_text(
        "[Exec]\nEnvironment=FOO=from-file\nWorkingDirectory=/tmp\nHostname=filehost\n"
        f"LimitNOFILE=333\nPersonality=x86\n[Files]\nBindReadOnly={data}:/mnt/data\n"
        "ReadOnly=yes\n")
    r = uspawn.run("run", "-M", "bb", "--", "sh", "-c", SHOW)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["from-file", "/tmp", "filehost", "333", "from-host", "rw=1"]
    assert r.stderr.strip().splitlines() == [
        f"uspawn: warning: {machine_env.trusted}/bb.nspawn:6: Personality= not supported "
        "by uspawn, ignored"]
    # The command line wins over the file.
    r = uspawn.run("run", "-M", "bb", "-E", "FOO=cli", "--hostname", "clihost", "--chdir", "/",
                   "--", "sh", "-c", SHOW)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cli", "/", "clihost", "333", "from-host", "rw=1"]


def test_untrusted_file_next_to_the_tree(uspawn: Runner, machine_env: types.SimpleNamespace,
                                         tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("from-host\n")
    (machine_env.machines / "bb.nspawn").write_text(
        f"[Exec]\nEnvironment=FOO=vendor\nLimitNOFILE=333\n[Files]\nBind={data}:/mnt/data\n")
    r = uspawn.run("run", "-M", "bb", "--", "sh", "-c", "echo $FOO; ls /mnt/data; ulimit -n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "vendor" and "f" not in r.stdout.split()
    warned = [ln for ln in r.stderr.splitlines() if "not trusted" in ln]
    assert sorted(w.split(": ")[3] for w in warned) == ["Bind= ignored", "LimitNOFILE= ignored"]


def test_bad_settings_file_is_one_line(uspawn: Runner,
                                       machine_env: types.SimpleNamespace) -> None:
    (machine_env.trusted / "bb.nspawn").write_text("[Files]\nReadOnly=perhaps\n")
    r = uspawn.run("run", "-M", "bb", "--", "true")
    assert r.returncode == 125
    assert r.stderr == (f"uspawn: {machine_env.trusted}/bb.nspawn:2: ReadOnly= 'perhaps' is "
                        "not a boolean (hint: use yes or no)\n")


# --- a Debian machine booted from a real /run/systemd/nspawn/NAME.nspawn ---------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def debian_machines(tmp_path: Path, need_root: None) -> Path:
    try:
        from fixtures.debian_tree import copy_debian_tree
    except ImportError as exc:
        skip_or_fail(f"fixture module missing: {exc}")
        raise
    machines = tmp_path / "machines"
    machines.mkdir(mode=0o700)
    try:
        copy_debian_tree(machines / "nspawnweb")
    except Exception as exc:  # debootstrap needs the Debian mirror
        skip_or_fail(f"cannot build the Debian fixture: {exc}")
    return machines


@pytest.fixture
def run_settings_file() -> Iterator[Path]:
    """/run/systemd/nspawn/nspawnweb.nspawn, removed afterwards (with the directory
    when this test made it)."""
    d = Path(settings.TRUSTED_DIRS[1])
    made = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    f = d / "nspawnweb.nspawn"
    assert not f.exists(), f"{f} exists: not ours to overwrite"
    try:
        yield f
    finally:
        f.unlink(missing_ok=True)
        if made:
            os.rmdir(d)


def _http_get(url: str) -> str:
    """One request. `boot --detach` returned after systemd's READY=1, i.e. after
    nginx.service started, which has its socket bound: a connection waits in
    its backlog, never refused; the timeout only bounds a hang."""
    with urllib.request.urlopen(url, timeout=60) as r:
        return str(r.read().decode())


def _unit_exec_start(instance: str) -> list[str]:
    """uspawn@INSTANCE.service's ExecStart= arguments (without the binary)."""
    unit = Path(__file__).resolve().parent.parent / "dist" / "systemd" / "uspawn@.service"
    line = next(ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart="))
    return [w.replace("%i", instance) for w in line.split()[1:]]


def test_debian_boots_from_a_real_nspawn_file(debian_machines: Path, run_settings_file: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              ) -> None:
    name = "nspawnweb"
    monkeypatch.setenv(settings.ENV_MACHINES_DIR, str(debian_machines))
    monkeypatch.delenv(settings.ENV_TRUSTED_DIRS, raising=False)  # the real /etc and /run
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello.txt").write_text("from-the-host\n")
    port = _free_port()
    # What an nspawn user has: the file systemd-nspawn@nspawnweb.service reads (the veth
    # comes from that unit's --network-veth, here from uspawn@.service's --network=veth).
    run_settings_file.write_text(
        "[Exec]\nPrivateUsers=pick\nEnvironment=GREETING=hello-from-nspawn-file\n"
        "[Files]\nPrivateUsersOwnership=auto\n"
        f"Bind={shared}:/srv/shared\n"
        f"[Network]\nPort=tcp:{port}:80\n")
    uspawn = Runner(tmp_path / "state")
    (tmp_path / "state").mkdir()
    # lxcfs's views are another test's subject (docs/LIMITS.md); off when uspawn has them.
    lxcfs = ["--lxcfs=no"] if "--lxcfs" in uspawn.run("boot", "--help").stdout else []
    # --keep-unit needs the unit's own cgroup (tests/test_keep_unit.py); detached here.
    args = [a for a in _unit_exec_start(name) if a != "--keep-unit"]
    r = uspawn.run(*args, "--detach", *lxcfs, timeout=150)
    assert r.returncode == 0, r.stderr
    try:
        def sh(cmd: str) -> str:
            p = uspawn.run("exec", name, "--", "sh", "-c", cmd, timeout=60)
            assert p.returncode == 0, (cmd, p.stdout, p.stderr)
            return p.stdout.strip()

        # Inside: pid 1's environment, the bind, the user namespace, the veth.
        assert "GREETING=hello-from-nspawn-file" in sh("tr '\\0' '\\n' </proc/1/environ")
        assert sh("cat /srv/shared/hello.txt") == "from-the-host"
        uid_map = sh("cat /proc/self/uid_map").split()
        assert uid_map[0] == "0" and int(uid_map[1]) >= 524288 and uid_map[2] == "65536"
        assert "host0" in sh("ls /sys/class/net").split()
        # On the host: pid 1 runs as an unprivileged host UID, the veth, the published port.
        rows = json.loads(uspawn.run("list", "--json").stdout)
        pid = next(int(row["pid"]) for row in rows if row["name"] == name)
        with open(f"/proc/{pid}/status") as f:
            uid_line = next(ln for ln in f if ln.startswith("Uid:"))
        assert int(uid_line.split()[1]) == int(uid_map[1])
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert f"ve-{name}" in links
        body = _http_get(f"http://127.0.0.1:{port}/")
        assert body.strip() == "uspawn-nginx-ok"
    finally:
        stop = uspawn.run("stop", name, "--timeout", "20", timeout=90)
    assert stop.returncode == 0, stop.stderr
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"ve-{name}" not in links
