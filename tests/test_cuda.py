"""The CUDA paths: every layer kind against the float64 reference, merging, a whole model's
merge-and-unload, DoRA's extra memory over LoRA by the CUDA allocator, and training through the
Trainer in each precision (float16 with its gradient scaler only exists here).

Skipped without CUDA (CI has none); ``scripts/gpu-check`` runs this file and the benchmarks on a
machine with a GPU. TF32 is off in these tests, so the float32 tolerances are float32's.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import pytest
import torch
from test_conv1d import naive as naive_conv1d
from test_conv1d import random_conv1d
from test_properties import (
    all_layer_cases,
    check_forward_and_gradients,
    check_merge_and_unload,
    check_merge_unmerge,
    layer_cases,
    model_cases,
)
from test_qdora import PACKAGE, adapted, check_matches_dequantized_reference
from test_train_loop import (
    check_resume_equals_uninterrupted_run,
    make_examples,
    make_model,
    quiet_args,
)
from torch import nn

from layer_kinds import assert_matches_reference
from profiles import run_examples
from torchdora import DoRALinear, LoRALinear
from torchdora.quantization import QUANTIZATION_METHODS
from torchdora.train import Trainer, evaluate_classification

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def on_cuda(cases):
    return cases.map(lambda case: replace(case, device="cuda"))


# --------------------------------------------------------------------------- layers
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_forward_and_gradients_match_reference(kind):
    """The property test's examples (every dtype, float16 and bfloat16 included), on CUDA."""
    run_examples("ci", on_cuda(layer_cases(kind)), check_forward_and_gradients, examples=150)


def test_merge_unmerge_is_identity_to_rounding():
    run_examples("ci", on_cuda(all_layer_cases), check_merge_unmerge, examples=150)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpt2_conv1d_matches_reference(dtype):
    layer, x = random_conv1d(dtype=dtype)
    layer.bias.requires_grad_(True)
    assert_matches_reference(layer.cuda(), x.cuda(), naive_conv1d, dtype)


def test_merge_and_unload_preserves_model_outputs():
    cases = on_cuda(model_cases([torch.float64, torch.float32]))
    run_examples("ci", cases, check_merge_and_unload, examples=40)


@pytest.mark.parametrize("quantized_on", ["cuda", "cpu"])  # cpu: then moved, as the CLI does
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_qdora_matches_dequantized_reference(method, quantized_on):
    """QDoRA on the GPU kernels of bitsandbytes/torchao (skipped where the library is missing:
    ``scripts/gpu-check`` says how to carry it)."""
    pytest.importorskip(PACKAGE[method])
    check_matches_dequantized_reference(adapted(method, device=quantized_on).cuda())


# --------------------------------------------------------------------------- memory
@pytest.mark.parametrize("tokens", [128, 2048])
def test_dora_needs_one_activation_more_than_lora(tokens):
    """docs/design.md §3's memory target, by the CUDA allocator: a DoRA step's peak exceeds
    LoRA's by at most one ``T × d_out`` activation plus O(d·r); a ``d_out × d_in`` temporary
    (64 MiB here, what PEFT's DoRA builds) fails it at both sizes."""
    d, rank = 4096, 16
    base = nn.Linear(d, d, device="cuda").requires_grad_(False)
    x = torch.randn(tokens, d, device="cuda", requires_grad=True)
    grad_out = torch.randn(tokens, d, device="cuda")

    def step_peak(layer: nn.Module) -> int:
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
        layer(x).backward(grad_out)  # once to warm up (cuBLAS workspace, caching allocator)
        x.grad = None
        layer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        layer(x).backward(grad_out)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    lora = step_peak(LoRALinear.from_linear(base, rank=rank))
    dora = step_peak(DoRALinear.from_linear(base, rank=rank))
    activation = tokens * d * 4
    assert dora - lora <= activation + 32 * d * (rank + 1) * 4, (dora - lora) / 2**20


# --------------------------------------------------------------------------- training
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_learns_in_each_precision(precision):
    examples = make_examples(64)
    model = make_model()
    before = evaluate_classification(model.cuda(), examples, batch_size=16)
    records = []
    args = quiet_args(
        device="cuda",
        precision=precision,
        train_batch_size=8,
        num_train_epochs=8,
        learning_rate=5e-2,
        logging_steps=8,
    )
    Trainer(model, args, examples, callbacks=[records.append]).train()
    after = evaluate_classification(model, examples, batch_size=16)
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records)
    assert after["eval_loss"] < before["eval_loss"]
    assert model.hidden.magnitude.dtype == torch.float32  # master weights stay float32


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_on_cuda_equals_uninterrupted_run(tmp_path, precision):
    """Bitwise, with dropout (the CUDA RNG) and, in float16, the gradient scaler's state."""
    check_resume_equals_uninterrupted_run(tmp_path, device="cuda", precision=precision)


def test_step_time_includes_the_work_queued_on_the_gpu():
    """CUDA runs ahead of Python: the reported step time must wait for the GPU's work."""
    sleep_cycles = 200_000_000
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(sleep_cycles)
    torch.cuda.synchronize()
    sleep_s = time.perf_counter() - start

    def slow_loss(model, batch):
        torch.cuda._sleep(sleep_cycles)
        return model(**batch).loss

    args = quiet_args(device="cuda", train_batch_size=4, max_steps=4, logging_steps=4)
    summary = Trainer(make_model(), args, make_examples(40), compute_loss=slow_loss).train()
    assert summary["time_per_step_s"] >= 0.9 * sleep_s
