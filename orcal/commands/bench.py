"""Benchmark orcal's kernels against the eager reference, torch.compile and torchmetrics (one table)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _suite_cli():
    """The suite lives in the source tree's benchmarks/ package (not installed with the wheel)."""
    try:
        from benchmarks import cli
    except ImportError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "benchmarks" / "suite.py").exists():
            return None
        sys.path.insert(0, str(root))
        from benchmarks import cli
    return cli


def configure(parser: argparse.ArgumentParser) -> None:
    cli = _suite_cli()
    if cli is not None:
        cli.configure(parser)


def run(args: argparse.Namespace) -> int:
    cli = _suite_cli()
    if cli is None:
        print("orcal bench needs the benchmarks/ directory of a source checkout of orcal", file=sys.stderr)
        return 2
    return cli.run(args)
