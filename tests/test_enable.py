"""`uspawn enable NAME` / `disable NAME` (issue 17): autostart as `machinectl enable`.

Everything happens in a temporary unit directory (USPAWN_UNIT_DIR) and a
temporary machines directory (USPAWN_MACHINES_DIR): the tests never touch /etc.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import skip_or_fail, uspawn_cmd

DIST = Path(__file__).resolve().parent.parent / "dist" / "systemd"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    units = tmp_path / "units"
    units.mkdir()
    for f in ("uspawn@.service", "uspawn-machines.target"):
        shutil.copy(DIST / f, units / f)
    machines = tmp_path / "machines"
    (machines / "web").mkdir(parents=True)
    return units, machines


def _uspawn(dirs: tuple[Path, Path], *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, USPAWN_UNIT_DIR=str(dirs[0]), USPAWN_MACHINES_DIR=str(dirs[1]))
    return subprocess.run([*uspawn_cmd(), *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_enable_links_the_machine_and_the_target(dirs: tuple[Path, Path]) -> None:
    units, _ = dirs
    r = _uspawn(dirs, "enable", "web")
    assert r.returncode == 0, r.stderr
    link = units / "uspawn-machines.target.wants" / "uspawn@web.service"
    assert os.readlink(link) == str(units / "uspawn@.service")
    target = units / "multi-user.target.wants" / "uspawn-machines.target"
    assert os.readlink(target) == str(units / "uspawn-machines.target")
    assert f"Created symlink {link}" in r.stdout
    # Twice: nothing to do, nothing said.
    r = _uspawn(dirs, "enable", "web")
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_disable_removes_only_the_machine(dirs: tuple[Path, Path]) -> None:
    units, _ = dirs
    assert _uspawn(dirs, "enable", "web").returncode == 0
    r = _uspawn(dirs, "disable", "web")
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(units / "uspawn-machines.target.wants" / "uspawn@web.service")
    # The target stays enabled (as machines.target after `machinectl disable`).
    assert os.path.islink(units / "multi-user.target.wants" / "uspawn-machines.target")
    r = _uspawn(dirs, "disable", "web")  # not enabled: a no-op
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_enable_is_what_systemctl_enable_makes(dirs: tuple[Path, Path]) -> None:
    """The links match the units' [Install] sections (WantedBy=)."""
    units, _ = dirs
    assert _uspawn(dirs, "enable", "web").returncode == 0

    def wanted_by(unit: str) -> str:
        for line in (units / unit).read_text().splitlines():
            if line.startswith("WantedBy="):
                return line.split("=", 1)[1].strip()
        raise AssertionError(f"{unit}: no WantedBy=")

    assert (units / f"{wanted_by('uspawn@.service')}.wants" / "uspawn@web.service").is_symlink()
    assert (units / f"{wanted_by('uspawn-machines.target')}.wants"
            / "uspawn-machines.target").is_symlink()


def test_enable_errors_are_one_line(dirs: tuple[Path, Path]) -> None:
    units, _ = dirs
    r = _uspawn(dirs, "enable", "nosuch")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "machine nosuch: no tree at" in r.stderr
    r = _uspawn(dirs, "enable", "../etc")
    assert r.returncode == 2 and "invalid container name" in r.stderr, r.stderr
    r = _uspawn(dirs, "disable", "../etc")
    assert r.returncode == 2 and "invalid container name" in r.stderr, r.stderr
    os.unlink(units / "uspawn@.service")
    r = _uspawn(dirs, "enable", "web")
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "unit uspawn@.service is not installed" in r.stderr and "hint: install" in r.stderr


def test_enable_leaves_an_admins_file_alone(dirs: tuple[Path, Path]) -> None:
    units, _ = dirs
    wants = units / "uspawn-machines.target.wants"
    wants.mkdir()
    (wants / "uspawn@web.service").write_text("[Service]\n")
    r = _uspawn(dirs, "enable", "web")
    assert r.returncode == 125 and "exists and is not a symlink" in r.stderr, r.stderr
    assert _uspawn(dirs, "disable", "web").returncode == 0
    assert (wants / "uspawn@web.service").read_text() == "[Service]\n"


def test_units_verify(dirs: tuple[Path, Path]) -> None:
    """systemd-analyze verify of the target and an enabled instance."""
    sa = shutil.which("systemd-analyze")
    if sa is None:
        skip_or_fail("systemd-analyze missing (apt-get install systemd)")
        return
    units, _ = dirs
    exe = shutil.which("uspawn") or "/usr/local/bin/uspawn"
    if not os.path.exists(exe):
        skip_or_fail("no uspawn executable on PATH or in /usr/local/bin")
    # Point ExecStart= at an existing uspawn: verify checks the binary exists.
    service = units / "uspawn@.service"
    service.write_text(service.read_text().replace("/usr/local/bin/uspawn", exe))
    assert _uspawn(dirs, "enable", "web").returncode == 0
    inst = units / "uspawn@web.service"
    shutil.copy(service, inst)
    r = subprocess.run([sa, "verify", "--man=no", str(inst), str(units / "uspawn-machines.target")],
                       capture_output=True, text=True, env=dict(
                           os.environ, SYSTEMD_UNIT_PATH=f"{units}:"))
    # RequiresMountsFor= on a missing path is only informational.
    errors = [ln for ln in r.stderr.splitlines() if "var/lib/machines" not in ln and ln.strip()]
    assert r.returncode == 0 and errors == [], r.stderr
