"""A cache of decoded image arrays, so 60,000 JPEGs are decoded once and then read in a second.

An entry is a folder ``<cache root>/<source name>-<hash of its absolute path>/`` holding one
``.npy`` file per array and ``meta.json``, which records the identity of the source it was
decoded from (absolute path, size, modification time, and for folders a digest of the file
listing). An entry whose identity differs from the source's current one is stale and is
rewritten. Every file is written atomically and ``meta.json`` last, so a reader that finds
a matching ``meta.json`` finds complete arrays.

Where the cache lives, first match wins:

1. ``cache_dir``, when the caller gives one;
2. the folder in ``$UNLEARNSHIELD_CACHE``;
3. ``.unlearnshield-cache/`` next to the data, when that folder is writable (an existing
   entry there is read even when it is not);
4. ``~/.cache/unlearnshield/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unlearnshield._io import atomic_write

logger = logging.getLogger(__name__)

CACHE_ENV = "UNLEARNSHIELD_CACHE"
"""Environment variable naming the cache folder (used when no ``cache_dir`` is given)."""

BESIDE_DATA_FOLDER = ".unlearnshield-cache"
"""Name of the cache folder created next to the data."""

CACHE_FORMAT = 1
"""Version of the entry layout; entries of another version are rewritten."""

# Temporary files are created private (0600); a cache next to shared data must be readable
# by the other users of that data.
_FILE_MODE = 0o644


def home_cache_root() -> Path:
    """The last-resort cache folder, ``~/.cache/unlearnshield``."""
    return Path.home() / ".cache" / "unlearnshield"


def _is_writable_dir(path: Path) -> bool:
    """True when ``path`` is an existing folder this process may create files in.

    A folder without its owner's write bit counts as read-only even for root (who may write
    anywhere): data laid out read-only is not ours to add files to.
    """
    return (
        path.is_dir()
        and os.access(path, os.W_OK | os.X_OK)
        and bool(path.stat().st_mode & stat.S_IWUSR)
    )


def cache_roots(data_path: Path, cache_dir: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The cache folders to read from and to write to, for data at ``data_path``.

    Args:
        data_path: the archive or folder the arrays are decoded from.
        cache_dir: an explicit cache folder; default None (see the module docstring).

    Returns:
        ``(read_roots, write_roots)``: folders to look for an entry in, in order, and folders
        to try writing a new entry to, in order.
    """
    if cache_dir is not None:
        return [cache_dir], [cache_dir]
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        env_root = Path(from_env).expanduser()
        return [env_root], [env_root]

    beside = data_path.parent / BESIDE_DATA_FOLDER
    home = home_cache_root()
    beside_writable = (
        _is_writable_dir(beside) if beside.exists() else _is_writable_dir(beside.parent)
    )
    if beside_writable:
        return [beside, home], [beside, home]
    logger.debug("%s is not writable; the cache goes to %s", beside.parent, home)
    return [beside, home], [home]


def entry_name(source_path: Path) -> str:
    """The entry folder name for a source: its file name plus a hash of its absolute path."""
    absolute = str(source_path.resolve())
    digest = hashlib.sha256(absolute.encode("utf-8")).hexdigest()[:16]
    return f"{source_path.name}-{digest}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    # Through a file object: np.save appends ".npy" to a bare path that lacks it.
    with open(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
    os.chmod(path, _FILE_MODE)


def _save_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.chmod(path, _FILE_MODE)


def read_entry(
    source_path: Path, identity: Mapping[str, Any], roots: list[Path]
) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays for ``source_path`` if an entry matching ``identity`` exists.

    Args:
        source_path: the archive or folder the arrays were decoded from.
        identity: JSON-compatible description of the source's current state.
        roots: cache folders to look in, in order.

    Returns:
        ``(arrays, extra)``: the arrays by name and the ``extra`` metadata stored with them;
        None when no root holds a complete, matching entry.
    """
    name = entry_name(source_path)
    for root in roots:
        entry = root / name
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable cache entry %s: %s", meta_path, exc)
            continue
        if meta.get("format") != CACHE_FORMAT or meta.get("identity") != dict(identity):
            logger.info("cache entry %s is stale (the source changed); it will be rebuilt", entry)
            continue
        arrays: dict[str, np.ndarray] = {}
        try:
            for array_name, spec in meta["arrays"].items():
                array = np.load(entry / f"{array_name}.npy", allow_pickle=False)
                if list(array.shape) != spec["shape"] or str(array.dtype) != spec["dtype"]:
                    raise ValueError(
                        f"{array_name}.npy holds {array.dtype} {array.shape}, "
                        f"meta.json says {spec['dtype']} {tuple(spec['shape'])}"
                    )
                arrays[array_name] = array
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring damaged cache entry %s: %s", entry, exc)
            continue
        logger.info("reading decoded arrays from the cache %s", entry)
        return arrays, dict(meta.get("extra", {}))
    return None


def write_entry(
    source_path: Path,
    identity: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    roots: list[Path],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path | None:
    """Store ``arrays`` decoded from ``source_path`` in the first cache root that accepts them.

    Args:
        source_path: the archive or folder the arrays were decoded from.
        identity: JSON-compatible description of the source's current state.
        arrays: arrays by name (names must be valid file names).
        roots: cache folders to try, in order.
        extra: further JSON-compatible metadata returned by :func:`read_entry`; default None.

    Returns:
        The entry folder written, or None when no root could be written (logged as a
        warning; the caller still has its arrays, only the next load decodes again).
    """
    meta = {
        "format": CACHE_FORMAT,
        "identity": dict(identity),
        "arrays": {
            name: {"shape": list(array.shape), "dtype": str(array.dtype)}
            for name, array in arrays.items()
        },
        "extra": dict(extra or {}),
    }
    name = entry_name(source_path)
    for root in roots:
        entry = root / name
        try:
            entry.mkdir(parents=True, exist_ok=True)
            (entry / "meta.json").unlink(missing_ok=True)
            for array_name, array in arrays.items():
                atomic_write(entry / f"{array_name}.npy", lambda tmp, a=array: _save_npy(tmp, a))
            atomic_write(entry / "meta.json", lambda tmp: _save_json(tmp, meta))
        except OSError as exc:
            logger.warning("cannot write the cache entry %s: %s", entry, exc)
            continue
        logger.info("cached decoded arrays in %s", entry)
        return entry
    logger.warning("decoded arrays were not cached; the next load will decode them again")
    return None
