"""Shared checks for the DoRA layer kinds against a float64 autograd reference.

A kind is checked through ``naive(x, W, b, A, B, m, s, eps, detach_norm)``: the layer's
output built from an explicit dense adapted weight (see ``reference.naive_dora_weight``) and
the plain functional op (``F.conv2d``, ``F.embedding``, ``x @ W``); ``naive_conv`` and
``naive_embedding`` build it for those kinds, ``reference.naive_dora_linear`` is Linear's.
Nothing here calls torchdora's maths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reference import naive_dora_weight, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def randomize(layer, *, b_std: float = 0.3) -> None:
    """Non-zero ``B``, random ``A`` and a magnitude away from its init (the base is untouched)."""
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_(std=b_std)
        if layer.magnitude is not None:
            layer.magnitude.uniform_(0.5, 2.0)


CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def naive_conv(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, use_dora: bool = True):
    """The reference for ``conv``'s geometry: W' = (m/n)(W + s·BA) on flattened rows, one conv."""

    def naive(x, W, b, A, B, m, s, eps, detach_norm):
        rows = W.reshape(W.shape[0], -1)
        if use_dora:
            adapted = naive_dora_weight(rows, A, B, m, s, eps, detach_norm)
        else:
            adapted = rows + s * (B @ A)
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        else:
            padding = conv.padding
        return CONV_FN[W.dim() - 2](
            x, adapted.reshape(W.shape), b, conv.stride, padding, conv.dilation, conv.groups
        )

    return naive


def naive_embedding(embedding: nn.Embedding, use_dora: bool = True, embed_scale: float = 1.0):
    """PEFT's convention: DoRA on Eᵀ (embedding_dim × num_embeddings), then a plain lookup.

    With a ``padding_idx``, as in PEFT, it applies to the lookups of ``E`` and ``Aᵀ`` separately
    (so neither row ``p`` of ``E`` nor column ``p`` of ``A`` gets a lookup gradient) while the
    scale ``m/n`` and ``B`` still see the padding tokens' outputs.
    """
    padding_idx = embedding.padding_idx

    def naive(x, W, b, A, B, m, s, eps, detach_norm):
        if padding_idx is None:
            if use_dora:
                table = naive_dora_weight(W.T, A, B, m, s, eps, detach_norm).T
            else:
                table = W + s * (B @ A).T
            return F.embedding(x, table) * embed_scale
        looked_up = F.embedding(x, W, padding_idx=padding_idx)
        looked_up = looked_up + s * F.embedding(x, A.T, padding_idx=padding_idx) @ B.T
        if use_dora:  # the norm from the explicit d × V matrix
            norm = torch.linalg.vector_norm(W.T + s * (B @ A), dim=1).clamp_min(eps)
            looked_up = (m / (norm.detach() if detach_norm else norm)) * looked_up
        return looked_up * embed_scale

    return naive


def reference(layer, x, naive, grad_out=None, detach_norm=False, dtype=torch.float64):
    """Output and gradients of ``naive`` in ``dtype`` on copies of the layer's tensors.

    Each copy needs a gradient where the layer's tensor does (a trainable bias or base too).
    The default float64 is the reference; a lower ``dtype`` gives the naive formula's own
    rounding error, a yardstick for what that dtype can achieve.
    """
    tensors = {
        "W": layer.weight,
        "b": layer.bias,
        "A": layer.lora_A,
        "B": layer.lora_B,
        "m": layer.magnitude,
    }
    leaves = {
        k: v.detach().to(dtype).requires_grad_(v.requires_grad)
        for k, v in tensors.items()
        if v is not None
    }
    float_input = x.is_floating_point()
    leaves["x"] = x.detach().to(dtype) if float_input else x
    if float_input:
        leaves["x"].requires_grad_()
    out = naive(
        leaves["x"],
        leaves["W"],
        leaves.get("b"),
        leaves["A"],
        leaves["B"],
        leaves.get("m"),
        layer.scaling,
        layer.eps,
        detach_norm,
    )
    if grad_out is None:
        return out.detach(), {}
    out.backward(grad_out.to(dtype))
    grads = {
        k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.grad is not None
    }
    return out.detach(), grads


def ours(layer, x, grad_out):
    """Output and gradients of ``layer`` (x, A, B, m, and b/W when they are trainable)."""
    x = x.detach().clone()
    if x.is_floating_point():
        x.requires_grad_()
    out = layer(x)
    out.backward(grad_out.to(out.dtype))
    grads = {
        "x": x.grad,
        "A": layer.lora_A.grad,
        "B": layer.lora_B.grad,
        "m": None if layer.magnitude is None else layer.magnitude.grad,
        "b": None if layer.bias is None else layer.bias.grad,
        "W": layer.weight.grad,
    }
    return out.detach(), {k: v for k, v in grads.items() if v is not None}


def assert_matches_reference(layer, x, naive, dtype, detach_norm=False):
    """Forward and every gradient within ``TOL[dtype]`` of the float64 reference."""
    with torch.no_grad():
        out_shape = layer(x).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64, device=x.device)
    ref_out, ref = reference(layer, x, naive, grad_out, detach_norm)
    out, got = ours(layer, x, grad_out)
    assert out.dtype == dtype
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert set(got) == set(ref), (set(got), set(ref))
    grad_scale = max(float(g.norm()) for g in ref.values())
    for name in got:
        assert rel_err(got[name], ref[name], floor=grad_scale) <= TOL[dtype], name


def assert_no_grad_forward_matches(layer, x, naive, tol=1e-10):
    """The cached no-grad path (``inference_scale``) gives the reference output too."""
    ref_out, _ = reference(layer, x, naive)
    with torch.no_grad():
        assert rel_err(layer(x), ref_out) <= tol
        assert rel_err(layer(x), ref_out) <= tol  # second call: from the cache


def assert_merge_round_trip(layer, x, tol=1e-12):
    """merge() reproduces the adapted output with the base alone; unmerge() restores W."""
    with torch.no_grad():
        W0 = layer.weight.detach().clone()
        before = layer(x)
        layer.merge()
        assert rel_err(layer.base_layer(x), before) <= tol
        assert rel_err(layer(x), before) <= tol
        layer.unmerge()
        assert rel_err(layer.weight, W0) <= tol
        assert rel_err(layer(x), before) <= tol
