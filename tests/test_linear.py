"""DoRALinear against the float64 naive reference: forward, gradients, merge, cache, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from layer_kinds import assert_matches_reference
from reference import naive_dora_linear, rel_err
from torchdora import DoRAConv, DoRAEmbedding, DoRALinear, LoRALinear, recommended_defaults

SHAPES = [  # (d_in, d_out, rank)
    (16, 8, 4),
    (7, 13, 3),
    (5, 3, 8),  # rank > min(d_in, d_out)
    (6, 1, 2),  # d_out = 1
    (1, 5, 2),  # d_in = 1
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def random_layer(d_in, d_out, rank, dtype=torch.float64, alpha=16.0, **kwargs) -> DoRALinear:
    """A DoRALinear with random W, b, non-zero B and a magnitude away from its init."""
    layer = DoRALinear(d_in, d_out, rank, alpha, dtype=dtype, **kwargs)
    with torch.no_grad():
        layer.base_layer.weight.normal_()
        layer.base_layer.bias.normal_()
        layer.lora_A.normal_()
        layer.lora_B.normal_(std=0.3)
        if layer.magnitude is not None:
            layer.magnitude.uniform_(0.5, 2.0)
    return layer


def reference_grads(
    layer: DoRALinear, x: torch.Tensor, grad_out: torch.Tensor, detach_norm=False, train_base=False
):
    """Output and gradients of the naive formula in float64 on copies of the layer's tensors."""
    leaves = {
        "x": x.detach().double().requires_grad_(),
        "W": layer.base_layer.weight.detach().double().requires_grad_(train_base),
        "b": layer.base_layer.bias.detach().double().requires_grad_(),
        "A": layer.lora_A.detach().double().requires_grad_(),
        "B": layer.lora_B.detach().double().requires_grad_(),
        "m": layer.magnitude.detach().double().requires_grad_(),
    }
    out = naive_dora_linear(
        leaves["x"],
        leaves["W"],
        leaves["b"],
        leaves["A"],
        leaves["B"],
        leaves["m"],
        layer.scaling,
        layer.eps,
        detach_norm,
    )
    out.backward(grad_out.double())
    return out.detach(), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def our_grads(layer: DoRALinear, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(grad_out.to(out.dtype))
    grads = {
        "x": x.grad,
        "A": layer.lora_A.grad,
        "B": layer.lora_B.grad,
        "m": layer.magnitude.grad,
        "b": layer.base_layer.bias.grad,
        "W": layer.base_layer.weight.grad,
    }
    return out.detach(), {k: v for k, v in grads.items() if v is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("detach_norm", [False, True])
def test_forward_and_gradients_match_reference(shape, dtype, detach_norm):
    d_in, d_out, rank = shape
    layer = random_layer(d_in, d_out, rank, dtype, detach_norm=detach_norm)
    layer.base_layer.bias.requires_grad_(True)  # check the bias gradient too
    x = torch.randn(2, 5, d_in, dtype=dtype)
    grad_out = torch.randn(2, 5, d_out, dtype=dtype)
    ref_out, ref = reference_grads(layer, x, grad_out, detach_norm=detach_norm)
    out, ours = our_grads(layer, x, grad_out)
    assert rel_err(out, ref_out) <= TOL[dtype]
    assert set(ours) == {"x", "A", "B", "m", "b"}
    # Relative to the problem's gradient scale. With d_in = 1 a row's direction is only its
    # sign, so the A and B gradients are exactly zero in exact arithmetic: a sum of large
    # cancelling terms whose float32 noise (naive formula included) reaches ~1e-5.
    grad_scale = max(float(g.norm()) for g in ref.values())
    for name in ours:
        degenerate = d_in == 1 and name in ("A", "B")
        tol = TOL[dtype] * (10 if degenerate and dtype == torch.float32 else 1)
        assert rel_err(ours[name], ref[name], floor=grad_scale) <= tol, name


def test_unstacked_path_matches_reference():
    """When x needs no gradient the base matmul is not shared with A; same answers."""
    layer = random_layer(12, 9, 4)
    x = torch.randn(6, 12, dtype=torch.float64)
    grad_out = torch.randn(6, 9, dtype=torch.float64)
    _, ref = reference_grads(layer, x, grad_out)
    out = layer(x)  # x.requires_grad is False
    out.backward(grad_out)
    for name, got in [
        ("A", layer.lora_A.grad),
        ("B", layer.lora_B.grad),
        ("m", layer.magnitude.grad),
    ]:
        assert rel_err(got, ref[name]) <= 1e-10, name


def test_trainable_base_weight_gradient():
    layer = random_layer(10, 6, 3, freeze_base=False)
    x = torch.randn(4, 10, dtype=torch.float64)
    grad_out = torch.randn(4, 6, dtype=torch.float64)
    _, ref = reference_grads(layer, x, grad_out, train_base=True)
    _, ours = our_grads(layer, x, grad_out)
    assert rel_err(ours["W"], ref["W"]) <= 1e-10
    assert rel_err(ours["b"], ref["b"]) <= 1e-10


def test_init_reproduces_base_layer():
    base = nn.Linear(32, 20, dtype=torch.float64)
    layer = DoRALinear.from_linear(base, rank=4)
    assert layer.base_layer is base  # wrapped, not copied
    x = torch.randn(7, 32, dtype=torch.float64)
    assert rel_err(layer(x), base(x)) <= 1e-14
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert torch.allclose(layer.magnitude, base.weight.norm(dim=1))
    assert not base.weight.requires_grad and not base.bias.requires_grad


def test_reset_parameters_returns_to_base_output():
    layer = random_layer(8, 5, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert rel_err(layer(x), layer.base_layer(x)) > 1e-3
    layer.merge()
    layer.reset_parameters()
    assert not layer.merged
    assert rel_err(layer(x), layer.base_layer(x)) <= 1e-14


def test_merge_unmerge_round_trip():
    layer = random_layer(12, 7, 3)
    x = torch.randn(4, 12, dtype=torch.float64)
    W0 = layer.base_layer.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert rel_err(layer(x), before) <= 1e-12
    assert rel_err(layer.base_layer(x), before) <= 1e-12
    layer.unmerge()
    assert rel_err(layer.base_layer.weight, W0) <= 1e-12
    assert rel_err(layer(x), before) <= 1e-12


def test_merge_and_unload_returns_plain_linear_with_adapted_output():
    layer = random_layer(9, 4, 2, dtype=torch.float32)
    x = torch.randn(5, 9)
    expected = layer(x).detach()
    plain = layer.merge_and_unload()
    assert type(plain) is nn.Linear
    assert rel_err(plain(x), expected) <= 1e-5


def test_large_update_relative_to_weight():
    """‖sBA_i‖ ≫ ‖W_i‖: the factored norm must not lose the answer to cancellation."""
    layer = random_layer(16, 8, 4)
    with torch.no_grad():
        layer.base_layer.weight.mul_(1e-4)
        layer.lora_B.mul_(1e3)
    x = torch.randn(3, 16, dtype=torch.float64)
    grad_out = torch.randn(3, 8, dtype=torch.float64)
    ref_out, ref = reference_grads(layer, x, grad_out)
    out, ours = our_grads(layer, x, grad_out)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) <= 1e-9
    for name in ("A", "B", "m", "x"):
        assert rel_err(ours[name], ref[name]) <= 1e-9, name


def test_update_cancelling_the_weight_stays_finite():
    """sBA_i = −W_i exactly: n_i would be 0; the floor keeps output and grads finite."""
    layer = random_layer(6, 4, 6, alpha=6.0)  # s = 1, rank = d_in so B A can equal −W
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(6, dtype=torch.float64))
        layer.lora_B.copy_(-layer.base_layer.weight)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    for t in (out, x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad):
        assert torch.isfinite(t).all()


def test_zero_row_of_weight():
    layer = random_layer(8, 5, 2)
    with torch.no_grad():
        layer.base_layer.weight[2].zero_()
        layer.lora_B.zero_()
        layer.magnitude.copy_(layer.base_layer.weight.norm(dim=1))
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert rel_err(out, layer.base_layer(x)) <= 1e-14
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    _, ref = reference_grads(layer, x, grad_out)
    for name, got in [
        ("A", layer.lora_A.grad),
        ("B", layer.lora_B.grad),
        ("m", layer.magnitude.grad),
    ]:
        assert torch.isfinite(got).all(), name
        assert rel_err(got, ref[name]) <= 1e-10, name


# --------------------------------------------------------------------------- cache staleness
def _assert_matches_reference(layer, x):
    with torch.no_grad():
        ref = naive_dora_linear(
            x,
            layer.base_layer.weight,
            layer.base_layer.bias,
            layer.lora_A,
            layer.lora_B,
            layer.magnitude,
            layer.scaling,
        )
    assert rel_err(layer(x), ref) <= 1e-10
    with torch.no_grad():  # the cached inference path too
        assert rel_err(layer(x), ref) <= 1e-10


def test_cache_follows_load_state_dict_into_base():
    layer = random_layer(8, 6, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    _assert_matches_reference(layer, x)
    other = nn.Linear(8, 6, dtype=torch.float64)
    layer.base_layer.load_state_dict(other.state_dict())
    _assert_matches_reference(layer, x)


def test_cache_follows_in_place_edit():
    layer = random_layer(8, 6, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    _assert_matches_reference(layer, x)
    with torch.no_grad():
        layer.base_layer.weight.mul_(3.0)
    _assert_matches_reference(layer, x)


def test_cache_follows_dtype_move():
    layer = random_layer(8, 6, 2, dtype=torch.float32)
    x = torch.randn(3, 8, dtype=torch.float32)
    layer(x)
    layer.double()
    _assert_matches_reference(layer, x.double())


def test_cache_follows_merge_and_unmerge():
    layer = random_layer(8, 6, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    _assert_matches_reference(layer, x)
    layer.merge()
    layer.unmerge()
    _assert_matches_reference(layer, x)


def test_cache_follows_optimizer_steps_in_no_grad_forward():
    layer = random_layer(8, 6, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        _assert_matches_reference(layer, x)
        layer(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    _assert_matches_reference(layer, x)


#: layer kinds whose no-grad forward caches m/n: (layer, input)
CACHING_KINDS = {
    "linear": (lambda: DoRALinear(8, 6, 2), lambda: torch.randn(3, 8)),
    "linear-no-norm": (lambda: DoRALinear(8, 6, 2, normalize=False), lambda: torch.randn(3, 8)),
    "conv2d": (lambda: DoRAConv(nn.Conv2d(3, 4, 3), 2), lambda: torch.randn(2, 3, 6, 6)),
    "embedding": (
        lambda: DoRAEmbedding(nn.Embedding(10, 6), 2),
        lambda: torch.randint(0, 10, (2, 5)),
    ),
}


@pytest.mark.parametrize("kind", list(CACHING_KINDS))
@pytest.mark.parametrize("order", ["cached-before-the-step", "cached-inside-the-step"])
def test_cache_sees_a_fused_optimizer_step(kind, order):
    """``AdamW(fused=True)`` updates A, B, m without bumping their version; a no-grad forward
    after the step must not reuse m/n cached before it, wherever in the step it was cached."""
    make_layer, make_input = CACHING_KINDS[kind]
    layer, x = make_layer(), make_input()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], fused=True)
    for _ in range(2):
        if order == "cached-before-the-step":
            with torch.no_grad():
                layer(x)
        out = layer(x)
        if order == "cached-inside-the-step":  # after the forward, before its backward
            with torch.no_grad():
                layer(x)
        out.square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            assert torch.equal(layer(x), copy.deepcopy(layer)(x))  # a copy starts uncached


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
@pytest.mark.parametrize("how", ["load_state_dict-assign", "param.data"])
def test_cache_never_matches_a_new_weight_at_the_same_address(how, grad):
    """A new base weight at the cached one's address and version is never a cache hit.

    The allocator often hands a freed weight's memory to the next one (swapping checkpoints
    with ``assign=True``); a staging buffer refilled for each checkpoint does so every time.
    """
    layer = random_layer(64, 64, 2)
    x = torch.randn(3, 64, dtype=torch.float64)
    staging = np.empty((64, 64))

    def load_base_weight(values: torch.Tensor) -> None:
        staging[:] = values.numpy()
        weight = torch.from_numpy(staging)  # a new tensor, version 0, at the same address
        if how == "param.data":
            layer.base_layer.weight.data = weight
        else:
            layer.load_state_dict({**layer.state_dict(), "base_layer.weight": weight}, assign=True)

    def assert_matches_reference(layer: DoRALinear) -> None:
        with torch.set_grad_enabled(grad):
            out = layer(x)
        with torch.no_grad():
            ref = naive_dora_linear(
                x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.magnitude,
                layer.scaling,
            )  # fmt: skip
        assert rel_err(out, ref) <= 1e-10

    load_base_weight(torch.randn(64, 64, dtype=torch.float64))
    assert_matches_reference(layer)  # caches ‖W_i‖² (and, without autograd, m/n)
    load_base_weight(torch.randn(64, 64, dtype=torch.float64))
    assert_matches_reference(layer)
    assert_matches_reference(copy.deepcopy(layer))  # the cache's weak references are not copied


def test_refresh_after_edit_through_data():
    """`.data` edits bypass the version counter; refresh_weight_norm is the documented remedy."""
    layer = random_layer(8, 6, 2)
    x = torch.randn(3, 8, dtype=torch.float64)
    _assert_matches_reference(layer, x)
    layer.base_layer.weight.data.mul_(2.0)
    layer.refresh_weight_norm()
    _assert_matches_reference(layer, x)


def test_torch_compile_fullgraph_matches_reference_and_follows_the_weight():
    """No graph break (the norm cache is bypassed while compiling), no stale norm either."""
    layer = random_layer(8, 6, 2)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 8, dtype=torch.float64)
    assert_matches_reference(compiled, x, naive_dora_linear, torch.float64)  # no-grad, autograd
    layer.zero_grad()
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    assert_matches_reference(compiled, x, naive_dora_linear, torch.float64)


# --------------------------------------------------------------------------- dropout, dtypes
def test_dropout_only_on_low_rank_branch_and_off_in_eval():
    torch.manual_seed(3)
    layer = random_layer(10, 6, 3, dropout=0.5)
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    ref = naive_dora_linear(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A,
        layer.lora_B,
        layer.magnitude,
        layer.scaling,
        lora_x=dropped,
    )
    assert rel_err(out, ref) <= 1e-10
    assert not torch.equal(dropped, x)
    layer.eval()
    ref_eval = naive_dora_linear(
        x,
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A,
        layer.lora_B,
        layer.magnitude,
        layer.scaling,
    )
    assert rel_err(layer(x), ref_eval) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    layer = random_layer(32, 16, 4, dtype=torch.float32)
    layer.base_layer.to(dtype)
    assert layer.magnitude.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    x = torch.randn(8, 32)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    ref = naive_dora_linear(
        x.double(),
        layer.base_layer.weight.double(),
        layer.base_layer.bias.double(),
        layer.lora_A.double(),
        layer.lora_B.double(),
        layer.magnitude.double(),
        layer.scaling,
    )
    assert rel_err(out, ref) <= 2e-2
    out.float().sum().backward()
    assert layer.magnitude.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_A.grad).all()


def test_lora_linear_matches_plain_lora():
    layer = LoRALinear(10, 4, rank=2, alpha=4.0, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 10, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    ref = x @ W.T + b + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    assert layer.magnitude is None
    assert rel_err(layer(x), ref) <= 1e-12
    layer.merge()
    assert rel_err(layer.base_layer(x), ref) <= 1e-12


# --------------------------------------------------------------------------- surface
def test_sizes_scaling_and_parameter_count():
    layer = DoRALinear(64, 32)
    assert (layer.in_features, layer.out_features, layer.rank, layer.alpha) == (64, 32, 8, 16.0)
    assert layer.scaling == 2.0
    assert layer.num_trainable_parameters() == 8 * 64 + 32 * 8 + 32
    assert DoRALinear(64, 32, rank=4, alpha=None).scaling == 1.0
    assert DoRALinear(64, 32, rank=16, alpha=8.0, use_rslora=True).scaling == 2.0
    assert recommended_defaults()["rank"] == 8 and recommended_defaults()["alpha"] == 16.0
    unfrozen = DoRALinear(64, 32, freeze_base=False)
    assert unfrozen.num_trainable_parameters() == 8 * 64 + 32 * 8 + 32 + 64 * 32 + 32


def test_adapter_vector_and_state_round_trip():
    src = random_layer(6, 4, 2)
    dst = DoRALinear(6, 4, 2, dtype=torch.float64)
    vec = src.get_adapter_vector()
    assert vec.shape == (2 * 6 + 4 * 2 + 4,)
    dst.set_adapter_vector(vec)
    assert torch.equal(dst.get_adapter_vector(), vec)
    dst2 = DoRALinear(6, 4, 2, dtype=torch.float64)
    state = src.get_adapter_state()
    assert set(state) == {"lora_A", "lora_B", "magnitude"}
    dst2.set_adapter_state(state)
    for name, tensor in state.items():
        assert torch.equal(getattr(dst2, name), tensor)
    state["lora_A"].zero_()  # a copy, not an alias
    assert not torch.equal(src.lora_A, state["lora_A"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": -2}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"dropout": -0.1}, ValueError, "dropout"),
    ],
)
def test_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        DoRALinear(4, 4, **kwargs)
    with pytest.raises(error, match=match):
        DoRALinear.from_linear(nn.Linear(4, 4), **kwargs)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no-grad"])
def test_bad_input_is_named_alike_with_and_without_autograd(grad):
    layer = DoRALinear(6, 5, 2)
    with torch.set_grad_enabled(grad):
        with pytest.raises(TypeError, match=r"floating-point input, got torch\.int64"):
            layer(torch.ones(3, 6, dtype=torch.long))
        with pytest.raises(ValueError, match=r"last dimension 6, got shape \(\)"):
            layer(torch.tensor(1.0))
        with pytest.raises(TypeError, match=r"in torch\.float32 .* input of dtype torch\.float64"):
            layer(torch.randn(3, 6, dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(torch.randn(3, 6, dtype=torch.float16)).dtype == torch.bfloat16
            with pytest.raises(TypeError, match=r"input of dtype torch\.float64"):
                layer(torch.randn(3, 6, dtype=torch.float64))  # autocast leaves it float64


def test_bad_inputs():
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        DoRALinear.from_linear(nn.Conv1d(3, 3, 1))
    layer = DoRALinear(6, 4, 2)
    with pytest.raises(ValueError, match="last dimension 6"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="24 elements"):
        layer.set_adapter_vector(torch.zeros(23))
    with pytest.raises(ValueError, match="missing"):
        layer.set_adapter_state({"lora_A": layer.lora_A})
    with pytest.raises(ValueError, match="shape"):
        layer.set_adapter_state({**layer.get_adapter_state(), "lora_B": torch.zeros(4, 3)})
