"""Dequantizers: turn integer pixel levels into continuous data, with the noise's log-density.

A dequantizer maps levels ``k`` to ``x = (k + u) / n_levels`` with ``u ∈ (0, 1)^D`` drawn from
``q(u | k)`` and returns ``log q(u | k)``. For a flow density ``p`` on ``[0, 1)^D``,

.. math::

    \\log P(k) \\ge \\mathbb{E}_{q(u|k)}\\left[\\log p\\big((k + u)/n\\big) − \\log q(u | k)\\right]
    − D \\log n,

so ``bpd = (−log p(x) + log q(u|k) + D log n) / (D log 2)`` is an upper bound on the discrete
model's bits/dim, for any ``q``. Uniform dequantization is ``q = U(0, 1)`` (``log q = 0``);
variational dequantization (Flow++) learns ``q`` jointly with the flow and tightens the bound —
the flow no longer has to be flat inside every bin, which matters for low-level data such as
the 17-level digits whose background is a single level.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["UniformDequantizer", "VariationalDequantizer", "build_dequantizer"]


class UniformDequantizer(nn.Module):
    """``u ~ U[0, 1)``, ``log q(u | k) = 0``.

    Shapes:
        levels: (N, C, H, W) -> x: (N, C, H, W) in [0, 1); log_q: (N,)
    """

    def __init__(self, event_shape, n_levels: int) -> None:
        super().__init__()
        self.n_levels = int(n_levels)

    def forward(self, levels: Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor]:
        from ..data import dequantize

        x = dequantize(levels, self.n_levels, generator=generator)
        return x, x.new_zeros(x.shape[0])


class VariationalDequantizer(nn.Module):
    """Learned, image-conditional dequantization noise ``q(u | k)`` (Flow++ §3.1).

    ``u = sigmoid(a)`` with ``a = μ(k) + exp(s(k)) · ε``, ``ε ~ N(0, I)``, where ``μ`` and ``s``
    come from a small convolutional net of the whole level image, so the noise of one pixel can
    depend on its neighbours. By the change of variables,

    .. math::

        \\log q(u | k) = \\sum_d \\log N(ε_d; 0, 1) − s_d − \\log σ'(a_d),
        \\qquad \\log σ'(a) = −\\mathrm{softplus}(a) − \\mathrm{softplus}(−a).

    The last convolution starts at zero, so at init ``a ~ N(0, 1)``.

    Shapes:
        levels: (N, C, H, W) -> x: (N, C, H, W) in (0, 1); log_q: (N,)

    Args:
        event_shape: ``(C, H, W)`` of the data.
        n_levels: number of pixel levels.
        hidden: channels of the conditioning net.

    References:
        Ho et al., Flow++, arXiv:1902.00275, §3.1.
    """

    _A_BOUND = 12.0  # sigmoid(±12) stays inside (0, 1) in float32 with room to spare

    def __init__(self, event_shape, n_levels: int, hidden: int = 32) -> None:
        super().__init__()
        c = int(event_shape[0])
        self.n_levels = int(n_levels)
        self.net = nn.Sequential(
            nn.Conv2d(c, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * c, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, levels: Tensor, generator: Optional[torch.Generator] = None
                ) -> Tuple[Tensor, Tensor]:
        dtype = self.net[0].weight.dtype
        k = levels.to(dtype)
        h = self.net(k / (self.n_levels - 1) - 0.5)
        mu, log_sigma = h.chunk(2, dim=1)
        log_sigma = log_sigma.clamp(-7.0, 3.0)
        eps = torch.randn(k.shape, generator=generator, dtype=dtype, device="cpu").to(k.device)
        a = (mu + log_sigma.exp() * eps).clamp(-self._A_BOUND, self._A_BOUND)
        u = torch.sigmoid(a)
        log_q = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - log_sigma
                 + F.softplus(a) + F.softplus(-a))
        x = (k + u) / self.n_levels
        return x, log_q.flatten(1).sum(1)


def build_dequantizer(kind: str, event_shape, n_levels: int) -> nn.Module:
    """``"uniform"`` or ``"variational"``."""
    if kind == "uniform":
        return UniformDequantizer(event_shape, n_levels)
    if kind == "variational":
        return VariationalDequantizer(event_shape, n_levels)
    raise ValueError(f"dequantization must be 'uniform' or 'variational'; got {kind!r}")
