"""The hand-written DoRA backward (``DoRALinearFunction``) against the float64 naive reference,
on every path the layer can take: stacked or separate frozen matmul, with or without a gradient
for ``x``, dropout input, trainable base, a retained graph, autocast, and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch

from reference import naive_dora_linear, rel_err
from torchdora import DoRALinear, LoRALinear
from torchdora import functional as DF

D_IN, D_OUT, RANK, SCALING = 12, 9, 4, 1.5


def leaves(dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    return {
        "x": torch.randn(2, 5, D_IN, dtype=dtype),
        "W": torch.randn(D_OUT, D_IN, dtype=dtype),
        "b": torch.randn(D_OUT, dtype=dtype) if bias else None,
        "A": torch.randn(RANK, D_IN, dtype=dtype),
        "B": 0.3 * torch.randn(D_OUT, RANK, dtype=dtype),
        "m": torch.rand(D_OUT, dtype=dtype) + 0.5,
    }


def run(fn, values, grad_out, needs, lora_x=None, retain=False):
    """Output and gradients of ``fn`` for the leaves named in ``needs``."""
    ts = {k: None if v is None else v.clone().requires_grad_(k in needs) for k, v in values.items()}
    extra = {} if lora_x is None else {"lora_x": lora_x.clone().requires_grad_("x" in needs)}
    out = fn(ts, **extra)
    out.backward(grad_out, retain_graph=retain)
    grads = {k: ts[k].grad for k in needs}
    if lora_x is not None and "x" in needs:
        grads["lora_x"] = extra["lora_x"].grad
    return out, grads, (out, ts, extra)


def ours(stack, detach_norm=False):
    def fn(t, lora_x=None):
        c = DF.weight_sq_row_norm(t["W"])
        return DF.dora_linear(
            *(t[k] for k in "xWbABm"),
            SCALING,
            c,
            lora_input=lora_x,
            detach_norm=detach_norm,
            stack=stack,
        )

    return fn


def reference(detach_norm=False):
    def fn(t, lora_x=None):
        return naive_dora_linear(
            *(t[k] for k in "xWbABm"), SCALING, detach_norm=detach_norm, lora_x=lora_x
        )

    return fn


def assert_same(got, want, tol=1e-10):
    out, grads, _ = got
    ref_out, ref_grads, _ = want
    assert rel_err(out, ref_out) <= tol
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) <= tol, name


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("needs", ["xAbBm", "ABm", "Bm", "xm", "xAB"])
@pytest.mark.parametrize("detach_norm", [False, True])
def test_paths_match_reference(stack, needs, detach_norm):
    values = leaves()
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    assert_same(
        run(ours(stack, detach_norm), values, grad_out, needs),
        run(reference(detach_norm), values, grad_out, needs),
    )


@pytest.mark.parametrize("stack", [True, False])
def test_no_bias_and_trainable_base(stack):
    values = leaves(bias=False)
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    assert_same(
        run(ours(stack), values, grad_out, "xWABm"),
        run(reference(), values, grad_out, "xWABm"),
    )


@pytest.mark.parametrize("stack", [True, False])
def test_separate_low_rank_input(stack):
    """Dropout feeds the low-rank branch another tensor; its gradient goes there, not to x."""
    values = leaves()
    lora_x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    for needs in ("xABm", "ABm"):
        assert_same(
            run(ours(stack), values, grad_out, needs, lora_x=lora_x),
            run(reference(), values, grad_out, needs, lora_x=lora_x),
        )


@pytest.mark.parametrize("stack", [True, False])
def test_retained_graph_backpropagates_twice(stack):
    """The first backward consumes the saved buffer; the second recomputes it."""
    values = leaves()
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    _, first, (out, ts, _) = run(ours(stack), values, grad_out, "xABm", retain=True)
    first = {k: g.clone() for k, g in first.items()}
    out.backward(grad_out)
    for name, grad in first.items():
        assert rel_err(ts[name].grad, 2 * grad) <= 1e-12, name


@pytest.mark.parametrize("stack", [True, False])
def test_saved_tensor_hooks_that_copy(stack):
    """Offloading hooks unpack a copy of every saved tensor, so saved views stop aliasing."""
    values = leaves()
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        got = run(ours(stack), values, grad_out, "xABm")
    assert_same(got, run(reference(), values, grad_out, "xABm"))


def test_floored_norm_has_zero_norm_gradient():
    """A row with n² < eps² takes the floor: the gradient through n is 0 there, as clamp gives."""
    values = leaves()
    values["W"][3] = 0.0
    values["B"][3] = 0.0
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    for stack in (True, False):
        assert_same(
            run(ours(stack), values, grad_out, "xABm"),
            run(reference(), values, grad_out, "xABm"),
        )


def test_autocast_bfloat16():
    layer = DoRALinear(32, 16, rank=4)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(6, 32, requires_grad=True)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 2e-2
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert layer.lora_A.grad.dtype == layer.magnitude.grad.dtype == torch.float32
    lora = LoRALinear(32, 16, rank=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora(x).dtype == torch.bfloat16


def test_torch_compile_matches_eager():
    layer = DoRALinear(24, 10, rank=4, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    eager = layer(x)
    eager.square().sum().backward()
    want = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.magnitude)]
    for t in (x, layer.lora_A, layer.lora_B, layer.magnitude):
        t.grad = None
    got = torch.compile(layer, backend="aot_eager")(x)
    got.square().sum().backward()
    assert rel_err(got, eager) <= 1e-12
    for t, g in zip((x, layer.lora_A, layer.lora_B, layer.magnitude), want, strict=True):
        assert rel_err(t.grad, g) <= 1e-10


@pytest.mark.parametrize("bias", [True, False])
def test_inference_path_equals_training_path(bias):
    layer = DoRALinear(16, 8, rank=4, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(3, 16, dtype=torch.float64)
    train_out = layer(x)
    with torch.no_grad():
        assert rel_err(layer(x), train_out) <= 1e-12


def test_stack_rule_is_by_tokens_per_output_row():
    weight = torch.empty(4096, 8, dtype=torch.float32)
    assert DF.stack_base_matmul(128, weight, 16)
    assert not DF.stack_base_matmul(8192, weight, 16)


def lora_ours(t, lora_x=None):
    return DF.lora_linear(*(t[k] for k in "xWbAB"), SCALING, lora_input=lora_x)


def lora_reference(t, lora_x=None):
    low = (t["x"] if lora_x is None else lora_x) @ t["A"].T
    return t["x"] @ t["W"].T + t["b"] + SCALING * low @ t["B"].T


@pytest.mark.parametrize("needs", ["xAbB", "AB", "xWAB", "x"])
@pytest.mark.parametrize("separate_input", [False, True])
def test_lora_backward_matches_autograd(needs, separate_input):
    values = leaves()
    lora_x = torch.randn(2, 5, D_IN, dtype=torch.float64) if separate_input else None
    grad_out = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    assert_same(
        run(lora_ours, values, grad_out, needs, lora_x=lora_x),
        run(lora_reference, values, grad_out, needs, lora_x=lora_x),
    )


def test_buffer_goes_through_saved_tensor_hooks():
    """Checkpointing and offloading hooks must see the (T + r) × d_out buffer to free it."""
    values = leaves()
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ours(True)(
            {k: v.requires_grad_(k in "AB") if v is not None else None for k, v in values.items()}
        )
    assert (10 + RANK, D_OUT) in shapes
    out.sum().backward()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(use_reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = DoRALinear(16, 8, rank=4, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    want = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.magnitude)]
    for t in (x, layer.lora_A, layer.lora_B, layer.magnitude):
        t.grad = None
    checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    for t, g in zip((x, layer.lora_A, layer.lora_B, layer.magnitude), want, strict=True):
        assert rel_err(t.grad, g) <= 1e-12


@pytest.mark.parametrize(("tokens", "out_features", "rank"), [(3, 64, 8), (2**12, 384, 16)])
def test_forward_and_backward_leave_process_state_alone(monkeypatch, tokens, out_features, rank):
    """No thread-count switching (or any other process-wide setting) inside a step: it slowed
    callers that run their own threads (TRL's SFTTrainer ~10×) and changed other threads' ops."""

    def refuse(*args):
        raise AssertionError("torch.set_num_threads called from inside a DoRA forward/backward")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    layer = DoRALinear(32, out_features, rank=rank)
    x = torch.randn(tokens, 32, requires_grad=True)
    layer(x).sum().backward()
    with torch.no_grad():
        layer.eval()(x)
    assert (torch.get_num_threads(), torch.get_default_dtype()) == (threads, dtype)
