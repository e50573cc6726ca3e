"""A cache of tensors derived from parameters, rebuilt when any source tensor changes.

Used by the 1x1 convolutions (``W``, ``W⁻¹``, ``log|det W|``) and by fused Glow runs (their
batched matrices) to avoid O(C³) rebuilds on every eval-mode call.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

from .base import is_compiling

__all__ = ["DerivedTensorCache"]


class DerivedTensorCache:
    """Named tensors built from source tensors, kept until a source changes.

    The key of the sources is every tensor's ``_version`` counter, storage address, dtype and
    device: in-place updates through autograd-visible ops (optimizer steps with the default
    for-loop or foreach implementations, ``load_state_dict``, writes under
    ``torch.no_grad()``) bump the counters, and ``.to()`` / ``.double()`` replace the storage.
    Writes that bypass the version counter (``param.data.copy_(...)``, a ``fused=True``
    optimizer) are invisible: call :meth:`clear` after them. Whether a call may use the cache
    at all (eval mode, autograd not recording) is the owner's decision.

    Values are built under ``torch.no_grad()`` and outside inference mode, so they stay usable
    in later calls whose inputs require grad (inference tensors cannot be saved for backward).

    Example:
        >>> import torch
        >>> w = torch.eye(2)
        >>> cache = DerivedTensorCache()
        >>> cache.get("inverse", lambda: torch.linalg.inv(w), [w]).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
        >>> _ = w.mul_(2)  # bumps w's version: the next call rebuilds
        >>> cache.get("inverse", lambda: torch.linalg.inv(w), [w]).tolist()
        [[0.5, 0.0], [0.0, 0.5]]
    """

    __slots__ = ("_values", "_key")

    def __init__(self) -> None:
        self._values: Dict[str, object] = {}
        self._key: Optional[tuple] = None

    def get(self, name: str, build: Callable[[], object], sources: Iterable[Tensor]) -> object:
        """The value ``name``, built by ``build()`` unless cached for the current ``sources``.

        While ``torch.compile`` traces, the value is built inside the graph and not cached:
        Dynamo cannot trace the key's storage addresses, and breaks the graph on them.
        """
        if is_compiling():
            with torch.no_grad():
                return build()
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in sources)
        if key != self._key:
            self._values = {}
            self._key = key
        value = self._values.get(name)
        if value is None:
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            self._values[name] = value
        return value

    def __len__(self) -> int:
        """How many values are cached now."""
        return len(self._values)

    def clear(self) -> None:
        """Drop every cached value."""
        self._values = {}
        self._key = None
