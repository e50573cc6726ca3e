"""Memory-saving backprop through a chain of bijectors (the reversible-network trick).

Ordinary backprop through ``z = f_K ∘ … ∘ f_1 (x)`` keeps every step's activations alive until
the backward pass, so activation memory grows linearly with depth ``K``. A flow is invertible,
so nothing has to be kept: :func:`memory_saving_forward` runs the chain without recording
autograd, keeps only the final output ``z_K``, and in the backward pass walks the steps in
reverse. For step ``k`` it recomputes the input ``z_{k-1} = f_k⁻¹(z_k)`` through the exact
inverse, re-runs ``f_k`` on it with autograd recording, and backpropagates the incoming
gradients ``(∂L/∂z_k, ∂L/∂log|det|)`` through that one step only. Activation memory is then
that of one step, whatever the depth. Each step is its own autograd node (so its parameter
gradients are released to autograd as soon as they exist), but only the last step of a run
saves its output; the others receive theirs from the backward of the step after them.

The price is one extra inverse and one extra forward per step: three forwards and one
backward instead of one and one, about 1.7× the compute of ordinary backprop in theory
(``BENCHMARKS.md`` has the measured cost). A channel coupling's inverse and re-run forward
read the same net output (``x_a = z_a``), so its net is evaluated once for both
(``ChannelCoupling._inverse_then_forward``): two net forwards and one backward per coupling.

Gradients equal ordinary backprop up to the round-off of the reconstruction ``f⁻¹(f(x))``
(about 1e-12 relative in float64, 1e-6 relative per step in float32), for the input, every
parameter, the log-det term and a context tensor.

Steps that cannot be reconstructed exactly run with ordinary autograd instead, splitting the
chain into reversible segments around them:

* a step flagged ``batch_dependent_in_training`` (batch norm) while in training mode, because
  its inverse in training mode uses statistics of a batch it no longer has, and its forward
  updates running averages (recomputing it would update them twice);
* a step flagged ``data_dependent_init`` (ActNorm) that is in training mode and not initialised
  yet (its ``initialized`` flag is false, or it has none): its first forward sets its
  parameters, so it runs once, normally, and is reversible from the next call on.

Random steps (dropout inside a coupling net) are not supported: the recomputed forward would
draw a different mask. No built-in bijector is random.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import base as _base

__all__ = ["memory_saving_forward", "ReversibleSequence", "is_reversible_now"]


def is_reversible_now(step: nn.Module) -> bool:
    """Whether ``step`` can be recomputed from its output through its inverse right now.

    False for a training-mode step flagged ``batch_dependent_in_training``, for a
    training-mode step flagged ``data_dependent_init`` whose ``initialized`` flag is false or
    missing, and for a training-mode step holding an active dropout layer (its inverse and its
    re-run forward would draw other masks than the forward did, so the recomputed input and the
    gradients would be wrong); true otherwise.
    """
    if not step.training:
        return True
    if getattr(step, "batch_dependent_in_training", False):
        return False
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
           for m in step.modules()):
        return False
    if getattr(step, "data_dependent_init", False):
        flag = getattr(step, "initialized", None)
        return flag is not None and bool(flag)
    return True


def _trainable_params(step: nn.Module) -> List[Tensor]:
    """The step's parameters that require grad, each once."""
    seen, params = set(), []
    for p in step.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


class _Tape:
    """Hands each step's reconstructed input to the step before it during the backward pass.

    Only the last step of a reversible run saves its output; every other step receives its
    output from the backward of the step after it, which autograd always runs first (the
    later step consumes this step's output).
    """

    __slots__ = ("z",)

    def __init__(self) -> None:
        self.z: Optional[Tensor] = None


class _ReversibleStep(torch.autograd.Function):
    """``(context, x, *params) -> (z, logabsdet)`` of one step, keeping no activations.

    One autograd node per step (rather than one for the whole run) so that each step's
    parameter gradients are handed to autograd as soon as they are computed: a single node
    would hold the gradients of every parameter of the run until its backward returns.
    """

    @staticmethod
    def forward(ctx, step, tape, first, last, context, x, *params):
        z, logabsdet = step(x, context)
        ctx.step, ctx.tape, ctx.first, ctx.last = step, tape, first, last
        # The parameters as passed (walking step.parameters() again in backward costs ~2% of a
        # small model's step); leaves, so holding them here makes no reference cycle.
        ctx.params = params
        if last:
            ctx.save_for_backward(z, context)
        else:
            ctx.save_for_backward(context)
        return z, logabsdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z, grad_logabsdet):
        step, tape = ctx.step, ctx.tape
        if ctx.last:
            z, context = ctx.saved_tensors
        else:
            (context,) = ctx.saved_tensors
            z = tape.z
        want_context = context is not None and ctx.needs_input_grad[4]
        want_x = ctx.needs_input_grad[5]
        params = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[6:]) if needed]
        step_context = context.detach().requires_grad_(True) if want_context else context
        x, x_leaves, z_again, logabsdet = _recompute(step, z, context, step_context, want_x)
        outputs, seeds = [z_again], [grad_z]
        if logabsdet.requires_grad:
            outputs.append(logabsdet)
            seeds.append(grad_logabsdet)
        inputs = x_leaves + params + ([step_context] if want_context else [])
        grads: List[Optional[Tensor]] = [None] * len(inputs)
        if inputs and any(t.requires_grad for t in outputs):
            grads = list(torch.autograd.grad(outputs, inputs, seeds, allow_unused=True))
        grad_x = None
        if want_x:
            leaf_grads = [
                torch.zeros_like(leaf) if g is None else g
                for leaf, g in zip(x_leaves, grads[: len(x_leaves)])
            ]
            grad_x = leaf_grads[0] if len(leaf_grads) == 1 else torch.cat(leaf_grads, dim=1)
            del grads[: len(x_leaves)]
        grad_context = grads.pop() if want_context else None
        tape.z = None if ctx.first else x.detach()
        grad_params = iter(grads)
        param_grads = [next(grad_params) if needed else None for needed in ctx.needs_input_grad[6:]]
        return (None, None, None, None, grad_context, grad_x, *param_grads)


def _recompute(
    step: nn.Module, z: Tensor, context: Optional[Tensor], step_context: Optional[Tensor], want_x: bool
) -> Tuple[Tensor, List[Tensor], Tensor, Tensor]:
    """Reconstruct a step's input from its output and recompute its forward with autograd.

    Returns the input ``x`` (detached), the leaves whose gradients concatenated along
    channels give ``∂/∂x`` (``[]`` unless ``want_x``) and the recomputed ``(z, logabsdet)``.
    A channel coupling evaluates its net once for both (``_inverse_then_forward``), as long
    as nothing could observe the difference (no module hooks, no ``check_finite`` mode, flat
    input); any other step runs ``inverse`` then ``forward``.
    """
    shortcut = getattr(step, "_inverse_then_forward", None)
    if (
        shortcut is not None
        and z.dim() == 4
        and not _base.calls_are_observed(step)
    ):
        return shortcut(z, step_context, want_x)
    with torch.no_grad():
        x, _ = step.inverse(z, context)
    x = x.detach().requires_grad_(want_x)
    with torch.enable_grad():
        z_again, logabsdet = step(x, step_context)
    return x.detach(), ([x] if want_x else []), z_again, logabsdet


def _segments(steps: Sequence[nn.Module]) -> List[Tuple[bool, List[nn.Module]]]:
    """Split ``steps`` into maximal runs of reversible / non-reversible steps, in order."""
    runs: List[Tuple[bool, List[nn.Module]]] = []
    for step in steps:
        ok = is_reversible_now(step)
        if runs and runs[-1][0] == ok:
            runs[-1][1].append(step)
        else:
            runs.append((ok, [step]))
    return runs


def memory_saving_forward(
    steps: Iterable[nn.Module], x: Tensor, context: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Run ``steps`` data → latent, with backprop that recomputes activations from outputs.

    Equivalent to ``for step in steps: x, ld = step(x, context); total += ld`` in value and in
    gradients, but the steps' activations are not kept for backward: the backward pass
    rebuilds each step's input from its output through ``step.inverse`` and backpropagates
    one step at a time (see the module docstring for what runs ordinarily instead). When
    autograd is not recording (``torch.no_grad()``, or nothing requires grad) it is the plain
    loop.

    .. math::

        z = f_K ∘ … ∘ f_1(x), \\qquad \\log|\\det J| = \\sum_k \\log|\\det J_{f_k}|

    Shapes:
        x: (N, C, H, W), context: (N, ...) or None -> z: (N, *out_event_shape); logabsdet: (N,)

    Args:
        steps: bijectors in data → latent order; each maps ``(x, context) -> (z, logabsdet)``
            and has an exact ``inverse(z, context) -> (x, logabsdet)``. Shape-changing steps
            (squeeze) are fine.
        x: input batch.
        context: optional conditioning tensor passed to every step; it receives gradients.

    Raises:
        ValueError: if ``steps`` is empty.

    References:
        Gomez et al., The Reversible Residual Network, arXiv:1707.04585, §4;
        Kingma & Dhariwal, Glow, arXiv:1807.03039 (whose reference code offers the same trick).

    Example:
        >>> import torch, flowplugins
        >>> steps = [flowplugins.build("affine_coupling", (4, 4, 4), hidden=8),
        ...          flowplugins.build("inv_conv1x1_lu", (4, 4, 4), seed=0)]
        >>> x = torch.randn(3, 4, 4, 4, requires_grad=True)
        >>> z, ld = memory_saving_forward(steps, x)
        >>> (z.square().sum() - ld.sum()).backward()
        >>> x.grad.shape, steps[0].net.conv_out.weight.grad is not None
        (torch.Size([3, 4, 4, 4]), True)
    """
    steps = list(steps)
    if not steps:
        raise ValueError("memory_saving_forward: steps must contain at least one bijector; got none")
    logabsdet: Optional[Tensor] = None
    z = x
    recording = torch.is_grad_enabled()
    for reversible, run in _segments(steps):
        tape = _Tape() if reversible and recording else None
        first = True
        for k, step in enumerate(run):
            params = _trainable_params(step) if tape is not None else []
            if tape is not None and (
                params or z.requires_grad or (context is not None and context.requires_grad)
            ):
                z, ld = _ReversibleStep.apply(
                    step, tape, first, k == len(run) - 1, context, z, *params
                )
                first = False
            else:
                z, ld = step(z, context)
            logabsdet = ld if logabsdet is None else logabsdet + ld
    return z, logabsdet  # type: ignore[return-value]  (steps is non-empty)


class ReversibleSequence(nn.Module):
    """A chain of bijectors whose training forward uses :func:`memory_saving_forward`.

    ``forward`` maps data → latent and returns ``(z, logabsdet)``; ``inverse`` maps latent →
    data through the steps in reverse (ordinary, it keeps nothing when run under no_grad).
    Memory saving only changes how gradients are computed, never the values.

    Shapes:
        x: (N, C, H, W) -> z: (N, *out_event_shape); logabsdet: (N,)

    Args:
        steps: bijectors in data → latent order.
        memory_saving: ``False`` runs the ordinary loop (for comparisons).

    Raises:
        ValueError: if ``steps`` is empty.

    Example:
        >>> import torch, flowplugins
        >>> seq = ReversibleSequence([flowplugins.build("actnorm", (2, 4, 4)),
        ...                           flowplugins.build("affine_coupling", (2, 4, 4), hidden=8)])
        >>> z, ld = seq(torch.randn(5, 2, 4, 4))
        >>> x, ld_inv = seq.inverse(z)
        >>> z.shape, torch.allclose(ld, -ld_inv)
        (torch.Size([5, 2, 4, 4]), True)
    """

    def __init__(self, steps: Iterable[nn.Module], memory_saving: bool = True) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        if len(self.steps) == 0:
            raise ValueError("ReversibleSequence: steps must contain at least one bijector; got none")
        self.memory_saving = bool(memory_saving)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.memory_saving:
            return memory_saving_forward(self.steps, x, context)
        logabsdet = None
        for step in self.steps:
            x, ld = step(x, context)
            logabsdet = ld if logabsdet is None else logabsdet + ld
        return x, logabsdet

    def inverse(self, z: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        logabsdet = None
        for step in reversed(self.steps):
            z, ld = step.inverse(z, context)
            logabsdet = ld if logabsdet is None else logabsdet + ld
        return z, logabsdet

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}"
