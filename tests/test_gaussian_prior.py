"""Tests of the learned (optionally class-conditional) Gaussian top prior."""

from __future__ import annotations

import math

import pytest
import torch

import flowplugins
from flowplugins.bijectors.gaussian_prior import LearnedGaussianPrior
from flowplugins.testing import check_bijector, perturb_parameters

SHAPE = (3, 2, 4)


def _perturbed(context_features=None, seed=0) -> LearnedGaussianPrior:
    torch.manual_seed(seed)
    prior = LearnedGaussianPrior(SHAPE, context_features=context_features).double()
    return perturb_parameters(prior, 0.3, torch.Generator().manual_seed(seed))


def test_starts_as_identity_with_per_channel_parameters():
    prior = LearnedGaussianPrior(SHAPE, context_features=5)
    assert prior.loc.shape == (3,) and prior.log_scale.shape == (3,)
    x, y = torch.randn(4, *SHAPE), torch.eye(5)[:4]
    z, ld = prior(x, y)
    assert torch.equal(z, x)
    assert torch.equal(ld, torch.zeros(4))


@pytest.mark.parametrize("context_features", [None, 3])
def test_map_and_log_det_match_the_gaussian_density(context_features):
    prior = _perturbed(context_features)
    x = torch.randn(5, *SHAPE, dtype=torch.float64)
    y = torch.randn(5, 3, dtype=torch.float64) if context_features else None
    mu, log_sigma = prior.prior_params(y, 5)
    if y is None:
        mu, log_sigma = mu.expand(5, 3), log_sigma.expand(5, 3)
    z, ld = prior(x, y)
    # log N(z; 0, I) + log-det is the density N(x; mu, sigma²) with per-channel mu, sigma.
    expected = torch.distributions.Normal(mu[:, :, None, None], log_sigma.exp()[:, :, None, None])
    lp_expected = expected.log_prob(x).sum((1, 2, 3))
    lp = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2, 3)) + ld
    torch.testing.assert_close(lp, lp_expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, -(SHAPE[1] * SHAPE[2]) * log_sigma.sum(1))


@pytest.mark.parametrize("context_features", [None, 3])
def test_round_trip_and_inverse_log_det(context_features):
    prior = _perturbed(context_features, seed=1)
    x = torch.randn(2, 3, *SHAPE, dtype=torch.float64)
    y = torch.randn(2, 3, 3, dtype=torch.float64) if context_features else None
    z, ld = prior(x, y)
    back, ld_inv = prior.inverse(z, y)
    assert z.shape == x.shape and ld.shape == (2, 3)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)


def test_log_det_matches_autograd_jacobian():
    prior = _perturbed(3, seed=2)
    x = torch.randn(1, *SHAPE, dtype=torch.float64)
    y = torch.randn(1, 3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: prior(v.view(1, *SHAPE), y)[0].flatten(), x.flatten())
    _, ld = prior(x, y)
    assert math.isclose(torch.linalg.slogdet(jac)[1].item(), ld.item(), rel_tol=1e-10, abs_tol=1e-10)


def test_conditional_prior_depends_on_the_context():
    prior = _perturbed(4, seed=3)
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    y = torch.eye(4, dtype=torch.float64)
    z0, ld0 = prior(x, y[[0, 0]])
    z1, ld1 = prior(x, y[[1, 1]])
    assert not torch.allclose(z0, z1)
    assert not torch.allclose(ld0, ld1)


def test_context_errors_name_the_layer_and_the_shape():
    with pytest.raises(ValueError, match=r"LearnedGaussianPrior.*context_features=3.*got none"):
        LearnedGaussianPrior(SHAPE, context_features=3)(torch.randn(2, *SHAPE))
    with pytest.raises(ValueError, match=r"LearnedGaussianPrior.*\(2, 5\)"):
        LearnedGaussianPrior(SHAPE, context_features=3)(torch.randn(2, *SHAPE), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"LearnedGaussianPrior.*context_features=None"):
        LearnedGaussianPrior(SHAPE)(torch.randn(2, *SHAPE), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"LearnedGaussianPrior: context_features.*0"):
        LearnedGaussianPrior(SHAPE, context_features=0)


def test_registered_and_built_for_every_backend():
    assert "gaussian_prior" in flowplugins.names()
    assert isinstance(flowplugins.build("gaussian_prior", SHAPE), LearnedGaussianPrior)
    assert type(flowplugins.build("gaussian_prior", SHAPE, backend="nflows")).__name__ == "NflowsTransform"
    assert type(flowplugins.build("gaussian_prior", SHAPE, backend="pyro")).__name__ == "PyroTransformModule"


@pytest.mark.parametrize("context_features", [None, 3])
def test_passes_the_public_checker(context_features):
    check_bijector(
        "gaussian_prior",
        SHAPE,
        options={"context_features": context_features},
        context_shape=(3,) if context_features else None,
        backend=("torch", "nflows", "pyro"),
    )
