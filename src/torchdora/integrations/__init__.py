"""torchdora inside other libraries' models: PEFT's DoRA computed by torchdora."""

from torchdora.integrations.peft import accelerate_peft, restore_peft

__all__ = ["accelerate_peft", "restore_peft"]
