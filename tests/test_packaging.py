"""The distribution: what a wheel built from this tree ships."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_packaging_wheel_ships_the_license_and_the_type_marker(tmp_path: Path) -> None:
    """The metadata says MIT: the wheel carries the licence's text, and ``py.typed``."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("quart_wslb-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [license_file] = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        text = archive.read(license_file).decode()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    assert text == (ROOT / "LICENSE").read_text()
    assert "MIT License" in text
    assert b"License-Expression: MIT" in metadata or b"License: MIT" in metadata
    assert "quart_wslb/py.typed" in names
