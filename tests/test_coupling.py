"""Tests of the channel-wise couplings (flowplugins.bijectors.coupling)."""

import doctest
import math

import pytest
import torch
from torch import nn

import flowplugins
import flowplugins.bijectors.coupling as coupling_module
from flowplugins.bijectors.coupling import AdditiveCoupling, AffineCoupling
from helpers import (
    assert_extra_batch_dims,
    assert_options_match_registry,
    assert_round_trip_on_device,
    autograd_logabsdet,
    perturb,
)

COUPLINGS = [AffineCoupling, AdditiveCoupling]
F64 = torch.float64


def make(cls, event_shape, **options):
    options.setdefault("hidden", 8)
    return perturb(cls(event_shape, **options).to(F64))


@pytest.mark.parametrize("cls", COUPLINGS)
def test_constructor_options_match_the_registry(cls):
    entry = {AffineCoupling: "affine_coupling", AdditiveCoupling: "additive_coupling"}[cls]
    assert_options_match_registry(cls, entry)


def test_additive_is_the_identity_at_init():
    layer = AdditiveCoupling((5, 4, 4), hidden=8)
    x = torch.randn(3, 5, 4, 4)
    z, ld = layer(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(3))


def test_affine_at_init_is_glows_sigmoid_2_scaling():
    # Glow's reference scale sigmoid(h + 2) is sigmoid(2) ~ 0.88 (not 1) for a zero net output.
    c, h, w = 5, 4, 3
    layer = AffineCoupling((c, h, w), hidden=8).to(F64)
    x = torch.randn(3, c, h, w, dtype=F64)
    z, ld = layer(x)
    s = torch.sigmoid(torch.tensor(2.0, dtype=F64))
    assert torch.equal(z[:, :3], x[:, :3])
    torch.testing.assert_close(z[:, 3:], s * x[:, 3:])
    torch.testing.assert_close(ld, torch.full((3,), (c // 2) * h * w * math.log(s), dtype=F64))


@pytest.mark.parametrize("cls", COUPLINGS)
@pytest.mark.parametrize("channels", [2, 3, 4, 7])
def test_split_keeps_the_first_ceil_half(cls, channels):
    layer = make(cls, (channels, 3, 3))
    x = torch.randn(4, channels, 3, 3, dtype=F64)
    z, _ = layer(x)
    kept = channels - channels // 2
    assert (layer.identity_channels, layer.transformed_channels) == (kept, channels // 2)
    assert torch.equal(z[:, :kept], x[:, :kept])
    assert (z[:, kept:] - x[:, kept:]).abs().min() > 0


@pytest.mark.parametrize("cls", COUPLINGS)
@pytest.mark.parametrize("channels", [2, 3, 6])
def test_round_trip_float64_after_perturbation(cls, channels):
    layer = make(cls, (channels, 4, 6))
    x = 2 * torch.randn(5, channels, 4, 6, dtype=F64)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert (x_back - x).abs().max() < 1e-10
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)
    assert not torch.allclose(z, x)


@pytest.mark.parametrize("cls", COUPLINGS)
def test_round_trip_float32(cls):
    layer = cls((4, 8, 8), hidden=16)
    perturb(layer)
    x = torch.randn(3, 4, 8, 8)
    x_back = layer.inverse(layer(x)[0])[0]
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", COUPLINGS)
@pytest.mark.parametrize("channels", [2, 3])
def test_logabsdet_matches_autograd_jacobian(cls, channels):
    layer = make(cls, (channels, 2, 3))
    x = torch.randn(3, channels, 2, 3, dtype=F64)
    z, ld = layer(x)
    torch.testing.assert_close(ld, autograd_logabsdet(layer, x), rtol=0, atol=1e-10)
    ld_inv = layer.inverse(z)[1]
    torch.testing.assert_close(ld_inv, autograd_logabsdet(layer.inverse, z), rtol=0, atol=1e-10)


def test_each_samples_logabsdet_ignores_the_other_samples():
    layer = make(AffineCoupling, (4, 3, 3))
    x = torch.randn(4, 4, 3, 3, dtype=F64)
    full = layer(x)[1]
    single = torch.cat([layer(x[i : i + 1])[1] for i in range(4)])
    torch.testing.assert_close(full, single)


@pytest.mark.parametrize("cls", COUPLINGS)
def test_extra_batch_dims(cls):
    layer = make(cls, (3, 4, 4), context_features=2)
    x = torch.randn(3, 4, 3, 4, 4, dtype=F64)
    ctx = torch.randn(3, 4, 2, dtype=F64)
    assert_extra_batch_dims(layer, x, ctx)


@pytest.mark.parametrize("cls", COUPLINGS)
def test_context_path(cls):
    layer = make(cls, (4, 3, 3), context_features=5)
    x = torch.randn(6, 4, 3, 3, dtype=F64)
    ctx = torch.randn(6, 5, dtype=F64, requires_grad=True)
    z, ld = layer(x, ctx)
    assert z.shape == x.shape and ld.shape == (6,)
    assert not torch.allclose(z, layer(x, torch.zeros_like(ctx))[0])
    (z.square().sum() + ld.sum()).backward()
    assert layer.net.context_proj.weight.grad.abs().sum() > 0
    assert ctx.grad.abs().sum() > 0
    assert (layer.inverse(z, ctx)[0] - x).abs().max() < 1e-10
    torch.testing.assert_close(ld[:2], autograd_logabsdet(layer, x[:2], ctx[:2].detach()))


@pytest.mark.parametrize("cls", COUPLINGS)
def test_context_errors_name_the_layer(cls):
    name = cls.__name__
    conditional = cls((4, 3, 3), hidden=8, context_features=5)
    with pytest.raises(ValueError, match=f"^{name}: .*context_features=5.*got none"):
        conditional(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=rf"^{name}: .*\(\.\.\., 5\).*\(2, 4\)"):
        conditional(torch.randn(2, 4, 3, 3), torch.randn(2, 4))
    plain = cls((4, 3, 3), hidden=8)
    with pytest.raises(ValueError, match=f"^{name}: got a context"):
        plain(torch.randn(2, 4, 3, 3), torch.randn(2, 5))


@pytest.mark.parametrize("cls", COUPLINGS)
def test_one_channel_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: .*at least 2 channels.*\(1, 4, 4\)"):
        cls((1, 4, 4))


@pytest.mark.parametrize("cls", COUPLINGS)
def test_custom_net_factory(cls):
    built = []

    class Net(nn.Module):
        def __init__(self, in_channels, out_channels):
            super().__init__()
            built.append((in_channels, out_channels))
            self.conv = nn.Conv2d(in_channels, out_channels, 1)
            self.embed = nn.Linear(2, out_channels)

        def forward(self, h, context=None):
            out = self.conv(h)
            return out if context is None else out + self.embed(context)[:, :, None, None]

    layer = cls((5, 4, 4), net=Net).to(F64)
    outputs = {AffineCoupling: 4, AdditiveCoupling: 2}[cls]
    assert built == [(3, outputs)] and isinstance(layer.net, Net)
    x = torch.randn(3, 5, 4, 4, dtype=F64)
    ctx = torch.randn(3, 2, dtype=F64)
    for context in (None, ctx):
        z, ld = layer(x, context)
        assert (layer.inverse(z, context)[0] - x).abs().max() < 1e-10
        torch.testing.assert_close(ld, autograd_logabsdet(layer, x, context))


@pytest.mark.parametrize("cls", COUPLINGS)
def test_custom_net_with_the_wrong_output_shape(cls):
    layer = cls((4, 4, 4), net=lambda i, o: nn.Conv2d(i, o + 1, 1))
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: the coupling net must map"):
        layer(torch.randn(2, 4, 4, 4))


def test_affine_scale_stays_bounded_for_extreme_parameters():
    layer = AffineCoupling((4, 4, 4), hidden=8)
    perturb(layer, scale=50.0)
    z, ld = layer(torch.randn(8, 4, 4, 4))
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    assert (ld <= 0).all()  # the scale sigmoid(h + 2) never exceeds 1


@pytest.mark.parametrize("cls", COUPLINGS)
def test_state_dict_round_trip(cls):
    layer = make(cls, (4, 3, 3))
    other = cls((4, 3, 3), hidden=8).to(F64)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    assert torch.equal(layer(x)[0], other(x)[0])


@pytest.mark.parametrize("cls", COUPLINGS)
def test_round_trip_on_device(cls, device):
    layer = make(cls, (4, 4, 4), context_features=2).to(device)
    x = torch.randn(3, 4, 4, 4, dtype=F64, device=device)
    ctx = torch.randn(3, 2, dtype=F64, device=device)
    assert_round_trip_on_device(layer, x, ctx)


def test_docstring_examples_run():
    result = doctest.testmod(coupling_module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("name", ["affine_coupling", "additive_coupling"])
def test_dropout_option_regularises_the_default_net_in_training_only(name):
    import copy

    layer = flowplugins.build(name, (4, 4, 4), hidden=16, dropout=0.5)
    assert layer.net.drop is not None and layer.net.drop.p == 0.5
    plain = flowplugins.build(name, (4, 4, 4), hidden=16)
    assert plain.net.drop is None
    with torch.no_grad():
        for p in layer.net.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(8, 4, 4, 4)
    layer.train()
    torch.manual_seed(0)
    a = layer(x)[0]
    torch.manual_seed(1)
    b = layer(x)[0]
    assert not torch.allclose(a, b)  # a new mask per call
    layer.eval()
    z, _ = layer(x)
    torch.testing.assert_close(layer(x)[0], z, rtol=0, atol=0)
    torch.testing.assert_close(layer.inverse(z)[0], x, rtol=1e-5, atol=1e-5)
    # eval mode is the dropout-free net: equal to a copy without the dropout layer
    twin = copy.deepcopy(layer)
    twin.net.drop = None
    torch.testing.assert_close(twin(x)[0], z, rtol=0, atol=0)


def test_dropout_with_a_custom_net_is_an_error():
    with pytest.raises(ValueError, match="dropout=0.2 applies to the default coupling net only"):
        flowplugins.build("affine_coupling", (4, 4, 4), net=lambda i, o: torch.nn.Conv2d(i, o, 1),
                          dropout=0.2)
    with pytest.raises(ValueError, match="dropout must be in"):
        flowplugins.build("affine_coupling", (4, 4, 4), hidden=8, dropout=1.0)
