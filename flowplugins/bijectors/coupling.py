"""Channel-wise couplings: Glow's affine coupling and the additive coupling of NICE."""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..base import Bijector, sum_except_batch
from ..nets import NetFactory, build_net, check_context

__all__ = ["ChannelCoupling", "AffineCoupling", "AdditiveCoupling"]


def _scale_floor(dtype: torch.dtype) -> float:
    """Lower clamp of the affine coupling's pre-sigmoid ``a``: 0.9·log(smallest normal number).

    Keeps ``s = sigmoid(a)`` a normal positive number (-78.6 in float32, -637 in float64), so
    ``log s`` is exact, ``z / s`` never divides by zero and the layer stays invertible whatever
    the net outputs.
    """
    floor = _SCALE_FLOORS.get(dtype)
    if floor is None:
        floor = _SCALE_FLOORS[dtype] = 0.9 * math.log(torch.finfo(dtype).tiny)
    return floor


# Filled at import for the usual dtypes: a first fill while torch.compile traces is a mutated
# global that Dynamo guards on, and the next call would recompile the whole model.
_SCALE_FLOORS: dict = {
    dtype: 0.9 * math.log(torch.finfo(dtype).tiny)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


class ChannelCoupling(Bijector):
    """Shared machinery of channel-wise couplings; subclasses supply the element-wise map.

    The input is split along channels into ``x_a`` (the first ``C - C//2 = ceil(C/2)`` channels,
    passed through unchanged and used as the conditioner's input) and ``x_b`` (the last
    ``C//2`` channels, transformed element-wise given ``h = NN(x_a)``). This is the split of
    Glow's reference code up to which half is transformed; with odd ``C`` the conditioner sees
    the larger half. The output is ``(x_a, g(x_b; h))``, so the Jacobian is block triangular and
    its log-det is that of the element-wise map ``g``.

    A subclass sets ``params_per_channel`` (how many channels of ``h`` each transformed channel
    uses) and implements :meth:`_couple` and :meth:`_uncouple`.

    Context: a layer built with ``context_features=K`` needs a context of shape ``(..., K)``;
    the default net adds a linear projection of it to its hidden activations. A custom ``net``
    receives the context as ``module(h, context)`` whenever one is given (see
    :mod:`flowplugins.nets`).

    Shapes:
        x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)`` with ``C >= 2``.
        hidden: hidden width of the default coupling net.
        net: ``None`` for :class:`flowplugins.nets.CouplingNet` (zero-initialised last layer, so
            the layer starts as the identity) or a factory ``net(in_channels, out_channels)``.
        context_features: size ``K`` of the context vector, or ``None``.
        dropout: dropout rate after the default net's hidden ReLUs, in training mode only
            (:class:`flowplugins.nets.CouplingNet`); not allowed with a custom ``net``.

    Raises:
        ValueError: if ``C < 2``, or (at call time) the context does not fit ``context_features``
            or a custom net returns the wrong shape.
        TypeError: if ``net`` is not a factory of ``nn.Module``.
    """

    params_per_channel: int = 1

    def __init__(
        self,
        event_shape: Sequence[int],
        hidden: int = 512,
        net: Optional[NetFactory] = None,
        context_features: Optional[int] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(event_shape)
        name = type(self).__name__
        c = self.event_shape[0]
        if c < 2:
            raise ValueError(
                f"{name}: a channel-wise coupling needs at least 2 channels to split; got event "
                f"shape {self.event_shape}"
            )
        self.identity_channels = c - c // 2
        self.transformed_channels = c // 2
        self.hidden = hidden
        self.context_features = context_features
        self.net_out_channels = self.params_per_channel * self.transformed_channels
        self.net = build_net(
            net, self.identity_channels, self.net_out_channels, hidden, context_features, name,
            dropout,
        )
        # A custom net built without context_features may take a context of any form.
        self._validates_context = net is None or context_features is not None

    def _condition(self, x_a: Tensor, context: Optional[Tensor]) -> Tensor:
        if self._validates_context:
            check_context(type(self).__name__, context, self.context_features, x_a.shape[0])
        h = self.net(x_a) if context is None else self.net(x_a, context)
        expected = (x_a.shape[0], self.net_out_channels, *x_a.shape[2:])
        if tuple(h.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: the coupling net must map {tuple(x_a.shape)} to "
                f"{expected}; got {tuple(h.shape)}"
            )
        return h

    def _couple(self, x_b: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        """Element-wise map ``x_b -> z_b`` given ``h``, with its log-det of shape ``(N,)``."""
        raise NotImplementedError

    def _uncouple(self, z_b: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        """Exact inverse of :meth:`_couple`, with its log-det of shape ``(N,)``."""
        raise NotImplementedError

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        x_a, x_b = x.split([self.identity_channels, self.transformed_channels], dim=1)
        z_b, logabsdet = self._couple(x_b, self._condition(x_a, context))
        return torch.cat([x_a, z_b], dim=1), logabsdet

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        z_a, z_b = z.split([self.identity_channels, self.transformed_channels], dim=1)
        x_b, logabsdet = self._uncouple(z_b, self._condition(z_a, context))
        return torch.cat([z_a, x_b], dim=1), logabsdet

    def _inverse_then_forward(
        self, z: Tensor, context: Optional[Tensor], input_requires_grad: bool
    ) -> Tuple[Tensor, List[Tensor], Tensor, Tensor]:
        """Memory-saving backprop's recomputation with one evaluation of the net.

        Reconstructs ``x = inverse(z)`` and recomputes ``forward(x)`` recording autograd, but
        evaluates ``NN(x_a)`` once (``x_a = z_a``, so the inverse and the forward read the same
        net output); the generic recomputation evaluates it twice. Flat ``(N, C, H, W)``
        input, no hooks or ``check_finite`` (the caller checks).

        Returns:
            ``x`` (detached), the leaves ``[x_a, x_b]`` whose gradients concatenated along
            channels are ``∂/∂x`` (empty unless ``input_requires_grad``), and the recomputed
            ``(z, logabsdet)``.
        """
        self.check_input(z, self.event_shape, "inverse")
        z_a, z_b = z.split([self.identity_channels, self.transformed_channels], dim=1)
        x_a = z_a.detach().requires_grad_(input_requires_grad)
        with torch.enable_grad():
            h = self._condition(x_a, context)
        with torch.no_grad():
            x_b, _ = self._uncouple(z_b, h)
        x_b.requires_grad_(input_requires_grad)
        with torch.enable_grad():
            z_b_again, logabsdet = self._couple(x_b, h)
            z_again = torch.cat([x_a, z_b_again], dim=1)
        x = torch.cat([x_a.detach(), x_b.detach()], dim=1)
        return x, ([x_a, x_b] if input_requires_grad else []), z_again, logabsdet

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, hidden={self.hidden}, "
            f"context_features={self.context_features}"
        )


class AffineCoupling(ChannelCoupling):
    """Glow's affine coupling with a bounded scale ``sigmoid(r + 2)``.

    Data → latent, with ``(x_a, x_b)`` the channel split of :class:`ChannelCoupling`::

        h = NN(x_a);  shift = h[:, :C//2];  r = h[:, C//2:]   (halves of the net's output)
        s = sigmoid(r + 2) ∈ (0, 1)
        z = (x_a, (x_b + shift) · s)
        log|det ∂z/∂x| = Σ_{c,h,w} log s

    ``r + 2`` is clamped below at 0.9·log of the dtype's smallest normal number (-78.6 in
    float32), so ``s`` never underflows: ``log s`` stays finite and exact and the layer
    invertible for any net output (below the clamp, ``r`` gets no gradient). ``log s`` is
    ``logsigmoid`` in float64 and ``log(s)`` otherwise (see the code for why).
    The ``+ 2`` makes ``s ≈ 0.88`` at init; with the zero-initialised net the layer then starts
    close to (not exactly) the identity: ``z_b = sigmoid(2) · x_b``. The inverse is exact:
    ``x_b = z_b / s - shift``.

    Shapes:
        x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)`` with ``C >= 2``.
        hidden: hidden width of the default coupling net (Glow uses 512).
        net: ``None`` for the default net, or a factory ``net(in_channels, out_channels)`` whose
            module maps ``ceil(C/2)`` channels to ``2·(C//2)`` channels.
        context_features: size ``K`` of a per-sample context vector, or ``None``.
        dropout: dropout rate in the default net's hidden layers (training mode only).

    Raises:
        ValueError: if ``C < 2``; at call time if the context does not fit
            ``context_features`` or a custom net returns the wrong shape.
        TypeError: if ``net`` is not a factory of ``nn.Module``.

    References:
        Kingma & Dhariwal, Glow, arXiv:1807.03039, §3.3 and the reference implementation's
        ``sigmoid(h + 2)`` scale; Dinh et al., Real NVP, arXiv:1605.08803, §3.3.

    Example:
        >>> import torch
        >>> layer = AffineCoupling((4, 8, 8), hidden=16)
        >>> x = torch.randn(2, 4, 8, 8)
        >>> z, ld = layer(x)
        >>> torch.equal(z[:, :2], x[:, :2]), ld.shape
        (True, torch.Size([2]))
        >>> torch.allclose(layer.inverse(z)[0], x, atol=1e-6)
        True
    """

    params_per_channel = 2

    def _scale_and_shift(self, h: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(s, log s, shift)`` from the net's output ``h``."""
        shift, raw = h.chunk(2, dim=1)
        a = (raw + 2.0).clamp_min(_scale_floor(h.dtype))
        scale = torch.sigmoid(a)
        if a.dtype == torch.float64:
            log_scale = F.logsigmoid(a)
        else:
            # log(sigmoid(a)) rather than logsigmoid(a): the float32 logsigmoid CPU kernel is
            # not vectorised (~15x slower than sigmoid + log). Where they differ (s near 1)
            # the difference is an absolute ~1e-7, far below the float32 sum's own round-off.
            log_scale = torch.log(scale)
        return scale, log_scale, shift

    # The element-wise maps run on (N, C, H·W) views. Under torch.compile on CPU, Inductor
    # lays every 4-D tensor downstream of a convolution out channels-last, and with the few
    # channels of a coupling its kernels then loop over 2-4 channels innermost and compute
    # exp and log one number at a time; 3-D intermediates keep a contiguous layout, whose
    # kernels are vectorised over H·W.
    def _couple(self, x_b: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        scale, log_scale, shift = self._scale_and_shift(h.flatten(-2))
        z_b = (x_b.flatten(-2) + shift) * scale
        return z_b.view(x_b.shape), sum_except_batch(log_scale)

    def _uncouple(self, z_b: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        scale, log_scale, shift = self._scale_and_shift(h.flatten(-2))
        x_b = z_b.flatten(-2) / scale - shift
        return x_b.view(z_b.shape), -sum_except_batch(log_scale)


class AdditiveCoupling(ChannelCoupling):
    """The additive (volume-preserving) coupling of NICE, as used in Glow's additive ablation.

    Data → latent, with ``(x_a, x_b)`` the channel split of :class:`ChannelCoupling`::

        z = (x_a, x_b + NN(x_a))
        log|det ∂z/∂x| = 0

    With the zero-initialised net the layer starts as the exact identity. The inverse is
    ``x_b = z_b - NN(z_a)``.

    Shapes:
        x: (..., C, H, W), context: (..., K) -> z: (..., C, H, W); logabsdet: (...) (zeros)

    Args:
        event_shape: ``(C, H, W)`` with ``C >= 2``.
        hidden: hidden width of the default coupling net.
        net: ``None`` for the default net, or a factory ``net(in_channels, out_channels)`` whose
            module maps ``ceil(C/2)`` channels to ``C//2`` channels.
        context_features: size ``K`` of a per-sample context vector, or ``None``.
        dropout: dropout rate in the default net's hidden layers (training mode only).

    Raises:
        ValueError: if ``C < 2``; at call time if the context does not fit
            ``context_features`` or a custom net returns the wrong shape.
        TypeError: if ``net`` is not a factory of ``nn.Module``.

    References:
        Dinh et al., NICE, arXiv:1410.8516, §3.2; Kingma & Dhariwal, Glow, arXiv:1807.03039,
        §3.3.

    Example:
        >>> import torch
        >>> layer = AdditiveCoupling((3, 4, 4), hidden=8)
        >>> x = torch.randn(5, 3, 4, 4)
        >>> z, ld = layer(x)
        >>> torch.equal(z, x), ld.tolist()
        (True, [0.0, 0.0, 0.0, 0.0, 0.0])
    """

    params_per_channel = 1

    def _couple(self, x_b: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        return x_b + h, x_b.new_zeros(x_b.shape[0])

    def _uncouple(self, z_b: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        return z_b - h, z_b.new_zeros(z_b.shape[0])
