"""``python -m benchmarks``: run the benchmark suite, print its table, write benchmarks/results/<device>.{md,json}."""

from __future__ import annotations

import argparse
import sys

from benchmarks.cli import configure, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    configure(parser)
    sys.exit(run(parser.parse_args()))
