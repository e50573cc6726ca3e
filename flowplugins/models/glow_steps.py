"""Fused execution of runs of Glow steps ``ActNorm → LU 1x1 conv → channel coupling``.

A Glow level is K identical steps. Run one bijector at a time, each step costs dozens of small
tensor operations and autograd nodes besides its coupling net, which on small images costs as
much as the net itself. :class:`GlowStepRun` computes the same K steps with far fewer:

* the K fused channel matrices ``W_k·diag(exp(log_scale_k))`` (ActNorm folded into the LU
  conv) are built in one batched computation per run, and their log-dets summed once: the
  pair's log-det ``H·W·(Σ log_scale + Σ log_abs_s)`` does not depend on the sample;
* per step, the ActNorm shift and the channel mix run as one autograd node
  (:class:`_MixChannels`, one batched matmul whose output halves are the coupling's two
  inputs), and the affine coupling's element-wise part as another (:class:`_AffineCouple`),
  both with handwritten backward passes;
* in eval mode without autograd recording, the fused matrices and their inverses are cached
  per run and rebuilt only when a parameter or buffer changes
  (:class:`~flowplugins.derived_cache.DerivedTensorCache`, as the LU conv's own cache);
* without autograd (sampling, evaluation) the inverse runs channel-major, one ``addmm`` per
  step with the coupling's inverse written in place, and sampling skips the log-det
  (:meth:`GlowStepRun.inverse` with ``with_log_det=False``).

The fused path is the same function of the same parameters: the steps, their parameters and
the state dict are untouched, and ``tests/test_glow_steps.py`` compares outputs, log-dets,
first and second derivatives with the step-by-step path.
:class:`~flowplugins.models.multiscale.MultiscaleFlow` falls back to the step-by-step path
whenever something could observe the difference (see :meth:`GlowStepRun.can_fuse`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import base as _base
from ..bijectors.actnorm import ActNorm
from ..bijectors.conv1x1 import LUInvertibleConv1x1
from ..bijectors.coupling import AdditiveCoupling, AffineCoupling, _scale_floor
from ..derived_cache import DerivedTensorCache

__all__ = ["GlowStepRun", "find_glow_step_runs"]

_COUPLINGS = (AffineCoupling, AdditiveCoupling)


def _functorch_active() -> bool:
    # The fused Functions are old-style (see _MixChannels); torch.func transforms refuse those.
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def find_glow_step_runs(
    steps: Sequence[nn.Module], level_bounds: Sequence[Tuple[int, int]], min_steps: int = 1
) -> List["GlowStepRun"]:
    """Maximal runs of consecutive ``(ActNorm, LUInvertibleConv1x1, coupling)`` triples
    within a level, all on one event shape.

    Exact types only: a subclass may change any of the three maps, so it is never fused.
    """
    runs: List[GlowStepRun] = []
    for start, stop in level_bounds:
        i = start
        while i + 2 < stop:
            first = i
            while i + 2 < stop and _is_glow_step(steps[i], steps[i + 1], steps[i + 2]):
                if i > first and tuple(steps[i].event_shape) != tuple(steps[first].event_shape):
                    break
                i += 3
            if (i - first) // 3 >= min_steps:
                runs.append(GlowStepRun(steps, first, i))
            if i == first:
                i += 1
    return runs


def _is_glow_step(actnorm: nn.Module, conv: nn.Module, coupling: nn.Module) -> bool:
    return (
        type(actnorm) is ActNorm
        and type(conv) is LUInvertibleConv1x1
        and type(coupling) in _COUPLINGS
        and tuple(actnorm.event_shape) == tuple(conv.event_shape) == tuple(coupling.event_shape)
    )


class GlowStepRun:
    """K consecutive Glow steps of a :class:`MultiscaleFlow`, computed fused (see the module
    docstring). Holds no parameters of its own: it reads the steps' on every call.

    Data → latent, for each step ``k`` (with ``(y_a, y_b)`` the coupling's channel split)::

        y   = W_k · diag(exp(log_scale_k)) · (x + shift_k)      (ActNorm, then the LU conv)
        z   = (y_a, (y_b + t) · sigmoid(r + 2))  with (t, r) = NN_k(y_a)   (affine coupling)
        z   = (y_a, y_b + NN_k(y_a))                                       (additive coupling)

        log|det J| = H·W·Σ_k (Σ_c log_scale_k + Σ_c log_abs_s_k) + Σ_k Σ_{c,h,w} log s_k

    Shapes:
        x: (N, C, H, W), context: (N, K) or None -> z: (N, C, H, W); log-det: (N,)

    Args:
        steps: the model's step list.
        start, stop: the run is ``steps[start:stop]``, a multiple of three long.
    """

    def __init__(self, steps: Sequence[nn.Module], start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.actnorms: List[ActNorm] = list(steps[start:stop:3])
        self.convs: List[LUInvertibleConv1x1] = list(steps[start + 1:stop:3])
        self.couplings: List[nn.Module] = list(steps[start + 2:stop:3])
        c, h, w = self.actnorms[0].event_shape
        self.channels, self.pixels = c, h * w
        self.split = self.couplings[0].identity_channels
        self.affine = tuple(type(cp) is AffineCoupling for cp in self.couplings)
        self.wants_context = tuple(cp.context_features is not None for cp in self.couplings)
        self._derived = DerivedTensorCache()
        # (ModuleList key, module) of every layer, to notice a step replaced after building.
        self._members = tuple(
            (str(i), m) for i, m in zip(range(start, stop), steps[start:stop])
        )

    def __len__(self) -> int:
        return len(self.couplings)

    # ------------------------------------------------------------------ checks
    def can_fuse(self, modules: Optional[dict] = None) -> bool:
        """Whether fusing is unobservable now and worth it: no ``check_finite`` mode, no module
        hooks on the run's layers, no torch.func transform active, no ``torch.compile`` tracing
        (the step-by-step path traces as one graph, which the fused Functions' ``out=`` views
        would break), no ActNorm left to initialise from a training batch, and (given the
        model's ``steps._modules``) none of the run's layers replaced since the run was built."""
        if _functorch_active() or _base.is_compiling():
            return False
        if modules is not None and any(modules.get(k) is not m for k, m in self._members):
            return False
        if any(an.awaits_initialization() for an in self.actnorms):
            return False
        return not _base.calls_are_observed(*(m for _, m in self._members))

    def _check(self, x: Tensor, context: Optional[Tensor], direction: str) -> None:
        """The checks the layers' own ``forward``/``inverse`` would make, once per run."""
        self.actnorms[0].check_input(x, self.actnorms[0].event_shape, direction)
        if context is not None:
            for coupling, wants in zip(self.couplings, self.wants_context):
                if wants:
                    coupling._check_context(context, x, x.shape[:1], direction)
                    break

    # -------------------------------------------------------------- matrices
    def _tensors(self):
        for m in (*self.actnorms, *self.convs):
            yield from m._parameters.values()
            yield from m._buffers.values()

    def _use_cache(self) -> bool:
        if self.actnorms[0].training:
            return False
        if not torch.is_grad_enabled():
            return True
        return not any(t.requires_grad for t in self._tensors() if t is not None)

    def clear_cache(self) -> None:
        self._derived.clear()

    def _cached(self, name: str, build):
        if not self._use_cache():
            return build()
        return self._derived.get(name, build, (t for t in self._tensors() if t is not None))

    def _factors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Stacked ``P``, ``L``, ``U + diag(sign·exp(log_abs_s))``, ``log_abs_s`` and
        ActNorm ``log_scale``, each with a leading K dimension."""
        conv = self.convs[0]
        c = self.channels
        perms = torch.stack([cv.permutation for cv in self.convs])
        lower = torch.addcmul(conv._eye, torch.stack([cv.lower for cv in self.convs]), conv._strict_lower)
        log_abs_s = torch.stack([cv.log_abs_s for cv in self.convs])
        signs = torch.stack([cv.sign for cv in self.convs])
        diag = torch.diag_embed(signs * log_abs_s.exp())
        upper = torch.addcmul(diag, torch.stack([cv.upper for cv in self.convs]), conv._strict_upper)
        log_scale = torch.stack([an.log_scale.view(c) for an in self.actnorms])
        return conv._eye[perms], lower, upper, log_abs_s, log_scale

    def _build_forward(self) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
        perm, lower, upper, log_abs_s, log_scale = self._factors()
        weights = torch.bmm(perm, torch.bmm(lower, upper)) * log_scale.exp().unsqueeze(1)
        shifts = torch.stack([an.shift.view(self.channels) for an in self.actnorms])
        log_det = (log_scale.sum() + log_abs_s.sum()) * self.pixels
        return weights.unbind(0), shifts.unbind(0), log_det

    def _build_inverse(self) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...], Tensor]:
        perm, lower, upper, log_abs_s, log_scale = self._factors()
        # W⁻¹ = U⁻¹ L⁻¹ Pᵀ by two batched triangular solves, as LUInvertibleConv1x1 does.
        y = torch.linalg.solve_triangular(lower, perm.transpose(1, 2), upper=False, unitriangular=True)
        inverse = torch.linalg.solve_triangular(upper, y, upper=True)
        weights = inverse * torch.exp(-log_scale).unsqueeze(2)
        biases = torch.stack([an.shift.view(self.channels) for an in self.actnorms]).neg()
        log_det = (log_scale.sum() + log_abs_s.sum()) * self.pixels
        return weights.unbind(0), biases.unbind(0), log_det

    # ----------------------------------------------------------------- maps
    def forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, List[Tensor], Tensor]:
        """Data → latent through the K steps.

        Returns ``z``, the affine couplings' per-sample log-dets (a list of ``(N,)``) and the
        run's sample-independent log-det (a scalar).
        """
        self._check(x, context, "forward")
        weights, shifts, log_det = self._cached("forward", self._build_forward)
        split = self.split
        per_sample: List[Tensor] = []
        h = x
        for k, coupling in enumerate(self.couplings):
            y_a, y_b = _MixChannels.apply(h, weights[k], shifts[k], split)
            net_out = coupling._condition(y_a, context if self.wants_context[k] else None)
            if self.affine[k]:
                h, ld = _AffineCouple.apply(y_a, y_b, net_out)
                per_sample.append(ld)
            else:
                h = torch.cat([y_a, y_b + net_out], dim=1)
        return h, per_sample, log_det

    def inverse(
        self, z: Tensor, context: Optional[Tensor], with_log_det: bool = True
    ) -> Tuple[Tensor, List[Tensor], Optional[Tensor]]:
        """Latent → data through the K steps in reverse: the exact inverse of :meth:`forward`.

        Returns ``x``, the per-sample log-dets of latent → data (empty when ``with_log_det``
        is false) and the run's sample-independent log-det of latent → data (``None`` when
        ``with_log_det`` is false).
        """
        self._check(z, context, "inverse")
        weights, biases, log_det = self._cached("inverse", self._build_inverse)
        if not torch.is_grad_enabled():
            x, per_sample = self._inverse_no_grad(z, context, weights, biases, with_log_det)
            return x, per_sample, (-log_det if with_log_det else None)
        n, c, hh, ww = z.shape
        split, p = self.split, self.pixels
        per_sample: List[Tensor] = []
        x = z
        for k in range(len(self.couplings) - 1, -1, -1):
            coupling = self.couplings[k]
            z_a, z_b = x[:, :split], x[:, split:]
            net_out = coupling._condition(z_a, context if self.wants_context[k] else None)
            if not self.affine[k]:
                x_b = z_b - net_out
            else:
                scale, log_scale, shift = coupling._scale_and_shift(net_out)
                x_b = z_b / scale - shift
                if with_log_det:
                    per_sample.append(-log_scale.sum((1, 2, 3)))
            weight = weights[k]
            # W⁻¹ [z_a; x_b] = W⁻¹[:, :split] z_a + W⁻¹[:, split:] x_b: no concatenation.
            out = torch.baddbmm(
                biases[k].view(1, c, 1), weight[:, :split].expand(n, c, split), z_a.reshape(n, split, p)
            )
            out = out.baddbmm(weight[:, split:].expand(n, c, c - split), x_b.reshape(n, c - split, p))
            x = out.view(n, c, hh, ww)
        return x, per_sample, (-log_det if with_log_det else None)

    def _inverse_no_grad(
        self, z: Tensor, context: Optional[Tensor], weights, biases, with_log_det: bool
    ) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`inverse` when nothing needs a gradient (sampling, evaluation).

        Works channel-major: the state is ``(C, N, H, W)``, so each step's inverse channel mix
        is one matrix product ``W⁻¹ (C, N·H·W) + bias`` instead of N small ones, and the
        coupling's inverse is written in place into the state's second half.
        """
        n, c, hh, ww = z.shape
        split, cb = self.split, self.channels - self.split
        per_sample: List[Tensor] = []
        # A fresh buffer (never a view of z: with N = 1 the transpose is already contiguous),
        # since the steps write into it.
        state = torch.empty((c, n, hh, ww), dtype=z.dtype, device=z.device)
        state.copy_(z.transpose(0, 1))
        for k in range(len(self.couplings) - 1, -1, -1):
            coupling = self.couplings[k]
            net_out = coupling._condition(
                state[:split].transpose(0, 1), context if self.wants_context[k] else None
            )
            x_b = state[split:].transpose(0, 1)
            if self.affine[k]:
                shift, raw = net_out[:, :cb], net_out[:, cb:]
                scale = raw.add(2.0).clamp_min_(_scale_floor(raw.dtype)).sigmoid_()
                x_b.div_(scale).sub_(shift)
                if with_log_det:
                    per_sample.append(-torch.log(scale).sum((1, 2, 3)))
            else:
                x_b.sub_(net_out)
            state = torch.addmm(biases[k].view(c, 1), weights[k], state.view(c, -1)).view(c, n, hh, ww)
        return state.transpose(0, 1), per_sample


class _MixChannels(torch.autograd.Function):
    """``y = W (x + shift)`` at every pixel, returned as the halves ``(y[:, :split], y[:, split:])``
    (views of one batched matmul's output).

    Saves only its inputs (``x + shift`` is recomputed in backward), so ``x`` shares storage
    with what the previous step saved, and the backward is itself differentiable (double
    backward, ``create_graph=True``).

    Old-style (``forward(ctx, ...)``) on purpose: a ``setup_context`` Function binds its
    arguments through ``inspect.signature`` on every call, which cost 7% of a small Glow's
    train step; under torch.func transforms, which need ``setup_context``, the model runs the
    steps unfused instead (see :meth:`GlowStepRun.can_fuse`).

    Shapes: x: (N, C, H, W), weight: (C, C), shift: (C,) -> (N, split, H, W), (N, C - split, H, W)
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, shift: Tensor, split: int):
        n, c, h, w = x.shape
        xs = (x + shift.view(1, c, 1, 1)).view(n, c, h * w)
        y = torch.bmm(weight.expand(n, c, c), xs).view(n, c, h, w)
        ctx.save_for_backward(x, weight, shift)
        return y[:, :split], y[:, split:]

    @staticmethod
    def backward(ctx, grad_a: Tensor, grad_b: Tensor):
        x, weight, shift = ctx.saved_tensors
        n, c, h, w = x.shape
        split = grad_a.shape[1]
        grad_y = torch.cat([grad_a.reshape(n, split, h * w), grad_b.reshape(n, c - split, h * w)], dim=1)
        grad_x = grad_weight = grad_shift = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            grad_xs = torch.bmm(weight.t().expand(n, c, c), grad_y)
            if ctx.needs_input_grad[2]:
                grad_shift = grad_xs.sum((0, 2))
            grad_x = grad_xs.view(n, c, h, w)
        if ctx.needs_input_grad[1]:
            xs = (x + shift.view(1, c, 1, 1)).view(n, c, h * w)
            grad_weight = torch.bmm(grad_y, xs.transpose(1, 2)).sum(0)
        return grad_x, grad_weight, grad_shift, None


class _AffineCouple(torch.autograd.Function):
    """Glow's affine coupling given the net output: ``z = (y_a, (y_b + t)·s)``, ``s =
    sigmoid(max(r + 2, floor))``, with ``Σ log s`` per sample (see :class:`AffineCoupling`).

    Backward, with ``g`` the gradient of ``z`` and ``γ`` that of the log-det:
    ``∂/∂y_b = g_b·s = ∂/∂t`` and ``∂/∂r = (g_b·z_b + γ)·(1 − s)`` where ``r + 2`` is at or above
    the clamp (0 below it, as ``clamp_min`` defines). Under ``create_graph=True`` the backward
    recomputes ``s`` from the saved net output and runs as ordinary differentiable operations
    (double backward); otherwise it uses the saved ``s`` and writes in place.

    Shapes: y_a: (N, Ca, H, W), y_b: (N, Cb, H, W), net_out: (N, 2·Cb, H, W)
    -> z: (N, Ca + Cb, H, W), log-det: (N,)
    """

    @staticmethod
    def forward(ctx, y_a: Tensor, y_b: Tensor, net_out: Tensor):
        n, ca, h, w = y_a.shape
        cb = y_b.shape[1]
        shift, raw = net_out[:, :cb], net_out[:, cb:]
        floor = _scale_floor(raw.dtype)
        a = raw + 2.0
        below = a < floor  # the clamp passes no gradient there
        a.clamp_min_(floor)
        if a.dtype == torch.float64:
            log_scale = torch.nn.functional.logsigmoid(a)
            scale = a.sigmoid_()
        else:
            # sigmoid + log rather than logsigmoid, as AffineCoupling does (a vectorised kernel).
            scale = a.sigmoid_()
            log_scale = torch.log(scale)
        z = torch.empty((n, ca + cb, h, w), dtype=y_b.dtype, device=y_b.device)
        z[:, :ca].copy_(y_a)
        torch.add(y_b, shift, out=z[:, ca:]).mul_(scale)
        ctx.save_for_backward(net_out, z, scale, below)
        return z, log_scale.sum((1, 2, 3))

    @staticmethod
    def backward(ctx, grad_z: Tensor, grad_ld: Tensor):
        net_out, z, scale, below = ctx.saved_tensors
        n, c, h, w = z.shape
        cb = scale.shape[1]
        ca = c - cb
        grad_zb, z_b = grad_z[:, ca:], z[:, ca:]
        if torch.is_grad_enabled():
            # create_graph=True: differentiable operations, with s recomputed from the net
            # output (the saved s has no autograd history).
            raw = net_out[:, cb:]
            a = raw + 2.0
            floor = _scale_floor(raw.dtype)
            scale = torch.sigmoid(a.clamp_min(floor))
            grad_yb = grad_zb * scale
            grad_raw = (grad_zb * z_b + grad_ld.view(-1, 1, 1, 1)) * (1.0 - scale)
            grad_raw = torch.where(a >= floor, grad_raw, torch.zeros_like(grad_raw))
            return grad_z[:, :ca], grad_yb, torch.cat([grad_yb, grad_raw], dim=1)
        # Both halves of the net's gradient are written in place into one buffer: no cat.
        grad_net = torch.empty((n, 2 * cb, h, w), dtype=grad_z.dtype, device=grad_z.device)
        grad_yb = torch.mul(grad_zb, scale, out=grad_net[:, :cb])  # = ∂/∂t
        grad_raw = torch.mul(grad_zb, z_b, out=grad_net[:, cb:])
        grad_raw.add_(grad_ld.view(-1, 1, 1, 1))
        grad_raw.addcmul_(grad_raw, scale, value=-1.0)  # · (1 − s)
        grad_raw.masked_fill_(below, 0.0)
        return grad_z[:, :ca], grad_yb, grad_net
