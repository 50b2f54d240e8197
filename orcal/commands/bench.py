"""Benchmark orcal's kernels against the eager reference, torch.compile and torchmetrics (one table).

The suite is the ``benchmarks`` package of a source checkout, not part of the installed library (as PyTorch's
own benchmarks): ``python -m benchmarks`` runs it from the checkout's root, and so does ``python -m orcal bench``
there. This command only imports it when Python can already find it; it never edits ``sys.path``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

HOW = ("orcal bench runs the benchmark suite of a source checkout (benchmarks/, not installed with the package): "
       "from the checkout's root run `python -m benchmarks --help` (or `python -m orcal bench`)")


def _suite_cli():
    """The suite's command line, or None where no ``benchmarks`` package with the suite can be imported."""
    try:
        if importlib.util.find_spec("benchmarks.suite") is None:
            return None
    except ImportError:  # a `benchmarks` module that is not the suite's package
        return None
    from benchmarks import cli

    return cli


def configure(parser: argparse.ArgumentParser) -> None:
    cli = _suite_cli()
    if cli is not None:
        cli.configure(parser)


def run(args: argparse.Namespace) -> int:
    cli = _suite_cli()
    if cli is None:
        print(HOW, file=sys.stderr)
        return 2
    return cli.run(args)
