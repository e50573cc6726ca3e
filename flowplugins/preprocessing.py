"""Data-side helpers for image flows: dequantisation, quantisation, bit reduction, bits/dim.

These are plain functions on tensors, not bijectors. The usual pipeline is::

    levels (uint8, 0..2^n−1) --reduce_bits--> levels (0..2^b−1) --dequantize--> x in [0, 1)
    x --model (e.g. LogitTransform + Glow)--> log p(x) --bits_per_dim--> bits/dim
    samples in [0, 1] --quantize--> levels

**Discrete vs continuous.** Images are discrete: each of the ``D`` dimensions takes one of
``K = 2^n`` levels ``k``. Uniform dequantisation maps level ``k`` to ``x = (k + u)/K`` with
``u ~ U[0, 1)^D``, so the cube of side ``1/K`` above ``k`` is covered exactly once. For a
density ``p`` on ``[0, 1)^D``, ``P(k) = ∫_{cube(k)} p(x) dx`` is a proper discrete
distribution, and by Jensen's inequality

.. math::

    \\log P(k) \\ge \\mathbb{E}_u[\\log p((k + u)/K)] − D \\log K,

so ``−log p(x) + D·n·log 2``, averaged over dequantised data, upper-bounds the discrete model's
negative log-likelihood; divided by ``D·log 2`` it is the bits/dim every flow paper reports
(Theis et al., arXiv:1511.01844, §3.1; Ho et al., arXiv:1902.00275, §3.1).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["bits_per_dim", "dequantize", "quantize", "reduce_bits"]

_MAX_BITS = 16


def _check_bits(owner: str, name: str, n_bits: int) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= _MAX_BITS:
        raise ValueError(f"{owner}: {name} must be an integer in [1, {_MAX_BITS}]; got {n_bits!r}")
    return n_bits


def _check_levels(owner: str, x: Tensor, n_bits: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: expected a torch.Tensor; got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(
            f"{owner}: expected an integer tensor of levels 0..{2 ** n_bits - 1}; got dtype "
            f"{x.dtype} (convert images in [0, 1] with quantize() first)"
        )
    if x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= 2**n_bits:
            raise ValueError(
                f"{owner}: levels must lie in [0, {2 ** n_bits - 1}] for n_bits={n_bits}; "
                f"got values in [{lo}, {hi}]"
            )


def dequantize(
    x: Tensor,
    n_bits: int = 8,
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Uniformly dequantise integer levels to continuous values in ``[0, 1)``.

    ``y = (k + u) / 2^n_bits`` with ``u ~ U[0, 1)`` drawn independently per element. Each
    output is clamped below ``(k + 1) / 2^n_bits`` in the output dtype (float rounding could
    otherwise reach it), so ``quantize(dequantize(k), n_bits) == k`` exactly and ``y < 1``.

    Shapes:
        x: (*) -> y: (*)

    Args:
        x: integer tensor (e.g. ``uint8`` images) of levels ``0 .. 2^n_bits − 1``.
        n_bits: bits per dimension of ``x`` (8 for ordinary images, 5 for Glow's CelebA-HQ).
        generator: optional ``torch.Generator`` (on ``x``'s device) for the noise.
        dtype: floating output dtype; default ``torch.get_default_dtype()``.

    Raises:
        TypeError: if ``x`` is not an integer tensor or ``dtype`` is not floating.
        ValueError: if ``n_bits`` is not in ``[1, 16]`` or a level is out of range.

    References:
        Theis et al., A note on the evaluation of generative models, arXiv:1511.01844, §3.1.

    Example:
        >>> import torch
        >>> k = torch.tensor([0, 7, 255], dtype=torch.uint8)
        >>> y = dequantize(k, generator=torch.Generator().manual_seed(0))
        >>> bool(((y >= k / 256) & (y < (k.long() + 1) / 256)).all()), torch.equal(quantize(y), k)
        (True, True)
    """
    _check_bits("dequantize", "n_bits", n_bits)
    _check_levels("dequantize", x, n_bits)
    dtype = dtype or torch.get_default_dtype()
    if not dtype.is_floating_point:
        raise TypeError(f"dequantize: dtype must be a floating dtype; got {dtype}")
    k = x.to(dtype)
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    scale = 1.0 / 2**n_bits
    # (k + 1)·2^-n is exact in binary floating point; its predecessor is the largest value
    # still inside level k's bin.
    upper = torch.nextafter((k + 1) * scale, torch.zeros((), dtype=dtype, device=x.device))
    return torch.minimum((k + u) * scale, upper)


def quantize(x: Tensor, n_bits: int = 8) -> Tensor:
    """Map values in ``[0, 1]`` back to integer levels: ``k = clamp(floor(x·2^n_bits), 0, 2^n_bits − 1)``.

    The inverse of :func:`dequantize` up to the noise; use it to turn model samples into images
    (values outside ``[0, 1]`` are clamped).

    Shapes:
        x: (*) -> k: (*), ``uint8`` when ``n_bits <= 8``, else ``int32``

    Args:
        x: floating tensor of values in ``[0, 1]``.
        n_bits: number of bits of the output levels.

    Raises:
        TypeError: if ``x`` is not a floating tensor.
        ValueError: if ``n_bits`` is not in ``[1, 16]`` or ``x`` contains NaN or ±inf.

    Example:
        >>> import torch
        >>> quantize(torch.tensor([0.0, 0.5, 0.999, 1.0, 1.7]), n_bits=8).tolist()
        [0, 128, 255, 255, 255]
    """
    _check_bits("quantize", "n_bits", n_bits)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"quantize: expected a floating tensor of values in [0, 1]; got "
            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}"
        )
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError("quantize: input contains NaN or inf (did the model diverge?)")
    levels = 2**n_bits
    out_dtype = torch.uint8 if n_bits <= 8 else torch.int32
    return torch.floor(x * levels).clamp_(0, levels - 1).to(out_dtype)


def reduce_bits(images: Tensor, n_bits: int, from_bits: int = 8) -> Tensor:
    """Drop the low bits of integer images: ``k' = floor(k / 2^(from_bits − n_bits))``.

    Glow's 5-bit CelebA-HQ experiments use ``reduce_bits(images, 5)``, then
    ``dequantize(..., n_bits=5)``.

    Shapes:
        images: (*) -> (*), same integer dtype, levels ``0 .. 2^n_bits − 1``

    Args:
        images: integer tensor of levels ``0 .. 2^from_bits − 1``.
        n_bits: bits to keep, ``1 <= n_bits <= from_bits``.
        from_bits: bits of the input levels.

    Raises:
        TypeError: if ``images`` is not an integer tensor.
        ValueError: if ``n_bits`` is not in ``[1, from_bits]`` or a level is out of range.

    References:
        Kingma & Dhariwal, Glow, arXiv:1807.03039, §6 (5-bit images).

    Example:
        >>> import torch
        >>> reduce_bits(torch.tensor([0, 7, 8, 255], dtype=torch.uint8), 5).tolist()
        [0, 0, 1, 31]
    """
    _check_bits("reduce_bits", "from_bits", from_bits)
    _check_bits("reduce_bits", "n_bits", n_bits)
    if n_bits > from_bits:
        raise ValueError(
            f"reduce_bits: n_bits must not exceed from_bits={from_bits}; got n_bits={n_bits}"
        )
    _check_levels("reduce_bits", images, from_bits)
    return torch.div(images, 2 ** (from_bits - n_bits), rounding_mode="floor").to(images.dtype)


def bits_per_dim(
    log_prob: Union[Tensor, float], num_dims: int, n_bits: int = 8
) -> Union[Tensor, float]:
    """Bits per dimension of discrete data from the log-density of its dequantised version.

    .. math::

        \\text{bpd} = \\frac{−\\log p(x) + D \\, n \\log 2}{D \\log 2},

    where ``log p(x)`` is the density (natural log) of ``x = (k + u)/2^n`` on the ``[0, 1)``
    scale: include every preprocessing log-det (e.g. :class:`LogitTransform`'s) in it. The
    ``D·n·log 2`` term converts the density on ``[0, 1)`` to a probability of the bin of side
    ``2^−n``; by the bound in the module docstring the result upper-bounds the discrete
    model's bits/dim. Data scaled to ``[−½, ½)`` has the same density (a shift); data on another
    scale needs its own ``log`` Jacobian added first.

    Shapes:
        log_prob: (*) -> bpd: (*)

    Args:
        log_prob: ``log p(x)`` per example (tensor or float), in nats.
        num_dims: ``D``, the number of dimensions per example (``C·H·W``).
        n_bits: bits per dimension of the discrete data.

    Raises:
        ValueError: if ``num_dims`` is not a positive integer or ``n_bits`` is not in
            ``[1, 16]``.

    Example:
        >>> import math
        >>> bits_per_dim(0.0, num_dims=3 * 32 * 32)  # a uniform density on [0, 1)^D
        8.0
        >>> round(bits_per_dim(-3072 * math.log(2), num_dims=3072), 6)
        9.0
    """
    _check_bits("bits_per_dim", "n_bits", n_bits)
    if isinstance(num_dims, bool) or not isinstance(num_dims, int) or num_dims < 1:
        raise ValueError(f"bits_per_dim: num_dims must be a positive integer; got {num_dims!r}")
    return -log_prob / (num_dims * math.log(2.0)) + n_bits
