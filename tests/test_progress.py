"""Progress bars: drawn on a terminal only, and one --quiet flag on every command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orcal._progress import progress_bar, show_progress

REPO = Path(__file__).resolve().parents[1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert show_progress() and not show_progress(False)
    for _ in progress_bar(range(3), desc="x"):
        pass
    assert "\r" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe
    assert not show_progress()
    for _ in progress_bar(range(3), desc="x"):
        pass
    assert sys.stderr.getvalue() == ""


def test_redirected_stderr_gets_no_bar_frames(tmp_path):
    """``orcal data info`` with stderr to a pipe, as in ``orcal demo 2> log``: no carriage-return frames."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "orcal", "data", "info", "-", "--dataset", "synthetic",
                           "--option", "n=30", "--option", "shape=16,16"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "cases:" not in proc.stderr, proc.stderr[:500]


@pytest.mark.parametrize("command", ["demo", "experiment", "train", "predict", "evaluate", "fuse", "data info",
                                     "nnunet convert"])
def test_every_command_takes_quiet(command):
    from orcal.cli import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command.split()[0]]
    if " " in command:
        sub = sub._subparsers._group_actions[0].choices[command.split()[1]]
    assert "--quiet" in sub._option_string_actions
    if command == "evaluate":  # its older name stays an alias
        assert sub._option_string_actions["--no-progress"].dest == "quiet"
