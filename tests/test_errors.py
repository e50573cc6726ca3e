"""Bad input gets a clear error: every registered bijector, every kind of mistake.

Each test is parametrized over :func:`flowplugins.names`, so a newly registered bijector is
audited automatically. A mistake must raise ``TypeError`` (wrong kind of value: not a tensor,
not floating point, dtype differing from the layer's parameters) or ``ValueError`` (rank,
event shape, device, context batch), before any computation, and the message must name the
layer, the expected and the received value. ``OPTIONS`` holds the per-name constructor options
(small nets, conditional variants); a name missing from it is built with its defaults.

Non-finite *values* are deliberately not checked here: that would cost a device synchronisation
per layer (see :mod:`flowplugins.diagnostics`, tested in ``test_check_finite.py``).
"""

from __future__ import annotations

import re
from typing import Any, Dict

import pytest
import torch

import flowplugins
from flowplugins import composer
from flowplugins.registry import UnknownBijectorError

SHAPE = (4, 4, 6)
SMALL = {"hidden": 8}
# Per-name constructor options; unlisted names use their defaults.
OPTIONS: Dict[str, Dict[str, Any]] = {
    "affine_coupling": SMALL,
    "additive_coupling": SMALL,
    "checkerboard_coupling": SMALL,
}
# Conditional variants: name -> options with context_features.
CONDITIONAL: Dict[str, Dict[str, Any]] = {
    "affine_coupling": {**SMALL, "context_features": 3},
    "additive_coupling": {**SMALL, "context_features": 3},
    "checkerboard_coupling": {**SMALL, "context_features": 3},
    "split2d_prior": {"context_features": 3},
    "gaussian_prior": {"context_features": 3},
}
NAMES = flowplugins.names()


def make(name: str, shape=SHAPE, **extra):
    torch.manual_seed(0)
    return flowplugins.build(name, shape, **{**OPTIONS.get(name, {}), **extra})


def has_float_state(layer) -> bool:
    return layer._reference_tensor() is not None


def shape_text(shape) -> str:
    return re.escape(str(tuple(shape)))


def expected_text(shape) -> str:
    return re.escape(f"(..., {', '.join(map(str, shape))})")


@pytest.fixture(params=NAMES)
def name(request) -> str:
    return request.param


# ------------------------------------------------------------------- input tensors
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_wrong_rank_names_layer_and_shapes(name, direction):
    layer = make(name)
    cls = type(layer).__name__
    expected = layer.event_shape if direction == "forward" else layer.output_event_shape()
    bad = torch.zeros(4, 6)
    with pytest.raises(ValueError, match=rf"{cls}\.{direction}: expected input of shape "
                       rf"{expected_text(expected)}; got {shape_text(bad.shape)}"):
        getattr(layer, direction)(bad)


@pytest.mark.parametrize("axis", [-3, -2, -1])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_wrong_event_shape_names_layer_and_shapes(name, axis, direction):
    layer = make(name)
    cls = type(layer).__name__
    expected = tuple(layer.event_shape if direction == "forward" else layer.output_event_shape())
    wrong = list(expected)
    wrong[axis] += 2
    bad = torch.zeros(3, *wrong)
    with pytest.raises(ValueError, match=rf"{cls}\.{direction}: expected input of shape "
                       rf"{expected_text(expected)}; got {shape_text(bad.shape)}"):
        getattr(layer, direction)(bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_input_is_type_error(name, dtype):
    layer = make(name)
    with pytest.raises(TypeError, match=rf"{type(layer).__name__}\.forward: .*{dtype}"):
        layer(torch.zeros(2, *SHAPE, dtype=dtype))


@pytest.mark.parametrize("value", [[[1.0]], 3.0, None])
def test_non_tensor_input_is_type_error(name, value):
    layer = make(name)
    with pytest.raises(TypeError, match=rf"{type(layer).__name__}\.forward: expected a torch.Tensor"):
        layer(value)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_mismatch_with_parameters(name, dtype):
    layer = make(name)  # float32 parameters
    x = torch.rand(2, *SHAPE).to(dtype)
    if not has_float_state(layer):
        # Parameter-free layers (squeeze, permutations, logit) work in the input's dtype.
        z, ld = layer.eval()(x)
        assert z.dtype == dtype and ld.dtype == dtype
        return
    with pytest.raises(TypeError, match=rf"{type(layer).__name__}\.forward: input dtype {dtype} "
                       r"does not match the layer's parameters \(torch.float32\)"):
        layer(x)


def test_device_mismatch_names_both_devices(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put the input elsewhere than the parameters")
    layer = make(name)
    if not has_float_state(layer):
        pytest.skip(f"{name} has no floating-point state to mismatch")
    with pytest.raises(ValueError, match=r"input is on cuda:0 but the layer's parameters are on cpu"):
        layer(torch.rand(2, *SHAPE, device="cuda"))


# ------------------------------------------------------------------------- context
def test_context_for_unconditional_layer(name):
    layer = make(name)
    context = torch.zeros(2, 3)
    if name in CONDITIONAL:
        with pytest.raises(ValueError, match=rf"{type(layer).__name__}: got a context of shape "
                           r"\(2, 3\) but the layer was built with context_features=None"):
            layer(torch.rand(2, *SHAPE), context)
    else:
        # Layers without a context option ignore it (the composer passes none anyway).
        layer(torch.rand(2, *SHAPE), context)


@pytest.mark.parametrize("conditional", sorted(CONDITIONAL))
def test_context_errors(conditional):
    layer = flowplugins.build(conditional, SHAPE, **CONDITIONAL[conditional])
    cls = type(layer).__name__
    x = torch.rand(2, *SHAPE)
    with pytest.raises(TypeError, match=rf"{cls}\.forward: context must be a torch.Tensor; got list"):
        layer(x, [[0.0, 1.0, 0.0]] * 2)
    with pytest.raises(ValueError, match=rf"{cls}\.forward: context batch shape \(5,\) does not "
                       r"match the input's \(2,\)"):
        layer(x, torch.zeros(5, 3))
    with pytest.raises(TypeError, match=rf"{cls}\.forward: context dtype torch.int64 does not "
                       r"match the input's torch.float32"):
        layer(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=rf"{cls}\.inverse: context dtype torch.float64"):
        layer.inverse(x, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=rf"{cls}: .*context of shape \(\.\.\., 3\).*got \(2, 4\)"):
        layer(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=rf"{cls}: the layer was built with context_features=3"):
        layer(x)


# ---------------------------------------------------------------- empty batches
@pytest.mark.parametrize("batch", [(0,), (0, 3), (3, 0)])
def test_empty_batch_is_fine_and_leaves_state_alone(name, batch):
    layer = make(name)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    z, ld = layer(torch.rand(*batch, *SHAPE))
    assert z.shape == (*batch, *layer.output_event_shape()) and ld.shape == batch
    x, ld_inv = layer.inverse(z)
    assert x.shape == (*batch, *SHAPE) and ld_inv.shape == batch
    for key, value in layer.state_dict().items():
        # Running statistics and data-dependent init must not learn from an empty batch.
        assert torch.equal(value, before[key]), f"{name}: {key} changed on an empty batch"


# --------------------------------------------------------------- construction
@pytest.mark.parametrize(
    "shape", [(4, 4), (4, 4, 4, 4), (0, 4, 4), (4, -2, 4), (4, 2.5, 4), "abc", None, 7]
)
def test_invalid_event_shape_names_layer(name, shape):
    cls = flowplugins.get_class(name).__name__
    with pytest.raises(ValueError, match=rf"{cls}: event_shape must be"):
        flowplugins.build(name, shape, **OPTIONS.get(name, {}))


def test_unknown_option_lists_accepted(name):
    with pytest.raises(TypeError, match=rf"bijector '{name}' .* got unknown option\(s\) \['hiden'\]; "
                       r"it accepts"):
        flowplugins.build(name, SHAPE, hiden=8)


@pytest.mark.parametrize("typo, suggestion", [("actnrom", "actnorm"), ("squeez", "squeeze"),
                                               ("affine_couplng", "affine_coupling")])
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(UnknownBijectorError, match=rf"unknown bijector '{typo}'; did you mean "
                       rf".*'{suggestion}'"):
        flowplugins.build(typo, SHAPE)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"unknown backend 'jax'"):
        flowplugins.build("actnorm", SHAPE, backend="jax")


@pytest.mark.parametrize(
    "name, options, pattern",
    [
        ("squeeze", {}, r"Squeeze: H and W must be divisible by factor 2; got event shape \(2, 5, 4\)"),
        ("squeeze", {"factor": 1}, r"Squeeze: factor must be an integer >= 2; got 1"),
        ("affine_coupling", {"hidden": 0}, r"CouplingNet: hidden must be a positive integer; got 0"),
        ("affine_coupling", {"net": "resnet"}, r"AffineCoupling: net must be None or a callable"),
        ("checkerboard_coupling", {"parity": 2}, r"CheckerboardCoupling: parity must be 0 or 1; got 2"),
        ("split2d_prior", {"context_features": 0},
         r"Split2dPrior: context_features must be a positive integer; got 0"),
        ("split2d_prior", {"context_features": 2.5},
         r"Split2dPrior: context_features must be a positive integer; got 2.5"),
        ("gaussian_prior", {"context_features": -1},
         r"LearnedGaussianPrior: context_features must be None or a positive integer; got -1"),
        ("batchnorm", {"momentum": 1.5}, r"BatchNormFlow: momentum must be in \[0, 1\]; got 1.5"),
        ("batchnorm", {"momentum": "fast"}, r"BatchNormFlow: momentum must be in \[0, 1\]; got 'fast'"),
        ("batchnorm", {"eps": float("inf")}, r"BatchNormFlow: eps must be > 0 and finite; got inf"),
        ("actnorm", {"eps": float("nan")}, r"ActNorm: eps must be a positive finite number; got nan"),
        ("logit", {"alpha": 0.5}, r"LogitTransform: alpha must satisfy 0 <= alpha < 0.5; got 0.5"),
        ("inv_conv1x1_lu", {"seed": -1}, r"LUInvertibleConv1x1: seed must be None or a non-negative"),
        ("shuffle_permutation", {"seed": 1.5}, r"ShufflePermutation: seed must be None or a non-negative"),
    ],
)
def test_invalid_options_name_layer_rule_and_value(name, options, pattern):
    shape = (2, 5, 4) if name == "squeeze" and not options else (2, 4, 4)
    with pytest.raises(ValueError if "net" not in options else TypeError, match=pattern):
        flowplugins.build(name, shape, **options)


@pytest.mark.parametrize("name, shape", [("affine_coupling", (1, 4, 4)),
                                         ("additive_coupling", (1, 2, 2)),
                                         ("split2d_prior", (1, 4, 4)),
                                         ("checkerboard_coupling", (3, 1, 1))])
def test_shapes_a_layer_cannot_split(name, shape):
    cls = flowplugins.get_class(name).__name__
    with pytest.raises(ValueError, match=rf"{cls}: .*got event shape {shape_text(shape)}"):
        flowplugins.build(name, shape, **OPTIONS.get(name, {}))


# ------------------------------------------------------------------ composed models
def test_model_sizes_that_do_not_survive_the_levels():
    with pytest.raises(ValueError, match=r"multiscale: H and W must be divisible by 2\*\*levels = 8 "
                       r"to survive 3 squeeze\(s\); got event shape \(3, 12, 16\)"):
        composer.glow((3, 12, 16), levels=3, depth=1, hidden=8)
    with pytest.raises(ValueError, match=r"multiscale: levels must be a positive integer; got 0"):
        composer.glow((3, 8, 8), levels=0, depth=1, hidden=8)


def test_model_input_errors_name_model_and_shapes():
    model = composer.glow((3, 8, 8), levels=2, depth=1, hidden=8)
    with pytest.raises(ValueError, match=r"MultiscaleFlow.log_prob: expected input of shape "
                       r"\(\.\.\., 3, 8, 8\); got \(2, 3, 8, 4\)"):
        model.log_prob(torch.rand(2, 3, 8, 4))
    with pytest.raises(ValueError, match=r"MultiscaleFlow.decode: expected input of shape"):
        model.decode(torch.rand(2, 12, 4, 4))
    with pytest.raises(TypeError, match=r"ActNorm.forward: input dtype torch.float64 does not match"):
        model.log_prob(torch.rand(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"Center.forward: input must be a floating-point tensor"):
        model.log_prob(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
