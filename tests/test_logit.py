"""Tests of flowplugins.bijectors.logit."""

from __future__ import annotations

import math

import pytest
import torch

from flowplugins.bijectors.logit import LogitTransform
from helpers import autograd_logabsdet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def unit(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=torch.float64).clamp(1e-3, 1 - 1e-3).to(dtype)


def test_declares_unit_interval_domain():
    assert LogitTransform.input_domain == "unit_interval"


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3])
def test_matches_the_formula(alpha):
    layer = LogitTransform((2, 3, 3), alpha=alpha)
    x = unit(4, 2, 3, 3)
    y, ld = layer(x)
    p = alpha + (1 - 2 * alpha) * x
    torch.testing.assert_close(y, torch.log(p / (1 - p)))
    expected = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log(1 - p)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(ld, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_logabsdet_matches_autograd_jacobian(alpha):
    layer = LogitTransform((2, 1, 2), alpha=alpha)
    x = unit(3, 2, 1, 2)
    y, ld = layer(x)
    torch.testing.assert_close(ld, autograd_logabsdet(layer, x), rtol=1e-10, atol=1e-10)
    _, ld_inv = layer.inverse(y)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_inv, autograd_logabsdet(layer.inverse, y), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, dict(rtol=0, atol=1e-10)), (torch.float32, dict(rtol=1e-5, atol=1e-5))]
)
@pytest.mark.parametrize("batch_shape", [(5,), (2, 3)])
def test_round_trip(dtype, tol, batch_shape):
    layer = LogitTransform((3, 4, 4))
    x = unit(*batch_shape, 3, 4, 4, dtype=dtype)
    y, ld = layer(x)
    x_back, ld_inv = layer.inverse(y)
    assert ld.shape == batch_shape and ld.dtype == dtype
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(ld_inv, -ld, **tol)


def test_boundary_values_are_finite_with_positive_alpha():
    layer = LogitTransform((1, 1, 2), alpha=0.05)
    y, ld = layer(torch.tensor([[[[0.0, 1.0]]]]))
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    x, ld_inv = layer.inverse(torch.tensor([[[[-200.0, 200.0]]]]))
    assert torch.isfinite(x).all() and torch.isfinite(ld_inv).all()


@pytest.mark.parametrize("alpha", [-0.01, 0.5, 0.7, float("nan"), "0.1", True, None])
def test_invalid_alpha_is_rejected(alpha):
    with pytest.raises(ValueError, match=r"LogitTransform: alpha must satisfy 0 <= alpha < 0.5; got"):
        LogitTransform((1, 2, 2), alpha=alpha)


def test_density_of_unit_interval_data_via_logit():
    """A standard logistic in logit space with alpha=0 is exactly the uniform density on (0, 1)."""
    layer = LogitTransform((1, 2, 2), alpha=0.0)
    x = unit(6, 1, 2, 2)
    y, ld = layer(x)
    logistic = (-y - 2 * torch.nn.functional.softplus(-y)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(logistic + ld, torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)


def test_gradients_flow_to_the_input():
    x = unit(2, 1, 2, 2).requires_grad_(True)
    y, ld = LogitTransform((1, 2, 2))(x)
    (y.sum() + ld.sum()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().min() > 0


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(dtype):
    layer = LogitTransform((2, 2, 2)).cuda()
    x = unit(3, 2, 2, 2, dtype=dtype).cuda()
    y, ld = layer(x)
    assert y.is_cuda and ld.is_cuda
    torch.testing.assert_close(layer.inverse(y)[0], x, rtol=1e-5, atol=1e-5)
