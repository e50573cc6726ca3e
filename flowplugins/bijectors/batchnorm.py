"""RealNVP's batch-normalisation flow on images."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..base import Bijector

__all__ = ["BatchNormFlow", "channel_mean_var"]


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks with a gradient: every rank's loss depends on the sum, so the gradient
    reaching a rank's input is the sum over ranks of the gradients with respect to the sum."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        total = grad.clone()
        torch.distributed.all_reduce(total)
        return total


def channel_mean_var(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` over ``(N, H, W)``, of the global batch.

    Without an initialised ``torch.distributed`` process group these are the local batch's
    statistics. With one, they are those of the union of every rank's batch (ranks may hold
    different batch sizes): the sums and counts are all-reduced, then the squared deviations
    from the global mean, so the variance is computed in two passes, without the cancellation
    of ``E[x²] - E[x]²``. The all-reduces are differentiable, so gradients flow through the
    global statistics back to every rank's inputs.

    Shapes:
        x: (N, C, H, W) -> mean: (C,), var: (C,)

    Example:
        >>> x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])
        >>> [t.tolist() for t in channel_mean_var(x)]
        [[4.0], [5.0]]
    """
    dims = (0, 2, 3)
    if not _distributed():
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean, var
    count = x.new_full((1,), float(x.shape[0] * x.shape[2] * x.shape[3]))
    totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
    mean = totals[:-1] / totals[-1]
    squares = _AllReduceSum.apply(((x - mean.view(1, -1, 1, 1)) ** 2).sum(dims))
    return mean, squares / totals[-1]


class BatchNormFlow(Bijector):
    """Batch normalisation as an invertible layer, with its log-det (RealNVP §3.7).

    Data → latent, per channel ``c``::

        z = (x - m_c) / sqrt(v_c + eps) · exp(log_gamma_c) + beta_c
        log|det ∂z/∂x| = H·W · Σ_c (log_gamma_c - ½ log(v_c + eps))   (the same for every sample)

    **Training mode** (``forward``): ``m``, ``v`` are the mean and biased variance of the batch
    over ``(N, H, W)`` — of the global batch under ``torch.distributed`` (see
    :func:`channel_mean_var`) — and the running statistics are updated without gradient:
    ``running = (1 - momentum)·running + momentum·batch`` (the biased batch variance, i.e. the
    one the layer used). The output of a sample then depends on the rest of the batch; the
    log-det treats the statistics as constants, which is RealNVP's convention and is the exact
    log-det of the map applied to each sample with those statistics held fixed.

    **Eval mode**: ``m``, ``v`` are ``running_mean`` and ``running_var``; the layer is an
    ordinary per-channel affine bijection and ``inverse`` is its exact inverse.

    **Inverse** (latent → data) always uses the running statistics, in training mode too: a
    latent batch has no data statistics to use. So in training mode ``inverse`` is *not* the
    inverse of the training-mode ``forward`` (which used the batch's statistics); it is the
    inverse of the eval-mode ``forward``, and does not update the running statistics.

    ``running_var`` starts at 1 and ``running_mean`` at 0, so a fresh layer in eval mode is
    (up to ``eps``) the identity with log-det ≈ 0. ``batch_dependent_in_training`` is ``True``,
    so property checkers test the layer in eval mode.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        momentum: weight of the new batch in the running averages, in ``[0, 1]``.
        eps: added to the variance before the square root, ``> 0``.

    Raises:
        ValueError: if ``momentum`` is not a number in ``[0, 1]`` or ``eps`` not a finite
            number ``> 0``.

    References:
        Dinh et al., Density estimation using Real NVP, arXiv:1605.08803, §3.7; Ioffe & Szegedy,
        Batch Normalization, arXiv:1502.03167.

    Example:
        >>> import torch
        >>> layer = BatchNormFlow((2, 3, 3))
        >>> x = 5 + 2 * torch.randn(16, 2, 3, 3)
        >>> z, ld = layer(x)                       # training: batch statistics
        >>> abs(z.mean().item()) < 1e-5, ld.shape
        (True, torch.Size([16]))
        >>> layer.running_mean.tolist() != [0.0, 0.0]
        True
        >>> _ = layer.eval()
        >>> torch.allclose(layer.inverse(layer(x)[0])[0], x, atol=1e-5)
        True
    """

    batch_dependent_in_training = True

    def __init__(
        self, event_shape: Sequence[int], momentum: float = 0.05, eps: float = 1e-5
    ) -> None:
        super().__init__(event_shape)
        if not _is_real(momentum) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNormFlow: momentum must be in [0, 1]; got {momentum!r}")
        if not _is_real(eps) or not 0.0 < eps < math.inf:
            raise ValueError(f"BatchNormFlow: eps must be > 0 and finite; got {eps!r}")
        self.momentum = float(momentum)
        self.eps = float(eps)
        c = self.event_shape[0]
        self.log_gamma = nn.Parameter(torch.zeros(c))
        self.beta = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def _statistics(self, x: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if x is None or not self.training:
            return self.running_mean, self.running_var
        if x.shape[0] == 0 and not _distributed():
            # An empty batch has no statistics; var_mean would write NaN into the running ones.
            return self.running_mean, self.running_var
        mean, var = channel_mean_var(x)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach(), self.momentum)
        return mean, var

    def _logabsdet(self, var: Tensor, n: int) -> Tensor:
        _, h, w = self.event_shape
        per_sample = (h * w) * (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        # A real (N,) tensor, not an expanded view, so callers may accumulate into it in place.
        return per_sample.repeat(n)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        mean, var = self._statistics(x)
        scale = self.log_gamma.exp() * torch.rsqrt(var + self.eps)
        offset = self.beta - mean * scale
        z = torch.addcmul(offset.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))
        return z, self._logabsdet(var, x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        mean, var = self._statistics(None)
        inv_scale = torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps)
        offset = mean - self.beta * inv_scale
        x = torch.addcmul(offset.view(1, -1, 1, 1), z, inv_scale.view(1, -1, 1, 1))
        return x, -self._logabsdet(var, z.shape[0])

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, momentum={self.momentum}, eps={self.eps}"
