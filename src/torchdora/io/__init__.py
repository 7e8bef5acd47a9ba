"""Adapter checkpoints: PEFT-format folders (safetensors + JSON), merged export, inspection."""

from torchdora.io.adapter import (
    AdapterSummary,
    from_pretrained,
    inspect_adapter,
    load_adapter,
    save_adapter,
    save_merged,
    save_pretrained,
)
from torchdora.io.files import AdapterFileError

__all__ = [
    "AdapterFileError",
    "AdapterSummary",
    "from_pretrained",
    "inspect_adapter",
    "load_adapter",
    "save_adapter",
    "save_merged",
    "save_pretrained",
]
