"""How a DoRA layer's adapters get their first values: from the base weight, now or later.

An adapter starts as its base: ``B = 0``, ``A`` random, ``m = ‖W_i‖``. A layer built while its
base is on the ``meta`` device cannot compute ``m`` yet: it is marked uninitialised until
:meth:`AdapterInitialization.initialize_magnitude` or a load gives it values.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchdora import functional as DF
from torchdora.distributed import copy_full_, full_tensor, is_dtensor, local_tensor
from torchdora.layers.adapter import DoRAAdapter


class AdapterInitialization:
    """The initialisation methods of :class:`~torchdora.DoRALayer` (a part of that class)."""

    def reset_parameters(self, adapter_name: str | None = None) -> None:
        """Back to the initial adapter: ``A``, ``B`` by :meth:`reset_lora_factors`, ``m = ‖W_i‖``.

        Applies to ``adapter_name`` (default: the active adapter), which then reproduces the
        base layer exactly. A merged layer is unmerged first. The base layer's own parameters
        are left alone. On a base still on the ``meta`` device nothing can be computed: the
        adapter is marked uninitialised instead (see :meth:`initialize_magnitude`).
        """
        adapter = self.get_adapter(adapter_name)
        if self.merged:
            self.unmerge()
        if self.base_weight.is_meta:
            adapter.uninitialized = set(adapter.parameter_names())
            return
        self._materialize_adapter(adapter)
        adapter.uninitialized.clear()
        with torch.no_grad():
            self._reset_lora_factors_whole(adapter)
            if adapter.magnitude is not None:
                copy_full_(adapter.magnitude, self.weight_sq_norm().sqrt())

    def initialize_magnitude(self) -> None:
        """Set ``m = ‖W + s·B A‖`` row-wise from the current base weight, for every adapter.

        For deferred initialisation: a layer built while its base was on the ``meta`` device
        has no adapter values. Once the base weights are real (``to_empty`` and loaded, or
        ``load_state_dict(..., assign=True)``), this materialises adapter parameters still on
        ``meta`` on the base weight's device and, if nothing was loaded into ``A`` and ``B``,
        initialises the whole adapter as :meth:`reset_parameters` does. Otherwise it keeps
        ``A`` and ``B`` and sets the magnitude that makes the layer compute what LoRA with the
        same ``A``, ``B`` computes (PEFT's DoRA initialisation; ``m = ‖W‖`` for
        ``normalize=False``), replacing a trained magnitude.
        With sharded (FSDP2) parameters every rank must call it.

        Raises:
            RuntimeError: the base weight is still on ``meta``, or the layer is merged.
        """
        if self.base_weight.is_meta:
            raise RuntimeError(
                f"cannot initialise the magnitude of this {type(self).__name__}: its base weight "
                "is still on the meta device. Materialise the model (model.to_empty(device=...)) "
                "and load the base weights first"
            )
        if self.merged:
            raise RuntimeError("cannot initialise the magnitude of a merged layer; unmerge() first")
        for name, adapter in self.adapters.items():
            if adapter.uninitialized & {"lora_A", "lora_B"}:
                self.reset_parameters(name)
                continue
            adapter.uninitialized.clear()
            if adapter.magnitude is None:
                continue
            if not adapter.normalize:  # m = ‖W‖ makes it compute what LoRA with A, B does
                with torch.no_grad():
                    copy_full_(adapter.magnitude, self.weight_sq_norm().sqrt())
                continue
            with torch.no_grad():
                weight_a = full_tensor(self.compute_weight_a(adapter))
                lora_A, lora_B = full_tensor(adapter.lora_A), full_tensor(adapter.lora_B)
                norm = DF.factored_row_norm(
                    self.weight_sq_norm(), weight_a, lora_A, lora_B, adapter.scaling, adapter.eps
                )
                copy_full_(adapter.magnitude, norm)

    @property
    def adapter_initialized(self) -> bool:
        """Whether the active adapter's ``A``, ``B``, ``m`` hold values (false for a layer built
        on ``meta``, until :meth:`initialize_magnitude` or a load)."""
        return not self.get_adapter().uninitialized

    def mark_initialized(self, adapter_name: str | None = None) -> None:
        """Declare an adapter's values set (default: the active one's), for code that copies an
        adapter into the parameters.

        ``load_state_dict``, :meth:`set_adapter_state`, :meth:`set_adapter_vector`,
        :meth:`initialize_magnitude` and torchdora's adapter loading do this themselves.
        """
        self.get_adapter(adapter_name).uninitialized.clear()

    def _check_initialized(self, adapter: DoRAAdapter | None = None) -> None:
        missing = (adapter or self.get_adapter()).uninitialized
        if missing:
            raise RuntimeError(
                f"this {type(self).__name__} has no values in {sorted(missing)}: it "
                "was built while its base was on the meta device. Once the base weights are "
                "loaded, call torchdora.initialize_magnitude(model) to start a new adapter, or "
                "load a trained one (torchdora.io.load_adapter, or load_state_dict with its "
                "keys; after writing the values in place otherwise, call mark_initialized())"
            )

    def _materialize_adapter(self, adapter: DoRAAdapter) -> None:
        """Replace adapter parameters left on ``meta`` by empty ones on the base weight's device."""
        device = local_tensor(self.base_weight).device
        for name, param in adapter.named_factors().items():
            if param.is_meta:
                empty = torch.empty_like(param, device=device)
                setattr(adapter, name, nn.Parameter(empty, requires_grad=param.requires_grad))

    def _reset_lora_factors_whole(self, adapter: DoRAAdapter) -> None:
        """:meth:`reset_lora_factors` on whole tensors when ``A``, ``B`` are sharded ``DTensor`` s.

        DTensor's own random ops on a CPU mesh give every shard the same numbers. Drawing the
        whole factor on each rank and keeping this rank's shard gives what one process with the
        same seed draws (and independent draws per shard if the ranks' seeds differ).
        """
        params = adapter._parameters
        sharded = {n: p for n in ("lora_A", "lora_B") if is_dtensor(p := params[n])}
        whole = {
            n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.device), False)
            for n, p in sharded.items()
        }
        params.update(whole)
        try:
            self.reset_lora_factors(adapter)
        finally:
            params.update(sharded)
        for name, param in sharded.items():
            copy_full_(param, whole[name])

    def reset_lora_factors(self, adapter: DoRAAdapter | None = None) -> None:
        """``B = 0`` and ``A`` by the adapter's ``init`` (see the class docstring): ``B A = 0``."""
        a = adapter or self.get_adapter()
        if a.init == "gaussian":
            nn.init.normal_(a.lora_A, std=1.0 / a.rank)
        else:
            nn.init.kaiming_uniform_(a.lora_A, a=math.sqrt(5))
        nn.init.zeros_(a.lora_B)
