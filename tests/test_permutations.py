"""Tests of flowplugins.bijectors.permutations."""

from __future__ import annotations

import pytest
import torch

from flowplugins.bijectors.permutations import ReversePermutation, ShufflePermutation
from helpers import autograd_logabsdet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def layers(c=5, h=2, w=3):
    return [ReversePermutation((c, h, w)), ShufflePermutation((c, h, w), seed=0)]


@pytest.mark.parametrize("layer", layers(), ids=type)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_shape", [(4,), (2, 3), ()])
def test_round_trip_is_exact_with_zero_logabsdet(layer, dtype, batch_shape):
    x = torch.randn(*batch_shape, 5, 2, 3, dtype=dtype)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert torch.equal(x_back, x)
    assert ld.shape == ld_inv.shape == batch_shape and ld.dtype == dtype
    assert not ld.any() and not ld_inv.any()


@pytest.mark.parametrize("layer", layers(c=3, h=1, w=2), ids=type)
def test_logabsdet_matches_autograd_jacobian(layer):
    x = torch.randn(2, 3, 1, 2, dtype=torch.float64)
    torch.testing.assert_close(autograd_logabsdet(layer, x), layer(x)[1])


def test_reverse_reverses_channels():
    x = torch.randn(2, 4, 3, 3)
    z, _ = ReversePermutation((4, 3, 3))(x)
    assert torch.equal(z, x[:, [3, 2, 1, 0]])


def test_shuffle_buffers_are_a_permutation_and_its_inverse():
    layer = ShufflePermutation((9, 1, 1), seed=1)
    perm, inv = layer.permutation, layer.inverse_permutation
    assert sorted(perm.tolist()) == list(range(9))
    assert torch.equal(perm[inv], torch.arange(9)) and torch.equal(inv[perm], torch.arange(9))
    x = torch.randn(3, 9, 1, 1)
    assert torch.equal(layer(x)[0], x[:, perm])


def test_shuffle_seed_is_reproducible_and_local():
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    a = ShufflePermutation((16, 1, 1), seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = ShufflePermutation((16, 1, 1), seed=3)
    c = ShufflePermutation((16, 1, 1), seed=4)
    assert torch.equal(a.permutation, b.permutation)
    assert not torch.equal(a.permutation, c.permutation)


def test_shuffle_state_dict_round_trips_into_a_differently_seeded_layer():
    a = ShufflePermutation((8, 2, 2), seed=0)
    b = ShufflePermutation((8, 2, 2), seed=1)
    assert set(a.state_dict()) == {"permutation", "inverse_permutation"}
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 8, 2, 2)
    assert torch.equal(a(x)[0], b(x)[0]) and torch.equal(a.inverse(x)[0], b.inverse(x)[0])


def test_shuffle_keeps_buffers_integer_under_dtype_changes():
    layer = ShufflePermutation((4, 1, 1), seed=0).double()
    assert layer.permutation.dtype == torch.long
    x = torch.randn(2, 4, 1, 1)  # no floating state: any floating dtype is accepted
    assert torch.equal(layer.inverse(layer(x)[0])[0], x)


@pytest.mark.parametrize("seed", [-1, 0.5, "3", True])
def test_invalid_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="ShufflePermutation: seed must be None or a non-negative integer"):
        ShufflePermutation((3, 1, 1), seed=seed)


@pytest.mark.parametrize("layer", layers(), ids=type)
def test_wrong_shape_is_a_clear_error(layer):
    with pytest.raises(ValueError, match=r"\.inverse: expected input of shape \(\.\.\., 5, 2, 3\)"):
        layer.inverse(torch.randn(1, 4, 2, 3))


def test_single_channel_is_identity():
    for layer in (ReversePermutation((1, 2, 2)), ShufflePermutation((1, 2, 2), seed=0)):
        x = torch.randn(3, 1, 2, 2)
        assert torch.equal(layer(x)[0], x)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(dtype):
    for layer in layers():
        x = torch.randn(2, 5, 2, 3, dtype=dtype, device="cuda")
        z, ld = layer.to("cuda")(x)
        assert z.is_cuda and ld.is_cuda
        assert torch.equal(layer.inverse(z)[0], x)
    cpu_layer = ShufflePermutation((5, 2, 3), seed=0)
    assert torch.equal(cpu_layer(x)[0].cpu(), cpu_layer(x.cpu())[0])
