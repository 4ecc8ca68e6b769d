"""The distribution: what a wheel built from this tree ships."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(name="wheel", scope="module")
def fixture_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree, built once by pip (which runs the build backend)."""
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = out.glob("quart_wslb-*.whl")
    return wheel


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_packaging_wheel_ships_the_license_and_the_type_marker(wheel: Path) -> None:
    """The metadata says MIT: the wheel carries the licence's text, and ``py.typed``."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [license_file] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        text = archive.read(license_file).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert text == (ROOT / "LICENSE").read_text()
    assert "MIT License" in text
    assert b"License-Expression: MIT" in metadata or b"License: MIT" in metadata
    assert "quart_wslb/py.typed" in names


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_packaging_sdist_ships_the_license_docs_and_tests(tmp_path: Path) -> None:
    """The sdist, built by the build backend itself (as any frontend would have it do),
    carries the licence, the docs the README names and the tests."""
    built = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [sdist] = tmp_path.glob("quart_wslb-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        root = archive.getnames()[0].split("/", 1)[0]
        member = archive.extractfile(f"{root}/LICENSE")
        assert member is not None
        text = member.read().decode()
    assert text == (ROOT / "LICENSE").read_text()
    assert {"PKG-INFO", "pyproject.toml", "quart_wslb/py.typed", "docs/index.md"} <= names
    assert {"docs/cli.md", "docs/metrics.md", "tests/conftest.py"} <= names


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_packaging_wheel_declares_the_wslb_command(wheel: Path) -> None:
    """``pip install`` of the wheel puts ``wslb`` on the PATH."""
    with zipfile.ZipFile(wheel) as archive:
        [entry_points] = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    assert "wslb = quart_wslb.cli:main" in text
