"""The adapter settings torchdora recommends for a first run, declared once.

Every signature and config that takes a rank, alpha, dropout or eps defaults to these.
"""

from __future__ import annotations

DEFAULT_RANK = 8
DEFAULT_ALPHA = 16.0
DEFAULT_DROPOUT = 0.0
DEFAULT_EPS = 1e-8

RECOMMENDED_DEFAULTS = {
    "rank": DEFAULT_RANK,
    "alpha": DEFAULT_ALPHA,
    "dropout": DEFAULT_DROPOUT,
    "eps": DEFAULT_EPS,
}


def recommended_defaults() -> dict[str, float]:
    """The defaults torchdora recommends for a first run: rank 8, alpha 16, no dropout."""
    return dict(RECOMMENDED_DEFAULTS)
