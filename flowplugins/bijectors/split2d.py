"""Glow's split2d prior, written as a bijection so a multi-scale model can factor out half."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..base import Bijector, sum_except_batch
from ..nets import _check_positive_int, check_context

__all__ = ["Split2dPrior"]


class Split2dPrior(Bijector):
    """Standardise the factored-out half by a Gaussian conditioned on the half that goes on.

    Channels split as ``z1 = x[:, :ceil(C/2)]`` (the half a multi-scale model factors out) and
    ``z2 = x[:, ceil(C/2):]`` (the ``C//2`` channels passed to the next level). This is the order
    of nflows' ``MultiscaleCompositeTransform``, whose ``torch.chunk(out, 2, dim=1)`` outputs the
    first (larger) chunk and passes the second on. Data → latent::

        (mu, log_sigma) = conv3x3(z2) + W·context      (halves of 2·ceil(C/2) channels)
        z1' = (z1 - mu) · exp(-log_sigma);   z2 unchanged
        log|det ∂z/∂x| = -Σ_{c,h,w} log_sigma

    A standard normal on ``z1'`` is then Glow's conditional prior ``N(z1; mu(z2), sigma(z2)²)``
    (the log-det carries the ``-log sigma`` terms). The convolution (and the context
    projection, when ``context_features`` is set) start at zero, so the layer starts as the
    identity. The inverse ``z1 = z1' · exp(log_sigma) + mu`` is exact because ``z2`` is unchanged.

    Sampling at temperature ``T`` draws ``z1 = mu + T·sigma·eps`` with ``eps ~ N(0, I)``; that is
    exactly ``inverse`` applied to ``(T·eps, z2)``, which :meth:`sample` does.
    :meth:`conditional_params` exposes ``(mu, log_sigma)`` for samplers that need them directly.

    Shapes:
        x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)`` with ``C >= 2``.
        context_features: size ``K`` of a per-sample context vector (for example a one-hot class
            label of a class-conditional prior), or ``None``.

    Raises:
        ValueError: if ``C < 2`` or ``context_features`` is not ``None`` or a positive integer;
            at call time if the context does not fit ``context_features``.

    References:
        Kingma & Dhariwal, Glow, arXiv:1807.03039, §3 and the reference implementation's
        ``split2d`` / ``split2d_prior``; Dinh et al., Real NVP, arXiv:1605.08803, §3.6.

    Example:
        >>> import torch
        >>> layer = Split2dPrior((3, 4, 4))
        >>> layer.factored_channels, layer.conditioning_channels
        (2, 1)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> z, ld = layer(x)
        >>> torch.equal(z, x), bool((ld == 0).all())
        (True, True)
        >>> layer.sample(torch.randn(6, 1, 4, 4), temperature=0.7).shape
        torch.Size([6, 3, 4, 4])
    """

    def __init__(
        self, event_shape: Sequence[int], context_features: Optional[int] = None
    ) -> None:
        super().__init__(event_shape)
        c = self.event_shape[0]
        if c < 2:
            raise ValueError(
                f"Split2dPrior: needs at least 2 channels to split into a factored-out and a "
                f"conditioning half; got event shape {self.event_shape}"
            )
        if context_features is not None:
            _check_positive_int("Split2dPrior", "context_features", context_features)
        self.factored_channels = c - c // 2
        self.conditioning_channels = c // 2
        self.context_features = context_features
        self.conv = nn.Conv2d(self.conditioning_channels, 2 * self.factored_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.context_proj: Optional[nn.Linear] = None
        if context_features is not None:
            self.context_proj = nn.Linear(int(context_features), 2 * self.factored_channels)
            nn.init.zeros_(self.context_proj.weight)
            nn.init.zeros_(self.context_proj.bias)

    # ------------------------------------------------------------------ prior
    def _params(self, z2: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        check_context("Split2dPrior", context, self.context_features, z2.shape[0])
        h = self.conv(z2)
        if self.context_proj is not None:
            h = h + self.context_proj(context)[:, :, None, None]
        mu, log_sigma = h.chunk(2, dim=1)
        return mu, log_sigma

    def conditional_params(
        self, z2: Tensor, context: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """Mean and log-std of the Gaussian prior of the factored-out half given ``z2``.

        Shapes:
            z2: (..., C//2, H, W), context: (..., K) -> mu, log_sigma: (..., ceil(C/2), H, W)

        Raises:
            ValueError: if ``z2`` or ``context`` has the wrong shape.
        """
        _, h, w = self.event_shape
        self.check_input(z2, (self.conditioning_channels, h, w), "conditional_params")
        batch_shape = z2.shape[:-3]
        flat = z2.reshape(-1, self.conditioning_channels, h, w)
        if context is not None:
            if context.shape[: len(batch_shape)] != batch_shape:
                raise ValueError(
                    f"Split2dPrior.conditional_params: context batch shape "
                    f"{tuple(context.shape[:len(batch_shape)])} does not match z2's "
                    f"{tuple(batch_shape)}"
                )
            context = context.reshape(flat.shape[0], *context.shape[len(batch_shape):])
        mu, log_sigma = self._params(flat, context)
        out_shape = (*batch_shape, self.factored_channels, h, w)
        return mu.reshape(out_shape), log_sigma.reshape(out_shape)

    def sample(
        self,
        z2: Tensor,
        temperature: float = 1.0,
        context: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Draw ``z1 = mu(z2) + T·sigma(z2)·eps`` and return the full ``(z1, z2)`` data tensor.

        Equivalent to ``self.inverse(torch.cat([T * eps, z2], dim=-3), context)[0]``.

        Shapes:
            z2: (..., C//2, H, W), context: (..., K) -> x: (..., C, H, W)

        Raises:
            ValueError: if ``z2`` or ``context`` has the wrong shape.
        """
        _, h, w = self.event_shape
        self.check_input(z2, (self.conditioning_channels, h, w), "sample")
        eps = torch.randn(
            (*z2.shape[:-3], self.factored_channels, h, w),
            dtype=z2.dtype,
            device=z2.device,
            generator=generator,
        )
        return self.inverse(torch.cat([eps * temperature, z2], dim=-3), context)[0]

    # ------------------------------------------------------------- bijection
    def _split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x.split([self.factored_channels, self.conditioning_channels], dim=1)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        z1, z2 = self._split(x)
        mu, log_sigma = self._params(z2, context)
        z1 = (z1 - mu) * torch.exp(-log_sigma)
        return torch.cat([z1, z2], dim=1), -sum_except_batch(log_sigma)

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        eps, z2 = self._split(z)
        mu, log_sigma = self._params(z2, context)
        z1 = torch.addcmul(mu, eps, log_sigma.exp())
        return torch.cat([z1, z2], dim=1), sum_except_batch(log_sigma)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, context_features={self.context_features}"
