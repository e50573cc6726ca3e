"""bf16 mixed precision for training flows: conditioner networks in bf16, the flow in float32.

A normalizing flow's loss is a sum of many log-determinants, ``log p(x) = log p(z) +
Σ_k log|det J_k|``, and the invertible stream ``x → z`` must stay accurate for the inverse to
hold. Autocasting the whole forward pass would run the invertible 1x1 convolutions in bf16
(8 bits of mantissa) and round each coupling's ``Σ log s`` to bf16 — an error of order one nat
per layer on a log-det of hundreds. So only the *conditioners* (the networks inside couplings
and split priors that predict shift and scale, where almost all the FLOPs are) run under
:func:`torch.autocast`; their outputs are cast back to the parameters' dtype (float32) before
the bijector uses them. The invertible stream, every log-det, their sum and the loss stay
float32.

A conditioner is any child module of a :class:`~flowplugins.base.Bijector` that holds
parameters and contains no bijector itself (``CouplingNet``, a split prior's convolution, a
third-party coupling's net).

On CPU, bf16 autocast works but is only faster on processors with native bf16 instructions
(AVX512-BF16 / AMX); elsewhere it is slower than float32 — see ``benchmarks/ddp_scaling.md``.
"""

from __future__ import annotations

from typing import Any, List

import torch
from torch import nn

from ..base import Bijector

__all__ = ["AMP_DTYPES", "autocast_conditioners"]

#: ``TrainConfig.amp`` / ``--amp`` values and the autocast dtype each one selects.
AMP_DTYPES = {"bf16": torch.bfloat16}


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


class _AutocastForward:
    """``forward`` of one conditioner, run under autocast with its output cast back."""

    def __init__(self, forward, device_type: str, dtype: torch.dtype, out_dtype: torch.dtype) -> None:
        self.forward = forward
        self.device_type = device_type
        self.dtype = dtype
        self.out_dtype = out_dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.forward(*args, **kwargs)
        return _cast_floats(out, self.out_dtype)


def autocast_conditioners(model: nn.Module, device_type: str, amp: str = "bf16") -> List[str]:
    """Run every conditioner network of ``model`` under ``torch.autocast(device_type, bf16)``.

    The change is to each conditioner instance's ``forward`` only: the ``state_dict`` (and so
    every checkpoint) is the same as without mixed precision, and a model trained with
    ``--amp bf16`` loads and samples in float32. Calling it twice is harmless.

    Args:
        model: the flow (any module holding bijectors).
        device_type: ``"cuda"`` or ``"cpu"``, as for :func:`torch.autocast`.
        amp: a key of :data:`AMP_DTYPES`.

    Returns:
        The qualified names of the conditioners now under autocast.

    Raises:
        ValueError: for an unknown ``amp`` value.

    Example:
        >>> import torch, flowplugins
        >>> flow = flowplugins.glow((1, 4, 4), levels=1, depth=1, hidden=8, backend="torch")
        >>> autocast_conditioners(flow, "cpu")
        ['steps.4.net']
        >>> flow.log_prob(torch.rand(2, 1, 4, 4)).dtype
        torch.float32
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"autocast_conditioners: amp must be one of {sorted(AMP_DTYPES)}; got {amp!r}")
    dtype = AMP_DTYPES[amp]
    patched = []
    for owner_name, owner in model.named_modules():
        if not isinstance(owner, Bijector):
            continue
        for child_name, child in owner.named_children():
            if isinstance(child.forward, _AutocastForward):
                patched.append(f"{owner_name}.{child_name}".lstrip("."))
                continue
            params = list(child.parameters())
            if not params or any(isinstance(m, Bijector) for m in child.modules()):
                continue
            child.forward = _AutocastForward(child.forward, device_type, dtype, params[0].dtype)
            patched.append(f"{owner_name}.{child_name}".lstrip("."))
    return patched
