"""Tests of RealNVP's checkerboard coupling (flowplugins.bijectors.checkerboard)."""

import doctest

import pytest
import torch
from torch import nn

import flowplugins.bijectors.checkerboard as checkerboard_module
from flowplugins.bijectors.checkerboard import CheckerboardCoupling
from helpers import (
    assert_extra_batch_dims,
    assert_options_match_registry,
    assert_round_trip_on_device,
    autograd_jacobians,
    perturb,
)

F64 = torch.float64


def make(event_shape, **options):
    options.setdefault("hidden", 8)
    return perturb(CheckerboardCoupling(event_shape, **options).to(F64))


def test_constructor_options_match_the_registry():
    assert_options_match_registry(CheckerboardCoupling, "checkerboard_coupling")


@pytest.mark.parametrize("parity", [0, 1])
def test_mask_pattern(parity):
    layer = CheckerboardCoupling((1, 3, 4), parity=parity, hidden=4)
    expected = torch.tensor([[(i + j + parity) % 2 == 0 for j in range(4)] for i in range(3)])
    assert torch.equal(layer.mask[0, 0].bool(), expected)
    assert torch.equal(layer.transform_mask, 1 - layer.mask)
    assert "mask" not in layer.state_dict()


def test_parities_are_complementary():
    masks = [CheckerboardCoupling((2, 4, 4), parity=p, hidden=4).mask for p in (0, 1)]
    assert torch.equal(masks[0] + masks[1], torch.ones_like(masks[0]))


@pytest.mark.parametrize("parity", [0, 1])
def test_identity_at_init(parity):
    layer = CheckerboardCoupling((3, 4, 4), parity=parity, hidden=8)
    x = torch.randn(2, 3, 4, 4)
    z, ld = layer(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(2))


@pytest.mark.parametrize("parity", [0, 1])
def test_kept_positions_are_copied_exactly_and_the_others_change(parity):
    layer = make((3, 4, 5), parity=parity)
    x = torch.randn(4, 3, 4, 5, dtype=F64)
    z, _ = layer(x)
    kept = layer.mask.bool().expand_as(x)
    assert torch.equal(z[kept], x[kept])
    assert (z[~kept] - x[~kept]).abs().min() > 0
    x_back = layer.inverse(z)[0]
    assert torch.equal(x_back[kept], z[kept])


@pytest.mark.parametrize("parity", [0, 1])
def test_round_trip_float64_after_perturbation(parity):
    layer = make((3, 6, 6), parity=parity)
    x = 2 * torch.randn(5, 3, 6, 6, dtype=F64)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert (x_back - x).abs().max() < 1e-10
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)


def test_round_trip_float32():
    layer = CheckerboardCoupling((3, 8, 8), hidden=16)
    perturb(layer)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("shape", [(2, 2, 3), (1, 1, 2), (1, 3, 3)])
def test_logabsdet_matches_autograd_and_only_counts_transformed_positions(parity, shape):
    layer = make(shape, parity=parity)
    x = torch.randn(3, *shape, dtype=F64)
    z, ld = layer(x)
    jac = autograd_jacobians(layer, x)
    torch.testing.assert_close(ld, torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    # The kept positions contribute a unit diagonal: log-det over the transformed ones only.
    kept = layer.mask.bool().expand(1, *shape).reshape(-1)
    diag = jac.diagonal(dim1=-2, dim2=-1)
    assert torch.equal(diag[:, kept], torch.ones_like(diag[:, kept]))
    torch.testing.assert_close(ld, diag[:, ~kept].log().sum(-1), rtol=0, atol=1e-10)
    inv_jac = autograd_jacobians(layer.inverse, z)
    torch.testing.assert_close(layer.inverse(z)[1], torch.linalg.slogdet(inv_jac)[1])


def test_log_scale_is_bounded_by_the_learned_per_channel_bound():
    layer = CheckerboardCoupling((2, 4, 4), hidden=8)
    perturb(layer.net, scale=50.0)
    with torch.no_grad():
        layer.log_scale_bound.copy_(torch.tensor([0.5, -0.3]))
    x = torch.randn(8, 2, 4, 4)
    z, ld = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    transformed = int(layer.transform_mask.sum())
    bound = layer.log_scale_bound.exp()
    assert (ld.abs() <= transformed * bound.sum() + 1e-3).all()


def test_extra_batch_dims_and_context():
    layer = make((2, 4, 4), context_features=3)
    x = torch.randn(3, 4, 2, 4, 4, dtype=F64)
    ctx = torch.randn(3, 4, 3, dtype=F64)
    assert_extra_batch_dims(layer, x, ctx)


def test_context_path_gradients():
    layer = make((2, 4, 4), context_features=3)
    x = torch.randn(5, 2, 4, 4, dtype=F64)
    ctx = torch.randn(5, 3, dtype=F64, requires_grad=True)
    z, ld = layer(x, ctx)
    assert not torch.allclose(z, layer(x, torch.zeros_like(ctx))[0])
    (z.square().sum() + ld.sum()).backward()
    assert layer.net.context_proj.weight.grad.abs().sum() > 0
    assert layer.log_scale_bound.grad.abs().sum() > 0
    assert ctx.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="^CheckerboardCoupling: .*needs a context"):
        layer(x)


@pytest.mark.parametrize("parity", [2, -1, 0.5, True, "0"])
def test_parity_is_validated(parity):
    with pytest.raises(ValueError, match="CheckerboardCoupling: parity must be 0 or 1"):
        CheckerboardCoupling((2, 4, 4), parity=parity)


def test_single_pixel_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^CheckerboardCoupling: .*H·W >= 2.*\(3, 1, 1\)"):
        CheckerboardCoupling((3, 1, 1))


def test_custom_net_factory():
    layer = CheckerboardCoupling((2, 4, 4), net=lambda i, o: nn.Conv2d(i, o, 3, padding=1))
    layer = layer.to(F64)
    assert layer.net.in_channels == 2 and layer.net.out_channels == 4
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    assert (layer.inverse(layer(x)[0])[0] - x).abs().max() < 1e-10
    bad = CheckerboardCoupling((2, 4, 4), net=lambda i, o: nn.Conv2d(i, o, 1, padding=1))
    with pytest.raises(ValueError, match="CheckerboardCoupling: the coupling net must map"):
        bad(torch.randn(2, 2, 4, 4))


def test_state_dict_round_trip():
    layer = make((2, 4, 4), parity=1)
    other = CheckerboardCoupling((2, 4, 4), parity=1, hidden=8).to(F64)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    assert torch.equal(layer(x)[0], other(x)[0])


def test_round_trip_on_device(device):
    layer = make((2, 4, 4), parity=1, context_features=2).to(device)
    x = torch.randn(3, 2, 4, 4, dtype=F64, device=device)
    ctx = torch.randn(3, 2, dtype=F64, device=device)
    assert_round_trip_on_device(layer, x, ctx)


def test_docstring_examples_run():
    result = doctest.testmod(checkerboard_module)
    assert result.attempted > 0 and result.failed == 0
