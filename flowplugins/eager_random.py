"""Random draws that a ``torch.compile`` graph takes from torch's own generator, not Inductor's.

Inductor lowers ``torch.randn`` / ``torch.rand`` on CPU to its own per-element random kernel:
the kernel that drew a 1×8×8 Glow's latent for a batch of 64 (4,096 numbers, fused with the
squeeze's copies) took 175 µs a call against 16–21 µs for ``torch.randn``, 1 thread, about an
eighth of what the compiled sampling call spent beyond its coupling nets. Here the draw is an
operator (``flowplugins::standard_normal``) that Inductor calls as an external kernel, so
compiled code draws exactly what eager code draws: with the same seed a compiled
:meth:`~flowplugins.models.multiscale.MultiscaleFlow.sample` returns the eager samples.
Outside a compiled graph these are plain ``torch.randn`` calls.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .base import is_compiling

__all__ = ["standard_normal"]


def _standard_normal(shape: List[int], like: Tensor) -> Tensor:
    return torch.randn(shape, dtype=like.dtype, device=like.device)


def _define_standard_normal_op():
    """``flowplugins::standard_normal``, or ``None`` where torch cannot register its fake
    (shape-only) version (before 2.4) or the name is taken (a second copy of this module):
    compiled graphs then draw with Inductor's generator."""
    register_fake = getattr(torch.library, "register_fake", None)
    if register_fake is None:
        return None
    try:
        # nondeterministic_seeded: two draws are never merged into one, as pure calls may be.
        _LIBRARY.define("standard_normal(int[] shape, Tensor like) -> Tensor",
                        tags=(torch.Tag.nondeterministic_seeded,))
    except RuntimeError:
        return None
    _LIBRARY.impl("standard_normal", _standard_normal, "CompositeExplicitAutograd")
    register_fake("flowplugins::standard_normal", lambda shape, like: like.new_empty(shape),
                  lib=_LIBRARY)
    return torch.ops.flowplugins.standard_normal.default


_LIBRARY = torch.library.Library("flowplugins", "FRAGMENT")
_STANDARD_NORMAL_OP = _define_standard_normal_op()


def standard_normal(shape: Sequence[int], like: Tensor) -> Tensor:
    """``torch.randn(shape)`` in ``like``'s dtype and device, drawn from torch's global
    generator also inside a compiled graph.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> a = standard_normal((2, 3), torch.empty(0))
        >>> _ = torch.manual_seed(0)
        >>> torch.equal(a, torch.randn(2, 3))
        True
    """
    shape = [int(s) for s in shape]
    if is_compiling() and _STANDARD_NORMAL_OP is not None:
        return _STANDARD_NORMAL_OP(shape, like)
    return torch.randn(shape, dtype=like.dtype, device=like.device)
