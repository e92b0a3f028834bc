"""Shared pieces of the subcommands: logging set-up, user errors, common options."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unlearnshield.checkpoints import CheckpointError
from unlearnshield.data import DatasetNotFoundError


class UsageError(Exception):
    """A problem with the user's input: reported in one paragraph, exit status 2."""


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the library's input errors into :class:`UsageError`."""
    try:
        yield
    except (CheckpointError, DatasetNotFoundError) as err:
        raise UsageError(str(err)) from err


def configure_logging(*, verbose: int = 0, quiet: bool = False) -> None:
    """Console logging for the CLI (the library itself only logs)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("unlearnshield")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (numbers, true/false, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(pairs: list[str] | None, option: str = "--set") -> dict[str, Any]:
    """``["a=1", "b=x"]`` → ``{"a": 1, "b": "x"}``; a clear error for a missing ``=``."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option} expects key=value, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def add_data_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--dataset`` and ``--data-root``."""
    from unlearnshield.data import DATASETS

    parser.add_argument(
        "--dataset",
        required=required,
        choices=DATASETS.names(),
        default=None if required else "digits",
        help="dataset name (digits is embedded and needs no --data-root)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="where the dataset lies: a folder or a .tar.gz (see README, 'Data')",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never try to download a missing dataset",
    )


def check_output_path(path: Path, *inputs: Path | None) -> None:
    """Refuse an output path that would overwrite an input, or whose folder cannot be made."""
    for given in inputs:
        if given is not None and Path(given).resolve() == path.resolve():
            raise UsageError(f"output {path} is also an input; choose another name")
    if path.exists() and path.is_dir():
        raise UsageError(f"output {path} is a folder")
