"""torchvision's dataset downloaders, guarded so an offline machine fails within seconds.

torchvision opens its URLs without a timeout, so on a network that drops packets a download
can hang for minutes. Before calling it, :func:`torchvision_download` checks that the
server answers a TCP connection within :data:`PROBE_TIMEOUT_S` seconds (name resolution
included, which ignores socket timeouts, hence the helper thread).
"""

from __future__ import annotations

import logging
import socket
import threading
import urllib.parse
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""Seconds to wait for the download server to accept a connection."""


class DownloadError(RuntimeError):
    """A download was not possible (offline, server down, checksum mismatch, ...)."""


def probe_host(url: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Check that the server of ``url`` accepts a TCP connection.

    Args:
        url: an http(s) URL.
        timeout_s: seconds to wait, name resolution included; default :data:`PROBE_TIMEOUT_S`.

    Returns:
        None when it answered, else the reason it did not, for an error message.
    """
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname
    if not host:
        return f"{url!r} names no host"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot connect to {host}:{port} ({exc})")

    worker = threading.Thread(target=connect, name="unlearnshield-probe", daemon=True)
    worker.start()
    worker.join(timeout_s + 1.0)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout_s:g} s"
    return outcome[0]


def torchvision_download(class_name: str, root: Path, **dataset_kwargs: Any) -> None:
    """Download and extract a torchvision dataset into ``root`` (e.g. CIFAR10, STL10).

    Args:
        class_name: the class in ``torchvision.datasets`` ("CIFAR10", "STL10").
        root: the folder torchvision downloads into; created if missing.
        **dataset_kwargs: further arguments of the dataset class (``train=True``, ...).

    Raises:
        DownloadError: the server is unreachable or torchvision's download failed.

    Notes:
        An archive already present at ``root`` (and matching torchvision's checksum) is
        extracted without touching the network.
    """
    from torchvision import datasets

    dataset_class = getattr(datasets, class_name)
    url = dataset_class.url
    if not (root / dataset_class.filename).is_file():
        reason = probe_host(url)
        if reason is not None:
            raise DownloadError(f"downloading {url} is not possible: {reason}")
    logger.info("downloading %s into %s with torchvision", url, root)
    try:
        dataset_class(root=str(root), download=True, **dataset_kwargs)
    except Exception as exc:
        raise DownloadError(f"torchvision's {class_name} downloader failed: {exc}") from exc
