"""Stop at the first NaN or Inf and say where it came from, instead of training on it.

* :func:`assert_finite` checks a model's parameters and their gradients (one device sync for
  all of them; call it after ``backward()`` or after the optimizer step).
* :func:`check_finite_outputs` hooks every module's forward: the first module whose output
  holds NaN/Inf raises, named, and says whether its input already did.

Both raise :class:`NonFiniteError`. DoRA layers themselves propagate NaN/Inf inputs exactly as
``nn.Linear`` does (an affected token's outputs only); these are the guards a trainer uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from torchdora.distributed import local_tensor

#: 1-byte float types (float8) have no ``isfinite`` in every torch build; they are skipped
_CHECKED_MIN_ITEMSIZE = 2


class NonFiniteError(FloatingPointError):
    """A tensor of the model (an output, a parameter or a gradient) holds NaN or Inf."""


def assert_finite(model: nn.Module, *, gradients: bool = True) -> None:
    """Raise :class:`NonFiniteError` if a parameter (or its gradient) holds NaN or Inf.

    The message names every such tensor (the first ten) by its name in
    ``model.named_parameters()`` and says whether it holds NaN or only Inf. A sharded
    (FSDP2) parameter is checked on this process's shard.

    Args:
        model: the model to check.
        gradients: check ``param.grad`` as well, where there is one.
    """
    tensors = []
    for name, param in model.named_parameters():
        tensors.append((name, local_tensor(param)))
        if gradients and param.grad is not None:
            tensors.append((f"{name} (gradient)", local_tensor(param.grad)))
    tensors = [(name, t.detach()) for name, t in tensors if _checkable(t)]
    finite = [torch.isfinite(t).all() for _, t in tensors]
    by_device: dict[torch.device, list[Tensor]] = {}
    for flag in finite:
        by_device.setdefault(flag.device, []).append(flag)
    if all(bool(torch.stack(flags).all()) for flags in by_device.values()):
        return  # one sync per device on the common path
    bad = [f"{name}: {_what(t)}" for (name, t), ok in zip(tensors, finite, strict=True) if not ok]
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise NonFiniteError(f"non-finite values in the model: {'; '.join(bad[:10])}{more}")


class FiniteOutputCheck:
    """Forward hooks installed by :func:`check_finite_outputs`; ``remove()`` or use as a
    context manager to take them off."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FiniteOutputCheck:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def check_finite_outputs(model: nn.Module) -> FiniteOutputCheck:
    """Make every module of ``model`` raise :class:`NonFiniteError` when its forward returns
    NaN/Inf, naming the module (the innermost one, since its hook runs first).

    The message says whether the module's floating inputs were finite (the module produced
    the NaN/Inf: a diverged weight, an overflow) or not (it came from the data or from code
    between modules). Each check costs a device sync per module: a guard for debugging or for
    runs that must not continue on NaN, not free.

    Returns:
        a :class:`FiniteOutputCheck`; ``with check_finite_outputs(model): ...`` removes the
        hooks at the end of the block.
    """
    handles = [
        module.register_forward_hook(_hook(name or type(model).__name__))
        for name, module in model.named_modules()
    ]
    return FiniteOutputCheck(handles)


def _hook(name: str) -> Callable[[nn.Module, tuple, Any], None]:
    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        bad = next((t for t in _tensors(output) if not bool(torch.isfinite(t).all())), None)
        if bad is None:
            return
        source = (
            "its input already did (the data, or code between modules)"
            if any(not bool(torch.isfinite(t).all()) for t in _tensors(inputs))
            else "its inputs are finite, so it produced them (a diverged weight, an overflow)"
        )
        raise NonFiniteError(
            f"the output of {name} ({type(module).__name__}) holds {_what(bad)}; {source}"
        )

    return hook


def _tensors(value: Any) -> Iterator[Tensor]:
    """The checkable tensors in a (nested) output: tuples, lists, dicts, ``ModelOutput``s."""
    if isinstance(value, Tensor):
        if _checkable(value):
            yield value.detach()
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _checkable(t: Tensor) -> bool:
    return t.is_floating_point() and t.element_size() >= _CHECKED_MIN_ITEMSIZE


def _what(t: Tensor) -> str:
    """``"NaN"`` or ``"Inf"`` (NaN wins), for a tensor known to hold one of them."""
    return "NaN" if bool(torch.isnan(t).any()) else "Inf"
