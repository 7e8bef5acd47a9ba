"""torchdora: exact, fast DoRA (Weight-Decomposed Low-Rank Adaptation) for PyTorch."""

from torchdora.layers import DoRALayer, DoRALinear, LoRALinear, recommended_defaults

__version__ = "0.1.0"

__all__ = ["DoRALayer", "DoRALinear", "LoRALinear", "__version__", "recommended_defaults"]
