"""How the package is installed: `python -m orcal` from the folder that holds a clone named orcal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import orcal

REPO = Path(__file__).resolve().parents[1]


def test_python_m_orcal_beside_a_clone_named_orcal(tmp_path):
    if Path(orcal.__file__).resolve().parent != REPO / "orcal":
        pytest.skip("orcal is not installed from this checkout in editable mode")
    (tmp_path / "orcal").symlink_to(REPO)  # the clone's own folder, seen from its parent
    done = subprocess.run([sys.executable, "-m", "orcal", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:] + "\n(install with editable_mode=compat, as the README does)"
    assert done.stdout.startswith("orcal ")
