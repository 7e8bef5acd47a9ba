"""QDoRA layers against a float64 reference built on the libraries' own dequantized weight.

Each backend's quantized Linear is made from a random float one; the reference then applies the
naive DoRA formula to the weight that library itself dequantizes (``dequantize_4bit``,
``int8_vectorwise_dequant``, ``Tensor.dequantize``), so only the adapter maths is under test:
it must be exact given the quantized base.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from reference import naive_dora_linear, rel_err
from torchdora import (
    DoRAConfig,
    DoRALinear,
    apply_dora,
    count_trainable_parameters,
    dora_modules,
)
from torchdora.io import load_adapter, save_adapter
from torchdora.layers.quantized import QuantizedDoRALinear
from torchdora.quantization import (
    QUANTIZATION_METHODS,
    backend_for,
    quantize_linear,
    quantize_model,
)

PACKAGE = {m: "bitsandbytes" if m.startswith("bnb-") else "torchao" for m in QUANTIZATION_METHODS}
TOL = 1e-5  # float32 against float64 (docs/design.md §3)
D_IN, D_OUT, RANK = 256, 128, 4  # torchao's NF4 needs a multiple of 64·256 weights
CHUNK = 3000  # elements dequantized at a time: several chunks per weight in every test


@pytest.fixture(autouse=True, scope="module")
def _one_openmp_thread():
    """Run these tests on one intra-op thread.

    With one OpenMP thread per core (2 on CI), libgomp's spin-waiting barriers cost a scheduler
    tick per small op whenever any other process runs (benchmarks/RESULTS.md, "QDoRA"); the
    many small kernels of a quantized model make that minutes. These tests check exactness.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quantized(
    method: str, d_in: int = D_IN, d_out: int = D_OUT, dtype=torch.float32, device="cpu"
) -> nn.Module:
    """A quantized Linear made by ``method`` from a random float Linear (on ``device``) with a
    bias."""
    pytest.importorskip(PACKAGE[method])
    linear = nn.Linear(d_in, d_out, dtype=dtype, device=device)
    with torch.no_grad():
        linear.bias.normal_()
    return quantize_linear(linear, method)


def library_dequantized(module: nn.Module) -> torch.Tensor:
    """The weight as the quantization library itself dequantizes it, in float64."""
    weight = module.weight
    if type(module).__module__.startswith("bitsandbytes."):
        import bitsandbytes.functional as bnbf

        if weight.dtype == torch.int8:
            scb = weight.SCB if weight.SCB is not None else module.state.SCB
            return bnbf.int8_vectorwise_dequant(weight.data, scb).double()
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).double()
    if type(weight).__name__ == "NF4Tensor":
        return weight.get_original_weight().double()
    return weight.dequantize().double()


def adapted(method: str, device="cpu", **kwargs) -> QuantizedDoRALinear:
    """A QDoRA layer over ``method``'s base (quantized on ``device``) with random ``B`` and a
    magnitude away from its init."""
    base = quantized(method, device=device)
    layer = QuantizedDoRALinear(base, rank=RANK, max_chunk_elements=CHUNK, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        if layer.magnitude is not None:
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.5, 2.0))
    return layer


def reference(layer: QuantizedDoRALinear, x: torch.Tensor, grad_out: torch.Tensor, **kwargs):
    """Output and gradients of the naive formula in float64 on the dequantized weight."""
    leaves = {
        "x": x.detach().double().requires_grad_(),
        "A": layer.lora_A.detach().double().requires_grad_(),
        "B": layer.lora_B.detach().double().requires_grad_(),
        "m": layer.magnitude.detach().double().requires_grad_(),
    }
    W = library_dequantized(layer.base_layer)
    b = layer.base_layer.bias.detach().double()
    out = naive_dora_linear(
        leaves["x"], W, b, leaves["A"], leaves["B"], leaves["m"], layer.scaling, **kwargs
    )
    out.backward(grad_out.double())
    return out.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def ours(layer: QuantizedDoRALinear, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    out.backward(grad_out)
    grads = {"x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad, "m": layer.magnitude.grad}
    return out.detach(), grads


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("detach_norm", [False, True])
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_forward_and_gradients_match_dequantized_reference(method, detach_norm):
    check_matches_dequantized_reference(adapted(method, detach_norm=detach_norm), detach_norm)


def check_matches_dequantized_reference(layer: QuantizedDoRALinear, detach_norm=False) -> None:
    """Forward, every gradient and the cached no-grad forward within ``TOL`` of the reference,
    on the layer's device."""
    device = layer.lora_A.device
    x = torch.randn(2, 5, D_IN, device=device)
    grad_out = torch.randn(2, 5, D_OUT, device=device)
    ref_out, ref = reference(layer, x, grad_out, detach_norm=detach_norm)
    out, got = ours(layer, x, grad_out)
    assert out.dtype == torch.float32
    assert rel_err(out, ref_out) <= TOL
    for name in ref:
        assert rel_err(got[name], ref[name]) <= TOL, name
    with torch.no_grad():  # the cached inference path
        assert rel_err(layer(x), ref_out) <= TOL


@pytest.mark.parametrize("method", ["bnb-nf4", "torchao-int8"])
def test_input_without_gradient_runs_base_and_a_separately(method):
    layer = adapted(method)
    x = torch.randn(6, D_IN)
    grad_out = torch.randn(6, D_OUT)
    _, ref = reference(layer, x, grad_out)
    layer(x).backward(grad_out)  # x.requires_grad is False
    for name, got in [
        ("A", layer.lora_A.grad),
        ("B", layer.lora_B.grad),
        ("m", layer.magnitude.grad),
    ]:
        assert rel_err(got, ref[name]) <= TOL, name


def test_int8_kernel_quantizing_its_input_still_gets_an_exact_norm():
    """An eval-mode Linear8bitLt quantizes x too, so W Aᵀ must come from the dequantized W.

    The base output itself is the library's; the reference takes it as given and builds the
    norm and the low-rank branch from the dequantized weight in float64.
    """
    layer = adapted("bnb-int8").eval()
    x = torch.randn(7, D_IN)
    grad_out = torch.randn(7, D_OUT)
    base_out = layer.base_layer(x).detach().double()
    assert rel_err(base_out, x.double() @ library_dequantized(layer.base_layer).T) > 1e-4
    A, B, m = (
        p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude)
    )
    W = library_dequantized(layer.base_layer)
    bias = layer.base_layer.bias.detach().double()
    norm = torch.linalg.vector_norm(W + layer.scaling * B @ A, dim=1)
    ref = (m / norm) * (base_out - bias + layer.scaling * (x.double() @ A.T) @ B.T) + bias
    ref.backward(grad_out.double())
    out = layer(x)
    out.backward(grad_out)
    assert rel_err(out, ref) <= TOL
    for got, want in [
        (layer.lora_A.grad, A.grad),
        (layer.lora_B.grad, B.grad),
        (layer.magnitude.grad, m.grad),
    ]:
        assert rel_err(got, want) <= TOL
    with torch.no_grad():
        assert rel_err(layer(x), ref) <= TOL


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-fp4"])
@pytest.mark.parametrize("d_in", [128, 96])  # 96: 4-bit blocks of 64 weights straddle rows
def test_chunks_across_quantization_blocks(method, d_in):
    """Chunked ‖W_i‖² and W Aᵀ (and its gradient) equal those of the whole dequantized weight."""
    module = quantized(method, d_in=d_in, d_out=300)  # > 256 blocks: several nested-scale blocks
    backend = backend_for(module)
    W = library_dequantized(module)
    a = torch.randn(3, d_in, requires_grad=True)
    for max_elements in (1, 700, 5000, 10**9):
        assert rel_err(backend.row_sq_norm(module, max_elements), W.square().sum(1)) <= TOL
        a.grad = None
        product = backend.weight_times(module, a, max_elements)
        a64 = a.detach().double().requires_grad_()
        want = W @ a64.T
        assert rel_err(product, want) <= TOL
        grad = torch.randn_like(product)
        product.backward(grad)
        want.backward(grad.double())
        assert rel_err(a.grad, a64.grad) <= TOL


# --------------------------------------------------------------------------- init, dtypes, freezing
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_init_reproduces_quantized_base(method):
    base = quantized(method)
    layer = QuantizedDoRALinear.from_module(base, rank=RANK, max_chunk_elements=CHUNK)
    assert layer.base_layer is base
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    assert rel_err(layer.magnitude, library_dequantized(base).norm(dim=1)) <= TOL
    x = torch.randn(3, 4, D_IN, requires_grad=True)
    assert rel_err(layer(x), base(x)) <= 1e-6
    with torch.no_grad():
        assert rel_err(layer(x), base(x)) <= 1e-6


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_base_is_frozen_and_adapter_is_float32(method):
    base = quantized(method)
    layer = QuantizedDoRALinear(base, rank=RANK)
    assert all(not p.requires_grad for p in base.parameters())
    assert {name for name, p in layer.named_parameters() if p.requires_grad} == {
        "adapters.default.lora_A",
        "adapters.default.lora_B",
        "adapters.default.magnitude",
    }
    assert layer.num_trainable_parameters() == RANK * (D_IN + D_OUT) + D_OUT
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters().values())


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_a_bias_made_trainable_gets_its_gradient(method):
    """The bias sits outside the normalisation (y = ... + b): its gradient is Σ_tokens ∂L/∂y."""
    layer = adapted(method)
    layer.bias.requires_grad_(True)  # what bias="all" does to the frozen base
    grad_out = torch.randn(4, D_OUT)
    layer(torch.randn(4, D_IN, requires_grad=True)).backward(grad_out)
    assert rel_err(layer.bias.grad, grad_out.sum(0)) <= TOL


@pytest.mark.parametrize("method", ["bnb-nf4", "torchao-int8", "torchao-int4", "torchao-nf4"])
def test_bfloat16_model_keeps_float32_adapter_and_bfloat16_activations(method):
    layer = QuantizedDoRALinear(quantized(method, dtype=torch.bfloat16), rank=RANK)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.magnitude.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    x = torch.randn(8, D_IN)
    out = layer(x.to(torch.bfloat16).requires_grad_())
    assert out.dtype == torch.bfloat16
    W = library_dequantized(layer.base_layer)
    ref = naive_dora_linear(
        x.double(),
        W,
        layer.base_layer.bias.double(),
        layer.lora_A.double(),
        layer.lora_B.double(),
        layer.magnitude.double(),
        layer.scaling,
    )
    assert rel_err(out, ref) <= 2e-2
    out.float().square().sum().backward()
    assert layer.magnitude.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    with torch.no_grad():
        assert layer(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_float32_quantized_base_takes_bfloat16_input():
    """torchao's int4 kernel rejects a bf16 input for a float32 weight; the layer casts."""
    layer = adapted("torchao-int4")
    out = layer(torch.randn(3, D_IN, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- the norm cache
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_norm_computed_once_while_weight_unchanged(method, monkeypatch):
    layer = adapted(method)
    calls = []
    compute = layer.compute_weight_sq_norm
    monkeypatch.setattr(layer, "compute_weight_sq_norm", lambda: calls.append(1) or compute())
    x = torch.randn(4, D_IN, requires_grad=True)
    for _ in range(3):
        layer(x).sum().backward()
        with torch.no_grad():
            layer(x)
    assert calls == []  # computed at construction, never again


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8", "torchao-int8", "torchao-nf4"])
def test_cache_follows_a_replaced_quantized_weight(method):
    layer = adapted(method)
    x = torch.randn(4, D_IN)
    grad_out = torch.randn(4, D_OUT)
    layer(x)
    with torch.no_grad():
        layer(x)
    layer.base_layer.weight = quantized(method).weight
    new_weight = library_dequantized(layer.base_layer)
    assert rel_err(layer.weight_sq_norm(), new_weight.square().sum(1)) <= TOL  # before any forward
    ref_out, _ = reference(layer, x, grad_out)
    assert rel_err(layer(x), ref_out) <= TOL
    with torch.no_grad():
        assert rel_err(layer(x), ref_out) <= TOL


# --------------------------------------------------------------------------- variants
@pytest.mark.parametrize("method", ["bnb-nf4", "torchao-int4"])
def test_lora_on_quantized_base(method):
    layer = adapted(method, use_dora=False)
    assert layer.magnitude is None
    x = torch.randn(5, D_IN)
    W = library_dequantized(layer.base_layer)
    A, B = layer.lora_A.double(), layer.lora_B.double()
    ref = (
        x.double() @ W.T + layer.base_layer.bias.double() + layer.scaling * (x.double() @ A.T) @ B.T
    )
    assert rel_err(layer(x), ref) <= TOL


def test_dropout_only_on_low_rank_branch():
    layer = adapted("bnb-nf4", dropout=0.5)
    x = torch.randn(4, D_IN)
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    args = (
        library_dequantized(layer.base_layer),
        layer.base_layer.bias.double(),
        layer.lora_A.double(),
        layer.lora_B.double(),
        layer.magnitude.double(),
        layer.scaling,
    )
    assert rel_err(out, naive_dora_linear(x.double(), *args, lora_x=dropped.double())) <= TOL
    layer.eval()
    assert rel_err(layer(x), naive_dora_linear(x.double(), *args)) <= TOL


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_no_tokens(method):
    layer = adapted(method)
    x = torch.randn(0, 3, D_IN, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 3, D_OUT)
    out.sum().backward()
    with torch.no_grad():
        assert layer(x).shape == (0, 3, D_OUT)


def test_disabled_adapter_runs_the_base():
    layer = adapted("torchao-int8")
    x = torch.randn(3, D_IN)
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))


def test_adapter_state_round_trips_over_the_same_quantized_base():
    layer = adapted("bnb-nf4")
    other = QuantizedDoRALinear(layer.base_layer, rank=RANK)
    x = torch.randn(3, D_IN)
    assert rel_err(other(x), layer(x)) > 1e-3
    other.set_adapter_state(layer.get_adapter_state())
    assert set(layer.get_adapter_state()) == {"lora_A", "lora_B", "magnitude"}
    assert torch.equal(other(x), layer(x))


# --------------------------------------------------------------------------- merging
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_merge_and_unload_returns_float_linear_with_adapted_output(method):
    layer = adapted(method)
    x = torch.randn(5, D_IN)
    ref_out, _ = reference(layer, x, torch.zeros(5, D_OUT))
    plain = layer.merge_and_unload()
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in plain.parameters())
    assert rel_err(plain(x), ref_out) <= TOL
    assert rel_err(layer(x), ref_out) <= TOL  # the QDoRA layer is untouched
    assert layer.merge_and_unload(dtype=torch.float64).weight.dtype == torch.float64
    layer.bias.requires_grad_(True)  # a trained bias (bias="all") stays trainable
    assert layer.merge_and_unload().bias.requires_grad


def test_in_place_merge_is_refused():
    layer = adapted("bnb-nf4")
    with pytest.raises(RuntimeError, match=r"in place: .*merge_and_unload\(\) replaces"):
        layer.merge()
    assert not layer.merged


# --------------------------------------------------------------------------- bitsandbytes specifics
def test_bitsandbytes_cpu_repacking_is_undone_and_switched_off():
    """An eval-mode Linear4bit repacks itself for a bf16 kernel on AVX512-BF16 CPUs. Built
    with bitsandbytes alone, as a loaded model has it (``quantize_linear`` switches it off)."""
    bnb = pytest.importorskip("bitsandbytes")
    linear = nn.Linear(D_IN, D_OUT)
    base = bnb.nn.Linear4bit(D_IN, D_OUT, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(linear.state_dict())
    base = base.to("cpu").eval()
    if not base.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    original = library_dequantized(base)
    with torch.no_grad():
        base(torch.randn(2, D_IN))
    assert base.weight.quant_state.packing_format_for_cpu
    layer = QuantizedDoRALinear(base, rank=RANK, max_chunk_elements=CHUNK)
    assert not base.weight.quant_state.packing_format_for_cpu
    assert not base.support_avx512bf16_for_cpu
    assert rel_err(library_dequantized(base), original) <= 1e-2  # block scales went through bf16
    x = torch.randn(4, D_IN)
    ref_out, _ = reference(layer, x, torch.zeros(4, D_OUT))
    with torch.no_grad():
        assert rel_err(layer(x), ref_out) <= TOL
    assert not base.weight.quant_state.packing_format_for_cpu


def test_unquantized_bitsandbytes_layers_are_refused():
    bnb = pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match=r"\.to\('cpu'\)"):
        QuantizedDoRALinear(bnb.nn.Linear4bit(64, 32, quant_type="nf4"))
    with pytest.raises(ValueError, match="has_fp16_weights=False"):
        QuantizedDoRALinear(bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=True).to("cpu"))


# --------------------------------------------------------------------------- errors, imports
def test_errors():
    with pytest.raises(TypeError, match="DoRALinear"):
        QuantizedDoRALinear(nn.Linear(8, 4))
    layer = QuantizedDoRALinear(quantized("torchao-int8"), freeze_base=False)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())  # always frozen
    with pytest.raises(TypeError, match="QuantizedDoRALinear"):
        DoRALinear.from_linear(quantized("torchao-int8"))
    with pytest.raises(ValueError, match="max_chunk_elements"):
        QuantizedDoRALinear(quantized("torchao-int8"), max_chunk_elements=0)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_linear(nn.Linear(8, 4), "int3")
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        quantize_linear(nn.Conv1d(8, 4, 1), "bnb-nf4")
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_linear(nn.Linear(96, 4), "torchao-int4")
    layer = adapted("torchao-int8")
    with pytest.raises(ValueError, match=f"last dimension {D_IN}"):
        layer(torch.randn(2, D_IN + 1))
    with pytest.raises(ValueError, match=f"last dimension {D_IN}"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point input"):
        layer(torch.ones(2, D_IN, dtype=torch.long))


@pytest.mark.parametrize(("method", "extra"), [("bnb-nf4", "bnb"), ("torchao-int8", "torchao")])
def test_missing_library_names_the_extra(method, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE[method], None)  # makes `import` raise ImportError
    with pytest.raises(ImportError, match=rf"pip install torchdora\[{extra}\]"):
        quantize_linear(nn.Linear(64, 64), method)


def test_recognising_quantized_layers_imports_no_quantization_library():
    """Importing bitsandbytes/torchao has side effects: torchdora must not do it on its own."""
    code = (
        "import sys, torch, torchdora, torchdora.layers.quantized as q\n"
        "from torchdora.quantization import is_quantized_linear\n"
        "assert not is_quantized_linear(torch.nn.Linear(4, 4))\n"
        "print(sorted(m for m in ('bitsandbytes', 'torchao') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- a model
def test_training_a_tiny_llama_with_nf4_qdora_lowers_the_loss():
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).requires_grad_(False)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    base = quantize_linear(child, "bnb-nf4")
                    setattr(parent, name, QuantizedDoRALinear(base, rank=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 3  # A, B, m of 7 projections in each of 2 blocks
    tokens = torch.randint(0, config.vocab_size, (4, 32))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# --------------------------------------------------------------------------- model level
def _quantized_mlp(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    model[0] = quantize_linear(model[0], method)
    return model


@pytest.mark.parametrize("method", ["bnb-nf4", "torchao-int8"])
def test_apply_dora_picks_quantized_kind_and_adapter_round_trips(method, tmp_path):
    model = apply_dora(_quantized_mlp(method), DoRAConfig(target_modules=["0", "2"], rank=4))
    kinds = {name: type(layer) for name, layer in dora_modules(model)}
    assert kinds == {"0": QuantizedDoRALinear, "2": DoRALinear}
    with torch.no_grad():
        for _, layer in dora_modules(model):
            layer.lora_B.normal_(std=0.1)
            layer.magnitude.mul_(1.1)
    save_adapter(model, tmp_path)
    loaded = load_adapter(_quantized_mlp(method), tmp_path)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def _mlp(method: str | None = None) -> nn.Module:
    """Two Linear layers in shapes every method takes, quantized by ``method`` if given."""
    model = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.ReLU(), nn.Linear(D_OUT, D_IN))
    if method is not None:
        pytest.importorskip(PACKAGE[method])
        quantize_model(model, method)
    return model


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_parameter_count_is_the_unquantized_models(method):
    """A packed weight (bitsandbytes 4-bit: two a byte) counts the weights it stands for."""
    config = DoRAConfig(target_modules=["0", "2"], rank=RANK)
    expected = count_trainable_parameters(apply_dora(_mlp(), config))
    assert count_trainable_parameters(apply_dora(_mlp(method), config)) == expected


def test_parameter_count_matches_peft_on_a_4bit_base():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=RANK, target_modules=["0", "2"], use_dora=True)
    expected = peft.get_peft_model(_mlp("bnb-nf4"), config).get_nb_trainable_parameters()
    ours = apply_dora(_mlp("bnb-nf4"), DoRAConfig(target_modules=["0", "2"], rank=RANK))
    assert count_trainable_parameters(ours) == expected
