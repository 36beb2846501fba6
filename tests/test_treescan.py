"""The hard-link scan's cache (kernel/hardlinks.scan_cached): a tree whose last scan
was clean and whose directories have not changed since is not walked file by file
again; any directory entry added since (a hard link to a host file among them) makes
the next start scan it all. Real files, links and ctimes; the cache directory is the
test's own. The start path itself: tests/attacks/test_hostile_tree.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uspawn.kernel import hardlinks


@pytest.fixture
def settle(monkeypatch: pytest.MonkeyPatch) -> None:
    # Directories older than 20 ms count as settled (2 s in the product), so the
    # tests need not sleep for seconds; every change below comes 50 ms after, more
    # than a tick of the coarse clock ctime is stamped with.
    monkeypatch.setattr(hardlinks, "_SETTLED_NS", 20_000_000)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    t = tmp_path / "tree"
    (t / "a" / "b").mkdir(parents=True)
    (t / "a" / "b" / "f").write_text("x")
    (t / "c").mkdir()
    time.sleep(0.05)
    fd = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
    yield t, fd
    os.close(fd)


def _outside(tmp_path: Path) -> Path:
    f = tmp_path / "host-file"
    f.write_text("host secret")
    return f


def _boom(*_a: object, **_k: object) -> hardlinks.Found:
    raise AssertionError("the tree was walked again")


def test_a_clean_settled_tree_is_not_walked_again_until_a_link_appears(
        settle: None, tree: tuple[Path, int], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t, fd = tree
    cache = tmp_path / "cache"
    assert hardlinks.scan_cached(fd, 1, str(cache)).total == 0
    assert len(list(cache.iterdir())) == 1
    walk = hardlinks.scan_fd
    monkeypatch.setattr(hardlinks, "scan_fd", _boom)
    assert hardlinks.scan_cached(fd, 1, str(cache)).total == 0  # from the cache
    monkeypatch.setattr(hardlinks, "scan_fd", walk)
    time.sleep(0.05)
    os.link(_outside(tmp_path), t / "a" / "b" / "shadow")  # deep: only a/b changes
    found = hardlinks.scan_cached(fd, 1, str(cache))
    assert found.total == 1 and found.files[0].path == "/a/b/shadow"


@pytest.mark.parametrize("change", ["new dir", "dir renamed", "dir made a symlink"])
def test_any_directory_change_means_a_new_walk(
        settle: None, tree: tuple[Path, int], tmp_path: Path, change: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    t, fd = tree
    cache = tmp_path / "cache"
    hardlinks.scan_cached(fd, 1, str(cache))
    time.sleep(0.05)
    if change == "new dir":
        (t / "c" / "new").mkdir()
    elif change == "dir renamed":
        os.rename(t / "a" / "b", t / "a" / "b2")
    else:
        os.rename(t / "c", tmp_path / "c-moved")
        os.symlink(str(tmp_path / "c-moved"), t / "c")
    walked = []
    walk = hardlinks.scan_fd

    def spy(*a: object, **k: object) -> hardlinks.Found:
        walked.append(1)
        return walk(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(hardlinks, "scan_fd", spy)
    hardlinks.scan_cached(fd, 1, str(cache))
    assert walked == [1]


def test_a_fresh_tree_is_not_cached(tree: tuple[Path, int], tmp_path: Path) -> None:
    """Directories changed within the last 2 s may change again within the same tick
    of the filesystem's clock: no verdict is kept for them."""
    _t, fd = tree
    cache = tmp_path / "cache"
    assert hardlinks.scan_cached(fd, 1, str(cache)).total == 0
    assert not cache.exists() or list(cache.iterdir()) == []


def test_a_tree_with_an_outside_link_is_never_cached(
        settle: None, tree: tuple[Path, int], tmp_path: Path) -> None:
    t, fd = tree
    os.link(_outside(tmp_path), t / "c" / "link")
    time.sleep(0.05)
    cache = tmp_path / "cache"
    for _ in range(2):
        assert hardlinks.scan_cached(fd, 1, str(cache)).total == 1
    assert not cache.exists() or list(cache.iterdir()) == []


@pytest.mark.parametrize("where", ["dir others can write", "file others can write"])
def test_a_planted_clean_verdict_is_ignored(settle: None, tree: tuple[Path, int],
                                            tmp_path: Path, where: str) -> None:
    """A verdict that someone else could have written is never read."""
    t, fd = tree
    os.link(_outside(tmp_path), t / "c" / "link")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    # A verdict that would validate: every directory's inode and ctime as they are.
    lines = [b"uspawn-treescan 1\n"]
    for rel in ("", "/a", "/a/b", "/c"):
        st = os.lstat(str(t) + rel)
        lines.append(f"{st.st_ino} {st.st_ctime_ns} {os.fsencode(rel).hex()}\n".encode())
    st = os.fstat(fd)
    planted = cache / f"{st.st_dev}-{st.st_ino}"
    planted.write_bytes(b"".join(lines))
    if where == "dir others can write":
        cache.chmod(0o777)
        planted.chmod(0o600)
    else:
        planted.chmod(0o666)
    assert hardlinks.scan_cached(fd, 1, str(cache)).total == 1
    planted.chmod(0o600)
    cache.chmod(0o700)
    # The same file, ours alone, is believed: the check above was the permissions.
    assert hardlinks.scan_cached(fd, 1, str(cache)).total == 0
