"""Independent references for the tests: the naive DoRA formula on a dense matrix, autograd only.

Nothing here imports torchdora's maths; it is what torchdora must agree with.
"""

from __future__ import annotations

import torch
from torch import Tensor


def naive_dora_weight(
    W: Tensor,
    A: Tensor,
    B: Tensor,
    m: Tensor,
    s: float,
    eps: float = 1e-8,
    detach_norm: bool = False,
) -> Tensor:
    """``W' = m / ‖W + sBA‖_row · (W + sBA)`` built explicitly (W is d_out × fan_in)."""
    V = W + s * (B @ A)
    n = torch.linalg.vector_norm(V, dim=1).clamp_min(eps)
    if detach_norm:
        n = n.detach()
    return (m / n).unsqueeze(1) * V


def naive_dora_linear(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    A: Tensor,
    B: Tensor,
    m: Tensor,
    s: float,
    eps: float = 1e-8,
    detach_norm: bool = False,
    lora_x: Tensor | None = None,
) -> Tensor:
    """``(m/n) ⊙ (W x + s·B A x_lora) + b`` with the norm from the explicit matrix."""
    V = W + s * (B @ A)
    n = torch.linalg.vector_norm(V, dim=1).clamp_min(eps)
    if detach_norm:
        n = n.detach()
    lora_x = x if lora_x is None else lora_x
    out = (m / n) * (x @ W.T + s * (lora_x @ A.T) @ B.T)
    return out if b is None else out + b


def rel_err(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """‖a − b‖ / max(‖b‖, floor) in float64.

    ``floor`` makes the measure absolute for quantities that are mathematically zero (e.g. the
    gradient of A when d_in = 1), where both sides are pure rounding noise.
    """
    a, b = a.detach().double(), b.detach().double()
    denom = max(float(b.norm()), floor)
    return float((a - b).norm()) / denom if denom > 0 else float((a - b).norm())
