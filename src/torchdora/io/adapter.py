"""Save and load adapters in PEFT's folder format; export merged models; inspect folders."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, replace
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

import torchdora
from torchdora.config import DoRAConfig
from torchdora.distributed import has_sharded_parameters, is_main_process, unwrap_model
from torchdora.io import files
from torchdora.io.files import AdapterFileError
from torchdora.io.peft_config import (
    NO_NORM_PEFT_TYPE,
    config_value,
    dora_config_from_peft,
    fit_to_model,
    peft_config,
)
from torchdora.io.peft_format import (
    adapter_layers,
    adapter_ranks,
    load_peft_state_dict,
    peft_state_dict,
)
from torchdora.layers.adapter import check_adapter_name
from torchdora.model import adapter_names, apply_dora, merge_and_unload
from torchdora.model.adapters import drop_adapter
from torchdora.quantization import dequantize_model

MAGNITUDE_TRAINABLE = "torchdora_magnitude_trainable"
"""Metadata key of the weights file: ``"false"`` when every magnitude was frozen
(``DoRAConfig.magnitude_trainable=False``), so that :func:`load_adapter` freezes them again."""


DEFAULT_ADAPTER = "default"


def adapter_folder(path: str | os.PathLike, adapter_name: str) -> Path:
    """Where PEFT keeps adapter ``adapter_name`` of a folder saved at ``path``: ``path`` itself
    for ``"default"``, the subfolder ``path/<adapter_name>`` for every other adapter."""
    name = check_adapter_name(adapter_name)
    return Path(path) if name == DEFAULT_ADAPTER else Path(path) / name


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``model``'s adapters to the folder ``path`` in PEFT's format; returns ``path``.

    Each adapter is a folder of ``adapter_model.safetensors`` and ``adapter_config.json``:
    ``"default"`` at ``path`` itself, every other adapter in ``path/<name>`` (PEFT's
    multi-adapter layout, which ``PeftModel.from_pretrained(base, path)`` and
    ``load_adapter(path/<name>, adapter_name=<name>)`` read unchanged). All adapters are written,
    or only ``adapter_name``. Only adapter tensors (plus trained biases and
    ``modules_to_save``) are written; each file is replaced atomically, so an interrupted save
    leaves the previous adapter readable, and nothing is written if any adapter cannot be.

    In a distributed run only rank 0 writes. A model sharded with FSDP2 has its tensors
    gathered first, so every rank must call this; a ``DistributedDataParallel`` wrapper is
    looked through (no collective: calling it on rank 0 alone is fine).
    """
    model = unwrap_model(model)
    names = adapter_names(model) if adapter_name is None else [adapter_name]
    if not names:
        raise ValueError("the model has no DoRA/LoRA layers to save; call apply_dora first")
    folders = {name: adapter_folder(path, name) for name in names}
    contents = {
        name: (peft_config(model, name, base_model_name_or_path), peft_state_dict(model, name))
        for name in names
    }  # every adapter is checked before any is written
    if not is_main_process():
        return Path(path)
    for name, (config, tensors) in contents.items():
        metadata = {
            "format": "pt",
            "torchdora_version": torchdora.__version__,
            "torchdora_format": files.FORMAT_VERSION,
        }
        if _magnitudes_frozen(model, name):
            metadata[MAGNITUDE_TRAINABLE] = "false"  # PEFT's config has no such field
        files.write_adapter_folder(folders[name], config, tensors, metadata)
    return Path(path)


def _magnitudes_frozen(model: nn.Module, adapter_name: str) -> bool:
    """Whether every magnitude of a DoRA adapter is frozen for good (not merely because
    another adapter is the active one: see :meth:`~torchdora.layers.adapter.DoRAAdapter.freeze`)."""
    adapters = [
        layer.get_adapter(adapter_name) for layer in adapter_layers(model, adapter_name).values()
    ]
    magnitudes = [a for a in adapters if a.use_dora]
    return bool(magnitudes) and not any(a.trains("magnitude") for a in magnitudes)


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER
) -> nn.Module:
    """Load the adapter folder ``path`` (ours or PEFT's) into ``model`` as ``adapter_name``.

    ``path`` is the adapter's own folder (for a multi-adapter save, ``root/<name>`` for every
    adapter but ``"default"``: see :func:`adapter_folder`). If ``model`` has no adapter of that
    name it is created first (``apply_dora`` with the settings in ``adapter_config.json``, on
    the modules the file has tensors for); as with PEFT's ``load_adapter``, an adapter added
    next to others is not made active (:func:`torchdora.set_adapter`). An adapter the model has
    already must have the file's kind (DoRA/LoRA), alpha and rsLoRA setting. Raises
    :class:`AdapterFileError` with the reason when the folder cannot be used; the model is then
    left as it was.

    Every rank reads the whole file; a model sharded with FSDP2 keeps each rank's shard of
    it (no communication), whatever world size the adapter was saved from. A
    ``DistributedDataParallel`` wrapper is looked through. Returns the ``model`` passed in.
    """
    wrapper, model = model, unwrap_model(model)
    check_adapter_name(adapter_name)
    config, tensors, metadata = files.read_adapter_folder(path)
    ranks = _adapted_modules(path, tensors)
    dora_config = fit_to_model(dora_config_from_peft(config, ranks), ranks, model)
    if adapter_layers(model, adapter_name):
        _check_same_settings(model, adapter_name, dora_config, path)
        load_peft_state_dict(model, tensors, adapter_name)
        return wrapper
    if metadata.get(MAGNITUDE_TRAINABLE) == "false":
        dora_config = replace(dora_config, magnitude_trainable=False)
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    try:
        apply_dora(model, dora_config, adapter_name)
        load_peft_state_dict(model, tensors, adapter_name)
    except (TypeError, ValueError) as err:
        if adapter_name in adapter_names(model):
            drop_adapter(model, adapter_name)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        if isinstance(err, AdapterFileError):
            raise
        raise AdapterFileError(f"the adapter in {path} does not fit this model: {err}") from err
    return wrapper


def _adapted_modules(path: str | os.PathLike, tensors: dict[str, Tensor]) -> dict[str, int]:
    """Module → rank of the adapter's tensors (:func:`adapter_ranks`); none is an error."""
    ranks = adapter_ranks(tensors)
    if not ranks:
        raise AdapterFileError(f"{Path(path) / files.WEIGHTS_NAME} holds no LoRA/DoRA tensors")
    return ranks


def _check_same_settings(
    model: nn.Module, adapter_name: str, config: DoRAConfig, path: str | os.PathLike
) -> None:
    """Adapter tensors loaded into existing layers must come from layers of the same kind and
    scaling; otherwise the model would compute something the adapter was not trained for."""

    def settings(use_dora: bool, alpha: float, use_rslora: bool) -> str:
        return f"{'DoRA' if use_dora else 'LoRA'}, alpha {alpha:g}" + (", rsLoRA" * use_rslora)

    wrong = []
    for name, layer in adapter_layers(model, adapter_name).items():
        adapter = layer.get_adapter(adapter_name)
        ours = settings(adapter.use_dora, adapter.alpha, adapter.use_rslora)
        theirs = settings(config.use_dora, float(config.alpha_for(name)), config.use_rslora)
        if ours != theirs:
            wrong.append(f"{name}: {ours} here, {theirs} in the file")
    if wrong:
        raise AdapterFileError(
            f"the adapter in {path} was trained with other settings than this model's adapter "
            f"{adapter_name!r} ({'; '.join(wrong[:3])}); load it as a new adapter "
            "(load_adapter(model, path, adapter_name='...') creates it from the file)"
        )


from_pretrained = load_adapter
save_pretrained = save_adapter


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a copy of ``model`` with the adapters merged into plain layers (and any quantized
    base dequantized to float32).

    A ``transformers`` model is written with its own ``save_pretrained`` (loads without
    torchdora); any other model as ``model.safetensors`` holding its state dict. ``model``
    itself is not changed (the copy costs one model's memory). In a distributed run only
    rank 0 writes; a model sharded with FSDP2 is refused (merge needs whole weights).
    """
    model = unwrap_model(model)
    if has_sharded_parameters(model):
        raise ValueError(
            "save_merged needs whole weights, and this model is sharded (fully_shard): "
            "save_adapter (it gathers the adapter), load it into an unsharded model with "
            "load_adapter, and save_merged that"
        )
    path = Path(path)
    if not is_main_process():
        return path
    merged = merge_and_unload(copy.deepcopy(model))
    dequantize_model(merged)  # untargeted quantized Linears of a QDoRA model, too
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
        writer = self.torchdora_version and f"torchdora {self.torchdora_version}"
        lines.append(f"written by  {writer or 'PEFT or another tool (no torchdora metadata)'}")
        return "\n".join(lines)


def _method(config: dict) -> str:
    if config.get("peft_type") == NO_NORM_PEFT_TYPE:
        return "DoRA without normalisation"
    return "DoRA" if config_value(config, "use_dora", bool) else "LoRA"


def inspect_adapter(path: str | os.PathLike) -> AdapterSummary:
    """Summarise an adapter folder without a model: targets, ranks, parameters, size."""
    config, tensors, metadata = files.read_adapter_folder(path)
    targets = _adapted_modules(path, tensors)
    dora_config_from_peft(config, targets)  # refuses what load_adapter would refuse
    ranks: dict[int, int] = {}
    for rank in targets.values():
        ranks[rank] = ranks.get(rank, 0) + 1
    return AdapterSummary(
        path=Path(path),
        method=_method(config),
        targets=sorted(targets),
        ranks=ranks,
        alpha=float(config_value(config, "lora_alpha", (int, float)) or 0),
        num_parameters=sum(t.numel() for t in tensors.values()),
        size_bytes=(Path(path) / files.WEIGHTS_NAME).stat().st_size,
        modules_to_save=[str(m) for m in config_value(config, "modules_to_save", list) or []],
        torchdora_version=metadata.get("torchdora_version"),
    )
