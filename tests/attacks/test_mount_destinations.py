"""Hostile trees against --bind destinations (runc CVE-2019-19921, CVE-2021-30465).

A destination inside an untrusted tree may be a symlink (absolute or `../..`), may
contain `..`, magic links, loops, or be absurdly deep. The mount must land inside
the rootfs, or uspawn must refuse with one clear line; the host never changes.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .conftest import assert_clean_error, mounts_mentioning, remove_deep

if TYPE_CHECKING:
    from .conftest import Attacker, HostGuard


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A bind source with a recognisable file (the admin's, trusted)."""
    d = tmp_path / "bindsrc"
    d.mkdir()
    (d / "content").write_text("bind-source\n")
    return d


def _link_target(kind: str, host: HostGuard, tree: Path) -> str:
    return {
        "abs-marker": str(host.marker),
        "rel-marker": host.relative_from(tree, "mnt"),
        "deep-marker": host.deep_relative(),
        "abs-etc": "/etc",
        "rel-etc": "../../../../../../../etc",
    }[kind]


@pytest.mark.parametrize("kind", ["abs-marker", "rel-marker", "deep-marker", "abs-etc",
                                  "rel-etc"])
def test_bind_destination_symlink_out_of_tree(attack: Attacker, host: HostGuard, tree: Path,
                                              src: Path, kind: str) -> None:
    """/mnt/evil -> (a host path | ../../host path | /etc): never the host's path."""
    target = _link_target(kind, host, tree)
    (tree / "mnt" / "evil").symlink_to(target)
    r = attack.run("sh", "-c", "cat /mnt/evil/content; readlink -f /mnt/evil",
                   extra=("--bind", f"{src}:/mnt/evil"))
    if kind.endswith("-etc"):
        # The tree has an /etc: the symlink resolves inside it, and the mount goes there.
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == ["bind-source", "/etc"]
        assert not (tree / "etc" / "content").exists()  # a mount, not a copy into the tree
        assert not Path("/etc/content").exists()
    elif r.returncode != 0:
        assert_clean_error(r, "/mnt/evil")
    else:  # created and mounted at the symlink's target *inside* the container
        assert r.stdout.splitlines()[0] == "bind-source"
    assert not (host.marker / "content").exists()
    assert mounts_mentioning(host.marker) == []
    host.assert_untouched()


@pytest.mark.parametrize("dest", ["/mnt/../../../tmp/{u}", "/../../../../var/{u}/x",
                                  "/mnt/../../..{marker}/planted"])
def test_bind_destination_dotdot(attack: Attacker, host: HostGuard, tree: Path, src: Path,
                                 dest: str) -> None:
    """`..` in the destination cannot climb out of the tree."""
    u = f"uspawn-attack-{uuid.uuid4().hex[:8]}"
    dest = dest.format(u=u, marker=host.marker)
    r = attack.run("sh", "-c", "find / \\( -path /proc -o -path /sys \\) -prune -o "
                   "-name content -print 2>/dev/null",
                   extra=("--bind", f"{src}:{dest}"))
    if r.returncode != 0:
        assert_clean_error(r)
    else:
        assert r.stdout.strip().endswith("/content"), r.stdout  # the mount is inside
    assert not Path("/tmp", u).exists() and not Path("/var", u).exists()
    assert not (host.marker / "planted").exists()
    host.assert_untouched()


def test_bind_destination_dotdot_resolves_like_the_kernel(attack: Attacker, host: HostGuard,
                                                          tree: Path, src: Path) -> None:
    out = attack.sh("cat /tmp/x/content; test -e /mnt/tmp && echo mnt-tmp-created; true",
                    extra=("--bind", f"{src}:/mnt/../../../tmp/x"))
    assert out.splitlines() == ["bind-source"]
    host.assert_untouched()


@pytest.mark.parametrize("link", ["/srv", "../srv"])
def test_bind_destination_below_tree_symlink(attack: Attacker, host: HostGuard, tree: Path,
                                             src: Path, link: str) -> None:
    (tree / "srv").mkdir()
    (tree / "var" / "data").symlink_to(link)
    out = attack.sh("cat /srv/foo/content", extra=("--bind", f"{src}:/var/data/foo"))
    assert out == "bind-source\n"
    host.assert_untouched()


@pytest.mark.parametrize("how", ["dest-proc-root", "dest-proc-cwd", "tree-link-proc-root"])
def test_bind_destination_through_magic_links(attack: Attacker, host: HostGuard, tree: Path,
                                              src: Path, how: str) -> None:
    """/proc/1/root of the init still points at the host's / before pivot_root: a
    destination through a /proc magic link must never be followed."""
    if how == "dest-proc-root":
        dest = f"/proc/1/root{host.marker}/x"
    elif how == "dest-proc-cwd":
        dest = f"/proc/self/cwd/..{host.marker}/x"
    else:
        (tree / "mnt" / "evil").symlink_to(f"/proc/1/root{host.marker}")
        dest = "/mnt/evil/x"
    r = attack.run("sh", "-c", "find / -xdev -name content 2>/dev/null; true",
                   extra=("--bind", f"{src}:{dest}"))
    if r.returncode != 0:
        assert_clean_error(r)
    assert not (host.marker / "x").exists()
    host.assert_untouched()


@pytest.mark.parametrize("layout", ["self", "pair", "parent-loop"])
def test_bind_destination_symlink_loop(attack: Attacker, host: HostGuard, tree: Path,
                                       src: Path, layout: str) -> None:
    mnt = tree / "mnt"
    if layout == "self":
        (mnt / "loop").symlink_to("loop")
        dest = "/mnt/loop"
    elif layout == "pair":
        (mnt / "a").symlink_to("/mnt/b")
        (mnt / "b").symlink_to("/mnt/a")
        dest = "/mnt/a"
    else:
        (mnt / "a").symlink_to("../mnt/a")
        dest = "/mnt/a/b/c"
    r = attack.run("true", extra=("--bind", f"{src}:{dest}"), timeout=15)
    assert_clean_error(r, "ELOOP")
    host.assert_untouched()


def test_bind_destination_very_deep(attack: Attacker, host: HostGuard, tree: Path,
                                    src: Path) -> None:
    """1500 nested components work (made inside the tree); past PATH_MAX is refused."""
    try:
        deep = "/a" * 1500
        out = attack.sh(f"cat {deep}/content", extra=("--bind", f"{src}:{deep}"))
        assert out == "bind-source\n"
        # Created inside the tree, nowhere else.
        assert os.path.isdir(str(tree) + deep)
        r = attack.run("true", extra=("--bind", f"{src}:{'/b' * 2100}"))
        assert_clean_error(r, "ENAMETOOLONG")
        assert not (tree / "b").exists()  # refused before anything was made
        host.assert_untouched()
    finally:
        remove_deep(tree / "a")
        remove_deep(tree / "b")


# --- binds are not idmapped unless asked ------------------------------------------


@pytest.fixture
def host_dir(tmp_path: Path) -> Path:
    """A host directory as an admin has it: root-owned 0755, a 0600 secret, and a
    world-writable drop box (so container root can create files at all)."""
    d = tmp_path / "hostdata"
    d.mkdir()
    d.chmod(0o755)
    secret = d / "secret"
    secret.write_text("host-root-only\n")
    secret.chmod(0o600)
    drop = d / "drop"
    drop.mkdir()
    drop.chmod(0o1777)
    return d


def test_bind_without_idmap_keeps_host_owners(attack: Attacker, host: HostGuard,
                                              host_dir: Path) -> None:
    """--bind SRC:DST (no idmap): container root is *not* host root there. It cannot
    read a 0600 root file or write into a root-owned 0755 directory, and a setuid
    file it plants is owned by its own unprivileged host UID, never by host root."""
    out = attack.sh(
        "cat /data/secret >/dev/null 2>&1; echo read=$?; "
        "touch /data/new 2>/dev/null; echo create=$?; "
        "chmod 0777 /data/secret 2>/dev/null; echo chmod=$?; "
        "cp /bin/busybox /data/drop/suid && chown 0:0 /data/drop/suid && "
        "chmod 4755 /data/drop/suid; echo plant=$?; "
        "stat -c 'owner=%u' /data/secret",
        extra=("--bind", f"{host_dir}:/data"))
    lines = out.split()
    assert "read=1" in lines and "create=1" in lines and "chmod=1" in lines, out
    assert "owner=65534" in lines  # host root shows as the overflow ID: unmapped
    planted = host_dir / "drop" / "suid"
    assert not (host_dir / "new").exists()
    assert stat.S_IMODE((host_dir / "secret").stat().st_mode) == 0o600
    # The drop box is world-writable, so the plant works, but as the container's
    # range: a setuid binary of an unprivileged host UID, not of host root.
    assert "plant=0" in lines, out
    st = planted.stat()
    assert st.st_mode & stat.S_ISUID
    assert st.st_uid != 0 and st.st_gid != 0 and st.st_uid >= 0x80000, (st.st_uid, st.st_gid)
    planted.unlink()
    host.assert_untouched()


def test_bind_idmap_on_request(attack: Attacker, host: HostGuard, host_dir: Path) -> None:
    """`idmap` asks for container root = host root on the source (nspawn's option);
    a source under a 0700 root directory (pytest's) warns about nothing."""
    drop = host_dir / "drop"
    drop.chmod(0o755)
    r = attack.run("sh", "-c", "cat /data/secret; touch /data/made",
                   extra=("--bind", f"{host_dir}:/data:idmap"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "host-root-only\n" and r.stderr == ""
    assert (host_dir / "made").stat().st_uid == 0
    (host_dir / "made").unlink()
    host.assert_untouched()


def test_bind_idmap_of_a_reachable_or_world_writable_source(attack: Attacker,
                                                            host: HostGuard) -> None:
    """idmap on a source other host users can reach: one warning line naming it;
    on a world-writable source: refused before anything is created."""
    base = Path("/var/tmp") / f"uspawn-attack-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    try:
        base.chmod(0o755)
        r = attack.run("true", extra=("--bind", f"{base}:/data:idmap"))
        assert r.returncode == 0, r.stderr
        warn = r.stderr.strip().splitlines()
        assert len(warn) == 1 and warn[0].startswith("uspawn: warning:") and str(base) in warn[0]
        r = attack.run("true", extra=("--bind", f"{base}:/data"))
        assert r.returncode == 0 and r.stderr == ""  # plain bind: nothing to warn about
        base.chmod(0o777)
        r = attack.run("true", extra=("--bind", f"{base}:/data:idmap"))
        assert_clean_error(r, str(base), "world-writable")
        r = attack.run("true", extra=("--bind", f"{base}:/data:rootidmap"))
        assert_clean_error(r, "rootidmap is not supported")
        assert list(base.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
    host.assert_untouched()
