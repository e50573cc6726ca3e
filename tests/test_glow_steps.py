"""Tests of flowplugins.models.glow_steps: fused runs of Glow steps inside MultiscaleFlow.

:class:`~flowplugins.models.glow_steps.GlowStepRun` recomputes ``ActNorm → LU 1x1 conv →
coupling`` runs with batched matrices, handwritten backward passes and an eval-mode cache. It
must be the same function of the same parameters as the step-by-step path
(``model.fuse_glow_steps = False``, the reference here), so every test below compares the two
on one model and its deep copy:

* log-probs and the gradients w.r.t. every parameter, the input and the context, in float64
  (1e-10 relative) and float32, affine and additive couplings, conditional couplings and
  conditional priors, split priors on and off, several levels and depths, odd channel splits;
* encode/decode and their log-dets, the round trip, gradients through decode;
* sampling under the same seed, with a temperature and a context, and the restored train/eval
  mode;
* that the fused path is actually taken (spied through ``monkeypatch``), and that it is *not*
  taken where the difference could be observed: module hooks, ``check_finite`` and ActNorm's
  data-dependent initialisation, which must come out exactly as the reference's;
* that the eval-mode matrix cache notices in-place parameter writes, mode switches,
  ``load_state_dict`` and ``.double()``;
* the affine coupling's clamp of ``r + 2`` (clamped elements get no gradient in both paths);
* which runs :func:`~flowplugins.models.glow_steps.find_glow_step_runs` finds;
* that memory-saving models, which run their own loop, still agree with the fused model.

Parameters are always moved away from their init (after ActNorm's initialisation) so that the
zero-initialised coupling nets and unit scales do not hide a wrong term.
"""

from __future__ import annotations

import copy
import io
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import flowplugins
from flowplugins import composer
from flowplugins.bijectors.actnorm import ActNorm
from flowplugins.bijectors.coupling import AffineCoupling
from flowplugins.diagnostics import NonFiniteError, check_finite
from flowplugins.models.glow_steps import GlowStepRun, find_glow_step_runs
from flowplugins.models.multiscale import MultiscaleFlow
from flowplugins.testing import perturb_parameters

SHAPE = (2, 8, 8)
CONTEXT = 3  # context features of the conditional models
BATCH = 4
PERTURB = 0.05  # larger moves send log p to -1e8 on these tiny nets: useless comparisons
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}  # observed: ~6e-16 and ~6e-7

# (coupling, levels, depth, split_prior, context): context None, "priors" (glow's own
# class conditioning: the split and top priors) or "couplings" (every coupling net too).
CASES = [
    ("affine", 1, 1, True, None),
    ("affine", 2, 2, True, None),
    ("additive", 2, 3, False, None),
    ("affine", 3, 1, False, "couplings"),
    ("additive", 2, 2, True, "couplings"),
    ("affine", 2, 2, True, "priors"),
]
CASE_IDS = [f"{c}-L{lv}-K{k}-{'split' if s else 'nosplit'}-{ctx}" for c, lv, k, s, ctx in CASES]


# ------------------------------------------------------------------------------ helpers
def _model(coupling: str, levels: int, depth: int, split_prior: bool, context: Optional[str],
           dtype: torch.dtype = torch.float64) -> MultiscaleFlow:
    if context == "couplings":
        step = ["actnorm", "inv_conv1x1_lu",
                {"name": f"{coupling}_coupling", "hidden": 8, "context_features": CONTEXT}]
        model = composer.multiscale(SHAPE, levels, step, depth=depth, split_prior=split_prior,
                                    context_features=CONTEXT, seed=0)
    else:
        model = composer.glow(SHAPE, levels=levels, depth=depth, hidden=8, coupling=coupling,
                              split_prior=split_prior, seed=0,
                              context_features=CONTEXT if context else None)
    return model.to(dtype)


def _mixed_model(dtype: torch.dtype = torch.float64) -> MultiscaleFlow:
    """Odd channel count (split 2 + 1), affine and additive couplings in one run, couplings with
    and without a context, a run broken by a shuffle, and a squeezed second level.

    Runs: steps[0:6] (two steps), steps[9:12] and steps[13:16] (one step each).
    """
    build = flowplugins.build
    shape, small = (3, 4, 4), (4, 2, 2)
    level0 = [
        build("actnorm", shape), build("inv_conv1x1_lu", shape, seed=1),
        build("affine_coupling", shape, hidden=6, context_features=CONTEXT),
        build("actnorm", shape), build("inv_conv1x1_lu", shape, seed=2),
        build("additive_coupling", shape, hidden=6),
        build("actnorm", shape), build("shuffle_permutation", shape, seed=3),
        build("affine_coupling", shape, hidden=6),
        build("actnorm", shape), build("inv_conv1x1_lu", shape, seed=4),
        build("affine_coupling", shape, hidden=6),
    ]
    level1 = [
        build("squeeze", (1, 4, 4)),
        build("actnorm", small), build("inv_conv1x1_lu", small, seed=5),
        build("affine_coupling", small, hidden=6, context_features=CONTEXT),
        build("gaussian_prior", small, context_features=CONTEXT),
    ]
    return MultiscaleFlow([level0, level1], context_features=CONTEXT).to(dtype)


def _data(model: MultiscaleFlow, n: int = BATCH, seed: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    dtype = model._anchor.dtype
    x = torch.rand(n, *model.event_shape, generator=gen, dtype=torch.float64).to(dtype)
    if model.context_features is None:
        return x, None
    return x, torch.randn(n, model.context_features, generator=gen, dtype=torch.float64).to(dtype)


def _prepare(model: MultiscaleFlow, x: Tensor, context: Optional[Tensor],
             seed: int = 1) -> Tuple[MultiscaleFlow, MultiscaleFlow]:
    """Initialise ActNorm from ``x``, perturb every parameter; return the model and its
    step-by-step deep copy."""
    model.train()
    with torch.no_grad():
        model.log_prob(x, context)
    perturb_parameters(model, PERTURB, torch.Generator().manual_seed(seed))
    reference = copy.deepcopy(model)
    reference.fuse_glow_steps = False
    return model, reference


def _prepared_in_mode(case, mode: str):
    """:func:`_prepare` for a case's model, both copies set to ``mode`` ("train" or "eval");
    returns the model, its step-by-step reference, and the data and context used."""
    model = _model(*case)
    x, context = _data(model)
    model, reference = _prepare(model, x, context)
    model.train(mode == "train")
    reference.train(mode == "train")
    return model, reference, x, context


def _assert_rel(actual: Optional[Tensor], expected: Optional[Tensor], rtol: float,
                what: str) -> None:
    """``max|actual - expected| <= rtol · max|expected|`` (a tensor-wide relative error)."""
    assert (actual is None) == (expected is None), f"{what}: one of the two is missing"
    if expected is None:
        return
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: got {tuple(actual.shape)} {actual.dtype}, expected "
        f"{tuple(expected.shape)} {expected.dtype}"
    )
    if expected.numel() == 0:
        return
    scale = max(expected.detach().abs().max().item(), 1e-12)
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.0e} x {scale:.3e}"


def _log_prob_grads(model: MultiscaleFlow, x: Tensor, context: Optional[Tensor]
                    ) -> Tuple[Tensor, Dict[str, Optional[Tensor]]]:
    """``log p`` and the gradients of a per-sample weighted sum of it (so that errors in one
    sample's log-det cannot cancel) w.r.t. ``x``, the context and every parameter."""
    x = x.clone().requires_grad_(True)
    context = None if context is None else context.clone().requires_grad_(True)
    log_prob = model.log_prob(x, context)
    weights = torch.linspace(0.5, 1.5, log_prob.numel(), dtype=x.dtype).view(log_prob.shape)
    named = dict(model.named_parameters())
    inputs = {"x": x, **({"context": context} if context is not None else {}), **named}
    loss = (log_prob * weights).sum()
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return log_prob.detach(), dict(zip(inputs, grads))


def _assert_same_log_prob_and_grads(model, reference, x, context, rtol) -> None:
    log_prob, grads = _log_prob_grads(model, x, context)
    ref_log_prob, ref_grads = _log_prob_grads(reference, x, context)
    _assert_rel(log_prob, ref_log_prob, rtol, "log_prob")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        _assert_rel(grads[name], ref_grads[name], rtol, f"d log_prob / d {name}")


def _run_layers(run: GlowStepRun) -> List[nn.Module]:
    return [m for step in zip(run.actnorms, run.convs, run.couplings) for m in step]


@pytest.fixture
def calls(monkeypatch) -> Dict[str, int]:
    """Counts of GlowStepRun.forward / .inverse calls (the fused path) during the test."""
    counts = {"forward": 0, "inverse": 0}
    for name in counts:
        original = getattr(GlowStepRun, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(GlowStepRun, name, spy)
    return counts


# -------------------------------------------------------------- 1. fused == step by step
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_log_prob_and_gradients_equal_step_by_step_float64(case, mode, calls):
    model, reference, x, context = _prepared_in_mode(case, mode)
    calls["forward"] = 0
    _assert_same_log_prob_and_grads(model, reference, x, context, RTOL[torch.float64])
    assert calls["forward"] == len(model._glow_runs) == case[1]


@pytest.mark.parametrize("case", CASES[1:4], ids=CASE_IDS[1:4])
def test_log_prob_and_gradients_equal_step_by_step_float32(case):
    model = _model(*case, dtype=torch.float32)
    x, context = _data(model)
    model, reference = _prepare(model, x, context)
    _assert_same_log_prob_and_grads(model, reference, x, context, RTOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_mixed_run_with_odd_split_equals_step_by_step(dtype, calls):
    model = _mixed_model(dtype)
    x, context = _data(model)
    model, reference = _prepare(model, x, context)
    calls["forward"] = 0
    _assert_same_log_prob_and_grads(model, reference, x, context, RTOL[dtype])
    assert calls["forward"] == 3


def test_batch_shapes_equal_step_by_step():
    model = _model("affine", 2, 2, True, "couplings")
    x, context = _data(model, n=6)
    model, reference = _prepare(model, x, context)
    x, context = x.view(2, 3, *SHAPE), context.view(2, 3, CONTEXT)
    _assert_same_log_prob_and_grads(model, reference, x, context, RTOL[torch.float64])
    empty_x, empty_context = x[:0, 0], context[:0, 0]
    for m in (model, model.eval()):
        assert m.log_prob(empty_x, empty_context).shape == (0,)


def test_copies_fuse_their_own_layers():
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, _ = _prepare(model, x, None)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        for run in clone._glow_runs:
            assert all(a is b for a, b in zip(_run_layers(run), clone.steps[run.start:run.stop]))
        perturb_parameters(clone, PERTURB, torch.Generator().manual_seed(9))
        reference = copy.deepcopy(clone)
        reference.fuse_glow_steps = False
        with torch.no_grad():
            log_prob = clone.log_prob(x)
            _assert_rel(log_prob, reference.log_prob(x), RTOL[torch.float64], "clone log_prob")
            assert (log_prob - model.log_prob(x)).abs().max() > 1e-3


# ------------------------------------------------------------------- 2. encode / decode
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES[1:], ids=CASE_IDS[1:])
def test_encode_decode_equal_step_by_step_and_invert(case, mode):
    model, reference, x, context = _prepared_in_mode(case, mode)
    rtol = RTOL[torch.float64]
    with torch.no_grad():
        z, log_det = model.encode_with_log_det(x, context)
        z_ref, log_det_ref = reference.encode_with_log_det(x, context)
        _assert_rel(z, z_ref, rtol, "encode")
        _assert_rel(log_det, log_det_ref, rtol, "encode log-det")
        x_back, log_det_inv = model.decode_with_log_det(z, context)
        assert (x_back - x).abs().max() < 1e-10
        _assert_rel(log_det_inv, -log_det, rtol, "decode log-det vs -encode log-det")
        z_other = 0.7 * torch.randn(z.shape, generator=torch.Generator().manual_seed(2),
                                    dtype=z.dtype)
        x_other, log_det_other = model.decode_with_log_det(z_other, context)
        x_ref, log_det_ref = reference.decode_with_log_det(z_other, context)
        _assert_rel(x_other, x_ref, rtol, "decode")
        _assert_rel(log_det_other, log_det_ref, rtol, "decode log-det")


@pytest.mark.parametrize("mode", ["train", "eval", "eval-frozen"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[CASE_IDS[1], CASE_IDS[4]])
def test_decode_gradients_equal_step_by_step(case, mode):
    model = _model(*case)
    x, context = _data(model)
    model, reference = _prepare(model, x, context)
    for m in (model, reference):
        m.train(mode == "train")
        if mode == "eval-frozen":  # the eval cache serves the matrices, autograd still records
            m.requires_grad_(False)

    def grads(m: MultiscaleFlow) -> Dict[str, Optional[Tensor]]:
        z = (0.7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3),
                               dtype=x.dtype)).requires_grad_(True)
        c = None if context is None else context.clone().requires_grad_(True)
        out, log_det = m.decode_with_log_det(z, c)
        weights = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view(out.shape)
        loss = (out * weights).sum() + (log_det * torch.arange(1.0, 1.0 + BATCH)).sum()
        inputs = {"z": z, **({"context": c} if c is not None else {}),
                  **{n: p for n, p in m.named_parameters() if p.requires_grad}}
        return dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()),
                                                    allow_unused=True)))

    actual, expected = grads(model), grads(reference)
    assert actual.keys() == expected.keys()
    assert len(actual) > 2 or mode == "eval-frozen"
    for name in actual:
        _assert_rel(actual[name], expected[name], RTOL[torch.float64], f"d decode / d {name}")


# ------------------------------------------------------------------------- 3. sampling
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[5]],
                         ids=[CASE_IDS[1], CASE_IDS[2], CASE_IDS[3], CASE_IDS[5]])
def test_sample_equals_step_by_step_and_restores_mode(case, mode, calls):
    model, reference, x, context = _prepared_in_mode(case, mode)
    contexts = [None] if context is None else [context[0], context[:3].repeat(2, 1)]
    for temperature in (1.0, 0.6, 0.0):
        for c in contexts:
            torch.manual_seed(7)
            sample = model.sample(6, temperature=temperature, context=c)
            torch.manual_seed(7)
            expected = reference.sample(6, temperature=temperature, context=c)
            _assert_rel(sample, expected, RTOL[torch.float64], f"sample at T={temperature}")
            assert sample.shape == (6, *SHAPE) and sample.dtype == torch.float64
            inside = ((expected > 0) & (expected < 1)).double().mean().item()
            assert inside > 0.5, "the clamp to [0, 1] would hide differences"
            assert all(m.training == (mode == "train") for m in model.modules())
    assert calls["inverse"] == 3 * len(contexts) * len(model._glow_runs)


def test_sample_of_an_uninitialised_model_leaves_actnorm_alone():
    model = _model("affine", 2, 2, True, None).train()
    torch.manual_seed(0)
    sample = model.sample(3, temperature=0.5)
    assert sample.shape == (3, *SHAPE) and torch.isfinite(sample).all()
    assert model.training
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))


# ------------------------------------------------- 4. when the fused path is (not) taken
def test_fused_path_is_taken(calls, monkeypatch):
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, _ = _prepare(model, x, None)
    calls.update(forward=0, inverse=0)
    model.log_prob(x).sum().backward()
    assert calls == {"forward": 2, "inverse": 0}
    flags: List[bool] = []
    spy = GlowStepRun.inverse

    def recording(self, z, context, with_log_det=True):
        flags.append(with_log_det)
        return spy(self, z, context, with_log_det)

    monkeypatch.setattr(GlowStepRun, "inverse", recording)
    model.sample(2)
    assert calls == {"forward": 2, "inverse": 2}
    assert flags == [False, False]  # sampling skips the log-det
    with torch.no_grad():
        model.eval().decode(model.encode(x))
    assert calls == {"forward": 4, "inverse": 4}
    model.fuse_glow_steps = False
    model.log_prob(x)
    model.sample(2)
    assert calls == {"forward": 4, "inverse": 4}


def test_replaced_step_is_used_not_the_one_the_run_was_built_with(calls):
    """Assigning a new module to ``model.steps[i]`` after building must take effect: the run
    holding the old layer falls back to step-by-step execution."""
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    run = model._glow_runs[0]
    index = run.start + 2  # the run's first coupling
    before = model.log_prob(x).detach()
    replacement = copy.deepcopy(model.steps[index])
    perturb_parameters(replacement, PERTURB, torch.Generator().manual_seed(7))
    model.steps[index] = replacement
    reference.steps[index] = copy.deepcopy(replacement)
    calls.update(forward=0, inverse=0)
    expected = reference.log_prob(x)
    assert calls["forward"] == 0  # the reference never fuses
    actual = model.log_prob(x)
    assert calls["forward"] == 1  # only the untouched run fused
    _assert_rel(actual, expected, RTOL[x.dtype], "log_prob")
    assert not torch.allclose(actual, before)  # the replacement does change the model


@pytest.mark.parametrize("kind", ["forward", "forward_pre"])
@pytest.mark.parametrize("layer", [0, 1, 2, 4],
                         ids=["actnorm", "conv", "coupling", "second-step-conv"])
def test_module_hook_on_a_run_layer_falls_back(layer, kind, calls):
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    run = model._glow_runs[1]
    seen: List[str] = []
    register = getattr(model.steps[run.start + layer], f"register_{kind}_hook")
    handle = register(lambda module, *args: seen.append(type(module).__name__))
    calls.update(forward=0, inverse=0)
    _assert_same_log_prob_and_grads(model, reference, x, None, RTOL[torch.float64])
    assert calls["forward"] == 1  # the other run still fuses
    assert len(seen) == 1  # the hooked layer ran on its own, once
    with torch.no_grad():
        torch.manual_seed(0)
        sample = model.sample(3)
        torch.manual_seed(0)
        _assert_rel(sample, reference.sample(3), RTOL[torch.float64], "sample")
    assert calls["inverse"] == 1
    handle.remove()
    model.log_prob(x)
    assert calls["forward"] == 3


def test_global_module_hook_falls_back(calls):
    model = _model("additive", 2, 2, False, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    seen: List[str] = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda module, *args: seen.append(type(module).__name__))
    try:
        calls.update(forward=0, inverse=0)
        with torch.no_grad():
            _assert_rel(model.log_prob(x), reference.log_prob(x), RTOL[torch.float64], "log_prob")
            model.decode(model.encode(x))
    finally:
        handle.remove()
    assert calls == {"forward": 0, "inverse": 0}
    assert "AdditiveCoupling" in seen and "LUInvertibleConv1x1" in seen


def test_check_finite_falls_back_and_names_the_layer(calls):
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    calls.update(forward=0, inverse=0)
    with check_finite(model):
        _assert_same_log_prob_and_grads(model, reference, x, None, RTOL[torch.float64])
        model.sample(2)
    assert calls == {"forward": 0, "inverse": 0}
    coupling = model._glow_runs[0].couplings[1]
    with torch.no_grad():
        coupling.net.conv_out.bias[0] = float("nan")
    with check_finite(model), pytest.raises(NonFiniteError, match="AffineCoupling") as info:
        model.log_prob(x)
    assert info.value.bijector is coupling
    assert calls["forward"] == 0
    model.log_prob(x)
    assert calls["forward"] == 2


def test_first_training_call_initialises_actnorm_like_the_reference(calls):
    model = _model("affine", 2, 2, True, "couplings").train()
    reference = copy.deepcopy(model)
    reference.fuse_glow_steps = False
    x, context = _data(model)
    log_prob = model.log_prob(x, context)
    assert calls["forward"] == 0  # nothing is initialised yet: step by step
    expected = reference.log_prob(x, context)
    _assert_rel(log_prob, expected, RTOL[torch.float64], "first log_prob")
    actnorms = [m for m in model.steps if isinstance(m, ActNorm)]
    assert len(actnorms) == 4 and all(bool(m.initialized) for m in actnorms)
    for (name, value), (_, ref_value) in zip(model.state_dict().items(),
                                            reference.state_dict().items()):
        assert torch.equal(value, ref_value), f"{name} differs after ActNorm's initialisation"
    perturb_parameters(model, PERTURB, torch.Generator().manual_seed(1))
    perturb_parameters(reference, PERTURB, torch.Generator().manual_seed(1))
    _assert_same_log_prob_and_grads(model, reference, x, context, RTOL[torch.float64])
    assert calls["forward"] == 2


def test_uninitialised_actnorm_in_eval_mode_fuses(calls):
    model = _model("additive", 2, 2, True, None).eval()
    reference = copy.deepcopy(model)
    reference.fuse_glow_steps = False
    perturb_parameters(model, PERTURB, torch.Generator().manual_seed(1))
    perturb_parameters(reference, PERTURB, torch.Generator().manual_seed(1))
    x, _ = _data(model)
    _assert_same_log_prob_and_grads(model, reference, x, None, RTOL[torch.float64])
    assert calls["forward"] == 2
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, ActNorm))


# --------------------------------------------------------------------- 5. eval-mode cache
def _eval_pair(dtype=torch.float64):
    model = _model("affine", 2, 2, True, None, dtype=dtype)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    return model.eval(), reference.eval(), x


def test_eval_cache_is_used_and_sees_in_place_writes(monkeypatch):
    model, reference, x = _eval_pair()
    builds = {"n": 0}
    original = GlowStepRun._build_forward

    def counting(self):
        builds["n"] += 1
        return original(self)

    monkeypatch.setattr(GlowStepRun, "_build_forward", counting)
    z = 0.7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=x.dtype)
    rtol = RTOL[torch.float64]
    with torch.no_grad():
        previous = model.log_prob(x)
        model.log_prob(x)
        assert builds["n"] == 2  # one per run: the second call is served by the cache
        run = model._glow_runs[0]
        names = ["log_scale", "shift", "lower", "upper", "log_abs_s"]
        layers = [run.actnorms[1]] * 2 + [run.convs[1]] * 3
        for name, layer in zip(names, layers):
            index = list(model.steps).index(layer)
            getattr(layer, name).add_(0.1)
            getattr(reference.steps[index], name).add_(0.1)
            log_prob = model.log_prob(x)
            assert (log_prob - previous).abs().max() > 1e-6, f"changing {name} changed nothing"
            _assert_rel(log_prob, reference.log_prob(x), rtol, f"log_prob after {name}.add_")
            _assert_rel(model.decode(z), reference.decode(z), rtol, f"decode after {name}.add_")
            previous = log_prob


def test_eval_cache_is_fresh_after_train_eval_and_load_state_dict():
    model, reference, x = _eval_pair()
    rtol = RTOL[torch.float64]
    with torch.no_grad():
        model.log_prob(x)
        model.sample(2)
        # .data writes bypass the version counters: a train()/eval() switch clears the cache.
        for layer, ref_layer in zip(model.steps, reference.steps):
            if isinstance(layer, ActNorm):
                layer.log_scale.data.add_(0.1)
                ref_layer.log_scale.data.add_(0.1)
        model.train()
        model.eval()
        _assert_rel(model.log_prob(x), reference.log_prob(x), rtol, "log_prob after train/eval")
        other = _model("affine", 2, 2, True, None)
        other, other_reference = _prepare(other, x, None, seed=3)
        model.load_state_dict(other.state_dict())
        _assert_rel(model.log_prob(x), other_reference.eval().log_prob(x), rtol,
                    "log_prob after load_state_dict")


def test_training_mode_never_uses_the_cache():
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    with torch.no_grad():  # e.g. a validation pass left in training mode
        model.log_prob(x)
        # A write that bypasses the version counters, as a fused=True optimizer step does.
        model._glow_runs[0].convs[0].log_abs_s.data.add_(0.1)
        reference._glow_runs[0].convs[0].log_abs_s.data.add_(0.1)
        _assert_rel(model.log_prob(x), reference.log_prob(x), RTOL[torch.float64],
                    "training-mode log_prob after a .data write")


def test_eval_cache_follows_double():
    model, reference, x = _eval_pair(torch.float32)
    with torch.no_grad():
        model.log_prob(x)
        model.sample(2)
        model.double()
        reference.double()
        x = x.double()
        log_prob = model.log_prob(x)
        assert log_prob.dtype == torch.float64
        _assert_rel(log_prob, reference.log_prob(x), RTOL[torch.float64], "log_prob after double()")
        torch.manual_seed(0)
        sample = model.sample(3)
        torch.manual_seed(0)
        _assert_rel(sample, reference.sample(3), RTOL[torch.float64], "sample after double()")


def test_eval_cache_built_in_inference_mode_serves_later_gradients():
    model, reference, x = _eval_pair()
    for m in (model, reference):
        m.requires_grad_(False)
    with torch.inference_mode():
        model.log_prob(x)
    x_grad = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.log_prob(x_grad).sum(), x_grad)
    x_ref = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference.log_prob(x_ref).sum(), x_ref)
    _assert_rel(grad, expected, RTOL[torch.float64], "d log_prob / d x from cached matrices")


# -------------------------------------------------------------------- 6. the affine clamp
@pytest.mark.parametrize("dtype, bias", [(torch.float32, -200.0), (torch.float64, -1000.0)],
                         ids=["float32", "float64"])
def test_clamped_affine_scale_equals_step_by_step(dtype, bias, calls):
    model = _model("affine", 2, 2, True, None, dtype=dtype)
    x, _ = _data(model)
    model, _ = _prepare(model, x, None)
    coupling = model._glow_runs[0].couplings[0]
    clamped = coupling.transformed_channels  # the first channel of r in the net's output
    with torch.no_grad():
        coupling.net.conv_out.bias[clamped] = bias
    reference = copy.deepcopy(model)
    reference.fuse_glow_steps = False
    calls["forward"] = 0
    _assert_same_log_prob_and_grads(model, reference, x, None, RTOL[dtype])
    assert calls["forward"] == 2
    model.zero_grad()
    model.log_prob(x).sum().backward()
    # Below the clamp r gets no gradient: nor does the bias or the weights feeding it.
    assert coupling.net.conv_out.bias.grad[clamped] == 0
    assert (coupling.net.conv_out.weight.grad[clamped] == 0).all()
    assert (coupling.net.conv_out.bias.grad[clamped + 1:] != 0).all()
    # The inverse through the clamp, with its log-det and without (sampling), against the
    # layers' own inverses. (decode(encode(x)) cannot check it: s ≈ 1e-35 makes the clamped
    # channel vanish in the next channel mix's round-off, in both paths alike.)
    run = model._glow_runs[0]
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(BATCH, *run.actnorms[0].event_shape, generator=gen, dtype=torch.float64)
    z = z.to(dtype)
    with torch.no_grad():
        expected, expected_log_det = z, torch.zeros(BATCH, dtype=dtype)
        for layer in reversed(_run_layers(run)):
            expected, log_det = layer.inverse(expected)
            expected_log_det = expected_log_det + log_det
        assert torch.isfinite(expected).all() and expected.abs().max() > 1e20  # z_b / s
        x_run, per_sample, constant = run.inverse(z, None)
        _assert_rel(x_run, expected, RTOL[dtype], "run inverse through the clamp")
        _assert_rel(torch.stack(per_sample).sum(0) + constant, expected_log_det, RTOL[dtype],
                    "run inverse log-det through the clamp")
        x_fast, per_sample, constant = run.inverse(z, None, with_log_det=False)
        _assert_rel(x_fast, expected, RTOL[dtype], "run inverse without log-det")
        assert per_sample == [] and constant is None


# ------------------------------------------------------------------ 7. which runs are found
@pytest.mark.parametrize("split_prior", [True, False])
@pytest.mark.parametrize("levels, depth", [(1, 1), (2, 3), (3, 2)])
def test_find_glow_step_runs_finds_one_run_per_level(levels, depth, split_prior):
    model = _model("affine", levels, depth, split_prior, None)
    runs = model._glow_runs
    assert [len(run) for run in runs] == [depth] * levels
    for run, (start, stop) in zip(runs, model.level_bounds):
        assert start <= run.start and run.stop <= stop and run.stop - run.start == 3 * depth
        assert _run_layers(run) == list(model.steps[run.start:run.stop])
    again = find_glow_step_runs(list(model.steps), model.level_bounds)
    assert [(r.start, r.stop) for r in again] == [(r.start, r.stop) for r in runs]
    assert find_glow_step_runs(list(model.steps), model.level_bounds, min_steps=depth + 1) == []


def test_find_glow_step_runs_on_a_mixed_model():
    model = _mixed_model()
    assert [(r.start, r.stop) for r in model._glow_runs] == [(0, 6), (9, 12), (13, 16)]
    first = model._glow_runs[0]
    assert first.affine == (True, False) and first.wants_context == (True, False)
    assert first.split == 2


def test_coupling_subclasses_are_not_fused():
    class MyAffineCoupling(AffineCoupling):
        pass

    shape = (4, 2, 2)
    steps = [flowplugins.build("actnorm", shape), flowplugins.build("inv_conv1x1_lu", shape),
             MyAffineCoupling(shape, hidden=4)]
    assert MultiscaleFlow([steps])._glow_runs == []


@pytest.mark.parametrize("permutation",
                         ["shuffle_permutation", "reverse_permutation", "inv_conv1x1"])
def test_non_lu_permutations_have_no_runs_and_still_work(permutation, calls):
    model = composer.glow(SHAPE, levels=2, depth=2, hidden=8, permutation=permutation,
                          seed=0).double()
    assert model._glow_runs == []
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    _assert_same_log_prob_and_grads(model, reference, x, None, RTOL[torch.float64])
    with torch.no_grad():
        assert (model.decode(model.encode(x)) - x).abs().max() < 1e-10
        assert model.sample(2, temperature=0.5).shape == (2, *SHAPE)
    assert calls == {"forward": 0, "inverse": 0}


# --------------------------------------------------------------------- 8. memory saving
def test_memory_saving_model_matches_the_fused_model(calls):
    kwargs = dict(levels=2, depth=2, hidden=8, context_features=CONTEXT, seed=0)
    saving = composer.glow(SHAPE, memory_saving=True, **kwargs).double()
    fused = composer.glow(SHAPE, **kwargs).double()
    x, context = _data(fused)
    fused, _ = _prepare(fused, x, context)
    saving.load_state_dict(fused.state_dict())
    calls["forward"] = 0
    _assert_same_log_prob_and_grads(saving, fused, x, context, 1e-9)
    assert calls["forward"] == 2  # the fused model's two runs; memory saving runs its own loop


# -------------------------------------------------------------- beyond first derivatives
@pytest.mark.parametrize("coupling", ["affine", "additive"])
def test_double_backward_equals_step_by_step(coupling):
    model = _model(coupling, 2, 2, True, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)

    def second_order(m: MultiscaleFlow) -> List[Optional[Tensor]]:
        # ∇_θ log p · v differentiated again w.r.t. x and θ (a Hessian-vector product).
        xg = x.clone().requires_grad_(True)
        params = list(m.parameters())
        grads = torch.autograd.grad(m.log_prob(xg).sum(), params, create_graph=True)
        dot = sum((g * torch.linspace(-1.0, 1.0, g.numel(), dtype=g.dtype).view(g.shape)).sum()
                  for g in grads)
        return torch.autograd.grad(dot, [xg, *params], allow_unused=True)

    for i, (a, e) in enumerate(zip(second_order(model), second_order(reference))):
        _assert_rel(a, e, 1e-8, f"second-order gradient {i}")


def test_torch_func_grad_equals_step_by_step():
    model = _model("affine", 2, 2, True, None)
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    expected = torch.func.grad(lambda v: reference.log_prob(v).sum())(x)
    actual = torch.func.grad(lambda v: model.log_prob(v).sum())(x)
    _assert_rel(actual, expected, RTOL[torch.float64], "torch.func.grad")


def test_context_dtype_error_is_the_reference_error():
    model = _model("affine", 2, 2, True, "couplings")
    x, context = _data(model)
    model, reference = _prepare(model, x, context)
    for m in (reference, model):
        with pytest.raises(TypeError, match="context dtype torch.float32 does not match"):
            m.log_prob(x, context.float())


# ------------------------------------------------------------------------ nflows view
@pytest.mark.parametrize("which", ["glow", "mixed"])
def test_nflows_view_runs_fused_and_equals_step_by_step(which, calls):
    """The nflows view groups each run in one transform that runs fused like the torch model:
    log_prob, its gradients and the inverse equal the view of the step-by-step model."""
    from flowplugins.models.nflows import nflows_flow

    model = _model("affine", 2, 2, True, "couplings") if which == "glow" else _mixed_model()
    x, context = _data(model)
    model, reference = _prepare(model, x, context)
    flow, flow_ref = nflows_flow(model), nflows_flow(reference)
    calls.update(forward=0, inverse=0)
    actual = flow.log_prob(x, context=context)
    assert calls["forward"] == len(model._glow_runs)
    expected = flow_ref.log_prob(x, context=context)
    assert calls["forward"] == len(model._glow_runs)  # the reference view never fuses
    _assert_rel(actual, expected, RTOL[torch.float64], "nflows log_prob")
    weights = torch.linspace(-1.0, 1.0, x.shape[0], dtype=x.dtype)
    grads = torch.autograd.grad((actual * weights).sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad((expected * weights).sum(), list(reference.parameters()))
    for (name, _), g, e in zip(model.named_parameters(), grads, grads_ref):
        _assert_rel(g, e, RTOL[torch.float64], f"d log_prob / d {name}")
    noise = flow.transform_to_noise(x, context=context)
    back, logabsdet = flow._transform.inverse(noise, context=context)
    back_ref, logabsdet_ref = flow_ref._transform.inverse(noise, context=context)
    assert calls["inverse"] == len(model._glow_runs)
    _assert_rel(back, back_ref, RTOL[torch.float64], "nflows inverse")
    _assert_rel(logabsdet, logabsdet_ref, RTOL[torch.float64], "nflows inverse log-det")
    _assert_rel(back, x, RTOL[torch.float64], "nflows round trip")


def test_dropout_nets_draw_the_same_masks_fused_and_step_by_step(calls):
    """With dropout active the fused path calls the nets in the same order, so under one seed
    it draws the same masks and gives the same log_prob and gradients."""
    model = composer.glow(SHAPE, levels=2, depth=2, hidden=8, seed=0, dropout=0.3).double()
    x, _ = _data(model)
    model, reference = _prepare(model, x, None)
    calls.update(forward=0, inverse=0)
    torch.manual_seed(5)
    actual = model.log_prob(x)
    assert calls["forward"] == len(model._glow_runs) > 0
    torch.manual_seed(5)
    expected = reference.log_prob(x)
    _assert_rel(actual, expected, RTOL[torch.float64], "log_prob with dropout")
    torch.manual_seed(6)
    assert not torch.allclose(model.log_prob(x), actual)  # the masks do matter
    grads = torch.autograd.grad(actual.sum(), list(model.parameters()))
    grads_ref = torch.autograd.grad(expected.sum(), list(reference.parameters()))
    for (name, _), g, e in zip(model.named_parameters(), grads, grads_ref):
        _assert_rel(g, e, RTOL[torch.float64], f"d log_prob / d {name}")


# --------------------------------------------------------------------- torch.compile
def _traced_graphs(fn, *args) -> Tuple[int, List[str]]:
    """How many graphs Dynamo splits ``fn(*args)`` into, and why it broke between them."""
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, [b.reason for b in explained.break_reasons]


def test_torch_compile_traces_one_graph_and_matches_the_fused_eager_path(calls):
    """While torch.compile traces, the runs step aside: the fused Functions' ``out=`` views and
    the eval cache's storage-address keys each split Dynamo's graph (19 graphs for the
    benchmark's 1×8×8 Glow, and a compiled train step slower than eager). log_prob in training mode and decode in
    eval mode must trace as one graph, and give what the fused eager path gives, including
    after a parameter changes in place between compiled calls."""
    model = composer.glow(SHAPE, levels=2, depth=2, hidden=8, seed=0)
    x, _ = _data(model)
    model, _ = _prepare(model, x, None)
    assert len(model._glow_runs) > 0
    assert _traced_graphs(model.log_prob, x) == (1, [])
    compiled_log_prob = torch.compile(model.log_prob)
    calls.update(forward=0, inverse=0)
    actual = compiled_log_prob(x)
    assert calls["forward"] == 0
    expected = model.log_prob(x)
    assert calls["forward"] == len(model._glow_runs)
    _assert_rel(actual, expected, RTOL[torch.float32], "compiled log_prob")

    model.eval()
    with torch.no_grad():
        z = model.encode(x)
        assert _traced_graphs(model.decode, z) == (1, [])
        compiled_decode = torch.compile(model.decode)
        for _ in range(2):
            calls["inverse"] = 0
            actual = compiled_decode(z)
            assert calls["inverse"] == 0
            expected = model.decode(z)
            assert calls["inverse"] == len(model._glow_runs)
            _assert_rel(actual, expected, RTOL[torch.float32], "compiled decode")
            # Eager rebuilds its cached matrices after this; the compiled decode must see it too.
            next(m for m in model.steps if type(m) is ActNorm).shift.add_(0.1)
