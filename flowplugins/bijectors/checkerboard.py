"""RealNVP's spatial checkerboard-mask affine coupling."""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..base import Bijector, sum_except_batch
from ..nets import NetFactory, build_net, check_context

__all__ = ["CheckerboardCoupling"]


class CheckerboardCoupling(Bijector):
    """Affine coupling over a spatial checkerboard: half the pixels condition the other half.

    The mask is ``b[h, w] = 1`` if ``(h + w + parity)`` is even, else 0, shared by all channels
    (``parity=0`` keeps the top-left pixel; ``parity=1`` swaps the roles, so alternating
    parities transform every pixel). Data → latent::

        (r, t) = NN(b ⊙ x)                        r: first C channels, t: last C channels
        s = (1 - b) ⊙ exp(log_scale_bound_c) · tanh(r)
        z = x ⊙ exp(s) + (1 - b) ⊙ t  =  b ⊙ x + (1 - b) ⊙ (x ⊙ exp(s) + t)
        log|det ∂z/∂x| = Σ_{c,h,w} s               (zero at the kept positions)

    The log-scale is bounded, ``|s_c| < exp(log_scale_bound_c)``, with a learned per-channel
    bound initialised to 1; with the zero-initialised net ``r = t = 0`` at init and the layer
    is the exact identity. The kept positions (``b = 1``) are copied exactly (``s = t = 0``
    there), and the inverse ``x = (z - (1 - b) ⊙ t) ⊙ exp(-s)`` recomputes ``(r, t)`` from
    ``b ⊙ z = b ⊙ x``, so it is exact.

    Shapes:
        x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)`` with ``H·W >= 2``.
        parity: 0 or 1, which colour of the checkerboard is kept (see above).
        hidden: hidden width of the default coupling net.
        net: ``None`` for :class:`flowplugins.nets.CouplingNet` or a factory
            ``net(in_channels, out_channels)`` whose module maps ``C`` channels to ``2C``.
        context_features: size ``K`` of a per-sample context vector, or ``None``.

    Raises:
        ValueError: if ``parity`` is not 0 or 1, or ``H·W < 2``; at call time if the context
            does not fit ``context_features`` or a custom net returns the wrong shape.
        TypeError: if ``net`` is not a factory of ``nn.Module``.

    References:
        Dinh et al., Density estimation using Real NVP, arXiv:1605.08803, §3.4 (masked
        convolution, checkerboard masks) and §4.1 (tanh-bounded scale).

    Example:
        >>> import torch
        >>> layer = CheckerboardCoupling((2, 4, 4), parity=1, hidden=8)
        >>> layer.mask[0, 0, :2, :2].tolist()
        [[0.0, 1.0], [1.0, 0.0]]
        >>> x = torch.randn(3, 2, 4, 4)
        >>> z, ld = layer(x)
        >>> torch.equal(z, x), ld.tolist()
        (True, [0.0, 0.0, 0.0])
    """

    def __init__(
        self,
        event_shape: Sequence[int],
        parity: int = 0,
        hidden: int = 64,
        net: Optional[NetFactory] = None,
        context_features: Optional[int] = None,
    ) -> None:
        super().__init__(event_shape)
        c, h, w = self.event_shape
        valid = isinstance(parity, numbers.Integral) and not isinstance(parity, bool)
        if not valid or parity not in (0, 1):
            raise ValueError(f"CheckerboardCoupling: parity must be 0 or 1; got {parity!r}")
        if h * w < 2:
            raise ValueError(
                f"CheckerboardCoupling: needs at least 2 pixels (H·W >= 2) so that one colour can "
                f"condition the other; got event shape {self.event_shape}"
            )
        self.parity = int(parity)
        self.hidden = hidden
        self.context_features = context_features
        rows = torch.arange(h).unsqueeze(1)
        cols = torch.arange(w).unsqueeze(0)
        mask = ((rows + cols + self.parity) % 2 == 0).to(torch.get_default_dtype())
        # Derived from (H, W, parity), so kept out of the state dict.
        self.register_buffer("mask", mask.expand(1, 1, h, w).clone(), persistent=False)
        self.register_buffer("transform_mask", 1.0 - self.mask, persistent=False)
        self.log_scale_bound = nn.Parameter(torch.zeros(c))
        self.net = build_net(net, c, 2 * c, hidden, context_features, "CheckerboardCoupling")
        self._validates_context = net is None or context_features is not None

    def _log_scale_and_shift(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        kept = x * self.mask
        if self._validates_context:
            check_context("CheckerboardCoupling", context, self.context_features, x.shape[0])
        h = self.net(kept) if context is None else self.net(kept, context)
        expected = (x.shape[0], 2 * x.shape[1], *x.shape[2:])
        if tuple(h.shape) != expected:
            raise ValueError(
                f"CheckerboardCoupling: the coupling net must map {tuple(kept.shape)} to "
                f"{expected}; got {tuple(h.shape)}"
            )
        raw, shift = h.chunk(2, dim=1)
        bound = self.log_scale_bound.exp().view(1, -1, 1, 1)
        log_scale = torch.tanh(raw) * bound * self.transform_mask
        return log_scale, shift * self.transform_mask

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        log_scale, shift = self._log_scale_and_shift(x, context)
        return torch.addcmul(shift, x, log_scale.exp()), sum_except_batch(log_scale)

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        log_scale, shift = self._log_scale_and_shift(z, context)
        return (z - shift) * torch.exp(-log_scale), -sum_except_batch(log_scale)

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, parity={self.parity}, hidden={self.hidden}, "
            f"context_features={self.context_features}"
        )
