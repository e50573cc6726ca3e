"""The torch-backend multi-scale flow model (RealNVP / Glow) built by :mod:`flowplugins.composer`."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import base as _base
from ..base import Bijector, EventShape
from ..bijectors.actnorm import ActNorm, _distributed_active
from ..bijectors.conv1x1 import LUInvertibleConv1x1, apply_channel_matrix
from ..derived_cache import derive_all
from ..eager_random import standard_normal
from .glow_steps import find_glow_step_runs

__all__ = ["Center", "MultiscaleFlow"]


class Center(Bijector):
    """Shift data in ``[0, 1)`` to ``[-½, ½)``: ``z = x - shift`` (Glow's preprocessing).

    Volume preserving, so ``log|det J| = 0`` and bits/dim are unchanged.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        shift: the constant subtracted (0.5 maps ``[0, 1)`` to ``[-½, ½)``).

    References:
        Kingma & Dhariwal, Glow, arXiv:1807.03039 (reference code's ``preprocess``).

    Example:
        >>> import torch
        >>> z, ld = Center((1, 1, 2))(torch.tensor([[[[0.0, 0.75]]]]))
        >>> z.flatten().tolist(), ld.tolist()
        ([-0.5, 0.25], [0.0])
    """

    def __init__(self, event_shape: Sequence[int], shift: float = 0.5) -> None:
        super().__init__(event_shape)
        self.shift = float(shift)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return x - self.shift, x.new_zeros(x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return z + self.shift, z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, shift={self.shift}"


def _fusable_pairs(steps: Sequence[Bijector]) -> frozenset:
    """Indices ``i`` where ``steps[i]`` is an :class:`ActNorm` directly followed by an
    :class:`LUInvertibleConv1x1` on the same shape (exact types: a subclass may change either
    map, so it is never fused)."""
    return frozenset(
        i
        for i in range(len(steps) - 1)
        if type(steps[i]) is ActNorm
        and type(steps[i + 1]) is LUInvertibleConv1x1
        and tuple(steps[i].event_shape) == tuple(steps[i + 1].event_shape)
    )


def _can_fuse(actnorm: ActNorm, conv: LUInvertibleConv1x1) -> bool:
    """Fusing skips the two layers' own ``forward``/``inverse``: only when nothing would
    observe the difference (no check_finite mode, no module hooks) and ActNorm has nothing to
    initialise."""
    return (
        # The pair was found at build time; a step assigned to the ModuleList since may differ.
        type(actnorm) is ActNorm
        and type(conv) is LUInvertibleConv1x1
        and not actnorm.awaits_initialization()
        and not _base.calls_are_observed(actnorm, conv)
    )


def _fused_actnorm_conv(actnorm: ActNorm, conv: LUInvertibleConv1x1, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``conv(actnorm(x))`` as one batched matmul: ``z = (W·diag(exp(log_scale))) (x + shift)``.

    Returns ``z`` and the summed log-det as a scalar (it is the same for every sample):
    ``H·W·(Σ log_scale + Σ log_abs_s)``. ``x + shift`` stays a separate add so that a constant
    channel still cancels exactly (see :class:`ActNorm`).
    """
    actnorm.check_input(x, actnorm.event_shape, "forward")
    conv.check_input(x, conv.event_shape, "forward")
    _, h, w = conv.event_shape
    weight = conv._get("weight", conv._build_weight) * actnorm.log_scale.exp().view(1, -1)
    z = apply_channel_matrix(weight, x + actnorm.shift)
    ld = (actnorm.log_scale.sum() + conv._get("logabsdet", conv._build_logabsdet)) * (h * w)
    return z, ld


def _fused_conv_actnorm_inverse(
    actnorm: ActNorm, conv: LUInvertibleConv1x1, z: Tensor, inverse_weight: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``actnorm.inverse(conv.inverse(z))`` as one batched matmul with a bias:
    ``x = (diag(exp(-log_scale))·W⁻¹) z - shift``; the log-det is returned as a scalar.
    ``inverse_weight`` is the conv's ``W⁻¹`` where the caller has it already."""
    conv.check_input(z, conv.event_shape, "inverse")
    actnorm.check_input(z, actnorm.event_shape, "inverse")
    _, h, w = conv.event_shape
    c = conv.event_shape[0]
    if inverse_weight is None:
        inverse_weight = conv._get("inverse", conv._build_inverse_weight)
    weight = inverse_weight * torch.exp(-actnorm.log_scale).view(c, 1)
    x = apply_channel_matrix(weight, z, -actnorm.shift.view(c))
    ld = (actnorm.log_scale.sum() + conv._get("logabsdet", conv._build_logabsdet)) * (-(h * w))
    return x, ld


def _total_log_det(per_sample: List[Tensor], constant: Optional[Tensor], n: int, like: Tensor) -> Tensor:
    """Σ of the steps' log-dets: one stack-and-sum instead of an add per step (fewer autograd
    nodes), plus the batch-independent part of fused steps, added once."""
    if per_sample:
        total = per_sample[0] if len(per_sample) == 1 else torch.stack(per_sample).sum(0)
        return total if constant is None else total + constant
    if constant is None:
        return like.new_zeros(n)
    return constant.expand(n)


def _actnorms_await_initialization(model: nn.Module) -> bool:
    """Whether a training-mode ActNorm of ``model`` is not known to be initialised.

    Reads ActNorm's Python flag only: reading its ``initialized`` buffer would be a
    data-dependent branch, which Dynamo cannot trace. A flag still false after a state-dict
    load just costs one eager pass that initialises nothing.
    """
    return any(isinstance(m, ActNorm) and m.awaits_initialization() for m in model.modules())


def _initializes_outside_the_graph(model: "MultiscaleFlow") -> bool:
    """Whether a traced training pass must initialise its ActNorms in an eager pass first.

    Only where ActNorm cannot initialise inside the graph: under ``torch.distributed`` its
    statistics take an all-reduce, and memory saving's segments are chosen by which steps are
    initialised. Elsewhere ActNorm initialises in the traced graph (see
    :meth:`ActNorm._initialize_in_graph`): a graph break here would stay in the compiled code of
    every caller's frame after initialisation, and a compiled step then ran three graphs per
    call instead of one (train step 2% slower at 1×8×8: 14.2 against 13.9 ms, medians of 8
    interleaved rounds in one process).
    """
    return (model.memory_saving or _distributed_active()) and _actnorms_await_initialization(model)


@torch.compiler.disable
def _initialize_actnorms_eagerly(model: "MultiscaleFlow", x: Tensor, context: Optional[Tensor]) -> None:
    """One eager, no-grad pass of ``model`` over ``x``, outside any compiled graph: every
    ActNorm that still needs it initialises itself, in order, from the activations that reach
    it (exactly what the training pass would do).

    Under ``torch.compile`` a data-dependent initialisation inside the traced pass splits the
    graph deep in the model, and those pieces stay cached after initialisation: a compiled
    train step was then slower than eager. Initialising first, in one break at the top of the
    pass, lets the graph traced next be the initialised model's, whole.
    """
    with torch.no_grad():
        model._encode_parts(x, context)


def _wants_context(step: nn.Module) -> bool:
    # The convention of every built-in: a layer built with context_features=K uses the
    # context, one built without refuses it.
    return getattr(step, "context_features", None) is not None


class MultiscaleFlow(nn.Module):
    """A multi-scale normalizing flow over images with a standard-normal base.

    The model is a list of levels, each a list of bijectors in data → latent order. After every
    level but the last, the first ``ceil(C/2)`` channels of its output (the half
    ``torch.chunk(h, 2, dim=1)`` returns first, the half ``split2d_prior`` standardises) are
    factored out as latents and the other ``C//2`` go on to the next level; the last level's
    whole output is the top latent. Every prior (split2d, learned top prior) is a bijector, so
    every latent is ``N(0, I)``::

        log p(x) = Σ_steps log|det J_step| + Σ_latents log N(z_ℓ; 0, I)

        x ─ level 1 ─┬─ z_1 (factored out)
                     └─ level 2 ─┬─ z_2
                                 └─ … ─ level L ─ z_L

    Latent layout of :meth:`encode` / :meth:`decode`: the latents ``z_1, …, z_L`` each
    flattened (C, H, W order) and concatenated in that order, then reshaped to ``x``'s shape.
    It is the layout of nflows' ``MultiscaleCompositeTransform`` (unflattened), so both
    backends give the same latent for the same image.

    A step receives the context when it was built with ``context_features`` (it exposes a
    non-``None`` ``context_features`` attribute, as the built-in priors and couplings do); the
    others are called without one.

    Speed: an :class:`~flowplugins.bijectors.actnorm.ActNorm` directly followed by an
    :class:`~flowplugins.bijectors.conv1x1.LUInvertibleConv1x1` runs as one batched matmul by
    ``W·diag(exp(log_scale))`` in both directions, with the pair's log-det (the same for every
    sample) added once; the steps, their parameters and the state dict are unchanged. The pair
    runs unfused while ActNorm still has to initialise, inside ``check_finite`` and when either
    layer has forward hooks.

    Runs of whole Glow steps (``ActNorm → LUInvertibleConv1x1 → AffineCoupling`` or
    ``AdditiveCoupling``) go further: they run fused as described in
    :mod:`flowplugins.models.glow_steps` (batched matrices, two autograd nodes per step besides
    the coupling net, cached matrices in eval mode, no log-det when sampling). Set the
    attribute ``fuse_glow_steps = False`` to run them step by step (same results up to
    floating-point round-off; useful to compare or debug).

    Train/eval: the steps' modes are the model's. ActNorm initialises from the first training
    batch it sees, batch norm uses batch statistics in training mode. :meth:`sample` runs in
    eval mode (restoring the mode afterwards); :meth:`decode` and :meth:`encode` use the
    current mode.

    Shapes:
        x: (..., C, H, W), context: (..., K) -> log_prob: (...)

    Args:
        levels: the bijectors of each level, data → latent; each bijector's ``event_shape`` must
            be the previous one's ``output_event_shape()`` (after a split: ``C//2`` channels).
        context_features: size ``K`` of the context vector of a conditional model, or ``None``.
        memory_saving: recompute activations from outputs during backward
            (:func:`flowplugins.memory_saving.memory_saving_forward`) instead of storing them.

    Raises:
        ValueError: if ``levels`` is empty, a level is empty, shapes do not chain, a split
            level's output has fewer than 2 channels, or ``context_features`` is given but no
            step uses a context.

    Example:
        >>> import torch, flowplugins
        >>> sq = flowplugins.build("squeeze", (1, 4, 4))
        >>> a = flowplugins.build("affine_coupling", (4, 2, 2), hidden=8)
        >>> top = flowplugins.build("actnorm", (2, 2, 2))
        >>> model = MultiscaleFlow([[sq, a], [top]])
        >>> x = torch.rand(3, 1, 4, 4)
        >>> model.log_prob(x).shape, model.latent_shapes
        (torch.Size([3]), [(2, 2, 2), (2, 2, 2)])
        >>> torch.allclose(model.decode(model.encode(x)), x, atol=1e-6)
        True
    """

    def __init__(
        self,
        levels: Sequence[Sequence[Bijector]],
        context_features: Optional[int] = None,
        memory_saving: bool = False,
    ) -> None:
        super().__init__()
        if len(levels) == 0:
            raise ValueError("MultiscaleFlow: needs at least one level; got none")
        steps: List[Bijector] = []
        bounds: List[Tuple[int, int]] = []
        split_channels = {}
        latent_shapes: List[EventShape] = []
        shape: Optional[EventShape] = None
        for index, level in enumerate(levels):
            if len(level) == 0:
                raise ValueError(f"MultiscaleFlow: level {index} has no bijectors")
            start = len(steps)
            for step in level:
                if not isinstance(step, Bijector):
                    raise TypeError(
                        f"MultiscaleFlow: level {index} holds a {type(step).__name__}, not a "
                        f"flowplugins.Bijector"
                    )
                if shape is not None and tuple(step.event_shape) != tuple(shape):
                    raise ValueError(
                        f"MultiscaleFlow: {type(step).__name__} (level {index}) takes event shape "
                        f"{tuple(step.event_shape)} but the previous step outputs {tuple(shape)}"
                    )
                steps.append(step)
                shape = tuple(step.output_event_shape())
            bounds.append((start, len(steps)))
            if index < len(levels) - 1:
                c, h, w = shape
                if c < 2:
                    raise ValueError(
                        f"MultiscaleFlow: level {index} must output at least 2 channels to factor "
                        f"half out; got {shape}"
                    )
                factored = c - c // 2  # torch.chunk(h, 2, dim=1)'s first chunk
                split_channels[len(steps) - 1] = factored
                latent_shapes.append((factored, h, w))
                shape = (c // 2, h, w)
        latent_shapes.append(shape)

        self.steps = nn.ModuleList(steps)
        self.level_bounds: Tuple[Tuple[int, int], ...] = tuple(bounds)
        self.event_shape: EventShape = tuple(steps[0].event_shape)
        self.latent_shapes: List[EventShape] = latent_shapes
        self.context_features = context_features
        self.memory_saving = bool(memory_saving)
        self._split_channels = split_channels
        self._latent_sizes = [math.prod(s) for s in latent_shapes]
        self._wants_context = tuple(_wants_context(s) for s in steps)
        # ActNorm → LU 1x1 conv pairs run as one matmul (see _fused_actnorm_conv); the
        # fusion only changes how the pair is computed, never the steps or the state dict.
        self._fusable = _fusable_pairs(steps)
        self._fusable_ordered = tuple(sorted(self._fusable))
        # Runs of whole Glow steps (ActNorm → LU conv → coupling) go further: see glow_steps.
        self._glow_runs = find_glow_step_runs(steps, bounds)
        self._run_starting_at = {run.start: run for run in self._glow_runs}
        self._run_ending_at = {run.stop - 1: run for run in self._glow_runs}
        self.fuse_glow_steps = True
        self._numel = math.prod(self.event_shape)
        self._log_z = 0.5 * self._numel * math.log(2.0 * math.pi)
        if context_features is not None and not any(self._wants_context):
            raise ValueError(
                f"MultiscaleFlow: context_features={context_features} but no step was built with "
                f"context_features, so the context would be ignored"
            )
        # Tracks the model's dtype and device for sampling, even without parameters.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    # ------------------------------------------------------------------ helpers
    @property
    def event_numel(self) -> int:
        """``C·H·W``, the number of dimensions ``D``."""
        return self._numel

    def _flatten(self, x: Tensor, context: Optional[Tensor], what: str):
        name = f"{type(self).__name__}.{what}"
        if x.dim() < 3 or tuple(x.shape[-3:]) != self.event_shape:
            raise ValueError(
                f"{name}: expected input of shape (..., {', '.join(map(str, self.event_shape))}); "
                f"got {tuple(x.shape)}"
            )
        batch = x.shape[:-3]
        flat = x.reshape(-1, *self.event_shape)
        if self.context_features is None:
            if context is not None:
                raise ValueError(
                    f"{name}: got a context of shape {tuple(context.shape)} but the model was built "
                    f"with context_features=None"
                )
            return batch, flat, None
        if context is None:
            raise ValueError(
                f"{name}: the model was built with context_features={self.context_features} and "
                f"needs a context of shape (..., {self.context_features}); got none"
            )
        if tuple(context.shape) != (*batch, self.context_features):
            raise ValueError(
                f"{name}: expected a context of shape {(*batch, self.context_features)} for input "
                f"of shape {tuple(x.shape)}; got {tuple(context.shape)}"
            )
        return batch, flat, context.reshape(-1, self.context_features)

    def _encode_parts(self, x: Tensor, context: Optional[Tensor]) -> Tuple[List[Tensor], Tensor]:
        """Flat batch ``x`` → the latents ``[z_1, …, z_L]`` and the total log-det."""
        if self.training and _base.is_compiling() and _initializes_outside_the_graph(self):
            _initialize_actnorms_eagerly(self, x, context)
        if self.memory_saving and torch.is_grad_enabled():
            return self._encode_parts_memory_saving(x, context)
        parts: List[Tensor] = []
        per_sample: List[Tensor] = []
        constant: Optional[Tensor] = None
        h = x
        wants = self._wants_context
        splits = self._split_channels
        fusable = self._fusable
        steps = self.steps
        runs = self._run_starting_at if self.fuse_glow_steps else {}
        i, n_steps = 0, len(steps)
        while i < n_steps:
            step = steps[i]
            run = runs.get(i)
            if run is not None and run.can_fuse(steps._modules):
                h, lds, ld = run.forward(h, context)
                per_sample.extend(lds)
                constant = ld if constant is None else constant + ld
                i = run.stop - 1
            elif i in fusable and _can_fuse(step, steps[i + 1]):
                h, ld = _fused_actnorm_conv(step, steps[i + 1], h)
                constant = ld if constant is None else constant + ld
                i += 1  # the conv ran too
            else:
                h, ld = step(h, context if wants[i] else None)
                per_sample.append(ld)
            if i in splits:
                parts.append(h[:, : splits[i]])
                h = h[:, splits[i]:]
            i += 1
        parts.append(h)
        return parts, _total_log_det(per_sample, constant, x.shape[0], x)

    def _encode_parts_memory_saving(
        self, x: Tensor, context: Optional[Tensor]
    ) -> Tuple[List[Tensor], Tensor]:
        from ..memory_saving import memory_saving_forward

        parts: List[Tensor] = []
        logabsdet: Optional[Tensor] = None
        h = x
        steps = list(self.steps)
        for start, stop in self.level_bounds:
            # memory_saving_forward hands its context to every step, so a level runs as runs
            # of steps that all take the context or all refuse it.
            i = start
            while i < stop:
                wants = self._wants_context[i]
                j = i
                while j < stop and self._wants_context[j] == wants:
                    j += 1
                h, ld = memory_saving_forward(steps[i:j], h, context if wants else None)
                logabsdet = ld if logabsdet is None else logabsdet + ld
                i = j
            if stop - 1 in self._split_channels:
                c = self._split_channels[stop - 1]
                parts.append(h[:, :c])
                h = h[:, c:]
        parts.append(h)
        return parts, logabsdet

    def _decode_parts(
        self, parts: Sequence[Tensor], context: Optional[Tensor], with_log_det: bool = True
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Latents ``[z_1, …, z_L]`` → flat batch ``x`` and the log-det of latent → data
        (``None`` when ``with_log_det`` is false, which lets fused runs skip computing it)."""
        steps = self.steps
        runs = self._run_ending_at if self.fuse_glow_steps else {}
        wants = self._wants_context
        splits = self._split_channels
        fusable = self._fusable
        inverse_weights = self._compiled_inverse_weights() if _base.is_compiling() else {}
        h = parts[-1]
        j = len(parts) - 2
        per_sample: List[Tensor] = []
        constant: Optional[Tensor] = None
        i = len(steps) - 1
        while i >= 0:
            if i in splits:
                h = torch.cat([parts[j], h], dim=1)
                j -= 1
            run = runs.get(i)
            if run is not None and run.can_fuse(steps._modules):
                h, lds, ld = run.inverse(h, context, with_log_det)
                if with_log_det:
                    per_sample.extend(lds)
                    constant = ld if constant is None else constant + ld
                i = run.start
            elif i - 1 in fusable and _can_fuse(steps[i - 1], steps[i]):
                h, ld = _fused_conv_actnorm_inverse(steps[i - 1], steps[i], h, inverse_weights.get(i))
                constant = ld if constant is None else constant + ld
                i -= 1  # the ActNorm ran too
            else:
                h, ld = steps[i].inverse(h, context if wants[i] else None)
                per_sample.append(ld)
            i -= 1
        # Fused runs may hand back a channel-major view; callers get a contiguous batch.
        h = h.contiguous()
        if not with_log_det:
            return h, None
        return h, _total_log_det(per_sample, constant, h.shape[0], h)

    def _compiled_inverse_weights(self) -> Dict[int, Tensor]:
        """While ``torch.compile`` traces a decode: ``W⁻¹`` of every fused pair's LU conv that
        may use its eval-mode cache, by step index, from one operator call
        (:func:`~flowplugins.derived_cache.derive_all`). Per conv, the calls out of the graph
        cost more than the two triangular solves they save."""
        steps = self.steps
        convs = [
            i + 1 for i in self._fusable_ordered
            if _can_fuse(steps[i], steps[i + 1]) and steps[i + 1]._use_cache()
        ]
        values = derive_all([
            (steps[j]._derived, steps[j]._derivations["inverse"], steps[j]._derivation_sources())
            for j in convs
        ])
        return dict(zip(convs, values))

    def _split_latent(self, z_flat: Tensor) -> List[Tensor]:
        n = z_flat.shape[0]
        return [
            piece.reshape(n, *shape)
            for piece, shape in zip(z_flat.split(self._latent_sizes, dim=1), self.latent_shapes)
        ]

    # ---------------------------------------------------------------- public API
    def log_prob(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """``log p(x | context)`` in nats, the density of ``x`` on the data scale.

        Shapes:
            x: (..., C, H, W), context: (..., K) -> (...)

        Raises:
            ValueError: if ``x`` has the wrong event shape or the context does not fit
                ``context_features``.
        """
        batch, flat, ctx = self._flatten(x, context, "log_prob")
        parts, logabsdet = self._encode_parts(flat, ctx)
        energy = parts[0].square().sum((1, 2, 3))
        for z in parts[1:]:
            energy = energy + z.square().sum((1, 2, 3))
        return (logabsdet - 0.5 * energy - self._log_z).reshape(batch)

    forward = log_prob

    def bits_per_dim(
        self, x: Tensor, context: Optional[Tensor] = None, n_levels: int = 256
    ) -> Tensor:
        """Bits per dimension of the discrete data that ``x`` dequantises.

        For ``x = (k + u) / n_levels`` with integer ``k`` and ``u ~ U[0, 1)``,
        ``bpd = (-log p(x) + D·log n_levels) / (D·log 2)``, an upper bound on the discrete
        model's bits/dim (uniform on ``[0, 1)`` gives ``log2(n_levels)``).

        Shapes:
            x: (..., C, H, W), context: (..., K) -> (...)

        Raises:
            ValueError: if ``n_levels < 2``, or as :meth:`log_prob`.
        """
        if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 2:
            raise ValueError(
                f"{type(self).__name__}.bits_per_dim: n_levels must be an integer >= 2; "
                f"got {n_levels!r}"
            )
        d = self._numel
        return (d * math.log(n_levels) - self.log_prob(x, context)) / (d * math.log(2.0))

    def encode_with_log_det(
        self, x: Tensor, context: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """``(z, log|det ∂z/∂x|)`` with ``z`` in the layout of :meth:`encode`."""
        batch, flat, ctx = self._flatten(x, context, "encode")
        parts, logabsdet = self._encode_parts(flat, ctx)
        n = flat.shape[0]
        z = torch.cat([p.reshape(n, -1) for p in parts], dim=1)
        return z.reshape(x.shape), logabsdet.reshape(batch)

    def encode(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Map data to the concatenated latents, reshaped to ``x``'s shape (see the class
        docstring for the layout).

        Shapes:
            x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W)
        """
        return self.encode_with_log_det(x, context)[0]

    def decode_with_log_det(
        self, z: Tensor, context: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """``(x, log|det ∂x/∂z|)``, the exact inverse of :meth:`encode_with_log_det`."""
        batch, flat, ctx = self._flatten(z, context, "decode")
        x, logabsdet = self._decode_parts(self._split_latent(flat.reshape(flat.shape[0], -1)), ctx)
        return x.reshape(z.shape), logabsdet.reshape(batch)

    def decode(self, z: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """Map latents in the layout of :meth:`encode` back to data (exact inverse).

        Shapes:
            z: (..., C, H, W), context: (..., K) -> x: (..., C, H, W)
        """
        return self.decode_with_log_det(z, context)[0]

    def sample(
        self, n: int, temperature: float = 1.0, context: Optional[Tensor] = None
    ) -> Tensor:
        """Draw ``n`` images: ``z ~ N(0, T²·I)`` decoded through the exact inverse (Glow §5).

        Runs in eval mode (the model's mode is restored afterwards) and without gradients.
        The result is clamped to ``[0, 1]``, the data range; use :meth:`decode` for the
        unclamped inverse.

        Shapes:
            context: (n, K) or (K,) -> x: (n, C, H, W)

        Args:
            n: number of images.
            temperature: ``T >= 0``; 1 samples the model, lower values trade diversity for
                fidelity.
            context: the condition of a conditional model, per image or one for all.

        Raises:
            ValueError: if ``n < 1``, ``temperature < 0`` or the context does not fit.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{type(self).__name__}.sample: n must be a positive integer; got {n!r}")
        if not temperature >= 0:
            raise ValueError(
                f"{type(self).__name__}.sample: temperature must be >= 0; got {temperature!r}"
            )
        if context is not None and context.dim() == 1:
            context = context.expand(n, -1)
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.no_grad():
                anchor = self._anchor
                z = standard_normal((n, *self.event_shape), anchor)
                if temperature != 1.0:
                    z.mul_(temperature)
                _, flat, ctx = self._flatten(z, context, "sample")
                x, _ = self._decode_parts(
                    self._split_latent(flat.reshape(n, -1)), ctx, with_log_det=False
                )
        finally:
            if was_training:
                self.train()
        return x.clamp_(0.0, 1.0)

    def train(self, mode: bool = True):
        # Fused runs cache their matrices in eval mode; a mode switch starts afresh, as the
        # LU conv's own cache does.
        for run in self._glow_runs:
            run.clear_cache()
        return super().train(mode)

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, levels={len(self.level_bounds)}, "
            f"latent_shapes={self.latent_shapes}, context_features={self.context_features}"
        )
