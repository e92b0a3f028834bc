"""The ``unlearnshield`` command line: one subcommand per verb of the package.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args)``;
:data:`COMMANDS` lists them in the order ``--help`` shows them. User errors (a bad file, a
bad option value) end with a one-paragraph message on stderr and exit status 2; nothing is
written in that case.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from unlearnshield import __version__
from unlearnshield.cli._common import UsageError, configure_logging

logger = logging.getLogger("unlearnshield.cli")

COMMANDS = ("train", "unlearn", "protect", "attack", "bench", "report", "demo")
"""Subcommand modules under :mod:`unlearnshield.cli`, in help order."""

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="unlearnshield",
        description=(
            "Protect unlearned models against unlearning-inversion attacks, and measure it: "
            "train an original model, unlearn samples, attack the release, protect it."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"unlearnshield.cli.{name}")
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose, quiet=args.quiet)
    try:
        return int(args.run(args) or 0)
    except UsageError as err:
        print(f"unlearnshield {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; nothing was written under the output name", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
