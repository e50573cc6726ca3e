"""Opt-in numerical diagnostics: stop at the first bijector that produces NaN or Inf.

A NaN deep in a 100-step flow surfaces, by default, as a NaN loss with no hint of where it came
from. Inside :func:`check_finite` every :class:`~flowplugins.Bijector` call (``forward`` and
``inverse``, through any backend) checks its output and its log-det, and the first non-finite
one raises :class:`NonFiniteError` naming the layer, the direction and, for a step of a composed
model, its index in ``model.steps`` (data → latent order) and its level::

    with flowplugins.diagnostics.check_finite(model):
        loss = -model.log_prob(x).mean()
    # NonFiniteError: check_finite: AffineCoupling at model.steps[37] (level 1 of 3) produced a
    # non-finite log-det in forward (data -> latent): 2 of 16 values are NaN/Inf; its input
    # was finite

**Policy.** Values are not checked outside this mode: a check costs one device synchronisation
per layer (``bool(isfinite(t).all())``), which a training step should not pay. Shapes, dtypes
and devices are always checked (they cost nothing). Inside the mode the check adds one
synchronisation per bijector call. When the offending layer's *input* was already non-finite
(NaN in the data, or a layer called outside the model), the message says so.

**Step indices.** A layer's position is found from, in order: the models passed to
:func:`check_finite` (their ``steps`` lists, looked up for the duration of the block), then a
label set once by :func:`label_steps` (what a composer calls after building ``model.steps``);
otherwise only the class name is given. Labels are plain attributes and survive
``state_dict``/``to()``; a layer shared by two models carries the last label given.

The mode is process-wide (not per thread) and nests: it stays on until the outermost block
exits. It checks the forward pass only; for NaN gradients use
``torch.autograd.detect_anomaly``.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import base
from .base import Bijector

__all__ = [
    "NonFiniteError",
    "RoundTrip",
    "roundtrip_error",
    "perturb_fan_in",
    "check_finite",
    "enable_check_finite",
    "disable_check_finite",
    "is_check_finite_enabled",
    "label_steps",
    "step_label",
]

_LABEL_ATTR = "_flowplugins_step_label"
_DIRECTIONS = {"forward": "forward (data -> latent)", "inverse": "inverse (latent -> data)"}


class NonFiniteError(FloatingPointError):
    """A bijector produced NaN or Inf inside :func:`check_finite`.

    Attributes:
        bijector: the offending layer.
        label: its position, e.g. ``"model.steps[37] (level 1 of 3)"``, or ``None``.
        step_index: its index in the composed model's ``steps``, or ``None``.
        direction: ``"forward"`` or ``"inverse"``.
        quantity: ``"output"`` or ``"log-det"``.
        input_finite: whether the layer's input was finite (``False`` means the NaN/Inf came
            from upstream, e.g. the data).
    """

    def __init__(
        self,
        message: str,
        *,
        bijector: Optional[nn.Module] = None,
        label: Optional[str] = None,
        step_index: Optional[int] = None,
        direction: Optional[str] = None,
        quantity: Optional[str] = None,
        input_finite: Optional[bool] = None,
    ) -> None:
        super().__init__(message)
        self.bijector = bijector
        self.label = label
        self.step_index = step_index
        self.direction = direction
        self.quantity = quantity
        self.input_finite = input_finite


# --------------------------------------------------------------------------- labels
def label_steps(steps: Iterable[nn.Module], owner: str = "model") -> None:
    """Give every bijector of a composed model its position, for :class:`NonFiniteError`.

    ``steps`` is the model's flat, data → latent list (``model.steps``); each bijector gets the
    label ``f"{owner}.steps[{i}]"``. Call it once after building the model; non-bijectors in the
    list are skipped (their index still counts).

    Example:
        >>> import flowplugins
        >>> steps = [flowplugins.build("squeeze", (1, 4, 4)), flowplugins.build("actnorm", (4, 2, 2))]
        >>> label_steps(steps)
        >>> step_label(steps[1])
        'model.steps[1]'
    """
    for index, step in enumerate(steps):
        if isinstance(step, Bijector):
            object.__setattr__(step, _LABEL_ATTR, (f"{owner}.steps[{index}]", index))


def step_label(bijector: nn.Module) -> Optional[str]:
    """The label :func:`label_steps` gave ``bijector``, or ``None``."""
    found = getattr(bijector, _LABEL_ATTR, None)
    return found[0] if found else None


class _Watched:
    """Positions of the steps of the models passed to :func:`check_finite`."""

    def __init__(self) -> None:
        self.positions: Dict[int, Tuple[str, int]] = {}

    def add(self, model: object, owner: str) -> None:
        steps = getattr(model, "steps", None)
        if steps is None and getattr(model, "model", None) is not None:
            # The Pyro backend's distribution holds the torch model as ``.model``.
            model = model.model
            steps = getattr(model, "steps", None)
        if steps is not None:
            self._add_steps(list(steps), getattr(model, "level_bounds", None), f"{owner}.steps")
        elif isinstance(model, nn.Module):
            # E.g. the nflows backend's Flow: its outermost bijectors in module order, which
            # for a composed model is the data -> latent order of ``steps``.
            self._add_steps(_outermost_bijectors(model), None, f"{owner} bijector ")
        else:
            raise TypeError(
                f"check_finite: expected a composed model (an nn.Module, ideally with a 'steps' "
                f"list); got {type(model).__name__}"
            )

    def _add_steps(self, steps: List[nn.Module], bounds, prefix: str) -> None:
        for index, step in enumerate(steps):
            where = f"{prefix}[{index}]"
            if bounds:
                for level, (start, stop) in enumerate(bounds):
                    if start <= index < stop:
                        where += f" (level {level} of {len(bounds)})"
                        break
            self.positions[id(step)] = (where, index)


def _outermost_bijectors(module: nn.Module) -> List[nn.Module]:
    found: List[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, Bijector):
                found.append(child)
            else:
                walk(child)

    if isinstance(module, Bijector):
        return [module]
    walk(module)
    return found


_lock = threading.Lock()
_depth = 0
_watched_stack: List[_Watched] = []


def _position(bijector: nn.Module) -> Tuple[Optional[str], Optional[int]]:
    for watched in reversed(_watched_stack):
        found = watched.positions.get(id(bijector))
        if found is not None:
            return found
    found = getattr(bijector, _LABEL_ATTR, None)
    return found if found else (None, None)


def _count_bad(t: Tensor) -> Tuple[int, int]:
    return int((~torch.isfinite(t)).sum()), t.numel()


def _finite(t: Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _hook(bijector: Bijector, direction: str, x: Tensor, out: Tensor, logabsdet: Tensor) -> None:
    # One synchronisation per call: both tensors are reduced before reading the flag.
    ok = torch.isfinite(out).all()
    if logabsdet.is_floating_point():
        ok = ok & torch.isfinite(logabsdet).all()
    if bool(ok):
        return
    quantity, bad = ("output", out) if not _finite(out) else ("log-det", logabsdet)
    n_bad, n = _count_bad(bad)
    label, index = _position(bijector)
    input_finite = _finite(x)
    where = type(bijector).__name__ + (f" at {label}" if label else "")
    cause = (
        "its input was finite"
        if input_finite
        else "its input was already non-finite, so the NaN/Inf comes from upstream (the data or "
        "a layer called outside check_finite)"
    )
    raise NonFiniteError(
        f"check_finite: {where} produced a non-finite {quantity} in "
        f"{_DIRECTIONS.get(direction, direction)}: {n_bad} of {n} values are NaN/Inf "
        f"(input shape {tuple(x.shape)}); {cause}",
        bijector=bijector,
        label=label,
        step_index=index,
        direction=direction,
        quantity=quantity,
        input_finite=input_finite,
    )


# ------------------------------------------------------------------------ the mode
def enable_check_finite(*models: nn.Module) -> None:
    """Turn check_finite mode on until a matching :func:`disable_check_finite`.

    For a whole run (e.g. a ``--check-finite`` flag); prefer the :func:`check_finite` block.
    ``models`` are composed models (with ``steps``) whose step indices errors should report.

    Raises:
        TypeError: if a model is not an ``nn.Module`` or a Pyro model distribution.
    """
    global _depth
    watched = _Watched()
    for i, model in enumerate(models):
        watched.add(model, "model" if len(models) == 1 else f"models[{i}]")
    with _lock:
        _watched_stack.append(watched)
        _depth += 1
        base._finite_hook = _hook


def disable_check_finite() -> None:
    """Undo one :func:`enable_check_finite`; the mode ends with the outermost one."""
    global _depth
    with _lock:
        if _depth == 0:
            return
        _watched_stack.pop()
        _depth -= 1
        if _depth == 0:
            base._finite_hook = None


def is_check_finite_enabled() -> bool:
    """Whether check_finite mode is on."""
    return base._finite_hook is not None


@contextlib.contextmanager
def check_finite(*models: nn.Module) -> Iterator[None]:
    """Within the block, raise :class:`NonFiniteError` at the first bijector producing NaN/Inf.

    Checks every bijector's output and log-det after each ``forward``/``inverse`` (one device
    synchronisation per call). Pass composed models (anything with a ``steps`` list, such as
    the composer's ``MultiscaleFlow``, or its nflows/Pyro wrappers) to have errors give the
    step's index in ``model.steps`` and its level.

    Raises:
        NonFiniteError: from inside the block, naming the layer, its position, the direction
            and whether its input was already non-finite.
        TypeError: if a model is not an ``nn.Module`` or a Pyro model distribution.

    Example:
        >>> import torch, flowplugins
        >>> layer = flowplugins.build("logit", (1, 2, 2))
        >>> with check_finite():
        ...     layer(torch.full((1, 1, 2, 2), 2.0))   # outside (0, 1): NaN
        Traceback (most recent call last):
        ...
        flowplugins.diagnostics.NonFiniteError: check_finite: LogitTransform produced a non-finite output in forward (data -> latent): 4 of 4 values are NaN/Inf (input shape (1, 1, 2, 2)); its input was finite
    """
    enable_check_finite(*models)
    try:
        yield
    finally:
        disable_check_finite()


# ------------------------------------------------------------------ stability measures
@dataclass(frozen=True)
class RoundTrip:
    """Round-trip errors of a composed model on one batch (see :func:`roundtrip_error`)."""

    max_abs_error: float  #: ``max |x − decode(encode(x))|``
    max_log_det_gap: float  #: ``max |log|det ∂z/∂x| + log|det ∂x/∂z||`` (0 for an exact inverse)
    max_abs_latent: float  #: ``max |z|``, how far the model stretches the data
    finite: bool  #: every latent, reconstruction and log-det is finite


@torch.no_grad()
def roundtrip_error(model: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> RoundTrip:
    """Measure how exactly ``model.decode`` inverts ``model.encode`` on the batch ``x``.

    ``model`` is a composed model with ``encode_with_log_det`` / ``decode_with_log_det`` (the
    composer's ``MultiscaleFlow``); it runs in its current train/eval mode, without gradients.

    Shapes:
        x: (..., C, H, W), context: (..., K)

    Example:
        >>> import torch
        >>> from flowplugins import composer
        >>> model = composer.glow((3, 8, 8), levels=2, depth=2, hidden=8, seed=0).eval()
        >>> report = roundtrip_error(model.double(), torch.rand(2, 3, 8, 8, dtype=torch.float64))
        >>> report.finite, report.max_abs_error < 1e-12
        (True, True)
    """
    z, log_det = model.encode_with_log_det(x, context)
    x_back, log_det_inv = model.decode_with_log_det(z, context)
    parts = (z, x_back, log_det, log_det_inv)
    finite = all(bool(torch.isfinite(t).all()) for t in parts)
    return RoundTrip(
        max_abs_error=float((x_back - x).abs().max()) if x.numel() else 0.0,
        max_log_det_gap=float((log_det + log_det_inv).abs().max()) if log_det.numel() else 0.0,
        max_abs_latent=float(z.abs().max()) if z.numel() else 0.0,
        finite=finite,
    )


@torch.no_grad()
def perturb_fan_in(
    module: nn.Module, scale: float = 0.1, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """Move every parameter away from its init by noise sized like a trained network's.

    Adds ``scale / sqrt(fan_in) · N(0, 1)`` to each parameter in place, with ``fan_in`` the
    product of all but the first dimension (1 for vectors and scalars): a weight then changes
    each output by about ``scale`` times a unit-gain layer's, whatever the width, so a
    512-wide coupling net is not pushed harder than an 8-wide one (absolute noise, as in
    :func:`flowplugins.testing.perturb_parameters`, grows with the width and, compounded over
    a 96-step Glow, overflows). Noise is drawn in float64 on the CPU from ``generator``, so the
    same seed gives the same parameters on any device and dtype. Returns ``module``.
    """
    for param in module.parameters():
        fan_in = math.prod(param.shape[1:]) if param.dim() >= 2 else 1
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
        param.add_(noise.to(device=param.device, dtype=param.dtype), alpha=scale / math.sqrt(fan_in))
    return module
