"""Large zero-filled work buffers that are cheap to touch the first time.

A fresh tensor of tens of megabytes costs more to touch the first time than to compute with:
the kernel maps and zeroes it one 4 KiB page at a time (measured here: 30 ms for 44 MB,
against 5 ms to overwrite memory already mapped). On Linux, :func:`zeroed_buffer` maps large
CPU buffers anonymously and advises the kernel to back them with transparent huge pages
(``madvise(MADV_HUGEPAGE)``, 2 MiB pages), which brought that first touch to 7.5 ms. The
memory is zero by construction, so nothing is written until the caller writes it.

Anywhere else (another OS, a GPU, a kernel without THP) it is simply ``torch.zeros``.

:data:`WORK_BUFFERS` keeps such buffers mapped between calls, so that a process protecting
one release after another pays for fresh pages only once.
"""

from __future__ import annotations

import logging
import math
import mmap
import threading
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

HUGE_BUFFER_BYTES = 8 * 2**20
"""Buffers from this size up get the huge-page mapping; smaller ones are plain ``torch.zeros``."""


def zeroed_buffer(
    shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A zero-filled contiguous tensor, huge-page backed where that is possible and useful.

    Args:
        shape: the tensor's shape.
        dtype: its dtype.
        device: its device; only CPU buffers are specially mapped.

    Returns:
        A writable tensor of zeros. A mapped buffer keeps its mapping alive as long as the
        tensor (or any view of it) lives.
    """
    device = torch.device(device)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if device.type != "cpu" or advice is None or nbytes < HUGE_BUFFER_BYTES:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(advice)
    except (OSError, ValueError) as err:  # no THP support: the plain allocation
        logger.debug("huge-page buffer unavailable (%s); using torch.zeros", err)
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(tuple(shape))


class BufferPool:
    """Large work buffers kept mapped between calls, so that only the first call pays for
    fresh pages.

    A buffer taken with :meth:`take` is the caller's until it gives it back with
    :meth:`give`; no view of it may outlive that. Up to ``max_idle`` buffers wait between
    calls (the most recently given back first); :meth:`clear` drops them.

    Args:
        max_idle: how many idle buffers to keep; default 2.
    """

    def __init__(self, max_idle: int = 2) -> None:
        self.max_idle = max_idle
        self._idle: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(
        self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str
    ) -> tuple[torch.Tensor, bool]:
        """A buffer of ``shape``: ``(buffer, fresh)``. A fresh one is zero-filled
        (:func:`zeroed_buffer`); a reused one holds whatever its last user left."""
        device = torch.device(device)
        with self._lock:
            for i, buffer in enumerate(self._idle):
                if (
                    tuple(buffer.shape) == tuple(shape)
                    and buffer.dtype == dtype
                    and buffer.device == device
                ):
                    return self._idle.pop(i), False
        return zeroed_buffer(shape, dtype=dtype, device=device), True

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer taken with :meth:`take` (the caller must hold no view of it)."""
        with self._lock:
            self._idle.insert(0, buffer)
            del self._idle[self.max_idle :]

    def clear(self) -> None:
        """Drop the idle buffers (their memory goes back to the system)."""
        with self._lock:
            self._idle.clear()


WORK_BUFFERS = BufferPool()
"""The pool the defenses take their large flat work buffers from. Between calls it holds up
to two idle buffers (for UnlearnShield on ResNet18: its 6 × 11.2M-entry workspace, 268 MB,
and its 45 MB release buffer); ``WORK_BUFFERS.clear()`` frees them."""
