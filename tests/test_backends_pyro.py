"""The Pyro backend: orientation, log-det reuse, shapes, parameters, SVI and conditioning."""

from __future__ import annotations

import importlib
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

import flowplugins
from flowplugins.backends.pyro import ConditionalPyroTransformModule, PyroTransformModule
from flowplugins.testing import perturb_parameters


def _base(shape, dtype=torch.float64, device="cpu"):
    return dist.Normal(torch.zeros(shape, dtype=dtype, device=device), 1.0).to_event(3)


class CountingCalls:
    """Counts calls of a bijector's forward and inverse."""

    def __init__(self, bijector):
        self.forward = self.inverse = 0
        original_forward, original_inverse = bijector.forward, bijector.inverse

        def forward(*args, **kwargs):
            self.forward += 1
            return original_forward(*args, **kwargs)

        def inverse(*args, **kwargs):
            self.inverse += 1
            return original_inverse(*args, **kwargs)

        bijector.forward, bijector.inverse = forward, inverse


def _coupling(shape, seed=0, **options):
    torch.manual_seed(seed)
    t = flowplugins.build("affine_coupling", shape, backend="pyro", hidden=8, **options).double()
    perturb_parameters(t, 0.1, torch.Generator().manual_seed(seed))
    return t


def test_log_prob_is_the_change_of_variables_by_hand(device, dtype):
    shape = (2, 4, 4)
    torch.manual_seed(0)
    transforms = [
        flowplugins.build("affine_coupling", shape, backend="pyro", hidden=8),
        flowplugins.build("actnorm", shape, backend="pyro"),
        flowplugins.build("squeeze", shape, backend="pyro"),
    ]
    for t in transforms:
        t.to(device=device, dtype=dtype)
        perturb_parameters(t, 0.1, torch.Generator().manual_seed(1))
    # Pyro applies the list base -> data, so the data-side layer comes last.
    flow = dist.TransformedDistribution(_base((8, 2, 2), dtype, device), transforms[::-1])
    x = torch.randn(3, 4, *shape, dtype=dtype, device=device)
    log_prob = flow.log_prob(x)  # data -> latent: initialises ActNorm
    assert log_prob.shape == (3, 4)
    assert bool(transforms[1].bijector.initialized)
    h, total = x, 0.0
    for t in transforms:  # data -> latent by hand, in flowplugins' orientation
        h, ld = t.bijector(h)
        total = total + ld
    expected = _base((8, 2, 2), dtype, device).log_prob(h) + total
    torch.testing.assert_close(log_prob, expected)
    samples = flow.sample((3, 4))
    assert samples.shape == (3, 4, *shape) and samples.dtype == dtype


def test_log_abs_det_jacobian_reuses_the_last_pass():
    shape = (2, 4, 4)
    t = _coupling(shape)
    calls = CountingCalls(t.bijector)
    flow = dist.TransformedDistribution(_base(shape), [t])
    x = torch.randn(3, 4, *shape, dtype=torch.float64)
    flow.log_prob(x)
    assert (calls.forward, calls.inverse) == (1, 0)
    z = torch.randn(5, *shape, dtype=torch.float64)
    y = t(z)
    ladj = t.log_abs_det_jacobian(z, y)
    assert (calls.forward, calls.inverse) == (1, 1)
    torch.testing.assert_close(ladj, -t.bijector(y)[1])
    # Other tensors than the last pass's: recomputed from the latent side.
    t.log_abs_det_jacobian(z.clone(), y)
    assert calls.inverse == 2


def test_a_parameter_update_invalidates_the_stored_log_det():
    shape = (2, 4, 4)
    t = _coupling(shape)
    z = torch.randn(2, *shape, dtype=torch.float64)
    y = t(z)
    stored = t.log_abs_det_jacobian(z, y)
    with torch.no_grad():  # what an optimizer step does
        for p in t.parameters():
            p.add_(0.3)
    fresh = t.log_abs_det_jacobian(z, y)
    torch.testing.assert_close(fresh, t.bijector.inverse(z)[1])
    assert not torch.allclose(fresh, stored)


def test_pyro_identity_cache_is_off_by_default_and_opt_in():
    shape = (2, 4, 4)
    t = _coupling(shape)
    calls = CountingCalls(t.bijector)
    flow = dist.TransformedDistribution(_base(shape), [t])
    x = flow.sample((2,))
    flow.log_prob(x)
    assert calls.forward == 1  # no stale reuse of the sampling pass
    cached = t.with_cache(1)
    assert cached.bijector is t.bijector and cached.with_cache(1) is cached
    flow = dist.TransformedDistribution(_base(shape), [cached])
    x = flow.sample((2,))
    flow.log_prob(x)
    assert calls.forward == 1  # Pyro's cache handed back the latent of the sampling pass
    cached.clear_cache()
    flow.log_prob(x)
    assert calls.forward == 2


def test_shape_changing_squeeze():
    t = flowplugins.build("squeeze", (3, 4, 6), backend="pyro")
    assert t.forward_shape((5, 12, 2, 3)) == (5, 3, 4, 6)
    assert t.inverse_shape((7, 1, 3, 4, 6)) == (7, 1, 12, 2, 3)
    with pytest.raises(ValueError, match=r"forward_shape: expected a shape \(\.\.\., 12, 2, 3\)"):
        t.forward_shape((3, 4, 6))
    flow = dist.TransformedDistribution(_base((12, 2, 3), torch.float32), [t])
    assert flow.event_shape == (3, 4, 6) and flow.batch_shape == ()
    assert flow.sample((2,)).shape == (2, 3, 4, 6)
    assert t.domain.event_dim == t.codomain.event_dim == 3 and t.bijective


def test_logit_codomain_is_the_unit_interval():
    t = flowplugins.build("logit", (1, 2, 2), backend="pyro")
    assert t.codomain.check(torch.full((1, 2, 2), 0.5)).all()
    assert not t.codomain.check(torch.full((1, 2, 2), 2.0)).any()


def test_pyro_module_registers_parameters():
    pyro.clear_param_store()
    t = flowplugins.build("affine_coupling", (2, 4, 4), backend="pyro", hidden=8)
    pyro.module("flow", t)
    names = set(pyro.get_param_store().keys())
    expected = {f"flow$$${n}" for n, _ in t.named_parameters()}
    assert expected and expected <= names
    pyro.clear_param_store()


def test_svi_step_trains_the_flow():
    pyro.clear_param_store()
    torch.manual_seed(0)
    shape = (2, 4, 4)
    transforms = [flowplugins.build("affine_coupling", shape, backend="pyro", hidden=8),
                  flowplugins.build("actnorm", shape, backend="pyro")]
    data = torch.randn(16, *shape) * 2.0 + 1.0

    def model(x):
        for i, t in enumerate(transforms):
            pyro.module(f"t{i}", t)
        flow = dist.TransformedDistribution(_base(shape, torch.float32), transforms)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", flow, obs=x)

    def guide(x):
        pass

    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    before = transforms[0].bijector.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    losses = [svi.step(data) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = transforms[0].bijector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    pyro.clear_param_store()


def test_conditional_transform_module():
    shape = (2, 4, 4)
    torch.manual_seed(0)
    bijector = flowplugins.get_class("affine_coupling")(shape, hidden=8, context_features=3).double()
    perturb_parameters(bijector, 0.1, torch.Generator().manual_seed(0))
    conditional = ConditionalPyroTransformModule(bijector)
    flow = dist.ConditionalTransformedDistribution(_base(shape), [conditional])
    context = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, *shape, dtype=torch.float64)
    conditioned = flow.condition(context)
    z, ld = bijector(x, context)
    torch.testing.assert_close(conditioned.log_prob(x), _base(shape).log_prob(z) + ld)
    # One context for every sample: it is broadcast over Pyro's sample dimensions.
    single = dist.TransformedDistribution(_base(shape), [conditional.condition(torch.randn(3, dtype=torch.float64))])
    assert single.sample((5,)).shape == (5, *shape)
    with pytest.raises(ValueError, match="does not broadcast"):
        PyroTransformModule(bijector, torch.randn(2, 3, dtype=torch.float64))(
            torch.randn(4, *shape, dtype=torch.float64)
        )
    bound = PyroTransformModule(bijector).condition(context)
    assert bound.bijector is bijector and bound.context is context


def test_actnorm_does_not_initialise_from_sampling():
    t = flowplugins.build("actnorm", (2, 2, 2), backend="pyro")
    flow = dist.TransformedDistribution(_base((2, 2, 2), torch.float32), [t])
    flow.sample((4,))
    assert not bool(t.bijector.initialized)
    flow.log_prob(torch.randn(4, 2, 2, 2))
    assert bool(t.bijector.initialized)


def test_missing_pyro_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyro.distributions", None)
    monkeypatch.delitem(sys.modules, "flowplugins.backends.pyro")
    with pytest.raises(ImportError, match=r"pip install 'pyro-ppl>=1.8'"):
        importlib.import_module("flowplugins.backends.pyro")


def test_rejects_non_bijectors():
    with pytest.raises(TypeError, match="expected a flowplugins.Bijector"):
        PyroTransformModule(torch.nn.Linear(2, 2))
