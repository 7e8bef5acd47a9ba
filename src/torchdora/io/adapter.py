"""Save and load adapters in PEFT's folder format; export merged models; inspect folders."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

import torchdora
from torchdora.io import files
from torchdora.io.files import AdapterFileError
from torchdora.io.peft_format import (
    dora_config_from_peft,
    load_peft_state_dict,
    peft_config,
    peft_state_dict,
    split_peft_key,
)
from torchdora.layers.base import DoRALayer
from torchdora.model import ModulesToSaveWrapper, apply_dora, dora_modules, merge_and_unload
from torchdora.quantization import dequantize_model


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``model``'s adapters to the folder ``path`` in PEFT's format.

    Only adapter tensors (plus trained biases and ``modules_to_save``) are written, as
    ``adapter_model.safetensors`` with ``adapter_config.json``; a PEFT user can
    ``PeftModel.from_pretrained(base_model, path)`` it unchanged. Each file is replaced
    atomically, so an interrupted save leaves the previous adapter readable.
    """
    config = peft_config(model, base_model_name_or_path)
    metadata = {
        "format": "pt",
        "torchdora_version": torchdora.__version__,
        "torchdora_format": files.FORMAT_VERSION,
    }
    return files.write_adapter_folder(path, config, peft_state_dict(model), metadata)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the adapter folder ``path`` (ours or PEFT's) into ``model``, in place.

    If ``model`` has no adapters yet, they are created first (``apply_dora`` with the settings
    in ``adapter_config.json``, on the modules the file has tensors for). Raises
    :class:`AdapterFileError` with the reason when the folder cannot be used; the model is
    then left as it was when it had adapters already.
    """
    config = files.read_config(path)
    tensors, _ = files.read_tensors(path)
    if not any(True for _ in dora_modules(model)):
        names = sorted({parsed[0] for key in tensors if (parsed := split_peft_key(key))})
        if not names:
            raise AdapterFileError(f"{Path(path) / files.WEIGHTS_NAME} holds no LoRA/DoRA tensors")
        dora_config = dora_config_from_peft(config, names)
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        try:
            apply_dora(model, dora_config)
            load_peft_state_dict(model, tensors)
        except (TypeError, ValueError) as err:
            _remove_adapters(model, requires_grad)
            if isinstance(err, AdapterFileError):
                raise
            raise AdapterFileError(f"the adapter in {path} does not fit this model: {err}") from err
        return model
    load_peft_state_dict(model, tensors)
    return model


def _remove_adapters(model: nn.Module, requires_grad: dict[nn.Parameter, bool]) -> None:
    """Undo a fresh ``apply_dora``: put the original modules back, restore ``requires_grad``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DoRALayer):
            model.set_submodule(name, module.base_layer)
        elif isinstance(module, ModulesToSaveWrapper):
            model.set_submodule(name, module.original_module)
    for param, flag in requires_grad.items():
        param.requires_grad_(flag)


from_pretrained = load_adapter
save_pretrained = save_adapter


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a copy of ``model`` with the adapters merged into plain layers (and any quantized
    base dequantized to float32).

    A ``transformers`` model is written with its own ``save_pretrained`` (loads without
    torchdora); any other model as ``model.safetensors`` holding its state dict. ``model``
    itself is not changed (the copy costs one model's memory).
    """
    merged = merge_and_unload(copy.deepcopy(model))
    dequantize_model(merged)  # untargeted quantized Linears of a QDoRA model, too
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(path)
    else:
        state = {k: v.contiguous() for k, v in merged.state_dict().items()}
        save_file(state, path / "model.safetensors", {"format": "pt"})
    return path


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter folder holds (see :func:`inspect_adapter`)."""

    path: Path
    method: str
    targets: list[str]
    ranks: dict[int, int]
    alpha: float
    num_parameters: int
    size_bytes: int
    modules_to_save: list[str]
    torchdora_version: str | None

    def __str__(self) -> str:
        ranks = ", ".join(f"r={r}: {n} modules" for r, n in sorted(self.ranks.items()))
        lines = [
            f"adapter     {self.path}",
            f"method      {self.method} ({ranks}; alpha {self.alpha:g})",
            f"parameters  {self.num_parameters:,} ({self.size_bytes / 1e6:.2f} MB on disk)",
            f"targets     {len(self.targets)}: {', '.join(self.targets[:6])}"
            + (" …" if len(self.targets) > 6 else ""),
        ]
        if self.modules_to_save:
            lines.append(f"saved       {', '.join(self.modules_to_save)}")
        lines.append(f"written by  torchdora {self.torchdora_version or '(not torchdora: PEFT?)'}")
        return "\n".join(lines)


def inspect_adapter(path: str | os.PathLike) -> AdapterSummary:
    """Summarise an adapter folder without a model: targets, ranks, parameters, size."""
    config = files.read_config(path)
    tensors, metadata = files.read_tensors(path)
    targets: dict[str, int] = {}
    for key, tensor in tensors.items():
        parsed = split_peft_key(key)
        if parsed and parsed[1] == "lora_A":
            targets[parsed[0]] = tensor.shape[0]
    ranks: dict[int, int] = {}
    for rank in targets.values():
        ranks[rank] = ranks.get(rank, 0) + 1
    return AdapterSummary(
        path=Path(path),
        method="DoRA" if config.get("use_dora") else "LoRA",
        targets=sorted(targets),
        ranks=ranks,
        alpha=float(config.get("lora_alpha", 0) or 0),
        num_parameters=sum(t.numel() for t in tensors.values()),
        size_bytes=(Path(path) / files.WEIGHTS_NAME).stat().st_size,
        modules_to_save=list(config.get("modules_to_save") or []),
        torchdora_version=metadata.get("torchdora_version"),
    )
