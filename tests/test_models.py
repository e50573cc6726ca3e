"""Tests of the composed models: the torch model's contract and the nflows / Pyro views."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from flowplugins import Bijector
from flowplugins.backends.nflows import NflowsTransform
from flowplugins.bijectors.actnorm import ActNorm
from flowplugins.composer import glow, multiscale, realnvp
from flowplugins.models import MultiscaleFlow
from flowplugins.models.pyro import MultiscaleFlowDistribution
from flowplugins.testing import perturb_parameters

SHAPE = (1, 8, 8)
TINY = dict(levels=2, depth=2, hidden=8)


def _ready(model: torch.nn.Module, x: torch.Tensor, context=None, seed: int = 0, eval_mode=True):
    """One training-mode pass (ActNorm's data init, batch-norm statistics), then move every
    parameter away from its identity init, so the checks test something."""
    bijectors = [m for m in model.modules() if isinstance(m, Bijector)]
    assert bijectors
    if isinstance(model, MultiscaleFlow):
        model.log_prob(x, context)
    else:  # nflows Flow
        model.log_prob(x, context=context)
    gen = torch.Generator().manual_seed(seed)
    for b in bijectors:
        perturb_parameters(b, 0.05, gen)
    return model.train(not eval_mode)


def _images(n=6, shape=SHAPE, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 17, (n, *shape), generator=g).to(dtype) + torch.rand(n, *shape, generator=g, dtype=dtype)) / 17


# ------------------------------------------------------------------------ torch model
@pytest.mark.parametrize("arch", ["glow", "realnvp", "glow_conditional", "glow_plain_split"])
def test_decode_inverts_encode_in_float64(arch):
    torch.manual_seed(0)
    context = None
    if arch == "glow":
        model = glow((3, 8, 8), **TINY)
    elif arch == "glow_plain_split":
        model = glow((3, 8, 8), split_prior=False, top_prior=False, **TINY)
    elif arch == "realnvp":
        model = realnvp((3, 8, 8), levels=2, hidden=8)
    else:
        model = glow((3, 8, 8), context_features=4, **TINY)
        context = torch.nn.functional.one_hot(torch.arange(5) % 4, 4).double()
    model = model.double()
    x = _images(5, (3, 8, 8), torch.float64)
    _ready(model, x, context)
    z, ld = model.encode_with_log_det(x, context)
    assert z.shape == x.shape
    back, ld_inv = model.decode_with_log_det(z, context)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-9)
    torch.testing.assert_close(model.decode(model.encode(x, context), context), x, rtol=0, atol=1e-10)


def test_log_prob_is_the_sum_of_step_log_dets_plus_the_base_log_prob():
    torch.manual_seed(1)
    model = multiscale(
        (1, 4, 4), 2, ["actnorm", ("affine_coupling", {"hidden": 4})], depth=1
    ).double()
    x = _images(3, (1, 4, 4), torch.float64)
    _ready(model, x)
    s = list(model.steps)
    assert [type(b).__name__ for b in s] == [
        "Center", "Squeeze", "ActNorm", "AffineCoupling", "Split2dPrior",
        "Squeeze", "ActNorm", "AffineCoupling", "LearnedGaussianPrior",
    ]
    total = torch.zeros(3, dtype=torch.float64)
    h = x
    for b in s[:5]:
        h, ld = b(h)
        total += ld
    z1, h = h[:, :2], h[:, 2:]  # (4, 2, 2) -> factor out the first ceil(4/2) = 2 channels
    for b in s[5:]:
        h, ld = b(h)
        total += ld
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    base = normal.log_prob(z1).sum((1, 2, 3)) + normal.log_prob(h).sum((1, 2, 3))
    torch.testing.assert_close(model.log_prob(x), total + base, rtol=1e-12, atol=1e-12)
    # encode's layout: z_1 flattened, then the top latent, reshaped to x's shape.
    expected = torch.cat([z1.reshape(3, -1), h.reshape(3, -1)], 1).reshape(x.shape)
    torch.testing.assert_close(model.encode(x), expected, rtol=0, atol=1e-14)


def test_log_prob_takes_leading_batch_dimensions():
    torch.manual_seed(2)
    model = glow(SHAPE, **TINY).eval()
    x = _images(6)
    torch.testing.assert_close(model.log_prob(x.reshape(2, 3, *SHAPE)), model.log_prob(x).reshape(2, 3))
    assert model(x).shape == (6,)  # forward is log_prob


def test_bits_per_dim_formula():
    torch.manual_seed(3)
    model = glow(SHAPE, **TINY)
    x = _images(4)
    _ready(model, x)
    d = math.prod(SHAPE)
    lp = model.log_prob(x)
    for n_levels in (17, 256):
        expected = (-lp + d * math.log(n_levels)) / (d * math.log(2))
        torch.testing.assert_close(model.bits_per_dim(x, n_levels=n_levels), expected)
    # At init an additive Glow is volume preserving and maps x = 1/2 to z = 0 (its 1x1 convs
    # are rotations), so log p(x) = log N(0; 0, I). (The affine coupling's scale starts at
    # sigmoid(2), not 1.)
    fresh = glow(SHAPE, coupling="additive", **TINY).eval()
    x0 = torch.full((1, *SHAPE), 0.5)
    bpd = fresh.bits_per_dim(x0, n_levels=17).item()
    assert math.isclose(bpd, (0.5 * math.log(2 * math.pi) + math.log(17)) / math.log(2), rel_tol=1e-6)
    with pytest.raises(ValueError, match="n_levels must be an integer >= 2; got 1"):
        model.bits_per_dim(x, n_levels=1)


def test_sample_shapes_temperature_and_mode():
    torch.manual_seed(4)
    model = glow(SHAPE, **TINY)
    x = _images(8)
    _ready(model, x, eval_mode=False)
    samples = model.sample(5, temperature=0.7)
    assert samples.shape == (5, *SHAPE)
    assert samples.min() >= 0 and samples.max() <= 1
    assert model.training  # restored
    assert not samples.requires_grad
    # T = 0 decodes the zero latent; lower temperature concentrates the latents.
    model.eval()
    zero = model.decode(torch.zeros(1, *SHAPE)).clamp(0, 1)
    torch.testing.assert_close(model.sample(3, temperature=0.0), zero.expand(3, *SHAPE))
    torch.manual_seed(0)
    hot = model.encode(model.sample(200, temperature=1.0))
    torch.manual_seed(0)
    cold = model.encode(model.sample(200, temperature=0.3))
    assert cold.std() < hot.std() * 0.5
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.sample(2, temperature=-1.0)


def test_sample_dtype_follows_the_model():
    model = glow(SHAPE, **TINY).double()
    assert model.sample(2).dtype == torch.float64


# ------------------------------------------------------------------------ conditional
def test_conditional_log_prob_depends_on_the_context():
    torch.manual_seed(5)
    model = glow(SHAPE, context_features=3, **TINY)
    x = _images(4)
    y = torch.eye(3)[[0, 1, 2, 0]]
    _ready(model, x, y)
    lp = {k: model.log_prob(x, torch.eye(3)[[k] * 4]) for k in range(3)}
    assert not torch.allclose(lp[0], lp[1]) and not torch.allclose(lp[1], lp[2])
    cond = [s for s in model.steps if getattr(s, "context_features", None) == 3]
    assert [type(s).__name__ for s in cond] == ["Split2dPrior", "LearnedGaussianPrior"]
    assert model.sample(4, context=torch.eye(3)[1]).shape == (4, *SHAPE)
    assert model.sample(3, context=torch.eye(3)).shape == (3, *SHAPE)


def test_context_errors():
    plain = glow(SHAPE, **TINY)
    cond = glow(SHAPE, context_features=3, **TINY)
    x = _images(2)
    with pytest.raises(ValueError, match="context_features=None"):
        plain.log_prob(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="context_features=3.*got none"):
        cond.log_prob(x)
    with pytest.raises(ValueError, match=r"expected a context of shape \(2, 3\).*got \(2, 4\)"):
        cond.log_prob(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 1, 8, 8\); got \(2, 1, 4, 4\)"):
        plain.log_prob(torch.rand(2, 1, 4, 4))


# ------------------------------------------------------------------- three backends
@pytest.mark.parametrize("arch", ["glow", "realnvp", "glow_conditional"])
def test_three_backends_give_the_same_log_prob(arch):
    x = _images(6)
    context = None
    if arch == "glow_conditional":
        context = torch.eye(3)[torch.arange(6) % 3]

    def make(backend):
        if arch == "realnvp":
            return realnvp(SHAPE, levels=2, hidden=8, backend=backend, seed=11)
        return glow(SHAPE, backend=backend, seed=11, context_features=context.shape[1] if context is not None else None, **TINY)

    model = make("torch")
    flow = make("nflows")
    d = make("pyro")
    assert type(flow).__name__ == "Flow"
    assert type(flow._transform).__name__ == "MultiscaleCompositeTransform"
    assert isinstance(d, MultiscaleFlowDistribution)
    for m in (model, flow, d.model):
        _ready(m, x, context)
    reference = model.log_prob(x, context)
    via_nflows = flow.log_prob(x, context=context)
    if context is not None:
        d = d.condition(context)
    via_pyro = d.log_prob(x)
    torch.testing.assert_close(via_nflows, reference, rtol=1e-4, atol=0)
    torch.testing.assert_close(via_pyro, reference, rtol=1e-4, atol=0)
    # The nflows latent is the torch model's encode() flattened.
    noise = flow.transform_to_noise(x, context=context)
    torch.testing.assert_close(noise, model.encode(x, context).reshape(6, -1), rtol=1e-5, atol=1e-5)


def test_nflows_flow_wraps_the_bijectors_level_by_level():
    model = glow(SHAPE, seed=0, **TINY)
    from flowplugins.models.nflows import nflows_flow

    flow = nflows_flow(model)
    levels = flow._transform._transforms
    assert len(levels) == 2
    assert type(levels[0]._transforms[-1].bijector).__name__ == "Split2dPrior"
    wrapped = [m.bijector for m in flow.modules() if isinstance(m, NflowsTransform)]
    assert wrapped == list(model.steps)  # the same modules, shared
    flow.eval()
    assert flow.sample(3).shape == (3, *SHAPE)
    cond = glow(SHAPE, context_features=2, backend="nflows", **TINY).eval()
    assert cond.sample(4, context=torch.eye(2)).shape == (2, 4, *SHAPE)


# ---------------------------------------------------------------------------- Pyro
def test_pyro_distribution_shapes_and_temperature():
    d = glow(SHAPE, backend="pyro", seed=0, **TINY)
    d.model.eval()
    assert d.event_shape == SHAPE and d.batch_shape == ()
    x = _images(12).reshape(3, 4, *SHAPE)
    assert d.log_prob(x).shape == (3, 4)
    assert d.sample((2, 3)).shape == (2, 3, *SHAPE)
    assert d.with_temperature(0.0).sample((2,)).shape == (2, *SHAPE)
    torch.testing.assert_close(d.sample((2,), temperature=0.0), d.model.decode(torch.zeros(2, *SHAPE)))
    z = d.rsample((2,))
    assert z.requires_grad
    assert d.expand((5,)).batch_shape == (5,)


def test_pyro_conditional_distribution_broadcasts_an_enumerated_label():
    d = glow(SHAPE, backend="pyro", context_features=3, seed=0, **TINY)
    x = _images(4)
    _ready(d.model, x, torch.eye(3)[[0, 1, 2, 0]])
    with pytest.raises(ValueError, match=r"\.condition\(context\)"):
        d.log_prob(x)
    labels = torch.eye(3).reshape(3, 1, 3)  # what enumeration of a 3-class label looks like
    lp = d.condition(labels).log_prob(x)
    assert lp.shape == (3, 4)
    for k in range(3):
        torch.testing.assert_close(lp[k], d.model.log_prob(x, torch.eye(3)[[k] * 4]))
    assert d.condition(torch.eye(3)).sample().shape == (3, *SHAPE)


def test_pyro_svi_trains_the_flow_parameters():
    pyro.clear_param_store()
    torch.manual_seed(6)
    d = glow(SHAPE, backend="pyro", **TINY)
    x = _images(16)

    def model(images):
        pyro.module("flow", d.model)
        with pyro.plate("data", images.shape[0]):
            pyro.sample("x", d, obs=images)

    def guide(images):
        pass

    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    losses = [svi.step(x) for _ in range(8)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith("flow$$$steps.") for n in names)
    d.model.eval()
    expected = -d.model.log_prob(x).sum().item()
    trace = pyro.poutine.trace(model).get_trace(x)
    assert math.isclose(-trace.log_prob_sum().item(), expected, rel_tol=1e-5)
    pyro.clear_param_store()


def test_pyro_distribution_inside_transformed_program_is_a_distribution():
    d = glow(SHAPE, backend="pyro", **TINY)
    assert isinstance(d, dist.TorchDistribution)
    assert d.has_rsample


# ---------------------------------------------------------------------- memory saving
@pytest.mark.parametrize("context_features", [None, 3])
def test_memory_saving_gives_the_same_values_and_gradients(context_features):
    x = _images(4, dtype=torch.float64)
    y = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]] if context_features else None

    def run(memory_saving):
        model = glow(SHAPE, seed=3, context_features=context_features, memory_saving=memory_saving, **TINY).double()
        _ready(model, x, y, eval_mode=False)
        model.zero_grad()
        lp = model.log_prob(x, y)
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    lp0, g0 = run(False)
    lp1, g1 = run(True)
    torch.testing.assert_close(lp1, lp0, rtol=1e-10, atol=1e-10)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-8, msg=name)


# --------------------------------------------------------------------------- devices
def test_every_backend_runs_on_the_device(device):
    torch.manual_seed(7)
    model = glow(SHAPE, context_features=2, seed=1, **TINY)
    x = _images(4)
    y = torch.eye(2)[[0, 1, 0, 1]]
    _ready(model, x, y)
    reference = model.log_prob(x, y)
    model.to(device)
    x, y = x.to(device), y.to(device)
    torch.testing.assert_close(model.log_prob(x, y).cpu(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.decode(model.encode(x, y), y), x, rtol=1e-4, atol=1e-4)
    assert model.sample(3, context=y[0]).device.type == torch.device(device).type
    from flowplugins.models.nflows import nflows_flow

    torch.testing.assert_close(nflows_flow(model).log_prob(x, context=y).cpu(), reference, rtol=1e-4, atol=1e-4)
    d = MultiscaleFlowDistribution(model).condition(y)
    assert d.sample().device.type == torch.device(device).type


def test_pyro_support_follows_the_preprocessing():
    """Glow (centring) has real support; RealNVP's logit preprocessing with margin α is defined
    on (−α/(1−2α), (1−α)/(1−2α)) per pixel, and validation refuses values outside it."""
    assert glow(SHAPE, backend="pyro", **TINY).support.base_constraint is dist.constraints.real
    d = realnvp(SHAPE, levels=2, hidden=8, backend="pyro")
    alpha = d.model.steps[0].alpha
    interval = d.support.base_constraint
    assert d.support.event_dim == 3
    assert math.isclose(interval.lower_bound, -alpha / (1 - 2 * alpha))
    assert math.isclose(interval.upper_bound, (1 - alpha) / (1 - 2 * alpha))
    x = _images(4)
    assert d.support.check(x).all() and not d.support.check(x + 2).any()
    strict = MultiscaleFlowDistribution(d.model, validate_args=True)
    assert torch.isfinite(strict.log_prob(x)).all()
    with pytest.raises(ValueError, match="support"):
        strict.log_prob(x + 2)


def test_torch_compile_before_actnorm_init_initialises_in_graph_and_then_runs_one_graph():
    """Compiling an uninitialised Glow: ActNorm's data-dependent init runs inside the traced
    graph (the same values as eager init), and every call after it runs exactly one graph
    holding every coupling net's convolutions. An eager init pass behind a graph break left the
    callers' frames split for good: three graphs per call, and a slower step."""
    torch.manual_seed(0)
    model = glow(SHAPE, seed=0, **TINY)
    reference = glow(SHAPE, seed=0, **TINY)
    x = _images(8)
    graphs, runs = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)
        index = len(graphs) - 1

        def run(*args):
            runs.append(index)
            return gm.forward(*args)

        return run

    def convolutions(gm) -> int:
        return sum(
            (node.op == "call_function" and node.target in (torch.conv2d, torch.nn.functional.conv2d))
            or (node.op == "call_module" and isinstance(gm.get_submodule(node.target), torch.nn.Conv2d))
            for node in gm.graph.nodes
        )

    torch._dynamo.reset()
    loss = torch.compile(lambda batch: -model.log_prob(batch).mean(), backend=backend)
    first = loss(x)
    expected = -reference.log_prob(x).mean()  # eager: initialises on this batch
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
    assert all(bool(m.initialized) and m._known_initialized
               for m in model.modules() if isinstance(m, ActNorm))
    loss(x)  # recompiles once: the graph of the initialised model
    del runs[:]
    for _ in range(2):
        actual = loss(x)
    assert len(runs) == 2 and runs[0] == runs[1], f"graphs run per call: {runs}"
    torch.testing.assert_close(actual, -reference.log_prob(x).mean(), rtol=1e-5, atol=1e-5)
    nets = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert convolutions(graphs[runs[0]]) == nets


def test_torch_compile_of_a_restored_glow_keeps_its_actnorm_parameters():
    """A state-dict load leaves ActNorm's Python flag false and its buffer true; the traced
    in-graph initialisation then keeps the restored parameters (eager checks the buffer)."""
    trained = glow(SHAPE, seed=0, **TINY)
    x = _images(8)
    trained.log_prob(x)  # initialises
    perturb_parameters(trained, generator=torch.Generator().manual_seed(1))
    restored = glow(SHAPE, seed=2, **TINY)
    restored.load_state_dict(trained.state_dict())
    assert not any(m._known_initialized for m in restored.modules() if isinstance(m, ActNorm))
    torch._dynamo.reset()
    loss = torch.compile(lambda batch: -restored.log_prob(batch).mean(), backend="eager")
    torch.testing.assert_close(loss(2 * x), -trained.log_prob(2 * x).mean(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(restored.named_parameters(), trained.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_sampling_draws_the_eager_samples_from_cached_inverses_and_sees_new_weights(
    backend, monkeypatch
):
    """A compiled ``sample`` draws its latent from torch's generator (the eager samples for the
    same seed) and takes every LU conv's W⁻¹ from its eval-mode cache: nothing is rebuilt while
    the weights stay, and a ``load_state_dict`` in eval mode is seen by the next call."""
    from flowplugins import derived_cache

    if derived_cache._DERIVED_TENSORS_OP is None:
        pytest.skip("this torch cannot register the operators' fake versions")
    name = "flowplugins.LUInvertibleConv1x1.inverse"
    builds = {"n": 0}
    build = derived_cache._DERIVATIONS[name]

    def counted(*sources):
        builds["n"] += 1
        return build(*sources)

    monkeypatch.setitem(derived_cache._DERIVATIONS, name, counted)
    model = _ready(glow(SHAPE, seed=0, **TINY), _images(8))
    convs = sum(type(m).__name__ == "LUInvertibleConv1x1" for m in model.modules())
    torch._dynamo.reset()
    draw = torch.compile(model.sample, backend=backend)
    for temperature in (1.0, 0.7):
        torch.manual_seed(3)
        eager = model.sample(5, temperature=temperature)
        torch.manual_seed(3)
        torch.testing.assert_close(draw(5, temperature=temperature), eager, rtol=1e-5, atol=1e-5)
    builds["n"] = 0
    for _ in range(3):
        draw(5)
    assert builds["n"] == 0
    other = glow(SHAPE, seed=1, **TINY)
    _ready(other, _images(8, seed=1), seed=1)
    model.load_state_dict(other.state_dict())
    torch.manual_seed(4)
    eager = other.sample(5)
    torch.manual_seed(4)
    torch.testing.assert_close(draw(5), eager, rtol=1e-5, atol=1e-5)
    assert builds["n"] == convs
