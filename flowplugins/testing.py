"""Property checks for flowplugins bijectors, public so plugin authors run the project's own.

One call checks everything the contract in :mod:`flowplugins.base` promises::

    from flowplugins.testing import check_bijector
    check_bijector("squeeze", (3, 4, 4))                       # a registry name
    check_bijector(MyBijector, (3, 4, 4), backend=("torch", "nflows", "pyro"))
    check_registered("my_bijector")                            # every backend, dtype, device

:func:`check_bijector` first moves every parameter away from its (often identity) init with
:func:`perturb_parameters` — a round trip through a coupling whose last conv is still zero
proves nothing — and then asserts, with messages that name the layer and the case:

* the output has shape ``batch_shape + output_event_shape()``, the log-det ``batch_shape``,
  both finite, on the input's dtype and device;
* ``inverse(forward(x)) == x`` and ``forward(inverse(z)) == z`` (1e-10 in float64, 1e-5
  relative in float32), and the inverse's log-det is minus the forward's;
* the log-det equals ``slogdet`` of the per-sample Jacobian computed by autograd on a float64
  copy (a round trip alone cannot catch a missing ``H·W`` factor), and the cross-sample blocks of
  the Jacobian are zero, so no sample's output depends on another's;
* every parameter that requires grad receives a finite, non-zero gradient;
* the ``state_dict`` loaded into a freshly built instance reproduces the outputs (an ActNorm
  that re-initialises after loading, or an inverse cache that goes stale, fails here);
* per backend: nflows ``CompositeTransform`` and ``Flow.log_prob``/``sample`` with a standard
  normal base; Pyro ``TransformedDistribution.log_prob`` against the change of variables by
  hand, ``sample`` shapes and ``log_abs_det_jacobian``.

The class attributes of :class:`~flowplugins.Bijector` steer the checks: ``input_domain =
"unit_interval"`` draws inputs in (0.05, 0.95); ``data_dependent_init`` runs one training
forward before anything else; ``batch_dependent_in_training`` runs a training forward (so
statistics exist) and checks in eval mode.

The hypothesis strategies (:func:`event_shapes`, :func:`batch_shapes`, :func:`seeds`) draw
structure, not tensor elements; hypothesis is only imported when they are called.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .base import Bijector, as_event_shape

__all__ = [
    "BijectorCheckError",
    "batch_shapes",
    "check_bijector",
    "check_registered",
    "event_shapes",
    "perturb_parameters",
    "seeds",
]

BACKENDS = ("torch", "nflows", "pyro")
# (atol, rtol) of the round trips, per dtype; the log-det's atol is scaled by sqrt(event numel).
_TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5)}
_UNIT_INTERVAL = (0.05, 0.95)


class BijectorCheckError(AssertionError):
    """A bijector broke a property of the flowplugins contract."""


# ----------------------------------------------------------------------------- strategies
def _strategies():
    try:
        from hypothesis import strategies
    except ImportError as err:  # pragma: no cover - hypothesis is a test extra
        raise ImportError(
            "flowplugins.testing strategies need hypothesis; install it with "
            "`pip install 'flowplugins[test]'`"
        ) from err
    return strategies


def event_shapes(
    levels: int = 1,
    min_channels: int = 1,
    max_channels: int = 4,
    max_size: int = 8,
    channel_multiple: int = 1,
):
    """Hypothesis strategy of image event shapes ``(C, H, W)``.

    ``H`` and ``W`` are independent multiples of ``2**levels`` up to ``max_size`` (so ``levels``
    squeezes fit), ``C`` a multiple of ``channel_multiple`` in ``[min_channels, max_channels]``.

    Raises:
        ValueError: if no shape satisfies the bounds.
    """
    st = _strategies()
    step = 2 ** int(levels)
    lo_c = max(1, math.ceil(min_channels / channel_multiple))
    hi_c = max_channels // channel_multiple
    if hi_c < lo_c or max_size < step:
        raise ValueError(
            f"event_shapes: no shape with channels in [{min_channels}, {max_channels}] "
            f"(multiple of {channel_multiple}) and sides <= {max_size} divisible by {step}"
        )
    sides = st.integers(1, max_size // step).map(lambda k: k * step)
    channels = st.integers(lo_c, hi_c).map(lambda k: k * channel_multiple)
    return st.tuples(channels, sides, sides)


def batch_shapes(min_dims: int = 0, max_dims: int = 2, max_side: int = 3):
    """Hypothesis strategy of batch shapes: ``()``, ``(2,)``, ``(3, 1)``, …"""
    st = _strategies()
    return st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


def seeds():
    """Hypothesis strategy of seeds for :func:`check_bijector`."""
    return _strategies().integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------ helpers
def perturb_parameters(
    module: nn.Module, scale: float = 0.1, generator: Optional[torch.Generator] = None
) -> nn.Module:
    """Add ``scale · N(0, 1)`` noise to every parameter of ``module`` in place and return it.

    Moves zero-initialised coupling nets, unit ActNorm scales and the like away from the
    identity, so that round-trip and log-det checks test something. The noise is drawn on the
    CPU from ``generator`` (reproducible across devices) and cast to each parameter.
    """
    with torch.no_grad():
        for param in module.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            param.add_(noise.to(device=param.device, dtype=param.dtype), alpha=scale)
    return module


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # nflows' StandardNormal draws samples in the default dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _max_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual.detach() - expected.detach()).abs().max()) if actual.numel() else 0.0


class _Checker:
    """State of one :func:`check_bijector` call: the layer, its case label and tolerances."""

    def __init__(self, label: str, dtype: torch.dtype, device: torch.device, numel: int,
                 atol: Optional[float], rtol: Optional[float]) -> None:
        self.label = label
        self.dtype = dtype
        self.device = device
        default_atol, default_rtol = _TOLERANCES.get(dtype, _TOLERANCES[torch.float32])
        self.atol = default_atol if atol is None else atol
        self.rtol = default_rtol if rtol is None else rtol
        self.ld_atol = self.atol * math.sqrt(numel)

    def fail(self, message: str) -> None:
        raise BijectorCheckError(f"{self.label}: {message}")

    def close(self, actual: Tensor, expected: Tensor, what: str, atol: float, rtol: float) -> None:
        if actual.shape != expected.shape:
            self.fail(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
        bound = atol + rtol * expected.detach().abs()
        excess = (actual.detach() - expected.detach()).abs() - bound
        if actual.numel() and float(excess.max()) > 0:
            self.fail(
                f"{what}: max abs error {_max_err(actual, expected):.3e} exceeds atol={atol:.1e}, "
                f"rtol={rtol:.1e}"
            )

    def finite_output(self, out: Tensor, logabsdet: Tensor, batch_shape, event_shape, direction: str):
        want = tuple(batch_shape) + tuple(event_shape)
        if tuple(out.shape) != want:
            self.fail(f"{direction} output has shape {tuple(out.shape)}; expected {want}")
        if tuple(logabsdet.shape) != tuple(batch_shape):
            self.fail(
                f"{direction} log-det has shape {tuple(logabsdet.shape)}; expected the batch "
                f"shape {tuple(batch_shape)}"
            )
        for tensor, what in ((out, "output"), (logabsdet, "log-det")):
            if tensor.dtype != self.dtype or tensor.device.type != self.device.type:
                self.fail(
                    f"{direction} {what} is {tensor.dtype} on {tensor.device}; expected "
                    f"{self.dtype} on {self.device}"
                )
            if not torch.isfinite(tensor).all():
                self.fail(f"{direction} {what} is not finite")


def _resolve(
    target: Union[str, type, Bijector, Callable[..., Bijector]],
    event_shape: Optional[Sequence[int]],
    options: Dict[str, Any],
) -> Tuple[Bijector, Optional[Callable[[], Bijector]], str]:
    """Return ``(bijector, fresh_factory_or_None, name)``."""
    if isinstance(target, Bijector):
        if options:
            raise TypeError("check_bijector: options are only used with a name, class or factory")
        if event_shape is not None and as_event_shape(event_shape) != target.event_shape:
            raise ValueError(
                f"check_bijector: event_shape {tuple(event_shape)} does not match the "
                f"instance's {target.event_shape}"
            )
        return target, None, type(target).__name__
    if event_shape is None:
        raise TypeError("check_bijector: event_shape is required unless a Bijector instance is given")
    shape = as_event_shape(event_shape, "check_bijector")
    if isinstance(target, str):
        from .registry import get_class

        cls = get_class(target)
        name = f"{cls.__name__} ({target!r})"

        def factory() -> Bijector:
            return cls(shape, **options)
    elif isinstance(target, type) and issubclass(target, Bijector):
        name = target.__name__

        def factory() -> Bijector:
            return target(shape, **options)
    elif callable(target):
        name = getattr(target, "__name__", repr(target))

        def factory() -> Bijector:
            return target(shape, **options)
    else:
        raise TypeError(
            f"check_bijector: expected a Bijector, a Bijector subclass, a registry name or a "
            f"factory; got {type(target).__name__}"
        )
    bijector = factory()
    if not isinstance(bijector, Bijector):
        raise TypeError(f"check_bijector: {name} built a {type(bijector).__name__}, not a Bijector")
    return bijector, factory, name


def _draw(shape, domain: str, generator: torch.Generator, dtype, device) -> Tensor:
    if domain == "unit_interval":
        lo, hi = _UNIT_INTERVAL
        x = lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=torch.float64)
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def _latent_sample(bijector: Bijector, batch_shape, generator, dtype, device, context) -> Tensor:
    """A latent point in the image of the data domain (so the inverse is defined)."""
    x = _draw(tuple(batch_shape) + bijector.event_shape, bijector.input_domain, generator, dtype, device)
    with torch.no_grad():
        return bijector.forward(x, context)[0]


# ----------------------------------------------------------------------------- the checks
def check_bijector(
    bijector_or_factory: Union[str, type, Bijector, Callable[..., Bijector]],
    event_shape: Optional[Sequence[int]] = None,
    *,
    options: Optional[Dict[str, Any]] = None,
    batch_shape: Sequence[int] = (2,),
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    backend: Union[str, Sequence[str]] = "torch",
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    jacobian_atol: float = 1e-8,
    max_jacobian_numel: int = 1024,
    perturb_scale: float = 0.1,
    context_shape: Optional[Sequence[int]] = None,
    seed: int = 0,
) -> Bijector:
    """Assert that a bijector keeps the flowplugins contract (see the module docstring).

    Args:
        bijector_or_factory: a :class:`~flowplugins.Bijector` instance, a subclass, a registry
            name, or a factory ``f(event_shape, **options)``. With an instance, the fresh copy
            for the ``state_dict`` check is a deep copy taken before anything runs.
        event_shape: the data event shape ``(C, H, W)``; optional for an instance.
        options: constructor keywords (not with an instance).
        batch_shape: leading batch dimensions of the test input (``()`` allowed).
        dtype, device: where the checks run; the Jacobian check always runs in float64.
        backend: ``"torch"``, ``"nflows"``, ``"pyro"`` or several; the torch checks always run,
            the others add their backend's checks.
        atol, rtol: round-trip tolerances (defaults 1e-10 for float64, 1e-5 for float32); the
            log-det tolerance is ``atol·sqrt(C·H·W)`` absolute plus ``rtol`` relative.
        jacobian_atol: tolerance of the autograd-Jacobian log-det comparison (float64).
        max_jacobian_numel: above this ``C·H·W`` the Jacobian check is skipped with a warning.
        perturb_scale: standard deviation of :func:`perturb_parameters`' noise.
        context_shape: event shape of a random context passed to ``forward``/``inverse``, for
            conditional bijectors; ``None`` passes no context.
        seed: seeds construction (``torch.manual_seed``), the inputs and the perturbation.

    Returns:
        The checked (perturbed) bijector.

    Raises:
        BijectorCheckError: naming the bijector, the case and the broken property.
        TypeError, ValueError: for arguments that do not describe a bijector.

    Example:
        >>> from flowplugins.bijectors.squeeze import Squeeze
        >>> _ = check_bijector(Squeeze, (2, 4, 4), backend=("torch", "nflows", "pyro"))
    """
    backends = (backend,) if isinstance(backend, str) else tuple(backend)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"check_bijector: unknown backend(s) {unknown}; choose from {BACKENDS}")
    device = torch.device(device)
    batch_shape = tuple(int(b) for b in batch_shape)
    options = dict(options or {})

    # Seeding must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        return _check_bijector(bijector_or_factory, event_shape, options, batch_shape, dtype,
                               device, backends, atol, rtol, jacobian_atol, max_jacobian_numel,
                               perturb_scale, context_shape, seed)


def _check_bijector(bijector_or_factory, event_shape, options, batch_shape, dtype, device,
                    backends, atol, rtol, jacobian_atol, max_jacobian_numel, perturb_scale,
                    context_shape, seed) -> Bijector:
    torch.manual_seed(seed)
    bijector, factory, name = _resolve(bijector_or_factory, event_shape, options)
    template = copy.deepcopy(bijector) if factory is None else None

    def fresh() -> Bijector:
        torch.manual_seed(seed + 1)
        new = factory() if factory is not None else copy.deepcopy(template)
        return new.to(device=device, dtype=dtype)

    bijector = bijector.to(device=device, dtype=dtype)
    in_shape = bijector.event_shape
    out_shape = tuple(bijector.output_event_shape())
    numel = math.prod(in_shape)
    label = (
        f"{name} [event_shape={in_shape}, batch_shape={batch_shape}, {dtype}, {device}, "
        f"seed={seed}]"
    )
    chk = _Checker(label, dtype, device, numel, atol, rtol)
    if math.prod(out_shape) != numel:
        chk.fail(f"output_event_shape() {out_shape} has {math.prod(out_shape)} elements, not {numel}")

    try:
        _run_checks(chk, bijector, fresh, backends, batch_shape, seed, context_shape,
                    jacobian_atol, max_jacobian_numel, perturb_scale)
    except BijectorCheckError:
        raise
    except Exception as err:  # noqa: BLE001 - any crash of the layer is a broken property
        raise BijectorCheckError(f"{label}: raised {type(err).__name__}: {err}") from err
    return bijector


def _run_checks(chk: _Checker, bijector: Bijector, fresh, backends, batch_shape, seed,
                context_shape, jacobian_atol, max_jacobian_numel, perturb_scale) -> None:
    dtype, device, label = chk.dtype, chk.device, chk.label
    in_shape = bijector.event_shape
    numel = bijector.event_numel
    gen = torch.Generator().manual_seed(seed)
    domain = bijector.input_domain
    if domain not in ("real", "unit_interval"):
        chk.fail(f"input_domain must be 'real' or 'unit_interval'; got {domain!r}")

    def context_for(shape) -> Optional[Tensor]:
        if context_shape is None:
            return None
        return _draw(tuple(shape) + tuple(context_shape), "real", gen, dtype, device)

    # Data-dependent init, then statistics, then warm any inverse caches, all before perturbing,
    # so that the checks see what a model sees after an optimizer step.
    bijector.train()
    init_batch = (8,)
    if bijector.data_dependent_init:
        bijector.forward(_draw(init_batch + in_shape, domain, gen, dtype, device), context_for(init_batch))
    eval_mode = bool(bijector.batch_dependent_in_training)
    with torch.no_grad():
        probe_ctx = context_for((2,))
        probe = bijector.forward(_draw((2,) + in_shape, domain, gen, dtype, device), probe_ctx)
        chk.finite_output(*probe, (2,), tuple(bijector.output_event_shape()), "forward")
        for mode in (False,) if eval_mode else (False, True):
            bijector.train(mode)
            warm_ctx = context_for((2,))
            bijector.inverse(_latent_sample(bijector, (2,), gen, dtype, device, warm_ctx), warm_ctx)
    perturb_parameters(bijector, perturb_scale, gen)
    bijector.train()
    if eval_mode:
        bijector.forward(_draw(init_batch + in_shape, domain, gen, dtype, device), context_for(init_batch))
        bijector.eval()

    _check_round_trips(chk, bijector, batch_shape, gen, context_for)
    if bijector.training:
        bijector.eval()
        _check_round_trips(chk, bijector, batch_shape, gen, context_for, where=" (eval mode)")
        bijector.train()
    if numel <= max_jacobian_numel:
        _check_jacobian(chk, bijector, fresh, gen, context_for, jacobian_atol)
    else:
        warnings.warn(
            f"{label}: Jacobian check skipped (C·H·W = {numel} > max_jacobian_numel = "
            f"{max_jacobian_numel})",
            stacklevel=2,
        )
    _check_gradients(chk, bijector, batch_shape, gen, context_for)
    _check_state_dict(chk, bijector, fresh, batch_shape, gen, context_for)
    if "nflows" in backends:
        _check_nflows(chk, bijector, gen, context_for)
    if "pyro" in backends:
        _check_pyro(chk, bijector, batch_shape, gen, context_for)


def _check_round_trips(chk: _Checker, bij: Bijector, batch_shape, gen, context_for, where: str = ""):
    in_shape, out_shape = bij.event_shape, tuple(bij.output_event_shape())
    ctx = context_for(batch_shape)
    with torch.no_grad():
        x = _draw(batch_shape + in_shape, bij.input_domain, gen, chk.dtype, chk.device)
        z, ld = bij.forward(x, ctx)
        chk.finite_output(z, ld, batch_shape, out_shape, "forward" + where)
        x_rec, ld_inv = bij.inverse(z, ctx)
        chk.finite_output(x_rec, ld_inv, batch_shape, in_shape, "inverse" + where)
        chk.close(x_rec, x, "inverse(forward(x)) != x" + where, chk.atol, chk.rtol)
        chk.close(ld_inv, -ld, "inverse log-det != -forward log-det" + where, chk.ld_atol, chk.rtol)
        z2 = _latent_sample(bij, batch_shape, gen, chk.dtype, chk.device, ctx)
        x2, ld2_inv = bij.inverse(z2, ctx)
        z2_rec, ld2 = bij.forward(x2, ctx)
        chk.close(z2_rec, z2, "forward(inverse(z)) != z" + where, chk.atol, chk.rtol)
        chk.close(ld2, -ld2_inv, "forward log-det != -inverse log-det at inverse(z)" + where,
                  chk.ld_atol, chk.rtol)


def _jacobian(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vmap's slow-path fallback warnings
        try:
            return torch.autograd.functional.jacobian(fn, x, vectorize=True)
        except RuntimeError:
            return torch.autograd.functional.jacobian(fn, x)


def _check_jacobian(chk: _Checker, bij: Bijector, fresh, gen, context_for, jacobian_atol: float):
    """log-det against slogdet of the autograd Jacobian, and zero cross-sample blocks, on a float64
    copy with a batch of two."""
    copy64 = fresh().to(torch.float64)
    copy64.load_state_dict(bij.state_dict())
    copy64.train(bij.training)
    n, d = 2, bij.event_numel
    in_shape = bij.event_shape
    x = _draw((n,) + in_shape, bij.input_domain, gen, torch.float64, chk.device)
    ctx = context_for((n,))
    ctx = ctx.to(torch.float64) if ctx is not None else None

    def flat_forward(flat: Tensor) -> Tensor:
        return copy64.forward(flat.reshape(x.shape), ctx)[0].reshape(-1)

    jac = _jacobian(flat_forward, x.reshape(-1)).reshape(n, d, n, d)
    with torch.no_grad():
        _, ld = copy64.forward(x, ctx)
    for i in range(n):
        sign, logabsdet = torch.linalg.slogdet(jac[i, :, i, :])
        if sign == 0:
            chk.fail(f"the Jacobian of sample {i} is singular")
        if abs(float(logabsdet) - float(ld[i])) > jacobian_atol * max(1.0, abs(float(logabsdet))):
            chk.fail(
                f"log-det {float(ld[i]):.10g} of sample {i} != log|det J| {float(logabsdet):.10g} "
                f"from the autograd Jacobian (float64)"
            )
        for j in range(n):
            if i != j and float(jac[i, :, j, :].abs().max()) > jacobian_atol:
                chk.fail(
                    f"output of sample {i} depends on sample {j} (cross-sample Jacobian block "
                    f"max {float(jac[i, :, j, :].abs().max()):.3e}); in training mode set "
                    "batch_dependent_in_training = True"
                )
    # The log-det must not depend on the other samples either.
    x_req = x.clone().requires_grad_(True)
    _, ld_req = copy64.forward(x_req, ctx)
    for i in range(n if ld_req.requires_grad else 0):
        (grad,) = torch.autograd.grad(ld_req[i], x_req, retain_graph=True, allow_unused=True)
        if grad is not None:
            others = torch.cat([grad[j].reshape(-1) for j in range(n) if j != i])
            if float(others.abs().max()) > jacobian_atol:
                chk.fail(f"log-det of sample {i} depends on the other samples of the batch")


def _check_gradients(chk: _Checker, bij: Bijector, batch_shape, gen, context_for):
    params = [(n, p) for n, p in bij.named_parameters() if p.requires_grad]
    if not params:
        return
    in_shape, out_shape = bij.event_shape, tuple(bij.output_event_shape())
    batch = batch_shape if math.prod(batch_shape) > 0 else (2,)
    ctx = context_for(batch)
    x = _draw(batch + in_shape, bij.input_domain, gen, chk.dtype, chk.device)
    z_lat = _latent_sample(bij, batch, gen, chk.dtype, chk.device, ctx)
    r_z = _draw(batch + out_shape, "real", gen, chk.dtype, chk.device)
    r_x = _draw(batch + in_shape, "real", gen, chk.dtype, chk.device)
    bij.zero_grad(set_to_none=True)
    z, ld = bij.forward(x, ctx)
    x_back, ld_back = bij.inverse(z_lat, ctx)
    loss = (z * r_z).sum() + ld.sum() + (x_back * r_x).sum() + ld_back.sum()
    loss.backward()
    for pname, p in params:
        if p.grad is None:
            chk.fail(f"parameter {pname!r} receives no gradient from forward or inverse")
        if not torch.isfinite(p.grad).all():
            chk.fail(f"parameter {pname!r} has a non-finite gradient")
    # A single parameter may legitimately get a zero gradient (the masked-out strictly lower
    # triangle of a 1x1 LU factor), but all of them at once means the outputs ignore them.
    if not any(bool(p.grad.abs().max() > 0) for _, p in params if p.numel()):
        chk.fail("every parameter has an all-zero gradient after perturbation")
    bij.zero_grad(set_to_none=True)


def _check_state_dict(chk: _Checker, bij: Bijector, fresh, batch_shape, gen, context_for):
    other = fresh()
    try:
        other.load_state_dict(bij.state_dict())
    except Exception as err:  # noqa: BLE001 - report any failure as a broken property
        chk.fail(f"state_dict does not load into a freshly built instance: {type(err).__name__}: {err}")
    other.train(bij.training)
    ctx = context_for(batch_shape)
    with torch.no_grad():
        x = _draw(batch_shape + bij.event_shape, bij.input_domain, gen, chk.dtype, chk.device)
        z, ld = bij.forward(x, ctx)
        z_other, ld_other = other.forward(x, ctx)
        chk.close(z_other, z, "forward after state_dict round trip", chk.atol, chk.rtol)
        chk.close(ld_other, ld, "log-det after state_dict round trip", chk.ld_atol, chk.rtol)
        x_back, _ = bij.inverse(z, ctx)
        x_other, _ = other.inverse(z, ctx)
        chk.close(x_other, x_back, "inverse after state_dict round trip", chk.atol, chk.rtol)


def _check_nflows(chk: _Checker, bij: Bijector, gen, context_for):
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import CompositeTransform, Transform

    from .backends import wrap

    transform = wrap(bij, "nflows")
    if not isinstance(transform, Transform):
        chk.fail(f"nflows backend returned {type(transform).__name__}, not an nflows Transform")
    composite = CompositeTransform([transform])
    out_shape = tuple(bij.output_event_shape())
    ctx = context_for((3,))
    x = _draw((3,) + bij.event_shape, bij.input_domain, gen, chk.dtype, chk.device)
    with torch.no_grad():
        z_ref, ld_ref = bij.forward(x, ctx)
        z, ld = composite(x, ctx)
        chk.close(z, z_ref, "nflows CompositeTransform forward", chk.atol, chk.rtol)
        chk.close(ld, ld_ref, "nflows CompositeTransform log-det", chk.ld_atol, chk.rtol)
        x_back, _ = composite.inverse(z, ctx)
        chk.close(x_back, x, "nflows CompositeTransform inverse(forward(x))", chk.atol, chk.rtol)
        flow = Flow(composite, StandardNormal(out_shape)).to(chk.device)
        log_prob = flow.log_prob(x, ctx)
        by_hand = ld_ref - 0.5 * z_ref.reshape(3, -1).pow(2).sum(-1) - 0.5 * math.prod(
            out_shape
        ) * math.log(2 * math.pi)
        chk.close(log_prob, by_hand, "nflows Flow.log_prob != base log-prob + log-det",
                  chk.ld_atol, chk.rtol)
        with _default_dtype(chk.dtype):
            samples = flow.sample(4, ctx)
    want = ((3,) if ctx is not None else ()) + (4,) + bij.event_shape
    if tuple(samples.shape) != want or not torch.isfinite(samples).all():
        chk.fail(
            f"nflows Flow.sample(4) gave shape {tuple(samples.shape)} (expected {want}) or "
            "non-finite values"
        )


def _check_pyro(chk: _Checker, bij: Bijector, batch_shape, gen, context_for):
    import pyro.distributions as dist

    from .backends import wrap

    transform = wrap(bij, "pyro")
    if not isinstance(transform, dist.TransformModule):
        chk.fail(f"pyro backend returned {type(transform).__name__}, not a Pyro TransformModule")
    ctx = context_for(batch_shape)
    if ctx is not None:
        transform = transform.condition(ctx)
    in_shape, out_shape = bij.event_shape, tuple(bij.output_event_shape())
    if tuple(transform.forward_shape(batch_shape + out_shape)) != batch_shape + in_shape:
        chk.fail(f"pyro forward_shape maps {batch_shape + out_shape} to the wrong data shape")
    if tuple(transform.inverse_shape(batch_shape + in_shape)) != batch_shape + out_shape:
        chk.fail(f"pyro inverse_shape maps {batch_shape + in_shape} to the wrong latent shape")
    base = dist.Normal(torch.zeros(out_shape, dtype=chk.dtype, device=chk.device), 1.0).to_event(3)
    flow = dist.TransformedDistribution(base, [transform])
    with torch.no_grad():
        x = _draw(batch_shape + in_shape, bij.input_domain, gen, chk.dtype, chk.device)
        z_ref, ld_ref = bij.forward(x, ctx)
        log_prob = flow.log_prob(x)
        chk.close(log_prob, base.log_prob(z_ref) + ld_ref,
                  "pyro TransformedDistribution.log_prob != base.log_prob(z) + log-det",
                  chk.ld_atol, chk.rtol)
        z = _latent_sample(bij, batch_shape, gen, chk.dtype, chk.device, ctx)
        x_of_z = transform(z)
        ladj = transform.log_abs_det_jacobian(z, x_of_z)
        chk.close(ladj, bij.inverse(z, ctx)[1], "pyro log_abs_det_jacobian(z, t(z))", chk.ld_atol, chk.rtol)
        chk.close(ladj, -bij.forward(x_of_z, ctx)[1],
                  "pyro log_abs_det_jacobian != -forward log-det at t(z)", chk.ld_atol, chk.rtol)
        if ctx is None:
            one = flow.sample()
            many = flow.sample((3,) + batch_shape)
            if tuple(one.shape) != in_shape:
                chk.fail(f"pyro sample() has shape {tuple(one.shape)}; expected {in_shape}")
            if tuple(many.shape) != (3,) + batch_shape + in_shape:
                chk.fail(
                    f"pyro sample({(3,) + batch_shape}) has shape {tuple(many.shape)}; expected "
                    f"{(3,) + batch_shape + in_shape}"
                )
            if not torch.isfinite(many).all():
                chk.fail("pyro samples are not finite")


def check_registered(
    target: Union[str, type, Callable[..., Bijector]],
    event_shapes: Iterable[Sequence[int]] = ((2, 4, 4), (4, 2, 6)),
    *,
    options: Optional[Dict[str, Any]] = None,
    backends: Sequence[str] = BACKENDS,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    devices: Optional[Sequence[str]] = None,
    batch_shapes: Sequence[Sequence[int]] = ((2,), (3, 1)),
    seeds: Sequence[int] = (0, 1),
    **kwargs: Any,
) -> None:
    """Run :func:`check_bijector` over event shapes, batch shapes, dtypes, devices and seeds.

    The one-liner for a plugin package's test suite (also the ``flowplugins_check`` pytest
    fixture)::

        def test_my_plugin():
            check_registered("my_bijector")

    For a registry name it also checks that :func:`flowplugins.build` gives each backend's type.
    ``devices`` defaults to the CPU plus CUDA when available. Extra keywords go to
    :func:`check_bijector`.

    Raises:
        BijectorCheckError: on the first broken property, naming the case.
    """
    if devices is None:
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    if isinstance(target, str):
        from .registry import build

        for shape in event_shapes:
            for backend in backends:
                built = build(target, shape, backend=backend, **(options or {}))
                if backend != "torch" and isinstance(built, Bijector):
                    raise BijectorCheckError(
                        f"build({target!r}, backend={backend!r}) returned a bare Bijector"
                    )
    for shape in event_shapes:
        for device in devices:
            for dtype in dtypes:
                for i, seed in enumerate(seeds):
                    check_bijector(
                        target,
                        shape,
                        options=options,
                        batch_shape=tuple(batch_shapes[i % len(batch_shapes)]),
                        dtype=dtype,
                        device=device,
                        backend=tuple(backends),
                        seed=seed,
                        **kwargs,
                    )
