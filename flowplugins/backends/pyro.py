"""Pyro backend: a :class:`~flowplugins.Bijector` seen as a ``pyro.distributions.TransformModule``.

Pyro orients a flow the other way round from flowplugins: a transform's ``_call`` maps the base
(latent) space to data, so ``dist.TransformedDistribution(base, [t])`` is the data density and
its ``log_prob(x)`` runs ``_inverse`` (data → latent). The adapter therefore maps

* ``_call(z)    = bijector.inverse(z)``  (latent → data, used by ``sample``/``rsample``),
* ``_inverse(x) = bijector.forward(x)``  (data → latent, used by ``log_prob``; this is where
  ActNorm's data-dependent init and batch-norm statistics happen),
* ``log_abs_det_jacobian(z, x) = log|det ∂x/∂z|`` (the base → data map).

Caching. Each bijector computes its output and its log-det in one pass, so every ``_call`` /
``_inverse`` stores ``(z, x, log|det ∂x/∂z|)`` and ``log_abs_det_jacobian(z, x)`` returns the
stored log-det when it is handed those very tensors (matched with ``is``) and no parameter has
been modified in place since (an optimizer step bumps the tensors' version counters) and the
train/eval mode is unchanged; otherwise it recomputes through ``bijector.inverse(z)``, the
direction with no data-dependent side effects. This makes ``TransformedDistribution.log_prob``
cost one bijector pass whatever ``cache_size`` is.

Pyro's own identity cache (``cache_size=1``) is off by default here: it returns the output of an
earlier call whenever the same input tensor comes back, even after an optimizer step or a
switch to eval mode, so a training loop over a fixed data tensor would silently score stale
latents. Set ``cache_size=1`` (or call :meth:`with_cache`) to skip the inverse pass in
``log_prob(t(z))``, and then call ``clear_cache()`` after every optimizer step, as Pyro's flow
tutorials do.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..base import Bijector, EventShape

try:
    from pyro.distributions import constraints
    from pyro.distributions.conditional import ConditionalTransformModule
    from pyro.distributions.torch_transform import TransformModule
except ImportError as err:  # pragma: no cover - exercised only without pyro installed
    raise ImportError(
        "the pyro backend of flowplugins needs Pyro; install it with `pip install 'pyro-ppl>=1.8'`"
    ) from err

__all__ = ["PyroTransformModule", "ConditionalPyroTransformModule"]

_EVENT_DIM = 3  # (C, H, W)


def _constraint_for(domain: str):
    if domain == "unit_interval":
        return constraints.independent(constraints.unit_interval, _EVENT_DIM)
    return constraints.independent(constraints.real, _EVENT_DIM)


def _broadcast_context(context: Tensor, batch_shape: torch.Size, context_event_dim: int, owner: str):
    """Expand a context with batch shape broadcastable to ``batch_shape`` (Pyro prepends sample
    dimensions to the base batch, the context does not carry them)."""
    ctx_batch = context.shape[: context.dim() - context_event_dim]
    ctx_event = context.shape[context.dim() - context_event_dim:]
    try:
        target = torch.broadcast_shapes(ctx_batch, batch_shape)
    except RuntimeError as err:
        raise ValueError(
            f"{owner}: context batch shape {tuple(ctx_batch)} does not broadcast to the input's "
            f"batch shape {tuple(batch_shape)}"
        ) from err
    if target != batch_shape:
        raise ValueError(
            f"{owner}: context batch shape {tuple(ctx_batch)} is larger than the input's batch "
            f"shape {tuple(batch_shape)}"
        )
    return context.expand(*batch_shape, *ctx_event)


class PyroTransformModule(TransformModule):
    """Expose a :class:`~flowplugins.Bijector` as a Pyro ``TransformModule`` (base → data).

    With ``b`` the bijector (data → latent), the transform is ``x = b⁻¹(z)`` and
    ``log_abs_det_jacobian(z, x) = log|det ∂x/∂z| = -log|det ∂b(x)/∂x|``. See the module
    docstring for the caching rules. The bijector is a submodule, so ``pyro.module(name, t)``
    registers its parameters.

    Shapes:
        z: (..., *bijector.output_event_shape()) -> x: (..., *bijector.event_shape);
        log_abs_det_jacobian: (...). ``forward_shape`` maps the latent shape to the data shape,
        ``inverse_shape`` the data shape to the latent shape.

    Args:
        bijector: the layer to expose.
        context: a conditioning tensor passed to the bijector; its batch shape must broadcast to
            the inputs' batch shape (it is expanded, so sample dimensions need not be repeated).
        context_event_dim: how many trailing dimensions of ``context`` are its event (1 for a
            feature vector).
        cache_size: Pyro's identity cache, 0 (default) or 1.

    Raises:
        TypeError: if ``bijector`` is not a :class:`~flowplugins.Bijector`.
        ValueError: from ``forward_shape``/``inverse_shape`` for a shape whose trailing three
            dimensions are not the bijector's.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from flowplugins.bijectors.squeeze import Squeeze
        >>> t = PyroTransformModule(Squeeze((1, 4, 4)))
        >>> base = dist.Normal(torch.zeros(4, 2, 2), 1.0).to_event(3)
        >>> flow = dist.TransformedDistribution(base, [t])
        >>> tuple(flow.sample((5,)).shape), tuple(flow.log_prob(torch.randn(5, 1, 4, 4)).shape)
        ((5, 1, 4, 4), (5,))
    """

    bijective = True

    def __init__(
        self,
        bijector: Bijector,
        context: Optional[Tensor] = None,
        context_event_dim: int = 1,
        cache_size: int = 0,
    ) -> None:
        if not isinstance(bijector, Bijector):
            raise TypeError(
                f"PyroTransformModule: expected a flowplugins.Bijector; got "
                f"{type(bijector).__name__}"
            )
        super().__init__(cache_size=cache_size)
        self.bijector = bijector
        self.context = context
        self.context_event_dim = int(context_event_dim)
        # Data lives in the bijector's input domain (the codomain in Pyro's orientation).
        self.domain = _constraint_for("real")
        self.codomain = _constraint_for(getattr(bijector, "input_domain", "real"))
        self._stash: Optional[Tuple[Tensor, Tensor, Tensor, tuple]] = None

    # ------------------------------------------------------------------ shapes
    @property
    def event_shape(self) -> EventShape:
        """The data-side event shape ``(C, H, W)``."""
        return self.bijector.event_shape

    def output_event_shape(self) -> EventShape:
        """The latent-side (base) event shape."""
        return self.bijector.output_event_shape()

    def _check_shape(self, shape, expected, direction: str) -> torch.Size:
        shape = torch.Size(shape)
        if len(shape) < _EVENT_DIM or tuple(shape[-_EVENT_DIM:]) != tuple(expected):
            raise ValueError(
                f"PyroTransformModule({type(self.bijector).__name__}).{direction}: expected a "
                f"shape (..., {', '.join(map(str, expected))}); got {tuple(shape)}"
            )
        return shape

    def forward_shape(self, shape) -> torch.Size:
        """Latent (base) shape → data shape."""
        shape = self._check_shape(shape, self.output_event_shape(), "forward_shape")
        return shape[:-_EVENT_DIM] + torch.Size(self.event_shape)

    def inverse_shape(self, shape) -> torch.Size:
        """Data shape → latent (base) shape."""
        shape = self._check_shape(shape, self.event_shape, "inverse_shape")
        return shape[:-_EVENT_DIM] + torch.Size(self.output_event_shape())

    # ----------------------------------------------------------------- context
    def _context(self, inputs: Tensor) -> Optional[Tensor]:
        if self.context is None:
            return None
        return _broadcast_context(
            self.context,
            inputs.shape[: inputs.dim() - _EVENT_DIM],
            self.context_event_dim,
            f"PyroTransformModule({type(self.bijector).__name__})",
        )

    def condition(self, context: Tensor) -> "PyroTransformModule":
        """The same transform (sharing the bijector and its parameters) bound to ``context``."""
        return PyroTransformModule(
            self.bijector, context, self.context_event_dim, cache_size=self._cache_size
        )

    # ------------------------------------------------------------- primitives
    def _state_key(self) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump a tensor's version counter.
        return (self.bijector.training,) + tuple(p._version for p in self.bijector.parameters())

    def _call(self, z: Tensor) -> Tensor:
        x, logabsdet = self.bijector.inverse(z, self._context(z))
        self._stash = (z, x, logabsdet, self._state_key())
        return x

    def _inverse(self, x: Tensor) -> Tensor:
        z, logabsdet = self.bijector.forward(x, self._context(x))
        self._stash = (z, x, -logabsdet, self._state_key())
        return z

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        """``log|det ∂y/∂x|`` of the base → data map, with ``x`` the base (latent) point and
        ``y = self(x)`` the data point; reuses the last ``_call``/``_inverse`` when they
        computed exactly this pair."""
        stash = self._stash
        if stash is not None and stash[0] is x and stash[1] is y and stash[3] == self._state_key():
            return stash[2]
        _, logabsdet = self.bijector.inverse(x, self._context(x))
        return logabsdet

    def clear_cache(self) -> None:
        """Drop Pyro's identity cache and the stored log-det (and the graph it holds)."""
        super().clear_cache()
        self._stash = None

    def with_cache(self, cache_size: int = 1) -> "PyroTransformModule":
        """The same transform (sharing the bijector) with Pyro's identity cache set."""
        if cache_size == self._cache_size:
            return self
        return PyroTransformModule(
            self.bijector, self.context, self.context_event_dim, cache_size=cache_size
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bijector!r})"


class ConditionalPyroTransformModule(ConditionalTransformModule):
    """A conditional Pyro transform over a :class:`~flowplugins.Bijector` that takes a context.

    ``condition(context)`` returns a :class:`PyroTransformModule` bound to ``context`` that shares
    this module's bijector, so it fits ``dist.ConditionalTransformedDistribution``.

    Args:
        bijector: a layer whose ``forward``/``inverse`` use their ``context`` argument.
        context_event_dim: how many trailing dimensions of a context are its event.
        cache_size: Pyro's identity cache of the conditioned transforms, 0 (default) or 1.

    Raises:
        TypeError: if ``bijector`` is not a :class:`~flowplugins.Bijector`.

    Example:
        >>> import torch
        >>> from flowplugins.bijectors.squeeze import Squeeze
        >>> t = ConditionalPyroTransformModule(Squeeze((1, 2, 2))).condition(torch.zeros(3))
        >>> tuple(t(torch.randn(2, 4, 1, 1)).shape)
        (2, 1, 2, 2)
    """

    def __init__(self, bijector: Bijector, context_event_dim: int = 1, cache_size: int = 0) -> None:
        if not isinstance(bijector, Bijector):
            raise TypeError(
                f"ConditionalPyroTransformModule: expected a flowplugins.Bijector; got "
                f"{type(bijector).__name__}"
            )
        super().__init__()
        self.bijector = bijector
        self.context_event_dim = int(context_event_dim)
        self.cache_size = cache_size

    def condition(self, context: Tensor) -> PyroTransformModule:
        return PyroTransformModule(
            self.bijector, context, self.context_event_dim, cache_size=self.cache_size
        )
