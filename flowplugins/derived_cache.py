"""A cache of tensors derived from parameters, rebuilt when any source tensor changes.

Used by the 1x1 convolutions (``W``, ``W⁻¹``, ``log|det W|``) and by fused Glow runs (their
batched matrices) to avoid O(C³) rebuilds on every eval-mode call.

A compiled graph cannot check the cache's key (storage addresses and version counters are not
traceable), so under ``torch.compile`` a *registered derivation* (a pure function of its source
tensors, see :func:`register_derivation`) is one call of the operator
``flowplugins::derived_tensors``: Inductor calls it as an external kernel, and it checks the key
and rebuilds if needed each time the graph runs, as an eager call does.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .base import is_compiling

__all__ = ["DerivedTensorCache", "derive_all", "register_derivation"]

# name -> pure function of the source tensors, returning one tensor.
_DERIVATIONS: Dict[str, Callable[..., Tensor]] = {}
# name -> the shape of its value from the sources (their shapes only): a compiled graph gets
# every value of a batch in one flat tensor and cuts it up by these.
_SHAPES: Dict[str, Callable[..., Sequence[int]]] = {}
# id -> live cache, so that a compiled graph (which can only hold an int) finds its cache.
_LIVE_CACHES: "weakref.WeakValueDictionary[int, DerivedTensorCache]" = weakref.WeakValueDictionary()
_cache_ids = itertools.count()


def _first_source_shape(*sources: Tensor) -> Sequence[int]:
    return sources[0].shape


def register_derivation(name: str, derive: Callable[..., Tensor],
                        shape: Optional[Callable[..., Sequence[int]]] = None) -> None:
    """Register ``derive`` (a pure function of tensors returning one tensor, e.g. ``W⁻¹`` from
    LU factors) under ``name`` for :meth:`DerivedTensorCache.derive`.

    ``shape(*sources)`` gives the shape of the value from the sources' shapes alone (default:
    the first source's shape, right for a matrix derived from matrices of its size). Compiled
    graphs rely on it; a wrong one is reported when the graph is traced.

    Raises:
        ValueError: if ``name`` is taken by another function.
    """
    known = _DERIVATIONS.get(name)
    if known is not None and known is not derive:
        raise ValueError(f"register_derivation: the name {name!r} is already registered")
    _DERIVATIONS[name] = derive
    _SHAPES[name] = _first_source_shape if shape is None else shape


def _check_shapes(derivations: Sequence[str], values: Sequence[Tensor], ranks: Sequence[int],
                  dims: Sequence[int]) -> None:
    start = 0
    for derivation, value, rank in zip(derivations, values, ranks):
        declared = tuple(dims[start:start + rank])
        start += rank
        if tuple(value.shape) != declared:
            raise ValueError(
                f"register_derivation: the shape rule of {derivation!r} gives {declared}, but "
                f"the derivation returned shape {tuple(value.shape)}; pass register_derivation "
                f"a shape function that matches it"
            )


def _flat(values: Sequence[Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in values])


# Bumped by every DerivedTensorCache.clear(), which may follow writes the sources' keys cannot
# see: the batch answers below are only valid within the generation they were built in.
_generation = 0


def _derived_tensors(derivations: List[str], sources: List[Tensor], counts: List[int],
                     caches: List[int], ranks: List[int], dims: List[int]) -> Tensor:
    first = _LIVE_CACHES.get(caches[0]) if caches else None
    # A compiled graph asks the same question on every call: its answer is kept on the first
    # cache under one key over all the sources, checked in one pass (the per-cache lookups
    # cost ~23 µs for the 8 convs of a 1×8×8 Glow, this ~6 µs). Versions and storage
    # addresses suffice: the graph's guards fix the sources' dtypes and devices, and a
    # conversion allocates new storage while the old is alive, so the address changes.
    key = ([t._version for t in sources], [t.data_ptr() for t in sources])
    signature = (tuple(derivations), tuple(caches), tuple(counts))
    if first is not None:
        known = first._batches.get(signature)
        if known is not None and known[0] == _generation and known[1] == key:
            # A copy: Inductor may reuse an external kernel's output buffer for later
            # results, and the cached values must outlive the graph.
            return known[2].clone()
    values, start = [], 0
    for derivation, count, cache in zip(derivations, counts, caches):
        own = sources[start:start + count]
        start += count
        derive = _DERIVATIONS[derivation]
        owner = _LIVE_CACHES.get(cache)
        if owner is None:  # a graph that outlived its module, or one run in another process
            with torch.no_grad():
                values.append(derive(*own))
        else:
            values.append(owner.get(derivation, lambda: derive(*own), own))
    _check_shapes(derivations, values, ranks, dims)
    with torch.no_grad():
        flat = _flat(values)
    if first is not None:
        first._batches[signature] = (_generation, key, flat)
    return flat.clone()


def _define_derived_tensors_op():
    """The operator behind :func:`derive_all` under ``torch.compile``, or ``None`` where torch
    cannot register its fake (shape-only) version (before 2.4) or the name is taken (a second
    copy of this module): compiled graphs then rebuild the values on every call.

    A plain ``torch.library`` operator rather than ``torch.library.custom_op``, whose Python
    wrapper cost 16 µs a call here against 9 µs; and one call for many values, since each call
    out of an Inductor graph cost ~45 µs at a Glow's sampling call. The values come back as one
    flat tensor (``ranks`` and ``dims``: their shapes, concatenated): one copy out of the cache
    instead of one per value, and a schema that Inductor's C++ wrapper calls through the
    dispatcher rather than through Python (it cannot return ``Tensor[]`` that way).
    """
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is None:
        return None
    try:
        _LIBRARY.define(
            "derived_tensors(str[] derivations, Tensor[] sources, int[] counts, int[] caches,"
            " int[] ranks, int[] dims) -> Tensor"
        )
    except RuntimeError:
        return None
    _LIBRARY.impl("derived_tensors", _derived_tensors, "CompositeExplicitAutograd")

    def fake(derivations, sources, counts, caches, ranks, dims):
        values, start = [], 0
        for derivation, count in zip(derivations, counts):
            values.append(_DERIVATIONS[derivation](*sources[start:start + count]))
            start += count
        _check_shapes(derivations, values, ranks, dims)
        return _flat(values)

    register_fake("flowplugins::derived_tensors", fake, lib=_LIBRARY)
    return torch.ops.flowplugins.derived_tensors.default


_LIBRARY = torch.library.Library("flowplugins", "FRAGMENT")
_DERIVED_TENSORS_OP = _define_derived_tensors_op()


def derive_all(requests: Sequence[Tuple["DerivedTensorCache", str, Sequence[Tensor]]]) -> List[Tensor]:
    """:meth:`DerivedTensorCache.derive` for many ``(cache, derivation, sources)`` at once:
    under ``torch.compile`` one operator call for all of them (one per dtype and device of
    their first sources, since the values travel as one flat tensor)."""
    if not requests:
        return []
    if not is_compiling():
        return [cache.derive(d, own) for cache, d, own in requests]
    if _DERIVED_TENSORS_OP is None:
        with torch.no_grad():
            return [_DERIVATIONS[d](*own) for _, d, own in requests]
    groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
    for i, (_, _, own) in enumerate(requests):
        groups.setdefault((own[0].dtype, own[0].device), []).append(i)
    values: List[Optional[Tensor]] = [None] * len(requests)
    for members in groups.values():
        batch = [requests[i] for i in members]
        shapes = [tuple(_SHAPES[d](*own)) for _, d, own in batch]
        flat = _DERIVED_TENSORS_OP(
            [d for _, d, _ in batch], [t for _, _, own in batch for t in own],
            [len(own) for _, _, own in batch], [cache._id for cache, _, _ in batch],
            [len(shape) for shape in shapes], [n for shape in shapes for n in shape],
        )
        pieces = flat.split([math.prod(shape) for shape in shapes])
        for i, piece, shape in zip(members, pieces, shapes):
            values[i] = piece.view(shape)
    return values  # type: ignore[return-value]


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

    __slots__ = ("_values", "_key", "_id", "_batches", "__weakref__")

    def __init__(self) -> None:
        self._values: Dict[str, object] = {}
        self._key: Optional[tuple] = None
        # The last answers of flowplugins::derived_tensors calls that start with this cache.
        self._batches: Dict[tuple, tuple] = {}
        self._id = next(_cache_ids)
        _LIVE_CACHES[self._id] = self

    # Copies and unpickled caches start empty, under an id of their own: the values belong to
    # the original's tensors, and two caches must never answer for each other's graphs.
    def __deepcopy__(self, memo) -> "DerivedTensorCache":
        return DerivedTensorCache()

    def __copy__(self) -> "DerivedTensorCache":
        return DerivedTensorCache()

    def __reduce__(self):
        return (DerivedTensorCache, ())

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

    def derive(self, derivation: str, sources: Sequence[Tensor]) -> Tensor:
        """The registered ``derivation`` (see :func:`register_derivation`) of ``sources``,
        cached under its name as :meth:`get` caches.

        While ``torch.compile`` traces, this is one call of ``flowplugins::derived_tensors``,
        which looks the value up (and rebuilds it if a source changed) each time the compiled
        graph runs: compiled sampling does not rebuild ``W⁻¹`` per call either. Only use it
        where autograd does not record for the sources (the operator has no backward).
        """
        if is_compiling():
            return derive_all([(self, derivation, sources)])[0]
        derive = _DERIVATIONS[derivation]
        return self.get(derivation, lambda: derive(*sources), sources)

    def __len__(self) -> int:
        """How many values are cached now."""
        return len(self._values)

    def clear(self) -> None:
        """Drop every cached value (those of compiled graphs' batched lookups included)."""
        global _generation
        _generation += 1
        self._values = {}
        self._key = None
        self._batches = {}
