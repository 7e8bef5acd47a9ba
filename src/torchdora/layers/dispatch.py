"""The one table from a kind of base module to the DoRA layer that adapts it.

``apply_dora`` asks :func:`layer_kind_for` which factory wraps a module. A new base kind
(e.g. a quantized Linear) is supported by one :func:`register_layer_kind` call; nothing in the
model code changes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from torchdora.layers.base import DoRALayer
from torchdora.layers.conv import DoRAConv
from torchdora.layers.conv1d import DoRAConv1D
from torchdora.layers.embedding import DoRAEmbedding
from torchdora.layers.linear import DoRALinear
from torchdora.layers.quantized import QuantizedDoRALinear
from torchdora.quantization import backend_for, is_quantized_linear

#: ``factory(base_module, rank=..., alpha=..., dropout=..., use_rslora=..., use_dora=...,
#: detach_norm=..., freeze_base=..., eps=..., init=...) -> DoRALayer``
LayerFactory = Callable[..., DoRALayer]


def _flattened_rows(module: nn.Module) -> Tensor:
    return module.weight.reshape(module.weight.shape[0], -1)


def _transposed(module: nn.Module) -> Tensor:
    return module.weight.T


def _dequantized(module: nn.Module) -> Tensor:
    return backend_for(module).dequantize(module)


@dataclass(frozen=True)
class LayerKind:
    """How to adapt one kind of base module.

    A module is of this kind if it is a ``base_type`` and ``matches(module)`` (when given) is
    true; the predicate tells apart kinds that share a type (a torchao-quantized
    ``nn.Linear``) or whose type is only importable lazily. ``linear`` kinds are those
    ``target_modules="all-linear"`` selects. ``weight_rows(module)`` is the base module's
    weight as the ``(d_out, fan_in)`` matrix whose rows DoRA normalises (what the factory's layer
    calls :meth:`~torchdora.DoRALayer.weight_matrix`), for analysing modules trained without an
    adapter; by default the weight with its trailing dimensions flattened.
    """

    name: str
    base_type: type[nn.Module]
    factory: LayerFactory
    linear: bool
    matches: Callable[[nn.Module], bool] | None = None
    weight_rows: Callable[[nn.Module], Tensor] = _flattened_rows

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, self.base_type) and (self.matches is None or self.matches(module))


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """``transformers``' ``Conv1D``, looked up only if transformers is loaded (else no model
    can hold one), so torchdora never imports transformers itself."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


_LAYER_KINDS: list[LayerKind] = [
    # before nn.Linear: bitsandbytes/torchao quantized Linears are nn.Linear subclasses/instances
    LayerKind(
        "quantized Linear (bitsandbytes, torchao)",
        nn.Module,
        QuantizedDoRALinear,
        linear=True,
        matches=is_quantized_linear,
        weight_rows=_dequantized,
    ),
    LayerKind("nn.Linear", nn.Linear, DoRALinear.from_linear, linear=True),
    LayerKind("nn.Conv1d", nn.Conv1d, DoRAConv, linear=False),
    LayerKind("nn.Conv2d", nn.Conv2d, DoRAConv, linear=False),
    LayerKind("nn.Conv3d", nn.Conv3d, DoRAConv, linear=False),
    LayerKind("nn.Embedding", nn.Embedding, DoRAEmbedding, linear=False, weight_rows=_transposed),
    LayerKind(
        "transformers Conv1D",
        nn.Module,
        DoRAConv1D,
        linear=True,
        matches=_is_transformers_conv1d,
        weight_rows=_transposed,
    ),
]


def register_layer_kind(kind: LayerKind) -> None:
    """Make ``apply_dora`` adapt the modules ``kind`` accepts with ``kind.factory``.

    Registered kinds are checked before the earlier ones, so a subclass of ``nn.Linear`` (as
    quantized Linear kinds often are) or an ``nn.Linear`` with a quantized weight (given a
    ``matches`` predicate) gets its own factory.
    """
    _LAYER_KINDS.insert(0, kind)


def layer_kind_for(module: nn.Module) -> LayerKind | None:
    """The :class:`LayerKind` that adapts ``module``, or ``None`` if it is not supported."""
    return next((kind for kind in _LAYER_KINDS if kind.accepts(module)), None)


def supported_base_types() -> list[str]:
    """Names of the supported base kinds, for error messages."""
    return [kind.name for kind in _LAYER_KINDS]
