"""Tests of Glow's split2d prior as a bijection (flowplugins.bijectors.split2d)."""

import doctest

import pytest
import torch
from torch import nn

import flowplugins.bijectors.split2d as split2d_module
from flowplugins.bijectors.split2d import Split2dPrior
from helpers import (
    assert_extra_batch_dims,
    assert_options_match_registry,
    assert_round_trip_on_device,
    autograd_logabsdet,
    perturb,
)

F64 = torch.float64


def make(event_shape, **options):
    return perturb(Split2dPrior(event_shape, **options).to(F64))


def test_constructor_options_match_the_registry():
    assert_options_match_registry(Split2dPrior, "split2d_prior")


@pytest.mark.parametrize("channels", [2, 3, 4, 5])
def test_identity_at_init(channels):
    layer = Split2dPrior((channels, 4, 4))
    x = torch.randn(3, channels, 4, 4)
    z, ld = layer(x)
    assert torch.equal(z, x) and not ld.any()


@pytest.mark.parametrize("channels", [2, 3, 4, 5, 7])
def test_factored_half_is_first_ceil_half_and_the_rest_is_unchanged(channels):
    layer = make((channels, 3, 3))
    factored = channels - channels // 2
    assert (layer.factored_channels, layer.conditioning_channels) == (factored, channels // 2)
    x = torch.randn(4, channels, 3, 3, dtype=F64)
    z, _ = layer(x)
    assert torch.equal(z[:, factored:], x[:, factored:])
    assert (z[:, :factored] - x[:, :factored]).abs().min() > 0


# nflows needs >= 2 channels at every level, so C >= 4 here (C//2 go on to the next level).
@pytest.mark.parametrize("channels", [4, 5, 6, 7])
def test_order_matches_nflows_multiscale_composite_transform(channels):
    """nflows factors out the first torch.chunk(…, 2, dim=1) chunk: it must be our z1'."""
    from nflows.transforms import IdentityTransform, MultiscaleCompositeTransform, Transform

    class Adapter(Transform):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, inputs, context=None):
            return self.layer(inputs, context)

        def inverse(self, inputs, context=None):
            return self.layer.inverse(inputs, context)

    h, w = 2, 3
    layer = make((channels, h, w))
    multiscale = MultiscaleCompositeTransform(num_transforms=2)
    next_shape = multiscale.add_transform(Adapter(layer), (channels, h, w))
    assert next_shape == (layer.conditioning_channels, h, w)
    multiscale.add_transform(IdentityTransform(), next_shape)
    x = torch.randn(3, channels, h, w, dtype=F64)
    out, ld = multiscale(x)
    z, ld_ours = layer(x)
    factored = layer.factored_channels * h * w
    torch.testing.assert_close(out[:, :factored], z[:, : layer.factored_channels].reshape(3, -1))
    torch.testing.assert_close(out[:, factored:], x[:, layer.factored_channels :].reshape(3, -1))
    torch.testing.assert_close(ld, ld_ours)
    assert (multiscale.inverse(out)[0] - x).abs().max() < 1e-10


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_round_trip_float64_after_perturbation(channels):
    layer = make((channels, 4, 4))
    x = 2 * torch.randn(5, channels, 4, 4, dtype=F64)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert (x_back - x).abs().max() < 1e-10
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)


def test_round_trip_float32():
    layer = Split2dPrior((6, 8, 8))
    perturb(layer)
    x = torch.randn(3, 6, 8, 8)
    torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [2, 3])
def test_logabsdet_matches_autograd_jacobian(channels):
    layer = make((channels, 2, 3))
    x = torch.randn(3, channels, 2, 3, dtype=F64)
    z, ld = layer(x)
    torch.testing.assert_close(ld, autograd_logabsdet(layer, x), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        layer.inverse(z)[1], autograd_logabsdet(layer.inverse, z), rtol=0, atol=1e-10
    )


def test_conditional_params_define_the_forward_map():
    layer = make((5, 3, 3))
    x = torch.randn(4, 5, 3, 3, dtype=F64)
    mu, log_sigma = layer.conditional_params(x[:, 3:])
    assert mu.shape == log_sigma.shape == (4, 3, 3, 3)
    z, ld = layer(x)
    torch.testing.assert_close(z[:, :3], (x[:, :3] - mu) * torch.exp(-log_sigma))
    torch.testing.assert_close(ld, -log_sigma.sum((1, 2, 3)))


def test_sample_at_temperature_is_inverse_of_scaled_noise():
    layer = make((4, 3, 3), context_features=2)
    z2 = torch.randn(2, 3, 2, 3, 3, dtype=F64)
    ctx = torch.randn(2, 3, 2, dtype=F64)
    x = layer.sample(z2, temperature=0.7, context=ctx, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 3, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = layer.inverse(torch.cat([0.7 * eps, z2], dim=-3), ctx)[0]
    assert x.shape == (2, 3, 4, 3, 3)
    torch.testing.assert_close(x, expected)
    mu, log_sigma = layer.conditional_params(z2, ctx)
    torch.testing.assert_close(x[..., :2, :, :], mu + 0.7 * log_sigma.exp() * eps)
    cold = layer.sample(z2, temperature=0.0, context=ctx)
    torch.testing.assert_close(cold[..., :2, :, :], mu)
    assert torch.equal(cold[..., 2:, :, :], z2)


def test_conditional_params_validate_their_input():
    layer = Split2dPrior((4, 3, 3))
    with pytest.raises(ValueError, match=r"Split2dPrior.conditional_params: .*\(\.\.\., 2, 3, 3\)"):
        layer.conditional_params(torch.randn(2, 4, 3, 3))
    conditional = Split2dPrior((4, 3, 3), context_features=2)
    with pytest.raises(ValueError, match="context batch shape"):
        conditional.conditional_params(torch.randn(2, 2, 3, 3), torch.randn(3, 2))


def test_extra_batch_dims():
    layer = make((3, 4, 4))
    x = torch.randn(3, 4, 3, 4, 4, dtype=F64)
    assert_extra_batch_dims(layer, x)


def test_class_conditional_context():
    layer = Split2dPrior((4, 3, 3), context_features=10).to(F64)
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    labels = nn.functional.one_hot(torch.arange(6) % 10, 10).to(F64)
    z, ld = layer(x, labels)
    assert torch.equal(z, x)  # the context projection starts at zero too
    (z.square().sum() + ld.sum()).backward()
    # Zero-initialised but last in its path, so it gets gradient from the first step.
    assert layer.context_proj.weight.grad.abs().sum() > 0
    perturb(layer)
    z, ld = layer(x, labels)
    assert not torch.allclose(z, layer(x, torch.zeros_like(labels))[0])
    assert (layer.inverse(z, labels)[0] - x).abs().max() < 1e-10
    torch.testing.assert_close(ld, autograd_logabsdet(layer, x, labels))


def test_context_errors_name_the_layer():
    with pytest.raises(ValueError, match="^Split2dPrior: .*needs a context"):
        Split2dPrior((4, 3, 3), context_features=2)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="^Split2dPrior: got a context"):
        Split2dPrior((4, 3, 3))(torch.randn(2, 4, 3, 3), torch.randn(2, 2))


def test_one_channel_is_a_clear_error():
    with pytest.raises(ValueError, match=r"^Split2dPrior: .*at least 2 channels.*\(1, 4, 4\)"):
        Split2dPrior((1, 4, 4))


def test_state_dict_round_trip():
    layer = make((4, 3, 3), context_features=2)
    other = Split2dPrior((4, 3, 3), context_features=2).to(F64)
    other.load_state_dict(layer.state_dict())
    x, ctx = torch.randn(2, 4, 3, 3, dtype=F64), torch.randn(2, 2, dtype=F64)
    assert torch.equal(layer(x, ctx)[0], other(x, ctx)[0])


def test_round_trip_and_sample_on_device(device):
    layer = make((5, 4, 4), context_features=2).to(device)
    x = torch.randn(3, 5, 4, 4, dtype=F64, device=device)
    ctx = torch.randn(3, 2, dtype=F64, device=device)
    assert_round_trip_on_device(layer, x, ctx)
    assert layer.sample(x[:, 3:], 0.5, ctx).device == x.device


def test_docstring_examples_run():
    result = doctest.testmod(split2d_module)
    assert result.attempted > 0 and result.failed == 0
