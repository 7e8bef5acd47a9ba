"""Speed choices that do not change a result: which of two equal computations runs.

Kept apart from the maths so that each rule, and the benchmark that set it, can be read on its
own; every path they choose between is exact.
"""

from __future__ import annotations

from torch import Tensor

STACK_MAX_TOKENS_PER_OUT = 0.5
"""See :func:`stack_base_matmul`: stack while ``T · itemsize ≤ this · d_out · 4``."""


def stack_base_matmul(tokens: int, weight: Tensor, rank: int) -> bool:
    """Whether the forward runs the frozen matmul once over ``[x; A]`` rather than twice.

    Stacking copies ``x`` into the ``(T + r) × d_in`` stacked input (a fresh allocation and a
    pass over ``T × d_in``); the separate ``W Aᵀ`` reads all of ``W`` again for only ``r``
    rows, at a fraction of the matmul's peak. The copy grows with ``T``, the extra read with
    ``d_out``: on CPU (``benchmarks/stack_rule.py``) stacking wins up to about ``T = 0.5·d_out``
    tokens in float32 (``T = d_out`` in 16-bit), at every rank measured. The backward follows
    the forward's choice.
    """
    return tokens * weight.element_size() <= STACK_MAX_TOKENS_PER_OUT * 4 * weight.shape[0]
