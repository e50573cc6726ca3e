"""The bijector contract every flowplugins layer (built-in or third-party) follows.

Conventions, stated once for the whole package:

* **Direction.** ``forward`` maps data → latent, ``inverse`` maps latent → data. This is the
  nflows orientation; the Pyro backend flips it, because Pyro's ``_call`` maps base → data.
* **Log-determinant.** Both directions return ``(output, logabsdet)`` where ``logabsdet`` is
  ``log |det ∂output/∂input|`` summed over the event dimensions ``(C, H, W)``. It has the input's
  batch shape. The inverse's log-det is minus the forward's at the matching point.
* **Shapes.** Inputs are ``(..., C, H, W)``: any number of leading batch dimensions. Subclasses
  only see a flat batch ``(N, C, H, W)``; :class:`Bijector` flattens and restores the rest.
* **Output shape.** A shape-changing bijector overrides :meth:`Bijector.output_event_shape`;
  composers infer every level's shape from it, nobody writes shapes by hand.
* **Bad input** is a ``TypeError`` (not a tensor, not floating point, dtype differs from the
  layer's parameters) or a ``ValueError`` (rank, event shape, device, context batch shape),
  raised before any computation and naming the layer, the expected and the received value.
  A context must be a floating-point tensor of the input's dtype, on the input's device.
  Any floating dtype that matches the parameters is accepted (a parameter-free layer takes
  any); float32 and float64 are the ones the property suite holds to its tolerances.
* **Non-finite values** are not checked on every call: that would cost a device
  synchronisation per layer. Inside :func:`flowplugins.diagnostics.check_finite` every
  bijector's output and log-det are checked, and the first non-finite one raises
  :class:`flowplugins.diagnostics.NonFiniteError` naming the layer (and its step index in a
  composed model). When the mode is off the only cost is one module-level ``None`` test.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

EventShape = Tuple[int, int, int]

__all__ = ["Bijector", "EventShape", "as_event_shape", "sum_except_batch"]

# Set by flowplugins.diagnostics while check_finite mode is on: called as
# ``hook(bijector, direction, input, output, logabsdet)`` after every forward/inverse. A plain
# module global so that the disabled mode costs one ``is not None`` test per call.
_finite_hook: Optional[Callable[["Bijector", str, Tensor, Tensor, Tensor], None]] = None


# torch.compiler.is_compiling from torch 2.3 on, torch._dynamo's before.
_dynamo_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling


def is_compiling() -> bool:
    """Whether ``torch.compile`` (Dynamo) is tracing the current call.

    Fast paths built for eager execution (hand-written autograd Functions that write into
    ``out=`` views, caches keyed on storage addresses) break Dynamo's graph into pieces, and
    compiled code runs slower than eager through them. While tracing, layers take their plain
    tensor path instead, which Dynamo traces as one graph and Inductor fuses.
    """
    return bool(_dynamo_is_compiling())


def calls_are_observed(*modules: nn.Module) -> bool:
    """Whether calling ``modules`` would be seen from outside: ``check_finite`` mode is on, or
    a global or per-module forward (pre-)hook is registered. Fast paths that skip the modules'
    own ``forward`` (fused steps, memory saving's shared recomputation) run only when not."""
    if _finite_hook is not None:
        return True
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def as_event_shape(event_shape: Sequence[int], owner: str = "Bijector") -> EventShape:
    """Validate and normalise an image event shape ``(C, H, W)``.

    Raises:
        ValueError: if ``event_shape`` is not three positive integers.
    """
    try:
        shape = tuple(int(s) for s in event_shape)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{owner}: event_shape must be a sequence (C, H, W); got {event_shape!r}"
        ) from err
    if len(shape) != 3 or any(s <= 0 for s in shape) or any(
        int(s) != s for s in event_shape
    ):
        raise ValueError(
            f"{owner}: event_shape must be three positive integers (C, H, W); got {event_shape!r}"
        )
    return shape  # type: ignore[return-value]


def sum_except_batch(x: Tensor, batch_dims: int = 1) -> Tensor:
    """Sum ``x`` over every dimension after the first ``batch_dims`` (empty batches allowed)."""
    return x.flatten(batch_dims).sum(-1) if x.dim() > batch_dims else x


class Bijector(nn.Module):
    """Base class of every image bijector: an invertible map on ``(..., C, H, W)`` tensors.

    ``forward`` maps data → latent and returns ``(z, logabsdet)`` with
    ``logabsdet = log |det ∂z/∂x|``; ``inverse`` maps latent → data and returns
    ``(x, logabsdet)`` with ``logabsdet = log |det ∂x/∂z| = -forward_logabsdet``.

    Subclasses implement :meth:`_forward` and :meth:`_inverse` on a flat batch
    ``(N, C, H, W)`` (with ``context`` flattened to ``(N, ...)`` when given) and return the
    log-det with shape ``(N,)``. The public :meth:`forward` / :meth:`inverse` validate the
    input (rank, event shape, dtype, device), flatten any leading batch dimensions and restore
    them on the way out.

    Class attributes a subclass may set:

    * ``input_domain``: ``"real"`` (default) or ``"unit_interval"`` for layers such as the logit
      preprocessing that are only defined on ``(0, 1)``; property checkers draw inputs from it.
    * ``batch_dependent_in_training``: ``True`` for layers whose training-mode output mixes
      samples (batch statistics); property checkers test them in eval mode.
    * ``data_dependent_init``: ``True`` for layers that initialise from the first training
      batch (ActNorm); property checkers run one forward pass before testing.

    Shapes:
        x: (..., C, H, W) -> z: (..., *output_event_shape()); logabsdet: (...)

    Args:
        event_shape: the input event shape ``(C, H, W)`` in the data → latent direction.

    Raises:
        ValueError: if ``event_shape`` is not three positive integers.
    """

    input_domain: str = "real"
    batch_dependent_in_training: bool = False
    data_dependent_init: bool = False

    def __init__(self, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.event_shape: EventShape = as_event_shape(event_shape, type(self).__name__)

    # ------------------------------------------------------------------ shapes
    def output_event_shape(self) -> EventShape:
        """Event shape of ``forward``'s output (``inverse``'s input). Default: unchanged."""
        return self.event_shape

    @property
    def event_numel(self) -> int:
        return math.prod(self.event_shape)

    # ------------------------------------------------------------- primitives
    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------- public API
    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Map data → latent. Returns ``(z, log|det ∂z/∂x|)``."""
        return self._apply_flat(self._forward, x, context, self.event_shape, "forward")

    def inverse(self, z: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Map latent → data. Returns ``(x, log|det ∂x/∂z|)``."""
        return self._apply_flat(
            self._inverse, z, context, self.output_event_shape(), "inverse"
        )

    # ---------------------------------------------------------------- helpers
    def _reference_tensor(self) -> Optional[Tensor]:
        # Walking self.parameters() costs a generator over every submodule per call; remember
        # the path to the first tensor instead, and re-walk only when that path holds nothing
        # (a replaced submodule). Whatever tensor the path holds now is the one to read:
        # torch.func.functional_call (FlatParameters) swaps in other tensors for a call, and
        # remembering those would make every compiled call write module state.
        path = self.__dict__.get("_reference_path")
        if path is not None:
            module = self
            for name in path[:-1]:
                module = module._modules.get(name)
                if module is None:
                    break
            else:
                found = module._parameters.get(path[-1])
                if found is None:
                    found = module._buffers.get(path[-1])
                if found is not None:
                    return found
        ref, where = None, None
        for name, p in self.named_parameters():
            ref, where = p, name
            break
        else:
            for name, b in self.named_buffers():
                if b.is_floating_point():
                    ref, where = b, name
                    break
        self.__dict__["_reference_path"] = None if where is None else tuple(where.split("."))
        return ref

    def check_input(self, x: Tensor, expected: Sequence[int], direction: str) -> None:
        """Raise a clear error if ``x`` is not a ``(..., *expected)`` floating tensor that
        matches this layer's parameters in dtype and device."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}.{direction}: expected a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(
                f"{name}.{direction}: input must be a floating-point tensor; got dtype {x.dtype}"
            )
        expected = tuple(expected)
        if x.dim() < len(expected) or x.shape[-len(expected):] != expected:
            raise ValueError(
                f"{name}.{direction}: expected input of shape (..., {', '.join(map(str, expected))}); "
                f"got {tuple(x.shape)}"
            )
        ref = self._reference_tensor()
        if ref is not None:
            if ref.dtype != x.dtype:
                raise TypeError(
                    f"{name}.{direction}: input dtype {x.dtype} does not match the layer's "
                    f"parameters ({ref.dtype}); call .to({x.dtype}) on the layer or the input"
                )
            if ref.device != x.device:
                raise ValueError(
                    f"{name}.{direction}: input is on {x.device} but the layer's parameters are "
                    f"on {ref.device}"
                )

    def _check_context(self, context: object, x: Tensor, batch_shape, direction: str) -> None:
        name = f"{type(self).__name__}.{direction}"
        if not isinstance(context, Tensor):
            raise TypeError(f"{name}: context must be a torch.Tensor; got {type(context).__name__}")
        if context.shape[: len(batch_shape)] != batch_shape:
            raise ValueError(
                f"{name}: context batch shape {tuple(context.shape[:len(batch_shape)])} does not "
                f"match the input's {tuple(batch_shape)}; got context of shape "
                f"{tuple(context.shape)} for input of shape {tuple(x.shape)}"
            )
        if context.dtype != x.dtype:
            raise TypeError(
                f"{name}: context dtype {context.dtype} does not match the input's {x.dtype}"
            )
        if context.device != x.device:
            raise ValueError(
                f"{name}: context is on {context.device} but the input is on {x.device}"
            )

    def _apply_flat(self, fn, x: Tensor, context: Optional[Tensor], expected, direction: str):
        self.check_input(x, expected, direction)
        if context is None and x.dim() == 4:
            # The common case (a flat batch, no context): nothing to flatten or restore.
            out, logabsdet = fn(x, None)
            if _finite_hook is not None:
                _finite_hook(self, direction, x, out, logabsdet)
            return out, logabsdet
        batch_shape = x.shape[: x.dim() - 3]
        n = math.prod(batch_shape)
        # An explicit size, not -1: reshaping an empty batch with -1 is ambiguous.
        flat = x.reshape(n, *x.shape[-3:]) if len(batch_shape) != 1 else x
        if context is not None:
            self._check_context(context, x, batch_shape, direction)
            context = context.reshape(n, *context.shape[len(batch_shape):])
        out, logabsdet = fn(flat, context)
        if _finite_hook is not None:
            _finite_hook(self, direction, flat, out, logabsdet)
        if len(batch_shape) != 1:
            out = out.reshape(*batch_shape, *out.shape[1:])
            logabsdet = logabsdet.reshape(batch_shape)
        return out, logabsdet

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"
