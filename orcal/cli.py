"""The ``orcal`` command line.

Each sub-command lives in its own module ``orcal.commands.<name>`` that defines

* a module docstring (its first line is the one-line help),
* ``configure(parser)`` adding the command's arguments (cheap: no heavy imports), and
* ``run(args) -> int`` doing the work (heavy imports go here).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Order is the order shown by ``orcal --help``.
COMMANDS = ("demo", "experiment", "train", "predict", "evaluate", "fuse", "data", "nnunet", "bench", "info")


def _load(name: str):
    try:
        return importlib.import_module(f"orcal.commands.{name}")
    except ModuleNotFoundError as err:  # a command whose module is not part of this install
        if err.name == f"orcal.commands.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one sub-parser per available command."""
    from orcal import __version__

    parser = argparse.ArgumentParser(
        prog="orcal",
        description="Calibrated multi-rater segmentation: ordinal rater consensus, fused losses and metrics.",
    )
    parser.add_argument("--version", action="version", version=f"orcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _load(name)
        if module is None:
            continue
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=(module.__doc__ or doc).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orcal`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"orcal {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # e.g. --out naming a file where a folder is made: the path and the reason, not a traceback
        hint = (" (a folder is needed there, and a file is in the way)"
                if isinstance(err, (FileExistsError, NotADirectoryError)) else "")
        where = err if err.filename is None else f"{err.filename}: {err.strerror}{hint}"
        print(f"orcal {args.command}: error: {where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
