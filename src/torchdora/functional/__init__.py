"""Pure DoRA maths: the factored row norm, the linear forward, and merge/unmerge.

DoRA adapts a frozen weight ``W`` (d_out × d_in) with a low-rank pair ``A`` (r × d_in),
``B`` (d_out × r) and a magnitude ``m`` (d_out)::

    V = W + s·B·A,    n_i = ‖V_i‖₂,    W' = diag(m / n) · V

Nothing on the training path builds a d_out × d_in matrix (:mod:`.norm`), and ``P = W Aᵀ``
comes out of the same frozen matmul that produces ``W x`` (:mod:`.linear`, with the written-out
backward in :mod:`.fused`); :mod:`.base_output` adds DoRA onto a base output computed
elsewhere (PEFT's layers). :mod:`.heuristics` holds the speed choices between equal paths;
:mod:`.merge` the dense maths of merging.
"""

from torchdora.functional.autocast import autocast_enabled, cast
from torchdora.functional.base_output import RescaleBaseOutputFunction, dora_from_base_output
from torchdora.functional.fused import DoRALinearFunction, LoRALinearFunction
from torchdora.functional.heuristics import STACK_MAX_TOKENS_PER_OUT, stack_base_matmul
from torchdora.functional.linear import (
    add_lora,
    add_lora_,
    base_and_weight_a,
    dora_linear,
    dora_linear_autograd,
    dora_linear_scaled,
    lora_linear,
)
from torchdora.functional.merge import delta_weight, merge_weight, unmerge_weight
from torchdora.functional.norm import (
    factored_row_norm,
    norm_backward,
    norm_dtype,
    norm_forward,
    rescale,
    scale_dtype,
    sq_norm_floor,
    sq_norm_terms,
    weight_sq_row_norm,
)

__all__ = [
    "STACK_MAX_TOKENS_PER_OUT",
    "DoRALinearFunction",
    "LoRALinearFunction",
    "RescaleBaseOutputFunction",
    "add_lora",
    "add_lora_",
    "autocast_enabled",
    "base_and_weight_a",
    "cast",
    "delta_weight",
    "dora_from_base_output",
    "dora_linear",
    "dora_linear_autograd",
    "dora_linear_scaled",
    "factored_row_norm",
    "lora_linear",
    "merge_weight",
    "norm_backward",
    "norm_dtype",
    "norm_forward",
    "rescale",
    "scale_dtype",
    "sq_norm_floor",
    "sq_norm_terms",
    "stack_base_matmul",
    "unmerge_weight",
    "weight_sq_row_norm",
]
