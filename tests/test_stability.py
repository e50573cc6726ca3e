"""Numerical stability: round trips of composed models, LU conv invertibility, bounded scales,
and a high learning rate that must fail loudly, not with silent NaN samples.

``scripts/roundtrip_stability.py`` measures the full default Glow (3 × 32 steps, 512 wide); the
tests hold the same bounds at smaller sizes: max |x − decode(encode(x))| ≤ 1e-4 in float32,
≤ 1e-10 in float64, with every parameter moved away from its init
(:func:`flowplugins.diagnostics.perturb_fan_in`).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowplugins
from flowplugins import composer
from flowplugins.diagnostics import perturb_fan_in, roundtrip_error

BOUNDS = {torch.float32: 1e-4, torch.float64: 1e-10}
PERTURB = 0.05  # fan-in scaled; max|z| stays around 10 (a trained model: about 4)


def _prepared(model, shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train().log_prob(torch.rand(8, *shape, generator=gen))  # ActNorm / batch-norm init
    perturb_fan_in(model, PERTURB, gen)
    return model.eval(), torch.rand(4, *shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("permutation", ["inv_conv1x1_lu", "inv_conv1x1", "shuffle_permutation",
                                         "reverse_permutation"])
def test_glow_round_trip_bounds(coupling, permutation):
    shape = (3, 16, 16)
    model = composer.glow(shape, levels=3, depth=4, hidden=32, coupling=coupling,
                          permutation=permutation, seed=0)
    model, x = _prepared(model, shape)
    for dtype, bound in BOUNDS.items():
        report = roundtrip_error(copy.deepcopy(model).to(dtype), x.to(dtype))
        assert report.finite, f"{dtype}: non-finite round trip"
        assert report.max_abs_error <= bound, f"{dtype}: {report}"
        assert report.max_abs_latent > 2.0  # the perturbation moved the model off the identity


@pytest.mark.parametrize("build", [
    lambda shape: composer.glow(shape, levels=2, depth=12, hidden=64, seed=1),
    lambda shape: composer.realnvp(shape, levels=2, depth=2, hidden=32, seed=0),
], ids=["deeper_glow", "realnvp"])
def test_round_trip_bounds(build):
    shape = (3, 16, 16)
    model, x = _prepared(build(shape), shape)
    for dtype, bound in BOUNDS.items():
        report = roundtrip_error(copy.deepcopy(model).to(dtype), x.to(dtype))
        assert report.finite and report.max_abs_error <= bound, f"{dtype}: {report}"


# ------------------------------------------------------------------ LU 1x1 convolution
@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 12), log_s=st.floats(-30.0, 30.0), spread=st.floats(0.0, 1e3),
       seed=st.integers(0, 2**16))
def test_lu_conv_is_invertible_for_any_parameter_values(c, log_s, spread, seed):
    layer = flowplugins.build("inv_conv1x1_lu", (c, 2, 2), seed=seed).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.log_abs_s.copy_(log_s + torch.randn(c, generator=gen, dtype=torch.float64))
        layer.lower.copy_(spread * torch.randn(c, c, generator=gen, dtype=torch.float64))
        layer.upper.copy_(spread * torch.randn(c, c, generator=gen, dtype=torch.float64))
    weight = layer.weight_matrix()
    inverse = layer._build_inverse_weight()
    # |det W| = exp(Σ log|s|) > 0 by construction, whatever L and U hold: the log-det is exact
    # and finite, and the triangular solves give a finite inverse.
    expected = layer.log_abs_s.sum()
    _, ld = layer(torch.zeros(1, c, 2, 2, dtype=torch.float64))
    assert ld.item() == pytest.approx(4 * expected.item(), rel=1e-12, abs=1e-12)
    assert torch.isfinite(weight).all() and torch.isfinite(inverse).all()
    cond = torch.linalg.cond(weight).item()
    if cond < 1e10:
        # Numerically the inverse is as exact as the conditioning allows.
        eye = torch.eye(c, dtype=torch.float64)
        assert (inverse @ weight - eye).abs().max().item() <= 1e-13 * cond
        x = torch.randn(3, c, 2, 2, generator=gen, dtype=torch.float64)
        x_back, _ = layer.inverse(layer(x)[0])
        assert (x_back - x).abs().max().item() <= 1e-13 * cond * (1 + x.abs().max().item())


def test_plain_conv_can_become_singular_but_lu_cannot():
    plain = flowplugins.build("inv_conv1x1", (3, 2, 2), seed=0)
    lu = flowplugins.build("inv_conv1x1_lu", (3, 2, 2), seed=0)
    with torch.no_grad():
        plain.weight.zero_()
        lu.lower.zero_()
        lu.upper.zero_()
        lu.log_abs_s.fill_(-80.0)  # exp(-80) is still a positive float32
    assert torch.isinf(plain(torch.zeros(1, 3, 2, 2))[1]).all()
    _, ld = lu(torch.zeros(1, 3, 2, 2))
    assert ld.item() == pytest.approx(4 * 3 * -80.0)


# --------------------------------------------------------------------- coupling scales
@pytest.mark.parametrize("raw", [-60.0, -10.0, 0.0, 10.0, 1e4, 1e30])
def test_affine_coupling_scale_is_bounded(raw):
    layer = flowplugins.build("affine_coupling", (4, 3, 3), hidden=8)
    with torch.no_grad():
        layer.net.conv_out.bias.zero_()
        layer.net.conv_out.bias[2:].fill_(raw)  # the raw scale half of the net's output
    x = torch.randn(5, 4, 3, 3)
    z, ld = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    # sigmoid(raw + 2) ∈ (0, 1]: the forward never expands, whatever the net outputs.
    assert (z[:, 2:].abs() <= x[:, 2:].abs() + 1e-6).all()
    assert (ld <= 0).all()
    if raw >= -60.0:
        x_back, ld_inv = layer.inverse(z)
        torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ld_inv, -ld)


@pytest.mark.parametrize("raw", [-1e30, -50.0, 0.0, 50.0, 1e30])
def test_checkerboard_log_scale_is_bounded_by_its_learned_bound(raw):
    layer = flowplugins.build("checkerboard_coupling", (2, 4, 4), hidden=8).double()
    with torch.no_grad():
        layer.net.conv_out.bias[:2].fill_(raw)  # the raw log-scale half
        layer.log_scale_bound.fill_(0.5)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z, ld = layer(x)
    bound = math.exp(0.5) * 16 * 2 / 2  # |s| < e^0.5 at each of the 16 transformed positions
    assert torch.isfinite(z).all() and (ld.abs() <= bound + 1e-9).all()
    x_back, _ = layer.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- high learning rate
def _train(tmp_path, lr, epochs=1):
    from flowplugins.training import TrainConfig, train

    config = TrainConfig(
        epochs=epochs, batch_size=64, lr=lr, warmup_steps=0, ema_decay=0.0, eval_samples=1,
        out=str(tmp_path / "run"), threads=1, progress=False, sample_count=16, grad_clip=0.0,
    )
    config.model.levels, config.model.depth, config.model.hidden = 1, 2, 8
    return train(config, resume="never", log=lambda message: None)


@pytest.mark.parametrize("lr", [3e-2, 10.0])
def test_high_learning_rate_trains_or_stops_loudly(tmp_path, lr):
    from flowplugins.training import NonFiniteLossError, load_model

    try:
        result = _train(tmp_path, lr)
    except NonFiniteLossError as err:
        assert re.search(r"non-finite (loss|gradient norm)", str(err)), str(err)
        assert "the weights were not updated" in str(err)
        return
    model, _ = load_model(result.best_checkpoint)
    samples = model.sample(16)
    assert torch.isfinite(samples).all(), "training finished but the samples hold NaN/Inf"
    assert math.isfinite(result.metrics["test_bpd"])
