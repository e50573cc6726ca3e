"""Space-to-depth squeeze (RealNVP §3.6)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import Tensor

from ..base import Bijector, EventShape

__all__ = ["Squeeze"]


class Squeeze(Bijector):
    """Trade spatial resolution for channels: each ``f x f`` patch becomes ``f²`` channels.

    Data → latent: ``z[c·f² + i·f + j, h, w] = x[c, h·f + i, w·f + j]`` (the pixel order of nflows'
    ``SqueezeTransform``, pinned by a golden test). A permutation of coordinates, so
    ``log|det J| = 0``.

    Shapes:
        x: (..., C, H, W) -> z: (..., f²C, H/f, W/f); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)`` with ``H`` and ``W`` divisible by ``factor``.
        factor: the patch size ``f`` (2 in RealNVP and Glow).

    Raises:
        ValueError: if ``H`` or ``W`` is not divisible by ``factor``, or ``factor < 2``.

    References:
        Dinh et al., Density estimation using Real NVP, arXiv:1605.08803, §3.6.

    Example:
        >>> import torch
        >>> sq = Squeeze((1, 4, 4))
        >>> z, ld = sq(torch.arange(16.).reshape(1, 1, 4, 4))
        >>> z.shape, ld.tolist()
        (torch.Size([1, 4, 2, 2]), [0.0])
    """

    def __init__(self, event_shape: Sequence[int], factor: int = 2) -> None:
        super().__init__(event_shape)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
            raise ValueError(f"Squeeze: factor must be an integer >= 2; got {factor!r}")
        self.factor = int(factor)
        c, h, w = self.event_shape
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"Squeeze: H and W must be divisible by factor {self.factor}; got event shape "
                f"{self.event_shape}"
            )

    def output_event_shape(self) -> EventShape:
        c, h, w = self.event_shape
        f = self.factor
        return (c * f * f, h // f, w // f)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        f = self.factor
        z = x.reshape(n, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(n, c * f * f, h // f, w // f), x.new_zeros(n)

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        n = z.shape[0]
        c, h, w = self.event_shape
        f = self.factor
        x = z.reshape(n, c, f, f, h // f, w // f).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c, h, w), z.new_zeros(n)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, factor={self.factor}"
