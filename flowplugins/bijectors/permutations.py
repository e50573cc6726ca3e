"""Fixed channel permutations: Glow's "reverse" and "shuffle" ablations (Glow §3.2, §5.1)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..base import Bijector

__all__ = ["ReversePermutation", "ShufflePermutation"]


class ReversePermutation(Bijector):
    """Reverse the order of the channels.

    Data → latent: ``z[c, h, w] = x[C − 1 − c, h, w]``. Its own inverse and volume preserving,
    so ``log|det J| = 0``.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.

    Raises:
        ValueError: if ``event_shape`` is not three positive integers.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §3.2 and §5.1; Dinh et al., Density estimation using Real NVP,
        arXiv:1605.08803.

    Example:
        >>> import torch
        >>> z, ld = ReversePermutation((3, 1, 1))(torch.tensor([0., 1., 2.]).view(1, 3, 1, 1))
        >>> z.flatten().tolist(), ld.tolist()
        ([2.0, 1.0, 0.0], [0.0])
    """

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return x.flip(1), x.new_zeros(x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return z.flip(1), z.new_zeros(z.shape[0])


class ShufflePermutation(Bijector):
    """A fixed random permutation of the channels.

    Data → latent: ``z[c, h, w] = x[π(c), h, w]`` with ``π`` drawn once at construction and kept
    in the buffers ``permutation`` (``π``) and ``inverse_permutation`` (``π⁻¹``), so it is saved
    in the ``state_dict`` and follows ``.to(device)``. Volume preserving: ``log|det J| = 0``.
    The layer has no floating-point state, so it accepts any floating dtype; an input on another
    device than the buffers is indexed with a copy of them on the input's device.

    Shapes:
        x: (..., C, H, W) -> z: (..., C, H, W); logabsdet: (...)

    Args:
        event_shape: ``(C, H, W)``.
        seed: seed of a local generator for drawing ``π``; ``None`` uses the global torch
            generator.

    Raises:
        ValueError: if ``seed`` is not ``None`` or an integer in ``[0, 2**64)``.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039, §5.1.

    Example:
        >>> import torch
        >>> layer = ShufflePermutation((4, 2, 2), seed=0)
        >>> x = torch.randn(3, 4, 2, 2)
        >>> z, ld = layer(x)
        >>> torch.equal(layer.inverse(z)[0], x), torch.equal(z, x[:, layer.permutation])
        (True, True)
    """

    def __init__(self, event_shape: Sequence[int], seed: Optional[int] = None) -> None:
        super().__init__(event_shape)
        valid = seed is None or (
            isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64
        )
        if not valid:
            raise ValueError(
                f"ShufflePermutation: seed must be None or a non-negative integer below 2**64 "
                f"(a torch seed); got {seed!r}"
            )
        self.seed = seed
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        perm = torch.randperm(self.event_shape[0], generator=gen)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    @staticmethod
    def _permute(x: Tensor, index: Tensor) -> Tensor:
        if index.device != x.device:
            index = index.to(x.device)
        return x.index_select(1, index)

    def _forward(self, x: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return self._permute(x, self.permutation), x.new_zeros(x.shape[0])

    def _inverse(self, z: Tensor, context: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        return self._permute(z, self.inverse_permutation), z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, seed={self.seed}"
