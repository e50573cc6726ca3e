"""The nflows backend: CompositeTransform, MultiscaleCompositeTransform and Flow."""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import CompositeTransform, MultiscaleCompositeTransform, Transform

import flowplugins
from flowplugins.backends.nflows import NflowsTransform
from flowplugins.bijectors.squeeze import Squeeze


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * flat.pow(2).sum(-1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


def test_build_returns_an_nflows_transform_sharing_the_bijector():
    t = flowplugins.build("squeeze", (1, 4, 4), backend="nflows")
    assert isinstance(t, Transform) and isinstance(t, NflowsTransform)
    assert t.output_event_shape() == (4, 2, 2) and t.event_shape == (1, 4, 4)
    with pytest.raises(TypeError, match="expected a flowplugins.Bijector"):
        NflowsTransform(torch.nn.Linear(2, 2))


def test_flow_log_prob_and_sample(dtype):
    torch.manual_seed(0)
    shape = (2, 4, 4)
    layers = [
        flowplugins.build("actnorm", shape, backend="nflows"),
        flowplugins.build("affine_coupling", shape, backend="nflows", hidden=8),
        flowplugins.build("squeeze", shape, backend="nflows"),
    ]
    transform = CompositeTransform(layers).to(dtype)
    flow = Flow(transform, StandardNormal((8, 2, 2)))
    x = torch.randn(5, *shape, dtype=dtype)
    log_prob = flow.log_prob(x)  # training mode: initialises ActNorm
    z, logabsdet = transform(x)
    torch.testing.assert_close(log_prob, _standard_normal_log_prob(z) + logabsdet)
    assert bool(layers[0].bijector.initialized)
    log_prob.mean().backward()
    assert all(p.grad is not None for p in transform.parameters())
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # nflows' StandardNormal samples in the default dtype
    try:
        samples = flow.sample(3)
    finally:
        torch.set_default_dtype(old)
    assert samples.shape == (3, *shape) and torch.isfinite(samples).all()


def test_multiscale_composite_transform_with_squeeze_and_split():
    torch.manual_seed(1)
    shape = (2, 8, 8)
    levels = 2
    multiscale = MultiscaleCompositeTransform(levels, split_dim=1)
    level_shape = shape
    for level in range(levels):
        squeeze = flowplugins.build("squeeze", level_shape, backend="nflows")
        inner = squeeze.output_event_shape()
        steps = [squeeze, flowplugins.build("affine_coupling", inner, backend="nflows", hidden=8)]
        if level < levels - 1:
            steps.append(flowplugins.build("split2d_prior", inner, backend="nflows"))
        # The shapes come from the layers, not by hand.
        level_shape = multiscale.add_transform(CompositeTransform(steps), inner)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        for p in multiscale.parameters():  # leave the identity init
            p.add_(0.05 * torch.randn_like(p))
        z, logabsdet = multiscale(x)
        assert z.shape == (3, math.prod(shape))
        x_back, inv_logabsdet = multiscale.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inv_logabsdet, -logabsdet, atol=1e-4, rtol=1e-5)
    flow = Flow(multiscale, StandardNormal((math.prod(shape),)))
    torch.testing.assert_close(flow.log_prob(x), _standard_normal_log_prob(z) + logabsdet,
                               atol=1e-4, rtol=1e-5)
    assert flow.sample(2).shape == (2, *shape)


def test_missing_nflows_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nflows.transforms", None)
    monkeypatch.delitem(sys.modules, "flowplugins.backends.nflows")
    with pytest.raises(ImportError, match=r"pip install 'nflows>=0.14'"):
        importlib.import_module("flowplugins.backends.nflows")


def test_forward_is_the_bijectors_forward():
    squeeze = Squeeze((1, 4, 4))
    t = NflowsTransform(squeeze)
    x = torch.arange(32.0).reshape(2, 1, 4, 4)
    for (a, la), (b, lb) in ((t(x), squeeze(x)), (t.inverse(squeeze(x)[0]), squeeze.inverse(squeeze(x)[0]))):
        assert torch.equal(a, b) and torch.equal(la, lb)
