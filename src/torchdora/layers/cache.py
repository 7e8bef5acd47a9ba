"""Caches of values computed from tensors (``‖W_i‖²``, ``m/n``) that can never go stale.

A cached value is kept with a :class:`Stamp` of every tensor it was computed from and is
returned only while each of them is the same tensor with the same contents (``docs/design.md``,
"The cache must never go stale").
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdRef

from torchdora.distributed import local_tensor


class Stamp:
    """What a cached value was computed from: a tensor, its storage and its in-place version.

    The tensor (for a view, its base: ``Conv1D`` computes with ``weight.T``) and its storage are
    held by weak reference and compared by identity, never by address: a new tensor that got a
    freed one's address and version 0 (``load_state_dict(..., assign=True)``, ``param.data =
    new``) never matches. ``_version`` catches in-place edits, except through ``tensor.data``:
    after such an edit call :meth:`~torchdora.DoRALayer.refresh_weight_norm`. For a ``DTensor``
    the storage and view are its local shard's, and both version counters count: an in-place op
    through the ``DTensor`` bumps only the wrapper's, one on the local shard only the shard's.
    """

    __slots__ = ("_state", "_storage", "_tensor")

    def __init__(self, t: Tensor) -> None:
        self._tensor = WeakIdRef(_owner(t))
        self._storage = StorageWeakRef(local_tensor(t).untyped_storage())
        self._state = _state(t)

    def matches(self, t: Tensor) -> bool:
        """Whether ``t`` is the same tensor, with the same contents, as when stamped."""
        return (
            self._tensor() is _owner(t)
            and _state(t) == self._state
            and local_tensor(t).untyped_storage()._cdata == self._storage.cdata
        )


def _owner(t: Tensor) -> Tensor:
    """The tensor whose identity stands for ``t``'s: ``t`` itself, or the base of a view."""
    return t if t._base is None else t._base


def _state(t: Tensor) -> tuple:
    """``t``'s in-place version and how it views its storage (the local shard's, if sharded)."""
    local = local_tensor(t)
    view = (local._version, t.dtype, local.shape, local.stride(), local.storage_offset())
    return view if local is t else (*view, t._version, t.shape, t.placements)


def same_storage(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (or their local shards) share memory."""
    a, b = local_tensor(a), local_tensor(b)
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class TensorCache:
    """One value, valid while its source tensors are unchanged and its settings equal.

    ``get(tensors, settings, compute, cacheable)`` returns the stored value if every tensor
    matches its stamp and ``settings`` (plain values such as a scaling) compare equal; else it
    calls ``compute()`` and, if ``cacheable``, stores the result. Copies (deepcopy, pickle)
    start empty: the stamps hold weak references to the original's tensors.
    """

    __slots__ = ("_key", "_value")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._value: Tensor | None = None
        self._key: tuple[tuple[Stamp, ...], Hashable] | None = None

    def get(
        self,
        tensors: Sequence[Tensor],
        settings: Hashable,
        compute: Callable[[], Tensor],
        cacheable: bool = True,
    ) -> Tensor:
        key = self._key
        if (
            cacheable
            and key is not None
            and key[1] == settings
            and all(stamp.matches(t) for stamp, t in zip(key[0], tensors, strict=True))
        ):
            return self._value
        value = compute()
        if cacheable:
            self._value, self._key = value, (tuple(Stamp(t) for t in tensors), settings)
        return value

    def __reduce__(self) -> tuple:
        return (TensorCache, ())


def holds_gradient(params: Iterable[Tensor | None]) -> bool:
    """Whether an optimizer step may be pending for ``params``: one of them holds a gradient.

    A value computed from trainable tensors is not cached then: some optimizers
    (``AdamW(fused=True)``) update parameters in place without bumping their ``_version``,
    so a :class:`Stamp` would not see the step.
    """
    return any(p is not None and p.grad is not None for p in params)


def forget_in_backward(cache: TensorCache, tensor: Tensor) -> None:
    """Clear ``cache`` when a backward pass reaches ``tensor`` (a forward's result that needs a
    gradient): that backward may lead to an optimizer step the cache's stamps cannot see (see
    :func:`holds_gradient`), even if the value was cached after this forward ran."""
    if tensor.requires_grad and not torch.compiler.is_compiling():
        tensor.register_hook(lambda grad: cache.clear())
