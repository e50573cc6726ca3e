"""Pluggable coupling networks: the default Glow net and the factory contract couplings use.

A coupling layer never builds its conditioner directly; it asks a **net factory** for one:

* ``net=None`` builds :class:`CouplingNet` (Glow's conv3x3-ReLU-conv1x1-ReLU-zero conv3x3) with
  the layer's ``hidden`` width and ``context_features``;
* otherwise ``net`` is any callable ``net(in_channels, out_channels) -> nn.Module``. The layer
  calls the module as ``module(h)`` when no context is given and as ``module(h, context)`` when
  one is, with ``h`` of shape ``(N, in_channels, H, W)`` and ``context`` of shape ``(N, K)``; the
  module must return ``(N, out_channels, H, W)``. The layer's ``hidden`` and
  ``context_features`` options are not passed to a custom factory (close over them if the net
  needs them), and the layer cannot make a custom net start at the identity: zero-initialise its
  last layer yourself if you want that.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["CouplingNet", "Dropout", "NetFactory", "build_net", "check_context"]

NetFactory = Callable[[int, int], nn.Module]
"""``net(in_channels, out_channels) -> nn.Module``; see the module docstring for the contract."""


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask is drawn as ``uniform < 1 − p``.

    Shapes: ``(...) -> (...)``. In training mode ``y = x · m / (1 − p)`` with ``m`` a 0/1 mask,
    each entry kept with probability ``1 − p``; in eval mode (or ``p = 0``) ``y = x``. This is
    the distribution of ``nn.Dropout``; only the random draws differ. On CPU torch draws its
    mask with ``bernoulli_``, element by element: at Glow's hidden activations that is about
    twice as slow as one uniform draw and a comparison, and made up 20% of the default digits
    model's train step (8–12% of the step saved, measured A/B in BENCHMARKS.md). Other devices
    keep torch's fused dropout kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and 0.0 < self.p < 1.0) or self.inplace or x.device.type != "cpu":
            return super().forward(x)
        keep = 1.0 - self.p
        # The float mask, not a bool one, is what the product saves for backward: a bool mask
        # would need a type promotion in both passes, which measured slower here.
        mask = (torch.rand_like(x) < keep).to(x.dtype).mul_(1.0 / keep)
        return x * mask


class CouplingNet(nn.Module):
    """Glow's coupling network, with an optional context bias; starts by outputting zeros.

    ``NN(h) = conv3x3(relu(conv1x1(relu(conv3x3(h) + P·c))))`` where the three convolutions map
    ``in_channels → hidden → hidden → out_channels`` (3x3 convolutions use ``padding=1``, so the
    spatial size is kept), ``P·c`` is a learned linear projection of the context ``c`` added as a
    per-channel bias to the first hidden activations (only when ``context_features`` is set),
    and the last convolution's weight and bias are zero, so ``NN(h) = 0`` at init and every
    coupling built on it starts as the identity.

    Shapes:
        h: (N, in_channels, H, W), context: (N, context_features) -> (N, out_channels, H, W)

    Args:
        in_channels: channels of the conditioning input.
        out_channels: channels of the output (for example shift and scale of the other half).
        hidden: width of the two hidden layers.
        context_features: size ``K`` of a per-sample context vector, or ``None`` for an
            unconditional net.
        dropout: probability of zeroing a hidden activation after each hidden ReLU, in training
            mode only (Flow++ uses it against overfitting on small data sets); ``0`` adds no
            layer.
        channels_last: run the convolutions on a channels-last copy of ``h`` (the result is
            returned contiguous, so callers see no difference but speed), with the weights
            stored channels-last too. ``None`` (default) does so on CPU only: there oneDNN
            runs these convolutions 10–25% faster in channels-last layout, forward and
            backward (see BENCHMARKS.md), far more than the two layout copies cost; on other
            devices the input is used as given and the weights are kept contiguous. Moving
            the net (``.to()``, ``.cuda()``, ``.cpu()``) re-applies this rule to the weights.

    Raises:
        ValueError: if a size is not a positive integer; at call time if a context is given to
            an unconditional net, is missing for a conditional one, or has the wrong shape.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §3.3 and Appendix.

    Example:
        >>> import torch
        >>> net = CouplingNet(2, 4, hidden=8, context_features=3)
        >>> out = net(torch.randn(5, 2, 6, 6), torch.randn(5, 3))
        >>> out.shape, bool((out == 0).all())
        (torch.Size([5, 4, 6, 6]), True)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 512,
        context_features: Optional[int] = None,
        dropout: float = 0.0,
        channels_last: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(
                f"CouplingNet: channels_last must be True, False or None; got {channels_last!r}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"CouplingNet: dropout must be in [0, 1); got {dropout!r}")
        for label, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("hidden", hidden),
        ):
            _check_positive_int("CouplingNet", label, value)
        if context_features is not None:
            _check_positive_int("CouplingNet", "context_features", context_features)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.hidden = int(hidden)
        self.context_features = None if context_features is None else int(context_features)
        self.conv_in = nn.Conv2d(self.in_channels, self.hidden, 3, padding=1)
        self.conv_hidden = nn.Conv2d(self.hidden, self.hidden, 1)
        self.conv_out = nn.Conv2d(self.hidden, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.context_proj = (
            nn.Linear(self.context_features, self.hidden) if self.context_features else None
        )
        self.drop = Dropout(float(dropout)) if dropout else None
        self.channels_last = channels_last
        self._lay_out_weights()

    def _uses_channels_last(self, h: Tensor) -> bool:
        if self.channels_last is None:
            return h.device.type == "cpu"
        return self.channels_last

    def _lay_out_weights(self) -> None:
        # Weights in the layout of the input they meet: with channels-last input and
        # contiguous weights, eager oneDNN reorders every weight on every call, and compiled
        # graphs copy each weight and its gradient (3×32×32 Glow train step, compiled:
        # 1.14× → 1.08–1.10× the floor, whose nets hold channels-last weights).
        for conv in (self.conv_in, self.conv_hidden, self.conv_out):
            weight = conv.weight
            layout = (torch.channels_last if self._uses_channels_last(weight)
                      else torch.contiguous_format)
            if not weight.is_contiguous(memory_format=layout):
                # .data keeps the Parameter object, so optimizers holding it stay valid.
                weight.data = weight.data.contiguous(memory_format=layout)

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._lay_out_weights()
        return module

    def forward(self, h: Tensor, context: Optional[Tensor] = None) -> Tensor:
        check_context("CouplingNet", context, self.context_features, h.shape[0])
        channels_last = h.dim() == 4 and self._uses_channels_last(h)
        if channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        a = self.conv_in(h)
        if self.context_proj is not None:
            # In place: a convolution's backward needs its input, not its output, so this
            # saves a full-size temporary per call.
            a.add_(self.context_proj(context)[:, :, None, None])
        a = a.relu_()
        a = self.conv_hidden(a if self.drop is None else self.drop(a)).relu_()
        out = self.conv_out(a if self.drop is None else self.drop(a))
        # Contiguous again: callers view and slice the output as (N, C, H, W) rows.
        return out.contiguous() if channels_last else out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"hidden={self.hidden}, context_features={self.context_features}"
            + ("" if self.channels_last is None else f", channels_last={self.channels_last}")
        )


def build_net(
    net: Optional[NetFactory],
    in_channels: int,
    out_channels: int,
    hidden: int,
    context_features: Optional[int],
    owner: str,
    dropout: float = 0.0,
) -> nn.Module:
    """Build a coupling's conditioner from its ``net`` option (see the module docstring).

    Args:
        net: ``None`` for :class:`CouplingNet`, or a factory ``net(in_channels, out_channels)``.
        in_channels: channels the conditioner reads.
        out_channels: channels it must produce.
        hidden: width of the default net (ignored for a custom factory).
        context_features: context size of the default net (ignored for a custom factory).
        owner: the layer's name, for error messages.
        dropout: dropout of the default net (see :class:`CouplingNet`).

    Raises:
        TypeError: if ``net`` is neither ``None`` nor callable, or does not return an
            ``nn.Module``.
        ValueError: if ``dropout`` is given with a custom factory (which builds its own net),
            or is not in ``[0, 1)``.

    Example:
        >>> build_net(None, 2, 4, 8, None, "AffineCoupling")
        CouplingNet(
          in_channels=2, out_channels=4, hidden=8, context_features=None
          (conv_in): Conv2d(2, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
          (conv_hidden): Conv2d(8, 8, kernel_size=(1, 1), stride=(1, 1))
          (conv_out): Conv2d(8, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        )
    """
    if net is None:
        return CouplingNet(in_channels, out_channels, hidden, context_features, dropout)
    if dropout:
        raise ValueError(
            f"{owner}: dropout={dropout!r} applies to the default coupling net only; a custom net "
            f"factory builds its own net, so put the dropout in it"
        )
    if not callable(net):
        raise TypeError(
            f"{owner}: net must be None or a callable net(in_channels, out_channels) -> "
            f"nn.Module; got {type(net).__name__}"
        )
    module = net(in_channels, out_channels)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{owner}: net({in_channels}, {out_channels}) must return an nn.Module; got "
            f"{type(module).__name__}"
        )
    return module


def check_context(
    owner: str, context: Optional[Tensor], context_features: Optional[int], batch: int
) -> None:
    """Raise a clear error unless ``context`` fits a layer built with ``context_features``.

    A layer built with ``context_features=K`` needs a context of shape ``(batch, K)``; a layer
    built without one accepts no context.

    Raises:
        ValueError: naming ``owner``, the rule and the received shape.
    """
    if context_features is None:
        if context is not None:
            raise ValueError(
                f"{owner}: got a context of shape {tuple(context.shape)} but the layer was built "
                f"with context_features=None"
            )
        return
    if context is None:
        raise ValueError(
            f"{owner}: the layer was built with context_features={context_features} and needs a "
            f"context of shape (..., {context_features}); got none"
        )
    if tuple(context.shape) != (batch, context_features):
        raise ValueError(
            f"{owner}: expected a context of shape (..., {context_features}) matching the "
            f"input's batch; got {tuple(context.shape)} for a flat batch of {batch}"
        )


def _check_positive_int(owner: str, label: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{owner}: {label} must be a positive integer; got {value!r}")
