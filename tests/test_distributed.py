"""DoRA across processes: DDP and FSDP2 on 2 real CPU processes (gloo, loopback only), compared
with the same model in one process; sharded norms, mixed precision, meta-device init on shards,
and adapter files moving between world sizes.

Each test spawns its processes afresh (a few seconds, bounded by ``TIMEOUT``); the functions
the ranks run are at module level so that the spawned interpreters can import them, and they
import ``torch.distributed.fsdp`` themselves (the parent process never needs it).
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from reference import rel_err
from torchdora import DoRAConfig, adapted_state_dict, apply_dora, dora_modules, initialize_magnitude
from torchdora.distributed import copy_full_, full_tensor, init_from_environment
from torchdora.io import load_adapter, save_adapter, save_merged
from torchdora.io.files import read_tensors

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

WORLD_SIZE = 2
TIMEOUT = 120.0
TOL = 1e-5  # float32 rounding: a different reduction order, never a different formula
CONFIG = {"rank": 3, "target_modules": ["embed", "fc", "conv"], "modules_to_save": ["head"]}


# ----------------------------------------------------------------------- the harness
def run_on_ranks(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in ``WORLD_SIZE`` fresh processes joined in a gloo group on
    127.0.0.1; an exception in any rank fails the test, and so does running past ``TIMEOUT``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(
        _rank_main, (fn, port, args), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} did not finish on {WORLD_SIZE} processes in {TIMEOUT}s")


def _rank_main(rank: int, fn, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo's own sockets on loopback too
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=TIMEOUT / 2)
    )
    try:
        fn(rank, *args)
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy_process_group()
    # A rank that passed leaves without the interpreter's teardown: there, now and then, a gloo
    # thread still being destroyed aborts the process ("terminate called without an active
    # exception", SIGABRT) after the work is done and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----------------------------------------------------------------------- the model
class Block(nn.Module):
    """Linear then Conv1d over the sequence, with a residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 9)
        self.conv = nn.Conv1d(9, width, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv(torch.tanh(self.fc(h)).transpose(1, 2)).transpose(1, 2)


class TinyNet(nn.Module):
    """Embedding, two blocks, a head. Sizes are odd so FSDP's shards are uneven, and the
    Embedding's DoRA rows (embedding dimensions) are split across the ranks' shards."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width), Block(width)])
        self.head = nn.Linear(width, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The adapted model with adapters away from their init (the same on every rank)."""
    torch.manual_seed(seed)
    model = apply_dora(TinyNet().to(dtype), DoRAConfig(**CONFIG))
    with torch.no_grad():
        for _, layer in dora_modules(model):
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
            layer.magnitude.mul_(torch.empty_like(layer.magnitude).uniform_(0.8, 1.2))
    return model


def batch(steps: int = 3, size: int = 4) -> torch.Tensor:
    """``steps`` global batches of token ids, the same on every rank."""
    return torch.randint(0, 11, (steps, size, 5), generator=torch.Generator().manual_seed(1))


def local(x: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's contiguous part of a global batch."""
    return x.chunk(WORLD_SIZE)[rank]


def shard(model: nn.Module, **options) -> nn.Module:
    """FSDP2 as usually applied: each block a unit, the rest in the root's unit. The head (a
    ``modules_to_save`` copy, trained in the base's dtype) gets a unit of its own: FSDP wants
    one dtype for the trainable parameters of a unit, and the adapters' is float32."""
    from torch.distributed.fsdp import fully_shard

    for module in (*model.blocks, model.head):
        fully_shard(module, **options)
    return fully_shard(model, **options)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOL):
    err = rel_err(full_tensor(actual).float(), expected.float())
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------- DDP
def _ddp_gradients(rank: int, folder: Path) -> None:
    model = build()
    reference = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model)
    for x in batch(steps=2):
        ddp(local(x, rank)).square().mean().backward()
        reference(x).square().mean().backward()
        params = trainable(model)
        for name, ref in trainable(reference).items():
            assert_close(params[name].grad, ref.grad, f"grad of {name}")
        for p in (*model.parameters(), *reference.parameters()):
            p.grad = None
    # Adapter files look through the wrapper (no "module." prefix) and only rank 0 writes.
    save_adapter(ddp, folder / f"only-{rank}")
    assert (folder / f"only-{rank}").exists() == (rank == 0)
    if rank == 0:
        save_adapter(reference, folder / "reference")
        ours, theirs = (read_tensors(folder / n)[0] for n in ("only-0", "reference"))
        assert ours.keys() == theirs.keys()


def test_ddp_gradients_equal_single_process_on_the_global_batch(tmp_path):
    run_on_ranks(_ddp_gradients, tmp_path)


def _trainer_stops_together(rank: int, folder: Path) -> None:
    import signal

    from test_train_loop import make_examples, make_model, quiet_args

    from torchdora.train import Trainer, model_loss, read_trainer_state
    from torchdora.train.trainer import TrainingInterrupted

    calls = 0

    def loss_with_a_signal(model: nn.Module, batch) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if rank == 1 and calls == 2:  # in step 2, on the rank that does not write
            os.kill(os.getpid(), signal.SIGTERM)
        return model_loss(model, batch)

    args = quiet_args(train_batch_size=2, max_steps=5, checkpoint_dir=str(folder / "ckpt"))
    trainer = Trainer(make_model(), args, make_examples(20), compute_loss=loss_with_a_signal)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert trainer.step == 2, f"rank {rank} stopped after step {trainer.step}"
    assert stopped.value.signum == signal.SIGTERM
    assert stopped.value.checkpoint == folder / "ckpt"
    dist.barrier()  # rank 0 has written the checkpoint of step 2
    assert read_trainer_state(folder / "ckpt")["step"] == 2


def test_ddp_trainer_stops_every_rank_after_the_step_one_rank_was_signalled(tmp_path):
    run_on_ranks(_trainer_stops_together, tmp_path)


# ----------------------------------------------------------------------- FSDP2
def _fsdp_training_matches(rank: int) -> None:
    model = build()
    reference = copy.deepcopy(model)
    shard(model)
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=0.05)
    ref_optimizer = torch.optim.AdamW(trainable(reference).values(), lr=0.05)
    for step, x in enumerate(batch()):
        out, ref_out = model(local(x, rank)), reference(x)
        assert_close(out, local(ref_out, rank).detach(), f"step {step} output")
        out.square().mean().backward()
        ref_out.square().mean().backward()
        params = trainable(model)
        for name, ref in trainable(reference).items():
            assert_close(params[name].grad, ref.grad, f"step {step} grad of {name}")
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
    x = batch(steps=1)[0]
    with torch.no_grad():  # the cached-scale path, after the optimizer changed A, B, m
        assert_close(model(local(x, rank)), local(reference(x), rank), "no-grad output")
        for m in (model, reference):  # new base weights: nothing cached may survive
            for name, p in m.named_parameters():
                if "base_layer" in name:
                    p.mul_(1.5)
        assert_close(model(local(x, rank)), local(reference(x), rank), "output, new base")
    out = model(local(x, rank))
    assert_close(out, local(reference(x), rank).detach(), "output with grad, new base")


def test_fsdp_forward_backward_and_steps_equal_unsharded():
    run_on_ranks(_fsdp_training_matches)


def _fsdp_sharded_norms(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    model = build()
    reference = copy.deepcopy(model)
    shard(model)
    layers, ref_layers = dict(dora_modules(model)), dict(dora_modules(reference))
    for name, layer in layers.items():  # outside forward: from the shards, gathered
        assert isinstance(layer.base_weight, DTensor)
        assert_close(layer.weight_sq_norm(), ref_layers[name].weight_sq_norm(), f"‖W‖² {name}")
    embed, expected = layers["embed"], ref_layers["embed"].weight_sq_norm()
    assert embed.base_weight.placements[0].dim == 0  # vocabulary split: rows of Eᵀ are partial
    with torch.no_grad():  # in place through the DTensor, then on the local shard alone
        embed.base_weight.mul_(2.0)
        assert_close(embed.weight_sq_norm(), 4 * expected, "‖2W‖², DTensor edited")
        embed.base_weight.to_local().mul_(2.0)
        assert_close(embed.weight_sq_norm(), 16 * expected, "‖4W‖², local shard edited")

    # Inside a unit's forward the weights are gathered copies. FSDP refills them in place with
    # their version counter kept, so a norm computed from one must never be reused.
    block, fc = model.blocks[0], layers["blocks.0.fc"]
    expected = ref_layers["blocks.0.fc"].weight_sq_norm()
    block.unshard()
    gathered = fc.base_weight
    assert not isinstance(gathered, DTensor)
    assert_close(fc.weight_sq_norm(), expected, "‖W‖², gathered")
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(gathered):
        gathered.mul_(3.0)  # what FSDP's next all-gather into the same storage does
    assert_close(fc.weight_sq_norm(), 9 * expected, "‖3W‖², refilled")
    block.reshard()
    with torch.no_grad():
        fc.base_weight.mul_(2.0)  # the shards: FSDP never wrote the gathered copy back
    block.unshard()
    assert_close(fc.weight_sq_norm(), 4 * expected, "‖2W‖², gathered anew")
    block.reshard()


def test_fsdp_row_norms_from_shards_and_never_stale():
    run_on_ranks(_fsdp_sharded_norms)


def _fsdp_misuse(rank: int, folder: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    model = build()
    fully_shard(model.blocks[0].fc.base_layer)  # the base alone: DoRA would read a shard
    fully_shard(model)
    with pytest.raises(RuntimeError, match="never base_layer alone"):
        model(local(batch(steps=1)[0], rank))

    model = shard(build())
    with pytest.raises(ValueError, match="before the model is sharded"):
        apply_dora(model, DoRAConfig(target_modules=["head"]))
    with pytest.raises(RuntimeError, match="merge in one process"):
        model.blocks[0].fc.merge()
    with pytest.raises(ValueError, match="needs whole weights"):
        save_merged(model, folder)


def test_fsdp_misuse_gets_errors_that_say_what_to_do(tmp_path):
    run_on_ranks(_fsdp_misuse, tmp_path)


def _fsdp_mixed_precision(rank: int) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    seen: dict[str, torch.dtype] = {}

    def record(layer: nn.Module, args) -> None:
        seen["magnitude"] = layer.magnitude.dtype
        seen["base"] = layer.base_weight.dtype
        seen["norm"] = layer.weight_sq_norm().dtype

    x = local(batch(steps=1)[0], rank)
    # 1. Frozen base stored in bf16, adapter in float32, no param_dtype: float32 magnitude.
    model = build(dtype=torch.bfloat16)
    reference = copy.deepcopy(model)
    shard(model, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    model.blocks[0].fc.register_forward_pre_hook(record)
    out = model(x)
    assert seen == {"magnitude": torch.float32, "base": torch.bfloat16, "norm": torch.float32}
    assert torch.equal(out, reference(x))  # the same maths in the same dtypes
    out.float().square().mean().backward()
    fc = model.blocks[0].fc
    assert fc.magnitude.dtype == fc.magnitude.grad.dtype == torch.float32

    # 2. autocast (torchdora's training loop) over an fp32 model: float32 magnitude.
    model = build()
    reference = copy.deepcopy(model)
    shard(model)
    model.blocks[0].fc.register_forward_pre_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref_out = model(x), reference(x)
    assert seen["magnitude"] == seen["norm"] == torch.float32
    assert torch.equal(out, ref_out)

    # 3. param_dtype=bf16: FSDP hands the forward a bf16 copy of every parameter, the magnitude
    # included; the norm is still float32, and the sharded magnitude and its gradient stay fp32.
    model = build()
    reference = copy.deepcopy(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    shard(model, mp_policy=policy)
    model.blocks[0].fc.register_forward_pre_hook(record)
    out = model(x)
    assert seen == {"magnitude": torch.bfloat16, "base": torch.bfloat16, "norm": torch.float32}
    assert_close(out, reference(x).detach(), "bf16-policy output", tol=2e-2)
    out.float().square().mean().backward()
    fc = model.blocks[0].fc
    assert fc.magnitude.dtype == fc.magnitude.grad.dtype == torch.float32


def test_fsdp_mixed_precision_keeps_the_magnitude_float32():
    run_on_ranks(_fsdp_mixed_precision)


# ----------------------------------------------------------------------- meta device + FSDP2
def _fsdp_meta_init(rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    torch.manual_seed(0)
    base = TinyNet()
    eager = copy.deepcopy(base)
    torch.manual_seed(1)
    apply_dora(eager, DoRAConfig(**CONFIG))

    with torch.device("meta"):
        model = apply_dora(TinyNet(), DoRAConfig(**CONFIG))
    shard(model)
    model.to_empty(device="cpu")  # each rank allocates its shards only
    weights = adapted_state_dict(model, base.state_dict()) if rank == 0 else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)  # the README's recipe
    model.unshard()  # the root unit's parameters, as its forward sees them
    with pytest.raises(RuntimeError, match="initialize_magnitude"):
        model.embed(torch.zeros(2, dtype=torch.long))
    model.reshard()

    torch.manual_seed(1)  # A drawn whole on every rank, each keeping its shard
    initialize_magnitude(model)
    state = {k: full_tensor(v) for k, v in model.state_dict().items()}
    expected = eager.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():  # ‖Eᵀ_i‖² of the split rows is summed across ranks
        assert_close(value, expected[key], key)
    x = batch(steps=1)[0]
    with torch.no_grad():
        assert_close(model(local(x, rank)), local(eager(x), rank), "output")

    # Factors that hold values are kept: m = ‖W + sBA‖, from sharded W, A, B.
    torch.manual_seed(2)
    for name, layer in dora_modules(model):
        for factor in ("lora_A", "lora_B"):
            value = 0.3 * torch.randn(getattr(layer, factor).shape)
            copy_full_(getattr(layer, factor), value)
            copy_full_(getattr(eager.get_submodule(name), factor), value)
    initialize_magnitude(model)
    initialize_magnitude(eager)
    for name, layer in dora_modules(model):
        expected = eager.get_submodule(name).magnitude
        assert_close(layer.magnitude, expected, f"‖W + sBA‖ of {name}")


def test_fsdp_meta_device_init_equals_eager_init():
    run_on_ranks(_fsdp_meta_init)


# ----------------------------------------------------------------------- adapter files
def _fsdp_checkpoint_round_trip(rank: int, folder: Path) -> None:
    torch.manual_seed(0)
    model = apply_dora(TinyNet(), DoRAConfig(**CONFIG))
    shard(model)
    load_adapter(model, folder / "one-process")  # each rank keeps its shard
    expected = torch.load(folder / "outputs.pt")
    with torch.no_grad():
        assert_close(model(local(expected["x"], rank)), local(expected["y"], rank), "output")
    save_adapter(model, folder / "two-processes")  # gathered, written by rank 0


def test_adapter_files_move_between_one_and_two_processes(tmp_path):
    model = build(seed=0)  # the same base as the ranks build (seed 0), a trained adapter
    save_adapter(model, tmp_path / "one-process")
    x = batch(steps=1)[0]
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "outputs.pt")

    run_on_ranks(_fsdp_checkpoint_round_trip, tmp_path)

    ours, theirs = (read_tensors(tmp_path / n)[0] for n in ("one-process", "two-processes"))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    torch.manual_seed(0)
    fresh = apply_dora(TinyNet(), DoRAConfig(**CONFIG))
    load_adapter(fresh, tmp_path / "two-processes")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(("local_rank", "gpus"), [(0, 1), (1, 1), (3, 2)])
def test_torchrun_process_needs_a_gpu_of_its_own(monkeypatch, local_rank, gpus):
    """Under torchrun with CUDA, process ``LOCAL_RANK`` takes that GPU and joins with NCCL; one
    beyond the visible GPUs (``--nproc-per-node 2`` on one GPU) is refused in words before it
    touches CUDA or the rendezvous."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(backend))
    if local_rank < gpus:
        assert init_from_environment()
        assert calls == [local_rank, "nccl"]
    else:
        with pytest.raises(ValueError, match=f"--nproc-per-node {gpus}"):
            init_from_environment()
        assert calls == []
