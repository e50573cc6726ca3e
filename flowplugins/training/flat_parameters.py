"""Every trainable parameter of a module in one contiguous vector per group.

A Glow has many small parameter tensors (88 in the 1×8×8 L2 K4 benchmark model, 264 at
3×32×32 L3 K8): two per ActNorm, three per LU 1x1 convolution, six per coupling net. On CPU
each tensor costs the optimizer, autograd's gradient accumulation and ``torch.compile``'s
graph inputs a fixed few microseconds, which at small image sizes adds up to a large share of
a training step: fused Adam took 267 µs over the 88 tensors of the small Glow and 45 µs over
one vector of the same 76,096 numbers (``BENCHMARKS.md``). :class:`FlatParameters` gives the
optimizer and autograd that one vector.

How it works. The parameters are copied into one vector (one per group) and each module
parameter is replaced by a frozen ``nn.Parameter`` that *aliases* its slice of the vector: it
shares the vector's storage and version counter, so the module always reads the current
values (evaluation, sampling, ``state_dict``, ``load_state_dict`` all work unchanged and copy
nothing) and any cache keyed on version counters sees the optimizer's updates. A call through
:meth:`FlatParameters.call` substitutes differentiable views of the vector for the aliases
(``torch.func.functional_call``), so the gradient of every parameter lands in ``vector.grad``
through one graph input and one accumulation.

Outside :meth:`~FlatParameters.call` the aliases do not require grad: a plain ``model(x)``
uses the current weights as constants. A data-dependent initialisation (ActNorm) writes the
parameters in place, so it must happen before training through :meth:`~FlatParameters.call`:
one ordinary training-mode forward, e.g. under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..base import is_compiling

__all__ = ["FlatParameters"]

_IN_PLACE = (
    "FlatParameters.call: the call wrote to the parameters in place (a data-dependent "
    "initialisation such as ActNorm's first training batch?); run one ordinary training-mode "
    "forward, e.g. under torch.no_grad(), before training through FlatParameters"
)


def _memory_order(size: Sequence[int], stride: Sequence[int]) -> Optional[List[int]]:
    """Dimensions from outermost to innermost in memory, if ``(size, stride)`` is dense and
    non-overlapping (contiguous, channels-last, any permutation of a contiguous block)."""
    dims = sorted(range(len(size)), key=lambda d: (-stride[d], -size[d]))
    expected = 1
    for d in reversed(dims):
        if size[d] != 1 and stride[d] != expected:
            return None
        expected *= size[d]
    return dims


def _view_layout(size: Sequence[int], order: Sequence[int]
                 ) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
    """How a 1-D segment becomes a tensor of ``size`` laid out in ``order``: view it as
    ``shape`` (the dimensions in memory order), then permute by ``inverse`` unless that is
    ``None`` (already in order)."""
    shape = tuple(size[d] for d in order)
    if all(position == d for position, d in enumerate(order)):
        return shape, None
    inverse = [0] * len(order)
    for position, d in enumerate(order):
        inverse[d] = position
    return shape, tuple(inverse)


def _view_of(segment: Tensor, shape: Tuple[int, ...], inverse: Optional[Tuple[int, ...]]) -> Tensor:
    """``segment`` seen through :func:`_view_layout`'s result: differentiable, and a view, so
    that gradients and in-place updates reach the vector."""
    view = segment.view(shape)
    return view if inverse is None else view.permute(inverse)


@torch.compiler.assume_constant_result
def _view_plan(flat: "FlatParameters") -> Tuple[Tuple[Tuple[int, ...], ...], Tuple[Any, ...]]:
    """How :meth:`FlatParameters.views` cuts the vectors: the split sizes per vector, and per
    parameter ``(names, group, index, shape, inverse)`` — piece ``index`` of vector ``group``
    seen through :func:`_view_of`.

    The plan is fixed when a :class:`FlatParameters` is built, so ``torch.compile`` may take
    it as a constant. Read from Python lists, each of its several hundred integers became a
    guard checked on every call of the compiled function (~0.1 µs each).
    """
    return flat._plan


class _Caller(nn.Module):
    """Lets ``torch.func.functional_call`` run any callable of ``module``, not only ``forward``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


class FlatParameters:
    """The trainable parameters of ``module`` stored in one contiguous vector per group.

    Args:
        module: the model. Move it to its device and dtype first: ``.to()`` afterwards gives
            the module new tensors that no longer alias the vectors.
        groups: optional lists of parameters, one vector each (e.g. with and without weight
            decay); together they must hold every trainable parameter of ``module`` exactly
            once. Default: one group of all trainable parameters.

    Attributes:
        vectors: one ``nn.Parameter`` of shape ``(n_g,)`` per group: what the optimizer gets.
        vector: the single vector when there is one group.

    Raises:
        ValueError: no trainable parameters; a module with memory-saving backprop; parameters
            of one group on different devices or with different dtypes; groups that miss,
            repeat or add parameters.

    Example:
        >>> import torch
        >>> from flowplugins.training import FlatParameters
        >>> model = torch.nn.Linear(3, 2)
        >>> flat = FlatParameters(model)
        >>> flat.vector.shape
        torch.Size([8])
        >>> optimizer = torch.optim.SGD([flat.vector], lr=0.1)
        >>> flat.call(model, torch.ones(4, 3)).sum().backward()
        >>> optimizer.step()
        >>> bool(torch.allclose(model.bias, flat.vector[6:]))
        True
    """

    def __init__(self, module: nn.Module,
                 groups: Optional[Sequence[Iterable[nn.Parameter]]] = None) -> None:
        reversible = [name for name, m in module.named_modules()
                      if getattr(m, "memory_saving", False)]
        if reversible:
            # Memory-saving backprop recomputes each step in the backward pass, after call()
            # has put the frozen aliases back, so its parameter gradients would be lost.
            raise ValueError(
                f"FlatParameters: {type(module).__name__} uses memory-saving backprop "
                f"({reversible[0] or 'the module itself'}), which recomputes steps with their own "
                "parameters; train it with per-tensor parameters or build it with "
                "memory_saving=False"
            )
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("FlatParameters: the module has no parameters that require grad")
        name_of = {id(p): name for name, p in named}
        if groups is None:
            group_lists = [[p for _, p in named]]
        else:
            group_lists = [list(g) for g in groups]
            listed = [id(p) for g in group_lists for p in g]
            listed_once = set(listed)
            unknown = [p for g in group_lists for p in g if id(p) not in name_of]
            if unknown:
                raise ValueError(
                    f"FlatParameters: groups hold {len(unknown)} tensor(s) that are not trainable "
                    f"parameters of the module (first of shape {tuple(unknown[0].shape)})"
                )
            if len(listed) != len(listed_once):
                raise ValueError("FlatParameters: a parameter appears in more than one group")
            missing = [name for name, p in named if id(p) not in listed_once]
            if missing:
                raise ValueError(
                    f"FlatParameters: groups miss {len(missing)} trainable parameter(s): "
                    f"{', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}"
                )
        self.module = module
        self._caller = _Caller(module)
        self.vectors: List[nn.Parameter] = []
        sizes = tuple(tuple(p.numel() for p in params) for params in group_lists)
        # Every name a parameter is reachable under (tied ones have several), for the swap.
        names: Dict[int, Tuple[str, ...]] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            if id(p) in name_of:
                names[id(p)] = names.get(id(p), ()) + (name,)
        entries = []  # (names, group, index, shape, inverse), one per distinct parameter
        aliases: Dict[int, nn.Parameter] = {}
        for g, params in enumerate(group_lists):
            if not params:
                raise ValueError(f"FlatParameters: group {g} is empty")
            first = params[0]
            for p in params:
                if p.device != first.device or p.dtype != first.dtype:
                    raise ValueError(
                        f"FlatParameters: group {g} mixes {first.dtype} on {first.device} "
                        f"({name_of[id(first)]}) with {p.dtype} on {p.device} ({name_of[id(p)]}); "
                        "put them in separate groups or move the module first"
                    )
            vector = torch.empty(sum(p.numel() for p in params), dtype=first.dtype,
                                 device=first.device)
            self.vectors.append(nn.Parameter(vector))
            # detach() shares the vector's version counter: caches keyed on _version (the 1x1
            # convolutions' W⁻¹) see every optimizer step through the aliases.
            segments = self.vectors[g].detach().split(sizes[g])
            for index, (p, segment) in enumerate(zip(params, segments)):
                order = _memory_order(p.shape, p.stride())
                if order is None:  # overlapping or gapped strides: store it contiguous
                    order = list(range(p.dim()))
                shape, inverse = _view_layout(p.shape, order)
                entries.append((names[id(p)], g, index, shape, inverse))
                alias = _view_of(segment, shape, inverse)
                with torch.no_grad():
                    alias.copy_(p)
                aliases[id(p)] = nn.Parameter(alias, requires_grad=False)
        self._plan = (sizes, tuple(entries))
        # Every owner of a (possibly shared) parameter gets the same alias.
        for owner in module.modules():
            for key, p in list(owner._parameters.items()):
                if p is not None and id(p) in aliases:
                    owner._parameters[key] = aliases[id(p)]

    @property
    def vector(self) -> nn.Parameter:
        if len(self.vectors) != 1:
            raise AttributeError(
                f"FlatParameters: there are {len(self.vectors)} vectors (one per group); "
                "use .vectors"
            )
        return self.vectors[0]

    def views(self) -> Dict[str, Tensor]:
        """Differentiable views of the vectors, shaped like the parameters, keyed by name."""
        return {names[0]: view for names, view in self._named_views()}

    def _named_views(self) -> List[Tuple[Tuple[str, ...], Tensor]]:
        # One split per vector, not a slice per parameter: a split's backward is one
        # concatenation, while each slice's backward would write a zero-filled vector.
        sizes, entries = _view_plan(self)
        pieces = [vector.split(s) for vector, s in zip(self.vectors, sizes)]
        return [(names, _view_of(pieces[g][index], shape, inverse))
                for names, g, index, shape, inverse in entries]

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (``fn`` is the module or one of its methods, e.g.
        ``model.log_prob``) with the module's parameters read from the vectors, so that
        backpropagating through the result fills ``vector.grad``. Works under
        ``torch.compile``."""
        # Every name of a tied parameter is listed, so functional_call need not walk the
        # module for ties (under torch.compile that walk guarded every module's dicts).
        views = {"module." + name: view for names, view in self._named_views() for name in names}
        if is_compiling():
            return torch.func.functional_call(self._caller, views, (fn, *args), kwargs,
                                              tie_weights=False)
        before = [vector._version for vector in self.vectors]
        try:
            result = torch.func.functional_call(self._caller, views, (fn, *args), kwargs,
                                                tie_weights=False)
        except RuntimeError as error:
            # Autograd refuses in-place writes to the split's views with a message about views
            # that does not say which call did it or what to do.
            if "inplace" not in str(error):
                raise
            raise RuntimeError(_IN_PLACE) from error
        if any(vector._version != b for vector, b in zip(self.vectors, before)):
            # Otherwise autograd would only fail later, in backward, on a saved view.
            raise RuntimeError(_IN_PLACE)
        return result

    def zero_grad(self) -> None:
        """Drop the vectors' gradients (what ``optimizer.zero_grad(set_to_none=True)`` does)."""
        for vector in self.vectors:
            vector.grad = None

    def __repr__(self) -> str:
        sizes = ", ".join(str(v.numel()) for v in self.vectors)
        return f"FlatParameters({len(self._plan[1])} parameters in vector(s) of {sizes})"
