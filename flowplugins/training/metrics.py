"""Evaluation in bits per dimension, and an exponential moving average of the weights."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from ..data import ImageSplit, batch_loader, bits_per_dim, dequantize

__all__ = ["evaluate_bpd", "EMA", "ContextFn"]

ContextFn = Callable[[Tensor], Optional[Tensor]]


@torch.no_grad()
def evaluate_bpd(
    model: nn.Module,
    split: ImageSplit,
    n_levels: int,
    batch_size: int = 512,
    samples: int = 1,
    seed: int = 0,
    context_fn: Optional[ContextFn] = None,
    device: torch.device | str = "cpu",
    dequantizer: Optional[nn.Module] = None,
) -> float:
    """Mean bits/dim of ``split`` under ``model``, over ``samples`` dequantization draws per image.

    ``bpd = (−log p(x) + log q(u|k) + D log n_levels) / (D log 2)`` with
    ``x = (k + u) / n_levels``, ``u ~ q`` (uniform unless a learned ``dequantizer`` is given,
    see :mod:`flowplugins.training.dequantization`); the noise comes from a generator seeded
    with ``seed``, so the number is reproducible and two checkpoints are compared on the same
    noise. The model is put in eval mode for the pass and restored afterwards.

    Raises:
        FloatingPointError: if a log-density is not finite.
    """
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    dims = math.prod(split.images.shape[1:])
    try:
        for levels, labels in batch_loader(split, batch_size, drop_last=False):
            context = context_fn(labels.to(device)) if context_fn is not None else None
            for _ in range(samples):
                if dequantizer is None:
                    x = dequantize(levels, n_levels, generator=generator).to(device)
                    log_q = 0.0
                else:
                    x, log_q = dequantizer(levels.to(device), generator=generator)
                log_prob = model.log_prob(x, context=context) - log_q
                if not torch.isfinite(log_prob).all():
                    raise FloatingPointError(
                        f"evaluate_bpd: the model returned a non-finite log-density on "
                        f"{int((~torch.isfinite(log_prob)).sum())} of {len(log_prob)} images"
                    )
                total += float(bits_per_dim(log_prob.double(), dims, n_levels).sum())
                count += log_prob.numel()
    finally:
        model.train(was_training)
    return total / count


class EMA:
    """Exponential moving average of a module's parameters (Polyak averaging).

    ``shadow ← d · shadow + (1 − d) · θ`` after each optimizer step, with the decay warmed up as
    ``d_t = min(d, (1 + t) / (10 + t))`` so early averages are not dominated by the random
    initialisation. The shadow starts at the first :meth:`update`, i.e. after data-dependent
    initialisations (ActNorm) have run. Buffers are not averaged: evaluation uses the live
    model's buffers.

    References: Polyak & Juditsky 1992; arXiv:1412.6980 §7.2 (temporal averaging).
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: Dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        if not self.shadow:
            self.shadow = {k: p.detach().clone() for k, p in params.items()}
        else:
            d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
            # One foreach call per operation instead of two kernel launches per parameter from
            # Python (0.2 against 1.2 ms per step for the default digits model), same arithmetic.
            shadow = [self.shadow[k] for k in params]
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [p.detach() for p in params.values()], alpha=1.0 - d)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (a no-op before any update)."""
        if not self.shadow:
            yield model
            return
        params = dict(model.named_parameters())
        backup = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.num_updates = int(state["num_updates"])  # type: ignore[arg-type]
        self.shadow = {k: v.clone() for k, v in dict(state["shadow"]).items()}  # type: ignore[union-attr]
