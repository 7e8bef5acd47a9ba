"""Tensors and models spread over processes: ranks, whole tensors from shards and back.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores each parameter as a ``DTensor`` holding
one shard; DDP keeps whole copies in a wrapper. These helpers let the rest of torchdora read
and write whole tensors either way, and do nothing special in a single process.

``torch.distributed.tensor`` is never imported here (it costs about half a second): a tensor
can only be a ``DTensor`` once that module has been loaded by whoever sharded it.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_initialized() -> bool:
    """Whether a default process group exists (``torchrun`` + ``init_process_group``)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Processes in the default group; 1 without one."""
    return dist.get_world_size() if is_initialized() else 1


def launched_with_ranks() -> bool:
    """Whether the environment describes several processes (``WORLD_SIZE`` > 1, as torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment() -> bool:
    """Join the process group ``torchrun`` describes, if it describes one.

    With ``WORLD_SIZE`` > 1 in the environment (``torchrun`` sets it, with ``RANK``,
    ``LOCAL_RANK`` and the rendezvous address), initialise the default group: NCCL with this
    process on GPU ``LOCAL_RANK`` when CUDA is available, gloo otherwise. Returns whether a
    group exists afterwards (``False`` in a plain single-process run). Raises ``ValueError``
    when there are more processes on this machine than GPUs.
    """
    if is_initialized():
        return True
    if not launched_with_ranks():
        return False
    if torch.cuda.is_available():
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= gpus:
            raise ValueError(
                f"torchrun started a process for GPU {local_rank} (LOCAL_RANK) but this machine "
                f"has {gpus} visible GPU(s): start one process per GPU (--nproc-per-node "
                f"{gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPUs with gloo"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def all_reduce_sum(*values: float | int) -> list[float]:
    """The sums of ``values`` over all ranks (one collective); the values themselves alone."""
    if not is_initialized():
        return [float(v) for v in values]
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return sums.tolist()


def is_main_process() -> bool:
    """Rank 0, the process that writes files and prints progress."""
    return get_rank() == 0


def _dtensor_module() -> ModuleType | None:
    return sys.modules.get("torch.distributed.tensor")


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (e.g. a parameter sharded by FSDP2)."""
    module = _dtensor_module()
    return module is not None and isinstance(tensor, module.DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of a ``DTensor`` (no communication); any other tensor itself."""
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.to_local()


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``: a ``DTensor`` is gathered from its shards, others returned as is.

    Gathering is a collective: every rank of the tensor's mesh must make the same call.
    """
    if not is_dtensor(tensor):
        return tensor
    with torch.no_grad():
        return tensor.full_tensor()


def copy_full_(dest: Tensor, full: Tensor) -> None:
    """Copy the whole tensor ``full`` into ``dest``; a ``DTensor`` ``dest`` takes its own shard.

    ``full`` must be the same on every rank (it is sliced locally, without communication).
    """
    if tuple(full.shape) != tuple(dest.shape):
        raise ValueError(
            f"cannot copy a tensor of shape {tuple(full.shape)} into one of {tuple(dest.shape)}"
        )
    with torch.no_grad():
        if is_dtensor(dest):
            full = _dtensor_module().distribute_tensor(
                full.to(dest.device), dest.device_mesh, dest.placements, src_data_rank=None
            )
        dest.copy_(full)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` (or ``DataParallel``) wrapper.

    The wrapper prefixes every name with ``module.``; adapter files use the model's own names.
    FSDP2 changes the model in place and needs no unwrapping.
    """
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


def has_sharded_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (``fully_shard`` has been applied)."""
    return any(is_dtensor(p) for p in model.parameters())
