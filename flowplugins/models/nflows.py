"""nflows view of a :class:`~flowplugins.models.MultiscaleFlow`: an ``nflows.flows.Flow``."""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ..backends.nflows import NflowsTransform
from .multiscale import MultiscaleFlow

try:
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform, MultiscaleCompositeTransform
except ImportError as err:  # pragma: no cover - exercised only without nflows installed
    raise ImportError(
        "the nflows backend of flowplugins needs nflows; install it with `pip install 'nflows>=0.14'`"
    ) from err

__all__ = ["nflows_flow"]


class _ContextFreeTransform(NflowsTransform):
    """An :class:`NflowsTransform` whose bijector was built without a context: nflows hands
    every transform the flow's context, this one does not pass it on."""

    def forward(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.bijector.forward(inputs)

    def inverse(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.bijector.inverse(inputs)


def nflows_flow(model: MultiscaleFlow) -> Flow:
    """An ``nflows.flows.Flow`` over the same bijector modules as ``model`` (shared parameters).

    The transform is an ``nflows.transforms.MultiscaleCompositeTransform`` with one
    ``CompositeTransform`` per level, each bijector wrapped as an
    :class:`~flowplugins.backends.nflows.NflowsTransform`; a level's split prior is its last
    transform, and nflows factors out the first ``torch.chunk`` half, the half that prior
    standardises. Output shapes come from the bijectors' ``output_event_shape()``. The base is
    nflows' ``StandardNormal`` of size ``C·H·W``, and the flattened latent is the layout of
    :meth:`MultiscaleFlow.encode`. A conditional model takes its context through nflows'
    ``context`` argument (``flow.log_prob(x, context=y)``); steps built without
    ``context_features`` do not receive it.

    Shapes:
        x: (N, C, H, W), context: (N, K) -> flow.log_prob: (N,);
        flow.sample(n) -> (n, C, H, W); flow.sample(n, context) -> (N, n, C, H, W)

    Args:
        model: the torch-backend model.

    Raises:
        TypeError: if ``model`` is not a :class:`MultiscaleFlow`.

    Example:
        >>> import torch
        >>> from flowplugins.composer import glow
        >>> flow = nflows_flow(glow((1, 4, 4), levels=2, depth=1, hidden=8))
        >>> flow.log_prob(torch.rand(3, 1, 4, 4)).shape
        torch.Size([3])
    """
    if not isinstance(model, MultiscaleFlow):
        raise TypeError(f"nflows_flow: expected a MultiscaleFlow; got {type(model).__name__}")
    transform = MultiscaleCompositeTransform(len(model.level_bounds), split_dim=1)
    for start, stop in model.level_bounds:
        level = [
            (NflowsTransform if model._wants_context[i] else _ContextFreeTransform)(model.steps[i])
            for i in range(start, stop)
        ]
        transform.add_transform(
            CompositeTransform(level), tuple(model.steps[stop - 1].output_event_shape())
        )
    return Flow(transform, StandardNormal([model.event_numel]))
