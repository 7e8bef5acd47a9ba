"""Autocast around DoRA's written-out autograd Functions, which cast once instead of per op."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


def autocast_enabled(like: Tensor) -> bool:
    """Whether ``torch.autocast`` is on for ``like``'s device type."""
    device = like.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


@contextmanager
def autocast_off(like: Tensor) -> Iterator[torch.dtype]:
    """Switch autocast off for a block, yielding the dtype it should compute in.

    The fused Functions mix dtypes on purpose (the norm in float32) and write into buffers in
    place, which autocast's per-op casting would break; they cast once instead.
    """
    if not autocast_enabled(like):
        yield like.dtype
        return
    device = like.device.type
    with torch.autocast(device, enabled=False):
        yield torch.get_autocast_dtype(device) if like.is_floating_point() else like.dtype


def cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``; ``None`` stays ``None``. A tensor already in ``dtype`` is returned
    without a call into ``Tensor.to`` (a dispatcher round trip, felt on small layers)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)
