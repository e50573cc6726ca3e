"""Glow's learned top prior, written as a bijection so every model keeps a standard-normal base."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..base import Bijector
from ..nets import check_context

__all__ = ["LearnedGaussianPrior"]


class LearnedGaussianPrior(Bijector):
    """A learned diagonal Gaussian ``N(mu, sigma²)`` over the top latent, as a bijection.

    The mean and log-std are learned **per channel** (shared across positions), as in the
    reference Glow code, where the top prior is a zero-initialised convolution of a zero image
    (its bias alone, one value per channel) plus, for class-conditional models, a
    zero-initialised linear map of the one-hot label. Per channel keeps the prior's parameter
    count independent of the image size and, with ``context_features``, gives each class its
    own mean and scale per channel. Data → latent::

        mu = loc + A·context[:C],   log_sigma = log_scale + A·context[C:]   (per sample)
        z = (x - mu) · exp(-log_sigma)
        log|det ∂z/∂x| = -H·W·Σ_c log_sigma_c

    A standard normal on ``z`` is then ``N(x; mu, sigma²)``. All parameters start at zero, so
    the layer starts as the identity (the prior starts as ``N(0, I)``). The log-det costs
    ``O(C)`` per sample. Sampling at temperature ``T`` (Glow §5) is ``inverse(T·eps)``, i.e.
    ``x = mu + T·sigma·eps``.

    Context: a layer built with ``context_features=K`` needs a context of shape ``(..., K)``
    (for example a one-hot class label); a layer built without accepts none.

    Shapes:
        x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        context_features: size ``K`` of the context vector, or ``None`` for an unconditional
            prior.

    Raises:
        ValueError: if ``context_features`` is not ``None`` or a positive integer; at call
            time if the context does not fit ``context_features``.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §3 and the reference implementation's ``prior`` (``learntop``,
        ``ycond``).

    Example:
        >>> import torch
        >>> prior = LearnedGaussianPrior((2, 3, 3), context_features=4)
        >>> x, y = torch.randn(5, 2, 3, 3), torch.eye(4)[[0, 1, 2, 3, 0]]
        >>> z, ld = prior(x, y)
        >>> torch.equal(z, x), bool((ld == 0).all())
        (True, True)
        >>> with torch.no_grad():
        ...     _ = prior.log_scale.fill_(0.5)
        >>> round(prior(x, y)[1][0].item(), 4)  # -H·W·C·0.5
        -9.0
    """

    def __init__(
        self, event_shape: Sequence[int], context_features: Optional[int] = None
    ) -> None:
        super().__init__(event_shape)
        c = self.event_shape[0]
        if context_features is not None and (
            isinstance(context_features, bool)
            or not isinstance(context_features, int)
            or context_features < 1
        ):
            raise ValueError(
                f"LearnedGaussianPrior: context_features must be None or a positive integer; "
                f"got {context_features!r}"
            )
        self.context_features = context_features
        self.loc = nn.Parameter(torch.zeros(c))
        self.log_scale = nn.Parameter(torch.zeros(c))
        self.context_proj: Optional[nn.Linear] = None
        if context_features is not None:
            self.context_proj = nn.Linear(context_features, 2 * c)
            nn.init.zeros_(self.context_proj.weight)
            nn.init.zeros_(self.context_proj.bias)

    def prior_params(self, context: Optional[Tensor], batch: int) -> Tuple[Tensor, Tensor]:
        """``(mu, log_sigma)``: shape ``(C,)`` unconditionally, ``(N, C)`` with a context.

        Raises:
            ValueError: if ``context`` does not fit ``context_features``.
        """
        check_context("LearnedGaussianPrior", context, self.context_features, batch)
        if self.context_proj is None:
            return self.loc, self.log_scale
        shift, log_scale = self.context_proj(context).chunk(2, dim=1)
        return self.loc + shift, self.log_scale + log_scale

    def _stats(self, context: Optional[Tensor], n: int) -> Tuple[Tensor, Tensor, Tensor]:
        """Broadcastable ``(mu, log_sigma)`` for an ``(N, C, H, W)`` batch and the per-sample
        ``Σ log_sigma`` over the event."""
        mu, log_sigma = self.prior_params(context, n)
        _, h, w = self.event_shape
        total = log_sigma.sum(-1) * (h * w)
        if log_sigma.dim() == 1:
            return mu[:, None, None], log_sigma[:, None, None], total.expand(n)
        return mu[:, :, None, None], log_sigma[:, :, None, None], total

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        mu, log_sigma, total = self._stats(context, x.shape[0])
        return (x - mu) * (-log_sigma).exp(), -total

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        mu, log_sigma, total = self._stats(context, z.shape[0])
        return z * log_sigma.exp() + mu, total

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, context_features={self.context_features}"
