"""DoRA layer kinds: one ``nn.Module`` per kind of base layer."""

from torchdora.layers.base import DoRALayer, recommended_defaults
from torchdora.layers.linear import DoRALinear, LoRALinear

__all__ = ["DoRALayer", "DoRALinear", "LoRALinear", "recommended_defaults"]
