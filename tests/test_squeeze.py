"""Tests of flowplugins.bijectors.squeeze."""

from __future__ import annotations

import pytest
import torch

from flowplugins.bijectors.squeeze import Squeeze

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_golden_pixel_order():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, ld = Squeeze((1, 4, 4))(x)
    expected = torch.tensor(
        [
            [[0.0, 2.0], [8.0, 10.0]],  # (i, j) = (0, 0)
            [[1.0, 3.0], [9.0, 11.0]],  # (0, 1)
            [[4.0, 6.0], [12.0, 14.0]],  # (1, 0)
            [[5.0, 7.0], [13.0, 15.0]],  # (1, 1)
        ]
    ).unsqueeze(0)
    assert torch.equal(z, expected)
    assert ld.tolist() == [0.0]


def test_golden_pixel_order_with_two_channels_keeps_channels_outermost():
    x = torch.arange(8.0).reshape(1, 2, 2, 2)
    z, _ = Squeeze((2, 2, 2))(x)
    assert z.flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert z.shape == (1, 8, 1, 1)


@pytest.mark.parametrize("shape", [(1, 2, 2), (3, 4, 6), (2, 8, 4)])
def test_matches_nflows_squeeze_transform(shape):
    from nflows.transforms import SqueezeTransform

    x = torch.randn(5, *shape)
    reference = SqueezeTransform(factor=2)
    z, ld = Squeeze(shape)(x)
    z_ref, ld_ref = reference(x)
    assert torch.equal(z, z_ref)
    torch.testing.assert_close(ld, ld_ref.to(ld.dtype).expand(5))
    assert torch.equal(Squeeze(shape).inverse(z)[0], reference.inverse(z_ref)[0])


@pytest.mark.parametrize("factor", [2, 3])
def test_follows_the_documented_index_formula(factor):
    c, h, w = 2, 3 * factor, 2 * factor
    x = torch.randn(c, h, w)
    z, _ = Squeeze((c, h, w), factor=factor)(x.unsqueeze(0))
    for cc in range(c):
        for i in range(factor):
            for j in range(factor):
                expected = x[cc, i::factor, j::factor]
                assert torch.equal(z[0, cc * factor * factor + i * factor + j], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_shape", [(3,), (2, 4), ()])
def test_round_trip_shapes_and_logabsdet(dtype, batch_shape):
    layer = Squeeze((3, 4, 6))
    assert layer.output_event_shape() == (12, 2, 3)
    x = torch.randn(*batch_shape, 3, 4, 6, dtype=dtype)
    z, ld = layer(x)
    assert z.shape == (*batch_shape, 12, 2, 3) and ld.shape == batch_shape and ld.dtype == dtype
    x_back, ld_inv = layer.inverse(z)
    assert torch.equal(x_back, x) and not ld.any() and not ld_inv.any()


def test_logabsdet_matches_autograd_jacobian():
    layer = Squeeze((1, 2, 2))
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0].reshape(-1), x).reshape(4, 4)
    assert torch.linalg.slogdet(jac)[1].item() == pytest.approx(0.0)


def test_odd_height_is_a_clear_error():
    with pytest.raises(ValueError) as info:
        Squeeze((1, 3, 4))
    message = str(info.value)
    assert message.startswith("Squeeze:")
    assert "divisible by factor 2" in message and "(1, 3, 4)" in message


def test_odd_width_with_factor_three_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Squeeze: H and W must be divisible by factor 3; got event shape \(2, 6, 4\)"):
        Squeeze((2, 6, 4), factor=3)


def test_input_with_odd_spatial_size_is_a_clear_error():
    layer = Squeeze((1, 4, 4))
    with pytest.raises(ValueError, match=r"Squeeze\.forward: expected input of shape \(\.\.\., 1, 4, 4\); got \(2, 1, 5, 4\)"):
        layer(torch.randn(2, 1, 5, 4))
    with pytest.raises(ValueError, match=r"Squeeze\.inverse: expected input of shape \(\.\.\., 4, 2, 2\)"):
        layer.inverse(torch.randn(2, 1, 4, 4))


@pytest.mark.parametrize("factor", [1, 0, 2.5, "2"])
def test_invalid_factor_is_rejected(factor):
    with pytest.raises((ValueError, TypeError), match="Squeeze: factor must be an integer >= 2"):
        Squeeze((1, 4, 4), factor=factor)


@cuda
def test_cuda():
    x = torch.randn(2, 3, 4, 4, device="cuda")
    layer = Squeeze((3, 4, 4))
    z, ld = layer(x)
    assert z.is_cuda and ld.is_cuda
    assert torch.equal(layer.inverse(z)[0], x)
