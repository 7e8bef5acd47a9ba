"""The training methods a run can use and ``--compare`` sets side by side.

A method is a name and the :class:`~torchdora.DoRAConfig` options it sets; adding one is one
line in :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """A way to train the target modules.

    Args:
        name: the ``--method`` value.
        help: one phrase for ``--help``.
        adapter: the :class:`~torchdora.DoRAConfig` options of its adapters; ``None`` for a
            full fine-tune, which trains the target modules' own weights and writes no adapter.
    """

    name: str
    help: str
    adapter: Mapping[str, Any] | None


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("dora", "DoRA", {"use_dora": True}),
        Method("lora", "LoRA", {"use_dora": False}),
        Method(
            "dora-frozen-magnitude",
            "DoRA with the magnitude kept at its initial row norms (a baseline)",
            {"use_dora": True, "magnitude_trainable": False},
        ),
        Method(
            "dora-no-norm",
            "DoRA without normalisation: m ⊙ (W + sBA) / ‖W‖, the base's norms fixed (a baseline)",
            {"use_dora": True, "normalize": False},
        ),
        Method(
            "full",
            "full fine-tuning of the modules the adapters would target (a baseline)",
            None,
        ),
    )
}
