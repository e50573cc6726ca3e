"""Tests of flowplugins.nets: the default coupling net and the net-factory contract."""

import doctest

import pytest
import torch
from torch import nn

import flowplugins.nets as nets_module
from flowplugins.nets import CouplingNet, Dropout, build_net, check_context
from helpers import perturb


def test_architecture_and_zero_output_at_init():
    net = CouplingNet(3, 6, hidden=16)
    assert (net.conv_in.kernel_size, net.conv_in.padding) == ((3, 3), (1, 1))
    assert net.conv_hidden.kernel_size == (1, 1)
    assert (net.conv_out.kernel_size, net.conv_out.padding) == ((3, 3), (1, 1))
    assert not net.conv_out.weight.any() and not net.conv_out.bias.any()
    out = net(torch.randn(4, 3, 5, 7))
    assert out.shape == (4, 6, 5, 7)
    assert torch.equal(out, torch.zeros_like(out))


def test_parameter_count_matches_the_glow_net():
    c_in, c_out, h = 6, 12, 32
    expected = (c_in * 9 * h + h) + (h * h + h) + (h * 9 * c_out + c_out)
    assert sum(p.numel() for p in CouplingNet(c_in, c_out, hidden=h).parameters()) == expected


def test_context_is_a_per_channel_bias_of_the_first_hidden_layer():
    torch.manual_seed(0)
    net = CouplingNet(2, 4, hidden=8, context_features=3).double()
    perturb(net)
    h = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    ctx = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = net(h, ctx)
    assert out.shape == (5, 4, 4, 4)
    hidden = torch.relu(net.conv_in(h) + net.context_proj(ctx)[:, :, None, None])
    expected = net.conv_out(torch.relu(net.conv_hidden(hidden)))
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    assert net.context_proj.weight.grad.abs().sum() > 0
    assert ctx.grad.abs().sum() > 0
    assert not torch.allclose(net(h, ctx), net(h, torch.zeros_like(ctx)))


def test_gradients_reach_every_parameter():
    net = CouplingNet(2, 4, hidden=8, context_features=3)
    perturb(net)
    net(torch.randn(3, 2, 4, 4), torch.randn(3, 3)).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "context, features, match",
    [
        (torch.zeros(2, 3), None, "context_features=None"),
        (None, 3, "needs a context"),
        (torch.zeros(2, 4), 3, r"\(\.\.\., 3\).*\(2, 4\)"),
        (torch.zeros(3, 3), 3, r"got \(3, 3\)"),
    ],
)
def test_context_errors_name_the_rule_and_the_shape(context, features, match):
    net = CouplingNet(2, 4, hidden=8, context_features=features)
    with pytest.raises(ValueError, match=match):
        net(torch.zeros(2, 2, 4, 4), context)
    with pytest.raises(ValueError, match="^Owner: "):
        check_context("Owner", context, features, 2)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_invalid_sizes_are_value_errors(bad):
    with pytest.raises(ValueError, match="CouplingNet: hidden must be a positive integer"):
        CouplingNet(2, 4, hidden=bad)
    with pytest.raises(ValueError, match="CouplingNet: context_features"):
        CouplingNet(2, 4, context_features=bad)


def test_build_net_default_and_custom_factories():
    default = build_net(None, 3, 4, 8, 2, "Layer")
    assert isinstance(default, CouplingNet)
    assert (default.in_channels, default.out_channels, default.hidden) == (3, 4, 8)
    assert default.context_features == 2

    calls = []

    def factory(in_channels, out_channels):
        calls.append((in_channels, out_channels))
        return nn.Conv2d(in_channels, out_channels, 1)

    custom = build_net(factory, 3, 4, 8, None, "Layer")
    assert isinstance(custom, nn.Conv2d) and calls == [(3, 4)]


def test_build_net_rejects_bad_factories():
    with pytest.raises(TypeError, match="Layer: net must be None or a callable"):
        build_net(42, 3, 4, 8, None, "Layer")
    with pytest.raises(TypeError, match=r"Layer: net\(3, 4\) must return an nn.Module; got str"):
        build_net(lambda i, o: "not a module", 3, 4, 8, None, "Layer")


def test_context_net_on_device(device):
    net = CouplingNet(2, 4, hidden=8, context_features=3).to(device)
    perturb(net)
    out = net(torch.randn(2, 2, 5, 5, device=device), torch.randn(2, 3, device=device))
    assert out.shape == (2, 4, 5, 5) and out.device.type == device


def _conv_in_layouts(net, *args):
    """Whether conv_in saw a channels-last input, and the output, for one call."""
    seen = []
    handle = net.conv_in.register_forward_pre_hook(
        lambda m, inp: seen.append(
            inp[0].is_contiguous(memory_format=torch.channels_last) and not inp[0].is_contiguous()
        )
    )
    try:
        out = net(*args)
    finally:
        handle.remove()
    return seen[0], out


@pytest.mark.parametrize("features", [None, 3])
def test_channels_last_layout_changes_speed_not_values(features):
    torch.manual_seed(0)
    base = CouplingNet(3, 6, hidden=8, context_features=features, channels_last=False).double()
    perturb(base)
    fast = CouplingNet(3, 6, hidden=8, context_features=features, channels_last=True).double()
    fast.load_state_dict(base.state_dict())
    h = torch.randn(4, 6, 5, 7, dtype=torch.float64)[:, 1:4]  # a channel slice, as couplings pass
    ctx = torch.randn(4, 3, dtype=torch.float64) if features else None
    args = (h,) if ctx is None else (h, ctx)
    used_base, out_base = _conv_in_layouts(base, *args)
    used_fast, out_fast = _conv_in_layouts(fast, *args)
    assert (used_base, used_fast) == (False, True)
    assert out_fast.is_contiguous() and out_fast.shape == (4, 6, 5, 7)
    torch.testing.assert_close(out_fast, out_base, rtol=1e-12, atol=1e-12)
    seed = torch.randn_like(out_base)
    grads = []
    for net in (base, fast):
        leaf = h.detach().requires_grad_(True)
        out = net(leaf) if ctx is None else net(leaf, ctx)
        grads.append(torch.autograd.grad(out, [leaf, *net.parameters()], seed))
    for g_base, g_fast in zip(*grads):
        torch.testing.assert_close(g_fast, g_base, rtol=1e-10, atol=1e-12)


def test_channels_last_default_follows_the_device(device):
    net = CouplingNet(2, 4, hidden=8).to(device)
    assert net.channels_last is None
    used, out = _conv_in_layouts(net, torch.randn(2, 2, 4, 4, device=device))
    # oneDNN's CPU convolutions are faster channels-last; elsewhere the layout is kept.
    assert used == (device == "cpu")
    assert out.is_contiguous()


def _weights_channels_last(net):
    return [c.weight.is_contiguous(memory_format=torch.channels_last)
            and not c.weight.is_contiguous()
            for c in (net.conv_in, net.conv_hidden, net.conv_out)]


def test_weights_follow_the_input_layout():
    # conv_hidden's (8, 8, 1, 1) weight is contiguous and channels-last at once.
    net = CouplingNet(2, 4, hidden=8)
    assert _weights_channels_last(net) == [True, False, True]
    assert net.conv_hidden.weight.is_contiguous(memory_format=torch.channels_last)
    weight = net.conv_in.weight
    net.double()  # moves re-apply the rule and keep the Parameter objects
    assert net.conv_in.weight is weight and _weights_channels_last(net) == [True, False, True]
    assert _weights_channels_last(CouplingNet(2, 4, hidden=8, channels_last=False)) == [False] * 3
    assert _weights_channels_last(net.to("meta")) == [False] * 3  # not CPU: contiguous
    # A state dict moves between layouts by value.
    plain = CouplingNet(2, 4, hidden=8, channels_last=False)
    perturb(plain)
    fast = CouplingNet(2, 4, hidden=8)
    fast.load_state_dict(plain.state_dict())
    assert _weights_channels_last(fast) == [True, False, True]
    h = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(fast(h), plain(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [1, "yes", 0.0])
def test_channels_last_must_be_a_bool_or_none(bad):
    with pytest.raises(TypeError, match="CouplingNet: channels_last must be True, False or None"):
        CouplingNet(2, 4, hidden=8, channels_last=bad)


def test_docstring_examples_run():
    result = doctest.testmod(nets_module)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_keeps_each_entry_with_probability_one_minus_p_and_rescales(p):
    torch.manual_seed(0)
    drop = Dropout(p)
    x = torch.rand(64, 16, 8, 8) + 0.5  # no zeros in the input
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    # 65536 Bernoulli draws: the kept fraction is within 5 standard deviations of 1 - p
    sd = (p * (1 - p) / kept.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.to(x.dtype) / (1 - p))
    assert not torch.equal(drop(x), y)  # a new mask per call
    drop.eval()
    assert torch.equal(drop(x), x)


def test_dropout_edge_cases_behave_as_torch_dropout():
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    torch.manual_seed(3)
    expected = torch.nn.Dropout(0.3, inplace=True)(x.clone())
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.3, inplace=True)(x.clone()), expected)
    assert isinstance(CouplingNet(2, 4, 8, dropout=0.1).drop, Dropout)
