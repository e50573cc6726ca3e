"""Fuzzing: random names, shapes, batch shapes, dtypes and option values, valid and invalid.

Every case either builds and then passes the full contract check (round trips, log-det against
the autograd Jacobian, gradients, state dict: :func:`flowplugins.testing.check_bijector`; for
composed models, encode/decode round trip and ``log_prob`` against the Jacobian by hand), or
raises one of the documented errors — ``ValueError``, ``TypeError`` or a
:class:`flowplugins.registry.RegistryError` — whose message names the layer (or the function)
at fault. Anything else (``IndexError``, ``RuntimeError`` from torch internals,
``ZeroDivisionError``, ``AttributeError`` …) or a check failure is a bug.

Examples per test: ``FLOWPLUGINS_FUZZ_EXAMPLES`` (default 15, which keeps CI short). For a
longer local run::

    FLOWPLUGINS_FUZZ_EXAMPLES=500 HYPOTHESIS_PROFILE=dev OMP_NUM_THREADS=1 \\
        pytest -p no:cacheprovider -q tests/test_fuzz.py

(the ``dev`` profile of ``tests/conftest.py`` draws fresh random examples instead of the
derandomized CI ones).
"""

from __future__ import annotations

import math
import os
import string

import pytest
import torch
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

import flowplugins
from flowplugins import composer
from flowplugins.registry import RegistryError
from flowplugins.testing import check_bijector, perturb_parameters

EXAMPLES = int(os.environ.get("FLOWPLUGINS_FUZZ_EXAMPLES", "15"))
fuzz = settings(max_examples=EXAMPLES, deadline=None)
DOCUMENTED = (ValueError, TypeError, RegistryError)
NAMES = flowplugins.names()
# Layers that can run anywhere in a model (logit is only defined on (0, 1), the data range).
ANYWHERE = [n for n in NAMES if flowplugins.get_class(n).input_domain == "real"]

# ------------------------------------------------------------------------- strategies
# Sizes beyond int64 (hidden=10**30) are left out: torch's allocator refuses them with its own
# TypeError, a resource limit rather than a validation gap.
_odd_numbers = st.sampled_from([0, -1, 2.5, math.nan, math.inf, -math.inf, "1", None, True])


def misspelled(names):
    """A registered name with one character dropped, doubled or replaced."""

    @st.composite
    def draw(draw_):
        name = draw_(st.sampled_from(names))
        i = draw_(st.integers(0, len(name) - 1))
        kind = draw_(st.sampled_from(["drop", "double", "replace"]))
        if kind == "drop":
            return name[:i] + name[i + 1:]
        if kind == "double":
            return name[:i] + name[i] + name[i:]
        return name[:i] + draw_(st.sampled_from(string.ascii_lowercase)) + name[i + 1:]

    return draw().filter(lambda n: n not in names)


def mostly(valid, invalid, invalid_weight: int = 1, valid_weight: int = 3):
    """``valid`` about ``valid_weight`` times as often as ``invalid``."""
    total = valid_weight + invalid_weight
    return st.integers(1, total).flatmap(lambda k: valid if k <= valid_weight else invalid)


names = mostly(
    st.sampled_from(NAMES),
    st.one_of(misspelled(NAMES), st.text(string.ascii_letters + "_- ", max_size=12)),
)
valid_shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
invalid_shapes = st.one_of(
    st.tuples(st.integers(-2, 0), st.integers(1, 4), st.integers(1, 4)),
    st.tuples(st.integers(1, 4), st.integers(-2, 0), st.integers(1, 4)),
    st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple),
    st.lists(st.integers(1, 4), min_size=4, max_size=5).map(tuple),
    st.tuples(st.integers(1, 4), st.floats(1.1, 3.9), st.integers(1, 4)),
    st.sampled_from([None, "3,4,4", 5, (2, "4", 4)]),
)
event_shapes = mostly(valid_shapes, invalid_shapes)

# Valid and invalid values of every option a built-in takes; unknown options use _odd_numbers.
OPTION_VALUES = {
    "hidden": mostly(st.integers(1, 6), _odd_numbers),
    "seed": mostly(st.one_of(st.none(), st.integers(0, 2**63 - 1)),
                   st.sampled_from([-1, 1.5, "3", 2**64, 2**70])),
    "scale": mostly(st.floats(0.5, 2.0), _odd_numbers),
    "eps": mostly(st.floats(1e-6, 1e-2), _odd_numbers),
    "momentum": mostly(st.floats(0.0, 1.0), st.one_of(_odd_numbers, st.just(1.5))),
    "alpha": mostly(st.floats(0.0, 0.4), st.one_of(_odd_numbers, st.just(0.5))),
    "parity": mostly(st.sampled_from([0, 1]), _odd_numbers),
    "factor": mostly(st.sampled_from([2, 3]), st.one_of(_odd_numbers, st.just(1))),
    "context_features": mostly(st.one_of(st.none(), st.integers(1, 3)), _odd_numbers),
    "net": mostly(st.none(), st.sampled_from(["conv", 3])),
}


@st.composite
def options_for(draw, name):
    try:
        accepted = list(flowplugins.info(name).options)
    except RegistryError:
        accepted = []
    chosen = draw(st.lists(st.sampled_from(accepted), unique=True)) if accepted else []
    options = {key: draw(OPTION_VALUES.get(key, _odd_numbers)) for key in chosen}
    if "hidden" in accepted and "hidden" not in options:
        options["hidden"] = draw(st.integers(1, 6))  # keep the default 512-wide nets out of CI
    if draw(st.integers(0, 9)) == 0:
        options["hiden"] = 8  # an unknown option
    return options


def assert_documented(err: BaseException, *owners: str) -> None:
    """A documented error type whose message names one of ``owners``."""
    event(f"raised {type(err).__name__}")
    if not isinstance(err, DOCUMENTED):
        raise AssertionError(f"undocumented {type(err).__name__}: {err}") from err
    message = str(err)
    assert any(o and o in message for o in owners), (
        f"{type(err).__name__} does not name any of {owners}: {message}"
    )


# ------------------------------------------------------------------------- bijectors
@fuzz
@given(data=st.data(), name=names, shape=event_shapes,
       backend=st.sampled_from(["torch", "torch", "torch", "nflows", "pyro", "tensorflow"]),
       batch_shape=st.lists(st.integers(1, 3), max_size=2).map(tuple),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**16))
def test_build_either_works_or_raises_a_documented_error(data, name, shape, backend, batch_shape,
                                                         dtype, seed):
    options = data.draw(options_for(name), label="options")
    try:
        cls_name = flowplugins.get_class(name).__name__
    except RegistryError as err:
        assert_documented(err, repr(name))
        return
    try:
        built = flowplugins.build(name, shape, backend=backend, **options)
    except Exception as err:  # noqa: BLE001 - the type is what is under test
        assert_documented(err, cls_name, repr(name), "CouplingNet", "backend")
        return
    layer = built if backend == "torch" else built.bijector
    assert type(layer).__name__ == cls_name
    context_features = options.get("context_features")
    note(f"built {layer!r} with {options}")
    event("built and checked")
    check_bijector(
        layer,
        batch_shape=batch_shape,
        dtype=dtype,
        backend=("torch",) if backend == "torch" else ("torch", backend),
        context_shape=(context_features,) if context_features else None,
        seed=seed,
    )


@fuzz
@given(name=st.sampled_from(NAMES), shape=valid_shapes,
       in_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                 torch.int64, torch.uint8, torch.bool, torch.complex64]),
       layer_dtype=st.sampled_from([torch.float32, torch.float64]),
       batch_shape=st.lists(st.integers(0, 3), max_size=3).map(tuple),
       direction=st.sampled_from(["forward", "inverse"]))
def test_calls_with_any_dtype_and_batch_shape(name, shape, in_dtype, layer_dtype, batch_shape,
                                              direction):
    options = {"hidden": 4} if "hidden" in flowplugins.info(name).options else {}
    try:
        layer = flowplugins.build(name, shape, **options)
    except ValueError as err:  # a shape the layer cannot take, e.g. odd H for a squeeze
        assert_documented(err, flowplugins.get_class(name).__name__)
        return
    layer = layer.to(layer_dtype).eval()
    event = layer.event_shape if direction == "forward" else layer.output_event_shape()
    gen = torch.Generator().manual_seed(0)
    x = 0.05 + 0.9 * torch.rand(*batch_shape, *event, generator=gen, dtype=torch.float64)
    x = x.to(in_dtype)
    cls_name = type(layer).__name__
    try:
        out, logabsdet = getattr(layer, direction)(x)
    except Exception as err:  # noqa: BLE001
        assert_documented(err, f"{cls_name}.{direction}")
        assert in_dtype != layer_dtype, f"rejected a matching {in_dtype} input: {err}"
        return
    # Accepted: a floating input that matches the parameters (or a parameter-free layer).
    assert x.is_floating_point() and (in_dtype == layer_dtype or layer._reference_tensor() is None)
    out_event = layer.output_event_shape() if direction == "forward" else layer.event_shape
    assert out.shape == (*batch_shape, *out_event) and logabsdet.shape == batch_shape
    assert out.dtype == in_dtype and torch.isfinite(out).all() and torch.isfinite(logabsdet).all()
    back, _ = getattr(layer, "inverse" if direction == "forward" else "forward")(out)
    # Half precision: about 3 (float16) or 2 (bfloat16) significant digits per operation.
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(in_dtype, 1e-4)
    torch.testing.assert_close(back, x, atol=tol, rtol=tol)


# ------------------------------------------------------------------------- composer
def _jacobian_log_det(model, x):
    """``log|det ∂encode/∂x|`` of one sample by autograd (float64)."""
    jac = torch.autograd.functional.jacobian(lambda v: model.encode(v[None])[0].flatten(), x)
    return torch.linalg.slogdet(jac.reshape(x.numel(), x.numel()))[1]


def _check_model(model, shape, seed):
    event("built and checked")
    c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    model = model.double().train()
    with torch.no_grad():
        model.log_prob(torch.rand(8, c, h, w, generator=gen, dtype=torch.float64))  # data init
    perturb_parameters(model, 0.05, gen)
    model.eval()
    x = 0.02 + 0.96 * torch.rand(3, c, h, w, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        z = model.encode(x)
        x_back = model.decode(z)
        log_prob = model.log_prob(x)
        samples = model.sample(2)
    assert z.shape == x.shape and torch.isfinite(z).all()
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    log_det = _jacobian_log_det(model, x[0])
    expected = log_det - 0.5 * z[0].square().sum() - 0.5 * z[0].numel() * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob[0], expected, atol=1e-7, rtol=1e-7)
    assert samples.shape == (2, c, h, w) and torch.isfinite(samples).all()


@st.composite
def model_shapes(draw):
    """``(levels, (C, H, W))``, H and W mostly multiples of ``2**levels``."""
    levels = draw(mostly(st.integers(1, 3), st.integers(-1, 0), valid_weight=8))
    step = 2 ** max(levels, 0)
    fit = st.integers(1, max(1, 8 // step)).map(lambda k: k * step)
    side = mostly(fit, st.integers(1, 9))
    return levels, (draw(st.integers(1, 3)), draw(side), draw(side))


@fuzz
@given(levels_shape=model_shapes(), depth=mostly(st.integers(1, 2), st.just(0)),
       hidden=mostly(st.integers(1, 4), st.sampled_from([0, 2.5, "8"])),
       coupling=mostly(st.sampled_from(["affine", "additive", "affine_coupling"]),
                       st.sampled_from(["afine", "", None])),
       permutation=mostly(st.sampled_from(["inv_conv1x1_lu", "inv_conv1x1", "shuffle_permutation",
                                           "reverse_permutation"]),
                          st.sampled_from(["inv_conv1x1_lu ", "identity"])),
       split_prior=st.booleans(), arch=st.sampled_from(["glow", "realnvp"]),
       seed=st.integers(0, 2**16))
def test_composer_presets(levels_shape, depth, hidden, coupling, permutation, split_prior, arch,
                          seed):
    levels, shape = levels_shape
    try:
        if arch == "glow":
            model = composer.glow(shape, levels=levels, depth=depth, hidden=hidden,
                                  coupling=coupling, permutation=permutation,
                                  split_prior=split_prior, seed=seed)
        else:
            model = composer.realnvp(shape, levels=levels, depth=depth, hidden=hidden,
                                     coupling=coupling, split_prior=split_prior, checkerboard=1,
                                     final_checkerboard=1, seed=seed)
    except Exception as err:  # noqa: BLE001
        assert_documented(err, f"{arch}:", "multiscale", "Coupling", "Checkerboard", "Split2d")
        return
    _check_model(model, shape, seed)


@fuzz
@given(shape=st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 4, 3]),
                      st.sampled_from([2, 4, 4, 6])),
       levels=st.integers(1, 2),
       step=st.lists(mostly(st.sampled_from(ANYWHERE), misspelled(NAMES), valid_weight=8),
                     min_size=1, max_size=3),
       split_prior=st.booleans(), top_prior=st.booleans(),
       preprocess=st.sampled_from(["center", None, "logit", "lgit"]),
       seed=st.integers(0, 2**16))
def test_multiscale_with_random_steps(shape, levels, step, split_prior, top_prior, preprocess, seed):
    specs = [
        {"name": n, "hidden": 4} if n in NAMES and "hidden" in flowplugins.info(n).options else n
        for n in step
    ]
    # Steps must keep the shape; a squeeze in a step is a legitimate model only if H, W allow it.
    try:
        model = composer.multiscale(shape, levels, specs, split_prior=split_prior,
                                    top_prior=top_prior, preprocess=preprocess, seed=seed)
    except Exception as err:  # noqa: BLE001
        assert_documented(err, "multiscale", "unknown bijector", *(
            flowplugins.get_class(n).__name__ for n in set(step) if n in NAMES), "CouplingNet")
        return
    assume(math.prod(shape) <= 96)
    _check_model(model, shape, seed)
