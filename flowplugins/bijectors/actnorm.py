"""Activation normalisation with data-dependent initialisation (Glow §3.1)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import base as _base
from ..base import Bijector

__all__ = ["ActNorm", "channel_sums", "channel_moments_from_sums"]


def channel_sums(x: Tensor) -> Tensor:
    """Per-channel sufficient statistics of a batch ``(N, C, H, W)``, packed for one all-reduce.

    Returns a float64 vector ``[count, Σx_c (C entries), Σx_c² (C entries)]`` where sums run
    over ``(N, H, W)``. Accumulating in float64 keeps ``Σx² / n − mean²`` accurate enough for
    the initial scale even when the inputs are float32 and the global batch is large.

    Shapes:
        x: (N, C, H, W) -> (2C + 1,)
    """
    n, c, h, w = x.shape
    x64 = x.detach().to(torch.float64).transpose(0, 1).reshape(c, -1)
    count = x64.new_full((1,), float(n * h * w))
    return torch.cat([count, x64.sum(1), (x64 * x64).sum(1)])


def channel_moments_from_sums(sums: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and (population) variance from :func:`channel_sums` output.

    The sums may be the element-wise total over several batches (e.g. after an all-reduce over
    ranks), in which case the moments are those of the concatenated batch.

    Shapes:
        sums: (2C + 1,) -> mean: (C,), var: (C,)

    Raises:
        ValueError: if ``sums`` does not have odd length ``2C + 1`` with ``C >= 1``, or the
            count is not positive.
    """
    if sums.dim() != 1 or sums.numel() < 3 or sums.numel() % 2 != 1:
        raise ValueError(
            f"ActNorm: channel sums must be a vector of length 2C + 1; got shape {tuple(sums.shape)}"
        )
    c = (sums.numel() - 1) // 2
    count = sums[0]
    if not bool(count > 0):
        raise ValueError(f"ActNorm: cannot compute moments from a count of {count.item()}")
    mean = sums[1 : 1 + c] / count
    var = (sums[1 + c :] / count - mean * mean).clamp_min(0.0)
    return mean, var


def _distributed_active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


class ActNorm(Bijector):
    """Per-channel affine map whose parameters are initialised from the first training batch.

    Data → latent, per channel ``c``:

    .. math::

        z_{c,h,w} = (x_{c,h,w} + \\text{shift}_c) \\cdot \\exp(\\text{log\\_scale}_c),
        \\qquad \\log|\\det J| = H W \\sum_c \\text{log\\_scale}_c,

    so the log-det costs O(C), independent of the number of pixels.

    **Data-dependent initialisation.** The first ``forward`` call in training mode sets
    ``shift_c = −mean_c`` and ``log_scale_c = log(scale / (std_c + eps))`` with mean and
    (population) standard deviation taken over ``(N, H, W)`` of that batch (all leading batch
    dimensions included), so that this batch leaves the layer with per-channel mean 0 and std
    ``scale``. The update runs without autograd tracking. A constant channel has std 0 and gets
    ``log(scale / eps)``: large but finite, never a division by zero. Afterwards the buffer
    ``initialized`` is ``True``; it is part of the ``state_dict``, so a model restored from a
    checkpoint is not initialised again.

    Under ``torch.distributed`` (available and initialised) the statistics are those of the
    *global* batch: each rank contributes float64 per-channel ``(count, Σx, Σx²)`` to one
    all-reduce, so every rank ends with identical parameters.

    **Train/eval.** Eval mode never initialises. ``inverse`` (latent → data, the sampling
    direction) never initialises either, in any mode: an ActNorm that has not seen data is the
    map given by its current parameters (the identity when freshly constructed).

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        scale: target per-channel standard deviation of the initialising batch's output.
        eps: added to the standard deviation during initialisation (guards constant channels).

    Raises:
        ValueError: if ``scale`` or ``eps`` is not a positive finite number.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §3.1.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = ActNorm((3, 4, 4))
        >>> z, ld = layer(5 + 2 * torch.randn(8, 3, 4, 4))
        >>> bool(layer.initialized), z.shape, ld.shape
        (True, torch.Size([8, 3, 4, 4]), torch.Size([8]))
        >>> abs(z.mean().item()) < 1e-5, round(z.std(unbiased=False).item(), 3)
        (True, 1.0)
    """

    data_dependent_init = True

    def __init__(self, event_shape: Sequence[int], scale: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__(event_shape)
        for name, value in (("scale", scale), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0
            ):
                raise ValueError(f"ActNorm: {name} must be a positive finite number; got {value!r}")
        self.scale = float(scale)
        self.eps = float(eps)
        c = self.event_shape[0]
        self.log_scale = nn.Parameter(torch.zeros(c, 1, 1))
        self.shift = nn.Parameter(torch.zeros(c, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of a True ``initialized`` so that training steps do not read the buffer
        # (a device sync on CUDA, a graph break under torch.compile); reset by state-dict loads.
        self._known_initialized = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._known_initialized = False

    def _is_initialized(self) -> bool:
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def awaits_initialization(self) -> bool:
        """Whether the next training-mode ``forward`` may initialise this layer.

        Eager calls read the ``initialized`` buffer once (after that, its Python mirror). While
        ``torch.compile`` traces, reading the buffer would be a data-dependent branch, so only
        the Python flag counts: a traced pass over a layer whose flag is false runs the
        in-graph initialisation, which keeps the parameters of an already initialised layer.
        """
        if not self.training:
            return False
        if _base.is_compiling():
            return not self._known_initialized
        return not self._is_initialized()

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``shift`` and ``log_scale`` from the batch ``x`` of shape ``(N, C, H, W)``.

        Called automatically by the first training-mode ``forward``; call it directly to
        initialise from a chosen batch. All-reduces the statistics when ``torch.distributed`` is
        initialised (every rank must then call it collectively). A globally empty batch leaves
        the layer uninitialised.
        """
        sums = channel_sums(x)
        if _distributed_active():
            torch.distributed.all_reduce(sums)
        if not bool(sums[0] > 0):
            return
        mean, var = channel_moments_from_sums(sums)
        if not _distributed_active():
            # Within one process a two-pass (centred) variance is more accurate than Σx² − mean²;
            # the distributed path needs sums, which float64 keeps accurate.
            xc = x.detach().to(torch.float64) - mean.view(1, -1, 1, 1)
            var = xc.pow(2).mean(dim=(0, 2, 3))
        shift, log_scale = self._initial_parameters(mean, var)
        self.shift.copy_(shift)
        self.log_scale.copy_(log_scale)
        self.initialized.fill_(True)
        self._known_initialized = True

    def _initial_parameters(self, mean: Tensor, var: Tensor) -> Tuple[Tensor, Tensor]:
        """``shift = −mean`` and ``log_scale = log(scale / (std + eps))`` in the parameters'
        dtype and shape ``(C, 1, 1)``, from float64 per-channel moments ``(C,)``."""
        dtype = self.log_scale.dtype
        std = var.sqrt()
        shift = (-mean).to(dtype).view_as(self.shift)
        log_scale = torch.log(self.scale / (std + self.eps)).to(dtype).view_as(self.log_scale)
        return shift, log_scale

    @torch.no_grad()
    def _initialize_in_graph(self, x: Tensor) -> None:
        """:meth:`initialize` without data-dependent branches, for a pass that ``torch.compile``
        traces in one process: the same float64 two-pass moments, written with
        ``torch.where(initialized, current, initial)`` so that a layer restored from a state dict
        (buffer true, Python flag false) keeps its parameters. The Python flag is set as a
        traced side effect; Dynamo guards on it, so the next call compiles the initialised
        model's graph, whole. An empty batch initialises nothing."""
        if x.numel() == 0:
            return
        x64 = x.detach().to(torch.float64)
        mean = x64.mean(dim=(0, 2, 3))
        var = (x64 - mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
        shift, log_scale = self._initial_parameters(mean, var)
        done = self.initialized
        self.shift.copy_(torch.where(done, self.shift, shift))
        self.log_scale.copy_(torch.where(done, self.log_scale, log_scale))
        self.initialized.fill_(True)
        self._known_initialized = True

    def _logabsdet(self, n: int, sign: int = 1) -> Tensor:
        _, h, w = self.event_shape
        # expand, not repeat: a stride-0 view costs no copy (the composer and memory saving
        # accumulate log-dets out of place).
        return (self.log_scale.sum() * (sign * h * w)).expand(n)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        if self.awaits_initialization():
            if _base.is_compiling() and not _distributed_active():
                self._initialize_in_graph(x)
            else:
                self.initialize(x)
        # Not fused as x·s + shift·s: that loses the exact cancellation x + shift = 0 of a
        # constant channel, whose scale can be 1/eps.
        z = (x + self.shift) * self.log_scale.exp()
        return z, self._logabsdet(x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        x = torch.addcmul(-self.shift, z, torch.exp(-self.log_scale))
        return x, self._logabsdet(z.shape[0], -1)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, scale={self.scale}, eps={self.eps}"
