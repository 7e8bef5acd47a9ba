"""The active adapter of a DoRA layer as a dict or a flat vector (the seeds'
``GetParameters``/``SetParameters``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdora.distributed import copy_full_, full_tensor


class AdapterAccess:
    """The parameter-access methods of :class:`~torchdora.DoRALayer` (a part of that class)."""

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the active adapter trains or owns, by name, in a fixed order.

        ``lora_A``, ``lora_B``, ``magnitude`` (DoRA only), then the base layer's parameters
        if it is not frozen.
        """
        params = dict(self.get_adapter().named_factors())
        for name, param in self.base_layer.named_parameters():
            if param.requires_grad:
                params[f"base_layer.{name}"] = param
        return params

    def num_trainable_parameters(self) -> int:
        """Elements of the parameters with ``requires_grad`` (the adapter; the base if unfrozen)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def get_adapter_state(self) -> dict[str, Tensor]:
        """A copy of :meth:`adapter_parameters` as plain, whole tensors (gathered if sharded)."""
        return {
            name: full_tensor(p).detach().clone() for name, p in self.adapter_parameters().items()
        }

    def set_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Copy tensors into :meth:`adapter_parameters`; keys and shapes must match exactly."""
        params = self.adapter_parameters()
        if set(state) != set(params):
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(
                f"adapter state keys differ: missing {missing}, unexpected {unexpected}"
            )
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"adapter state {name!r} has shape {tuple(state[name].shape)}, "
                    f"expected {tuple(param.shape)}"
                )
        for name, param in params.items():
            copy_full_(param, state[name])
        self.mark_initialized()

    def get_adapter_vector(self) -> Tensor:
        """All of :meth:`adapter_parameters` flattened into one vector, in their order."""
        params = self.adapter_parameters().values()
        return torch.cat([full_tensor(p).detach().reshape(-1) for p in params])

    def set_adapter_vector(self, vector: Tensor) -> None:
        """Inverse of :meth:`get_adapter_vector`; ``vector`` must have exactly the right length."""
        params = list(self.adapter_parameters().values())
        expected = sum(p.numel() for p in params)
        if vector.dim() != 1 or vector.numel() != expected:
            raise ValueError(
                f"adapter vector must be 1-D with {expected} elements, "
                f"got shape {tuple(vector.shape)}"
            )
        for param, chunk in zip(params, vector.split([p.numel() for p in params]), strict=True):
            copy_full_(param, chunk.view(param.shape))
        self.mark_initialized()
