"""nflows view of a :class:`~flowplugins.models.MultiscaleFlow`: an ``nflows.flows.Flow``."""

from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from ..backends.nflows import NflowsTransform
from .glow_steps import GlowStepRun
from .multiscale import MultiscaleFlow, _total_log_det

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


class _GlowStepRunTransform(CompositeTransform):
    """A run of Glow steps (see :mod:`flowplugins.models.glow_steps`) as an nflows
    ``CompositeTransform`` of its steps' transforms, computed fused whenever the torch model
    would fuse it (same modules, same results up to round-off), step by step otherwise.

    Shapes:
        inputs: (N, C, H, W), context: (N, K) -> outputs: (N, C, H, W); logabsdet: (N,)
    """

    def __init__(self, model: MultiscaleFlow, run: GlowStepRun, transforms: List[NflowsTransform]) -> None:
        super().__init__(transforms)
        # The model only answers "may this run fuse now?"; not a submodule (its parameters
        # are already this transform's through the steps).
        object.__setattr__(self, "_model", model)
        self._run = run

    def _fusable(self, inputs: Tensor) -> bool:
        model = self._model
        return inputs.dim() == 4 and model.fuse_glow_steps and self._run.can_fuse(model.steps._modules)

    def forward(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if not self._fusable(inputs):
            return super().forward(inputs, context)
        run = self._run
        z, per_sample, constant = run.forward(inputs, context if any(run.wants_context) else None)
        return z, _total_log_det(per_sample, constant, inputs.shape[0], inputs)

    def inverse(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if not self._fusable(inputs):
            return super().inverse(inputs, context)
        run = self._run
        x, per_sample, constant = run.inverse(
            inputs, context if any(run.wants_context) else None, with_log_det=True
        )
        return x.contiguous(), _total_log_det(per_sample, constant, inputs.shape[0], inputs)


def nflows_flow(model: MultiscaleFlow) -> Flow:
    """An ``nflows.flows.Flow`` over the same bijector modules as ``model`` (shared parameters).

    The transform is an ``nflows.transforms.MultiscaleCompositeTransform`` with one
    ``CompositeTransform`` per level, each bijector wrapped as an
    :class:`~flowplugins.backends.nflows.NflowsTransform` (a run of Glow steps grouped in one
    ``CompositeTransform`` that runs fused like the torch model); a level's split prior is its last
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

    def wrap(i: int) -> NflowsTransform:
        return (NflowsTransform if model._wants_context[i] else _ContextFreeTransform)(model.steps[i])

    for start, stop in model.level_bounds:
        level = []
        i = start
        while i < stop:
            run = model._run_starting_at.get(i)
            if run is None:
                level.append(wrap(i))
                i += 1
            else:
                level.append(_GlowStepRunTransform(model, run, [wrap(j) for j in range(run.start, run.stop)]))
                i = run.stop
        transform.add_transform(
            CompositeTransform(level), tuple(model.steps[stop - 1].output_event_shape())
        )
    return Flow(transform, StandardNormal([model.event_numel]))
