"""Invertible 1x1 convolutions (Glow §3.2): a full weight matrix and its LU parametrisation."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import base as _base
from ..base import Bijector
from ..derived_cache import DerivedTensorCache, register_derivation

__all__ = ["InvertibleConv1x1", "LUInvertibleConv1x1", "random_rotation"]


def random_rotation(n: int, seed: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A Haar-distributed random orthogonal ``(n, n)`` matrix (QR of a Gaussian matrix).

    Drawn in float64 on the CPU from a local ``torch.Generator`` seeded with ``seed`` (or from
    the global generator when ``seed`` is ``None``), then cast to ``dtype`` (default: the
    default dtype).
    """
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    # Fixing the signs of R's diagonal makes Q Haar-distributed rather than biased by QR's convention.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(dtype or torch.get_default_dtype())


def _check_seed(owner: str, seed: Optional[int]) -> None:
    valid = seed is None or (
        isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64
    )
    if not valid:
        raise ValueError(
            f"{owner}: seed must be None or a non-negative integer below 2**64 (a torch seed); "
            f"got {seed!r}"
        )


# Up to this many input channels, compiled sampling writes the 1x1 convolution as C
# multiply-adds that Inductor fuses into the neighbouring kernels instead of a matmul call:
# 1×8×8 sampling (C = 4 and 8) ran 1.155 → 1.119× its eager floor, 2 threads, A/B in one
# process; at C = 12 (3×32×32) the fused kernels were slower, 1.46 → 1.70×.
UNROLLED_CHANNELS = 8

# Up to this many input channels, a compiled train step (traced with autograd) also takes the
# pixel-major (N·H·W, C) × (C, C_out) product: one ``mm`` forward and two backward instead of a
# ``bmm`` over N tiny matrices and a reduction of the weight's gradient. With Inductor's C++
# wrapper, 1×8×8 train steps (C = 4 and 8) ran 1.158 → 1.110× the eager floor at 2 threads and
# 1.091 → 1.073× at 1 (A/B in one process); at 3×32×32 (C ≥ 12) the bmm was 1-2 points faster.
PIXEL_MAJOR_TRAINING_CHANNELS = 8


def apply_channel_matrix(weight: Tensor, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``out[n, :, h, w] = weight @ x[n, :, h, w] (+ bias)``: a 1x1 convolution as a batched matmul.

    Eager, ``torch.bmm`` over ``(N, C, H·W)`` rather than ``F.conv2d`` with a ``C×C×1×1`` kernel: on
    CPU, oneDNN's convolution has a large fixed cost per call and no fast path for 1x1 kernels
    on small images (2-13× slower than the matmul at the shapes of a Glow, ``BENCHMARKS.md``).
    The ``weight`` is broadcast with ``expand``, so it is never copied per sample.

    Shapes:
        weight: (C_out, C), x: (N, C, H, W), bias: (C_out,) -> (N, C_out, H, W)
    """
    if _base.is_compiling():
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            # Traced with autograd (a compiled train step): see PIXEL_MAJOR_TRAINING_CHANNELS;
            # above it the product stays the bmm below.
            if x.shape[1] <= PIXEL_MAJOR_TRAINING_CHANNELS:
                return _pixel_major_product(weight, x, bias)
        else:
            # Traced without autograd (compiled sampling): for a few channels, multiply-adds
            # (UNROLLED_CHANNELS); otherwise one (N·H·W, C) × (C, C_out) product on a
            # pixel-major view, whose permutes Inductor folds into the neighbouring kernels;
            # the result is a channels-last view. A compiled sampling call ran 1.32 → 1.23× its
            # floor at 1×8×8 and 1.17 → 1.07× at 3×32×32 (A/B in one process, 1 thread).
            c = x.shape[1]
            if c <= UNROLLED_CHANNELS:
                out = weight[:, 0].view(1, -1, 1, 1) * x[:, :1]
                for i in range(1, c):
                    out = out + weight[:, i].view(1, -1, 1, 1) * x[:, i:i + 1]
                return out if bias is None else out + bias.view(1, -1, 1, 1)
            return _pixel_major_product(weight, x, bias)
    n, c, h, w = x.shape
    c_out = weight.shape[0]
    x3 = x.reshape(n, c, h * w)
    if bias is None:
        out = torch.bmm(weight.expand(n, c_out, c), x3)
    else:
        out = torch.baddbmm(bias.view(1, c_out, 1), weight.expand(n, c_out, c), x3)
    return out.view(n, c_out, h, w)


def _pixel_major_product(weight: Tensor, x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``apply_channel_matrix`` as one ``(N·H·W, C) × (C, C_out)`` product; a channels-last view."""
    out = torch.matmul(x.permute(0, 2, 3, 1), weight.t())
    if bias is not None:
        out = out + bias
    return out.permute(0, 3, 1, 2)


def _lu_factors(lower: Tensor, upper: Tensor, log_abs_s: Tensor, permutation: Tensor, sign: Tensor,
                eye: Tensor, strict_lower: Tensor, strict_upper: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``P``, unit lower ``L`` and ``U + diag(sign·exp(log_abs_s))`` of an LU 1x1 convolution."""
    # Dense P (rows of the identity) from the buffer on every build, so that a loaded
    # ``permutation`` is always honoured; a matmul by a constant has a cheaper backward than
    # the row gather (whose backward scatters into zeros).
    unit_lower = torch.addcmul(eye, lower, strict_lower)
    full_upper = torch.addcmul(torch.diag(sign * log_abs_s.exp()), upper, strict_upper)
    return eye[permutation], unit_lower, full_upper


def _triangle_masks(c: int, like: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The ``C×C`` identity and strict lower / upper masks, in ``like``'s dtype and device."""
    ones = torch.ones(c, c, dtype=like.dtype, device=like.device)
    return torch.eye(c, dtype=like.dtype, device=like.device), ones.tril(-1), ones.triu(1)


def _lu_weight(*sources: Tensor) -> Tensor:
    """``W = P L U`` from the sources of :func:`_lu_factors`."""
    perm, lower, upper = _lu_factors(*sources)
    return perm @ (lower @ upper)


def _lu_inverse_weight(*sources: Tensor) -> Tensor:
    """``W⁻¹ = U⁻¹ L⁻¹ Pᵀ`` from the sources of :func:`_lu_factors`."""
    perm, lower, upper = _lu_factors(*sources)
    # Triangular solves instead of a general inverse: exact structure, better conditioning.
    y = torch.linalg.solve_triangular(lower, perm.T, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper, y, upper=True)


def _lu_inverse_from_state(lower: Tensor, upper: Tensor, log_abs_s: Tensor, permutation: Tensor,
                           sign: Tensor) -> Tensor:
    """``W⁻¹`` from the LU conv's parameters and persistent buffers alone: the masks are
    rebuilt, so the cache key and a compiled graph's inputs leave them out."""
    return _lu_inverse_weight(lower, upper, log_abs_s, permutation, sign,
                              *_triangle_masks(lower.shape[0], lower))


register_derivation("flowplugins.LUInvertibleConv1x1.inverse", _lu_inverse_from_state)
register_derivation("flowplugins.InvertibleConv1x1.inverse", torch.linalg.inv)
register_derivation("flowplugins.InvertibleConv1x1.logabsdet",
                    lambda weight: torch.linalg.slogdet(weight)[1], shape=lambda weight: ())


class _CachedConv1x1(Bijector):
    """Shared machinery: apply ``W`` as a 1x1 convolution (a batched matmul) and cache derived matrices.

    Derived quantities (``W``, ``W⁻¹``, ``log|det W|``) are cached only in eval mode and only
    while autograd is not recording for the parameters (``torch.no_grad()``,
    ``torch.inference_mode()``, frozen parameters); otherwise they are computed afresh and
    differentiably. The cache key holds every parameter's and buffer's ``_version`` counter,
    storage address, dtype and device: in-place updates through autograd-visible ops (optimizer
    steps with the default for-loop or foreach implementations, ``load_state_dict``, writes
    under ``torch.no_grad()``) bump the counters, and ``.to()`` / ``.double()`` replace the
    storage. ``train()`` / ``eval()`` clear the cache. Writes that bypass the version counter —
    ``param.data.copy_(...)`` or a ``fused=True`` optimizer — are invisible to the key, which is
    why training mode never uses the cache; after such a write in eval mode call
    :meth:`clear_cache` (or toggle ``train()``/``eval()``).
    """

    def __init__(self, event_shape: Sequence[int]) -> None:
        super().__init__(event_shape)
        self._derived = DerivedTensorCache()

    def _use_cache(self) -> bool:
        if self.training:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))

    def clear_cache(self) -> None:
        """Drop cached matrices (needed only after writes that bypass version counters)."""
        self._derived.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    # Names of registered pure functions of ``_derivation_sources()`` for "weight", "inverse"
    # and "logabsdet". With them, compiled eval-mode graphs use the cache too
    # (DerivedTensorCache.derive). Never inherited (see __init_subclass__): a subclass may
    # override a builder.
    _derivations: Dict[str, str] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "_derivations" not in cls.__dict__:
            cls._derivations = {}

    def _derivation_sources(self) -> Tuple[Tensor, ...]:
        """The tensors the derived values are built from, in the order the derivations take."""
        return (*self.parameters(), *self.buffers())

    def _get(self, name: str, build: Callable[[], Tensor]) -> Tensor:
        if not self._use_cache():
            return build()
        sources = self._derivation_sources()
        if _base.is_compiling():
            derivation = self._derivations.get(name)
            if derivation is not None:
                return self._derived.derive(derivation, sources)
        return self._derived.get(name, build, sources)

    # Subclasses provide these three builders.
    def _build_weight(self) -> Tensor:
        raise NotImplementedError

    def _build_inverse_weight(self) -> Tensor:
        raise NotImplementedError

    def _build_logabsdet(self) -> Tensor:
        """``log|det W|`` (a scalar), not yet multiplied by ``H·W``."""
        raise NotImplementedError

    def weight_matrix(self) -> Tensor:
        """The current ``C×C`` weight ``W`` (from the cache in eval mode when autograd is not recording)."""
        return self._get("weight", self._build_weight)

    def _conv(self, x: Tensor, weight: Tensor) -> Tensor:
        return apply_channel_matrix(weight, x)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        _, h, w = self.event_shape
        weight = self._get("weight", self._build_weight)
        ld = self._get("logabsdet", self._build_logabsdet) * (h * w)
        return self._conv(x, weight), ld.expand(x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        _, h, w = self.event_shape
        weight_inv = self._get("inverse", self._build_inverse_weight)
        ld = self._get("logabsdet", self._build_logabsdet) * (-(h * w))
        return self._conv(z, weight_inv), ld.expand(z.shape[0])


class LUInvertibleConv1x1(_CachedConv1x1):
    """Invertible 1x1 convolution with an LU-parametrised weight and an O(C) log-det.

    Data → latent, at every pixel: ``z[:, h, w] = W x[:, h, w]`` with

    .. math::

        W = P \\, L \\, \\big(U + \\operatorname{diag}(\\text{sign} \\odot \\exp(\\text{log\\_abs\\_s}))\\big),
        \\qquad \\log|\\det J| = H W \\sum_c \\text{log\\_abs\\_s}_c,

    where ``P`` (buffer ``permutation``, as row indices) and ``sign`` (buffer) are fixed, ``L``
    is unit lower-triangular (parameter ``lower``, strictly-lower part used) and ``U`` strictly
    upper-triangular (parameter ``upper``, strictly-upper part used). The exponential keeps the
    diagonal non-zero, so ``W`` is invertible for any parameter values. Initialised from the LU
    decomposition of a random rotation.

    Applied as a batched matmul over ``(N, C, H·W)`` (one ``C×C`` weight, never a per-pixel
    matrix; see :func:`apply_channel_matrix`). The inverse
    uses ``W⁻¹ = (U + diag)⁻¹ L⁻¹ Pᵀ`` by two triangular solves of the ``C×C`` factors.

    **Train/eval.** In eval mode without autograd recording for the parameters (sampling,
    evaluation under ``torch.no_grad()``), ``W`` and ``W⁻¹`` are cached and rebuilt only when a
    parameter or buffer has changed (optimizer step, ``load_state_dict``, ``.to()``), so
    sampling pays no O(C³) work per call, inside a ``torch.compile``'d graph too (``W⁻¹`` comes
    through the operator ``flowplugins::derived_tensors``, which checks the cache's key each
    time the graph runs; :mod:`flowplugins.derived_cache`). In training mode, or while autograd records, they are
    recomputed differentiably on every call (O(C³) on a ``C×C`` matrix, small next to the
    convolution itself). ``train()``/``eval()`` clear the cache; parameter writes that bypass
    autograd's version counters (``param.data.copy_(...)``, ``fused=True`` optimizers) while in
    eval mode need :meth:`clear_cache`.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        seed: seed of a local generator for the random-rotation initialisation; ``None`` uses
            the global torch generator.

    Raises:
        ValueError: if ``seed`` is not ``None`` or an integer in ``[0, 2**64)``.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §3.2.

    Example:
        >>> import torch
        >>> layer = LUInvertibleConv1x1((4, 3, 3), seed=0)
        >>> x = torch.randn(2, 4, 3, 3)
        >>> z, ld = layer(x)
        >>> x_back, ld_inv = layer.inverse(z)
        >>> torch.allclose(x_back, x, atol=1e-5), torch.allclose(ld, -ld_inv)
        (True, True)
    """

    def __init__(self, event_shape: Sequence[int], seed: Optional[int] = None) -> None:
        super().__init__(event_shape)
        _check_seed("LUInvertibleConv1x1", seed)
        self.seed = seed
        c = self.event_shape[0]
        q = random_rotation(c, seed, dtype=torch.float64)
        p, l, u = torch.linalg.lu(q)
        s = torch.diagonal(u)
        dtype = torch.get_default_dtype()
        self.lower = nn.Parameter(torch.tril(l, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(u, 1).to(dtype))
        self.log_abs_s = nn.Parameter(s.abs().log().to(dtype))
        # P @ M == M[permutation]: row i of P has its 1 in column permutation[i].
        self.register_buffer("permutation", p.argmax(dim=1))
        self.register_buffer("sign", torch.sign(s).to(dtype))
        # Constant masks, built once rather than by tril/triu/eye on every training step. Not
        # persistent: the state dict is unchanged, and .to()/.double() still move them.
        for name, mask in zip(("_eye", "_strict_lower", "_strict_upper"),
                              _triangle_masks(c, self.lower)):
            self.register_buffer(name, mask, persistent=False)

    _derivations = {
        # W and log|det W| cost less in the graph than a call out of it.
        "inverse": "flowplugins.LUInvertibleConv1x1.inverse",
    }

    def _derivation_sources(self) -> Tuple[Tensor, ...]:
        # The state W depends on; the constant masks are not part of it (see _masks).
        return (self.lower, self.upper, self.log_abs_s, self.permutation, self.sign)

    def _masks(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The identity and the strict lower / upper masks that :func:`_lu_factors` takes."""
        if _base.is_compiling():
            # In a graph they are index arithmetic fused into the kernels that read them; as
            # buffers they would be graph inputs, three more tensors per conv for the compiled
            # function's guards to check on every call.
            return _triangle_masks(self.event_shape[0], self.lower)
        return self._eye, self._strict_lower, self._strict_upper

    def _build_weight(self) -> Tensor:
        return _lu_weight(*self._derivation_sources(), *self._masks())

    def _build_inverse_weight(self) -> Tensor:
        return _lu_inverse_weight(*self._derivation_sources(), *self._masks())

    def _build_logabsdet(self) -> Tensor:
        return self.log_abs_s.sum()

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, seed={self.seed}"


class InvertibleConv1x1(_CachedConv1x1):
    """Invertible 1x1 convolution with a full, unconstrained weight matrix (for ablations).

    Data → latent, at every pixel: ``z[:, h, w] = W x[:, h, w]`` with parameter ``weight``
    (``C×C``, initialised to a random rotation) and

    .. math::

        \\log|\\det J| = H W \\log|\\det W|.

    ``log|det W|`` costs O(C³) (``torch.linalg.slogdet``) while training; in eval mode without
    autograd recording it is cached together with ``W⁻¹`` and rebuilt only after the weight
    changes (see :class:`LUInvertibleConv1x1`). Unlike the LU form, nothing keeps ``W`` invertible during
    training.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        seed: seed of a local generator for the random-rotation initialisation; ``None`` uses
            the global torch generator.

    Raises:
        ValueError: if ``seed`` is not ``None`` or an integer in ``[0, 2**64)``.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §3.2.

    Example:
        >>> import torch
        >>> layer = InvertibleConv1x1((3, 2, 2), seed=0)
        >>> z, ld = layer(torch.randn(5, 3, 2, 2))
        >>> z.shape, round(ld[0].item(), 6)  # a rotation has |det W| = 1
        (torch.Size([5, 3, 2, 2]), 0.0)
    """

    def __init__(self, event_shape: Sequence[int], seed: Optional[int] = None) -> None:
        super().__init__(event_shape)
        _check_seed("InvertibleConv1x1", seed)
        self.seed = seed
        self.weight = nn.Parameter(random_rotation(self.event_shape[0], seed))

    _derivations = {
        "inverse": "flowplugins.InvertibleConv1x1.inverse",
        "logabsdet": "flowplugins.InvertibleConv1x1.logabsdet",
    }

    def _derivation_sources(self) -> Tuple[Tensor, ...]:
        return (self.weight,)

    def _build_weight(self) -> Tensor:
        return self.weight

    def _build_inverse_weight(self) -> Tensor:
        return torch.linalg.inv(self.weight)

    def _build_logabsdet(self) -> Tensor:
        return torch.linalg.slogdet(self.weight)[1]

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, seed={self.seed}"
