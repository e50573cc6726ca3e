"""Pyro view of a :class:`~flowplugins.models.MultiscaleFlow`: a distribution over images."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..bijectors.logit import LogitTransform
from .multiscale import MultiscaleFlow

try:
    from pyro.distributions import constraints
    from pyro.distributions.torch_distribution import TorchDistribution
except ImportError as err:  # pragma: no cover - exercised only without Pyro installed
    raise ImportError(
        "the pyro backend of flowplugins needs Pyro; install it with `pip install 'pyro-ppl>=1.8'`"
    ) from err

__all__ = ["MultiscaleFlowDistribution"]


class MultiscaleFlowDistribution(TorchDistribution):
    """A Pyro distribution over ``(C, H, W)`` images whose density is a multi-scale flow.

    ``log_prob(x)`` is the torch model's :meth:`~flowplugins.models.MultiscaleFlow.log_prob`
    (the same numbers), ``rsample`` draws ``z ~ N(0, T²·I)`` and decodes it through the exact
    inverse, so it is reparameterised. Use it as ``pyro.sample("x", d, obs=images)`` inside a
    Pyro program, and register the flow's parameters with ``pyro.module("flow", d.model)`` in
    the model (and guide) so SVI trains them. The distribution leaves the model's train/eval
    mode alone.

    Conditional models (built with ``context_features=K``): ``d.condition(context)`` (or the
    ``context`` argument) binds a context of shape ``(*batch, K)``, e.g. one-hot labels; the
    distribution's batch shape is the context's batch shape, and ``log_prob`` broadcasts the
    images' batch shape against it, so an enumerated label of shape ``(num_classes, 1, K)``
    scores a plate of images ``(N, C, H, W)`` as ``(num_classes, N)``.

    Shapes:
        value: (*sample, *batch, C, H, W) -> log_prob: (*sample, *batch);
        rsample(sample_shape) -> (*sample_shape, *batch, C, H, W)

    Args:
        model: the torch-backend model (its modules are shared, not copied).
        context: the context of a conditional model, or ``None``.
        temperature: default ``T >= 0`` of ``sample`` / ``rsample``.
        batch_shape: explicit batch shape (the context's batch shape broadcast to it);
            default: the context's batch shape, or ``()``.
        validate_args: Pyro's argument / support validation.

    Raises:
        TypeError: if ``model`` is not a :class:`MultiscaleFlow`.
        ValueError: if the context does not fit ``context_features``, or the model is
            conditional and ``log_prob`` / ``rsample`` are called before a context is bound.

    Example:
        >>> import torch, pyro
        >>> from flowplugins.composer import glow
        >>> d = MultiscaleFlowDistribution(glow((1, 4, 4), levels=2, depth=1, hidden=8))
        >>> x = torch.rand(5, 1, 4, 4)
        >>> def program(images):
        ...     pyro.module("flow", d.model)
        ...     with pyro.plate("data", images.shape[0]):
        ...         return pyro.sample("x", d, obs=images)
        >>> tuple(pyro.poutine.trace(program).get_trace(x).nodes["x"]["fn"].log_prob(x).shape)
        (5,)
        >>> tuple(d.sample((2, 3), temperature=0.5).shape)
        (2, 3, 1, 4, 4)
    """

    arg_constraints = {}
    has_rsample = True

    @constraints.dependent_property(is_discrete=False, event_dim=3)
    def support(self):
        """Where the density is defined: every real image, unless the model's first step
        needs data in the unit interval. Logit preprocessing with margin ``α`` is defined on
        ``(−α/(1−2α), (1−α)/(1−2α))`` per pixel, which holds ``[0, 1]`` when ``α > 0`` (Pyro has
        no open interval: the constraint is the closed one, whose two ends have infinite or
        undefined density); another step declaring ``input_domain = "unit_interval"`` gives
        ``[0, 1]``."""
        first = self.model.steps[0]
        if type(first) is LogitTransform:
            a = first.alpha
            interval = constraints.interval(-a / (1.0 - 2.0 * a), (1.0 - a) / (1.0 - 2.0 * a))
            return constraints.independent(interval, 3)
        if getattr(first, "input_domain", "real") == "unit_interval":
            return constraints.independent(constraints.unit_interval, 3)
        return constraints.independent(constraints.real, 3)

    def __init__(
        self,
        model: MultiscaleFlow,
        context: Optional[Tensor] = None,
        temperature: float = 1.0,
        batch_shape: Optional[torch.Size] = None,
        validate_args: Optional[bool] = None,
    ) -> None:
        if not isinstance(model, MultiscaleFlow):
            raise TypeError(
                f"MultiscaleFlowDistribution: expected a MultiscaleFlow; got {type(model).__name__}"
            )
        if not temperature >= 0:
            raise ValueError(
                f"MultiscaleFlowDistribution: temperature must be >= 0; got {temperature!r}"
            )
        k = model.context_features
        context_batch = torch.Size()
        if context is not None:
            if k is None:
                raise ValueError(
                    f"MultiscaleFlowDistribution: got a context of shape {tuple(context.shape)} but "
                    f"the model was built with context_features=None"
                )
            if context.dim() < 1 or context.shape[-1] != k:
                raise ValueError(
                    f"MultiscaleFlowDistribution: expected a context of shape (..., {k}); got "
                    f"{tuple(context.shape)}"
                )
            context_batch = context.shape[:-1]
        if batch_shape is None:
            batch_shape = context_batch
        batch_shape = torch.Size(batch_shape)
        if torch.broadcast_shapes(context_batch, batch_shape) != batch_shape:
            raise ValueError(
                f"MultiscaleFlowDistribution: the context's batch shape {tuple(context_batch)} "
                f"does not broadcast to batch_shape {tuple(batch_shape)}"
            )
        self.model = model
        self.context = context
        self.temperature = float(temperature)
        super().__init__(batch_shape, torch.Size(model.event_shape), validate_args=validate_args)

    # ------------------------------------------------------------- variants
    def condition(self, context: Tensor) -> "MultiscaleFlowDistribution":
        """The distribution given ``context`` (shape ``(*batch, K)``), sharing the model."""
        return type(self)(self.model, context, self.temperature, validate_args=self._validate_args)

    def with_temperature(self, temperature: float) -> "MultiscaleFlowDistribution":
        """The same distribution sampling at temperature ``T`` by default."""
        return type(self)(
            self.model, self.context, temperature, self.batch_shape, self._validate_args
        )

    def expand(self, batch_shape, _instance=None) -> "MultiscaleFlowDistribution":
        return type(self)(
            self.model, self.context, self.temperature, torch.Size(batch_shape), self._validate_args
        )

    # -------------------------------------------------------------- density
    def _context_for(self, batch: torch.Size, what: str) -> Optional[Tensor]:
        k = self.model.context_features
        if k is None:
            return None
        if self.context is None:
            raise ValueError(
                f"MultiscaleFlowDistribution.{what}: the model is conditional "
                f"(context_features={k}); bind a context with .condition(context) first"
            )
        return self.context.expand(*batch, k)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        event = self.event_shape
        batch = torch.broadcast_shapes(value.shape[:-3], self.batch_shape)
        context = self._context_for(batch, "log_prob")
        return self.model.log_prob(value.expand(*batch, *event), context)

    def rsample(self, sample_shape=torch.Size(), temperature: Optional[float] = None) -> Tensor:
        """``x = decode(T·eps)`` with ``eps ~ N(0, I)``; differentiable in the parameters."""
        temperature = self.temperature if temperature is None else float(temperature)
        if not temperature >= 0:
            raise ValueError(
                f"MultiscaleFlowDistribution.rsample: temperature must be >= 0; got {temperature!r}"
            )
        shape = self._extended_shape(torch.Size(sample_shape))
        batch = shape[:-3]
        context = self._context_for(batch, "rsample")
        anchor = self.model._anchor
        eps = torch.randn(shape, dtype=anchor.dtype, device=anchor.device)
        return self.model.decode(eps * temperature, context)

    def sample(self, sample_shape=torch.Size(), temperature: Optional[float] = None) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, temperature)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(event_shape={tuple(self.event_shape)}, "
            f"batch_shape={tuple(self.batch_shape)}, temperature={self.temperature}, "
            f"conditional={self.model.context_features is not None})"
        )
