"""DoRA layer kinds: one ``nn.Module`` per kind of base layer, and the table choosing among them."""

from torchdora.defaults import recommended_defaults
from torchdora.layers.base import DoRALayer
from torchdora.layers.conv import DoRAConv
from torchdora.layers.conv1d import DoRAConv1D
from torchdora.layers.dispatch import LayerKind, layer_kind_for, register_layer_kind
from torchdora.layers.embedding import DoRAEmbedding
from torchdora.layers.linear import DoRALinear, LoRALinear
from torchdora.layers.quantized import QuantizedDoRALinear

__all__ = [
    "DoRAConv",
    "DoRAConv1D",
    "DoRAEmbedding",
    "DoRALayer",
    "DoRALinear",
    "LayerKind",
    "LoRALinear",
    "QuantizedDoRALinear",
    "layer_kind_for",
    "recommended_defaults",
    "register_layer_kind",
]
