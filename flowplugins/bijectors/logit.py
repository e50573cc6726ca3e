"""RealNVP's logit preprocessing of data in (0, 1) (RealNVP §4.1)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Bijector, sum_except_batch

__all__ = ["LogitTransform"]


class LogitTransform(Bijector):
    """Map data in ``(0, 1)`` to the real line, keeping away from the boundary by ``alpha``.

    Data → latent, element-wise with ``p = α + (1 − 2α)·x``:

    .. math::

        y = \\operatorname{logit}(p) = \\log p − \\log(1 − p), \\qquad
        \\log|\\det J| = \\sum_{c,h,w} \\big[\\log(1 − 2α) − \\log p − \\log(1 − p)\\big].

    Latent → data: ``x = (σ(y) − α) / (1 − 2α)`` with log-det
    ``Σ [−softplus(−y) − softplus(y) − log(1 − 2α)]``, written with softplus so that large
    ``|y|`` stays finite. Including this log-det in a model's ``log_prob`` makes it the density
    of the ``[0, 1)`` data, which is what :func:`flowplugins.preprocessing.bits_per_dim`
    expects. Values are not range-checked (that would cost a device sync per call): with
    ``α > 0`` any ``x`` in ``[0, 1]`` is fine; ``x`` outside ``(−α/(1−2α), (1−α)/(1−2α))``
    gives NaN or ±inf.

    Shapes:
        x: (..., C, H, W) -> y: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        alpha: boundary margin ``α`` with ``0 <= α < 0.5`` (RealNVP uses 0.05 on CIFAR-10).

    Raises:
        ValueError: if ``alpha`` is not a number in ``[0, 0.5)``.

    References:
        Dinh et al., Density estimation using Real NVP, arXiv:1605.08803, §4.1.

    Example:
        >>> import torch
        >>> layer = LogitTransform((1, 1, 2), alpha=0.05)
        >>> y, ld = layer(torch.tensor([[[[0.5, 0.9]]]]))
        >>> [round(v, 4) for v in y.flatten().tolist()]
        [0.0, 1.8153]
        >>> x, _ = layer.inverse(y)
        >>> [round(v, 4) for v in x.flatten().tolist()]
        [0.5, 0.9]
    """

    input_domain = "unit_interval"

    def __init__(self, event_shape: Sequence[int], alpha: float = 0.05) -> None:
        super().__init__(event_shape)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
            0.0 <= alpha < 0.5
        ):
            raise ValueError(f"LogitTransform: alpha must satisfy 0 <= alpha < 0.5; got {alpha!r}")
        self.alpha = float(alpha)
        self._log_range = math.log1p(-2.0 * self.alpha)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        p = x * (1.0 - 2.0 * self.alpha) + self.alpha
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        ld = self._log_range * self.event_numel - sum_except_batch(log_p + log_1mp)
        return log_p - log_1mp, ld

    def _inverse(self, y: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        x = (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)
        ld = -self._log_range * self.event_numel - sum_except_batch(F.softplus(y) + F.softplus(-y))
        return x, ld

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, alpha={self.alpha}"
