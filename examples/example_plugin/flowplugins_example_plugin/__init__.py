"""An example flowplugins plugin: an elementwise invertible leaky ReLU with learned slopes.

Installing this package (``pip install -e examples/example_plugin``) registers the bijector as
``leaky_relu_flow`` through the entry-point group ``flowplugins.bijectors``; flowplugins then
builds it for the torch, nflows and Pyro backends and its property checks apply unchanged.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from flowplugins import Bijector

__all__ = ["InvertibleLeakyReLU"]


class InvertibleLeakyReLU(Bijector):
    """Leaky ReLU with a learned, strictly positive slope per channel on the negative side.

    Data → latent, with ``a_c = exp(log_slope_c) > 0``::

        z = x              where x >= 0
        z = a_c · x        where x < 0
        log|det ∂z/∂x| = Σ_{c,h,w} [x < 0] · log_slope_c

    The slope is positive, so the sign is preserved and the inverse divides the negative
    entries by ``a_c``.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        negative_slope: the initial slope ``a`` of every channel; must be positive.

    Raises:
        ValueError: if ``negative_slope`` is not a positive finite number.

    References:
        Maas et al., Rectifier nonlinearities improve neural network acoustic models (2013);
        used as a flow layer in e.g. Oliva et al., Transformation Autoregressive Networks,
        arXiv:1801.09819.

    Example:
        >>> import torch
        >>> layer = InvertibleLeakyReLU((1, 1, 2), negative_slope=0.5)
        >>> z, ld = layer(torch.tensor([[[[-2.0, 3.0]]]]))
        >>> z.tolist(), round(ld.item(), 4)
        ([[[[-1.0, 3.0]]]], -0.6931)
    """

    def __init__(self, event_shape: Sequence[int], negative_slope: float = 0.5) -> None:
        super().__init__(event_shape)
        if isinstance(negative_slope, bool) or not (
            isinstance(negative_slope, (int, float))
            and math.isfinite(negative_slope)
            and negative_slope > 0
        ):
            raise ValueError(
                f"InvertibleLeakyReLU: negative_slope must be a positive finite number; got "
                f"{negative_slope!r}"
            )
        self.negative_slope = float(negative_slope)
        c = self.event_shape[0]
        self.log_slope = nn.Parameter(torch.full((c, 1, 1), math.log(self.negative_slope)))

    def _map(self, v: Tensor, sign: float) -> Tuple[Tensor, Tensor]:
        negative = v < 0
        log_slope = sign * self.log_slope
        out = torch.where(negative, v * log_slope.exp(), v)
        logabsdet = (negative.to(v.dtype) * log_slope).flatten(1).sum(-1)
        return out, logabsdet

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return self._map(x, 1.0)

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return self._map(z, -1.0)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, negative_slope={self.negative_slope}"
