"""Memory-saving backprop: gradients equal ordinary backprop, activations constant in depth."""

from __future__ import annotations

import copy

import pytest
import torch

import flowplugins
from flowplugins.memory_saving import (
    ReversibleSequence,
    is_reversible_now,
    memory_saving_forward,
)
from flowplugins.testing import perturb_parameters

RTOL = 1e-5  # the bar for float64; the observed error is ~1e-13


def _plain_forward(steps, x, context=None):
    total = None
    for step in steps:
        x, ld = step(x, context)
        total = ld if total is None else total + ld
    return x, total


def _chain(context_features=3, seed=0):
    """A chain touching every kind of step: data init, LU conv, couplings with context,
    a shape change, a prior with context, a permutation; all moved away from the identity."""
    gen = torch.Generator().manual_seed(seed)
    k = context_features
    steps = [
        flowplugins.build("actnorm", (2, 4, 4)),
        flowplugins.build("inv_conv1x1_lu", (2, 4, 4), seed=1),
        flowplugins.build("affine_coupling", (2, 4, 4), hidden=6, context_features=k),
        flowplugins.build("squeeze", (2, 4, 4)),
        flowplugins.build("shuffle_permutation", (8, 2, 2), seed=2),
        flowplugins.build("additive_coupling", (8, 2, 2), hidden=6),
        flowplugins.build("affine_coupling", (8, 2, 2), hidden=6, context_features=k),
        flowplugins.build("split2d_prior", (8, 2, 2), context_features=k),
    ]
    steps = [s.double() for s in steps]
    for s in steps:
        perturb_parameters(s, 0.3, gen)
    return steps


class _ContextRouter(torch.nn.Module):
    """Calls a step with the context only if it was built for one (as the composer does)."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, x, context=None):
        return self.step(x, context if self.step_wants else None)

    def inverse(self, z, context=None):
        return self.step.inverse(z, context if self.step_wants else None)

    @property
    def step_wants(self):
        return getattr(self.step, "context_features", None) is not None


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def _assert_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{what}[{i}]: one gradient is missing"
        if a is None:
            continue
        scale = e.abs().max().clamp_min(1e-12)
        err = ((a - e).abs().max() / scale).item()
        assert err < RTOL, f"{what}[{i}]: relative error {err:.2e}"


def test_gradients_match_ordinary_backprop_float64():
    steps = [_ContextRouter(s) for s in _chain()]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    context = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    _plain_forward(steps, x.detach(), context.detach())  # ActNorm's data-dependent init
    params = [p for s in steps for p in s.parameters()]
    w = torch.randn(5, 8, 2, 2, generator=gen, dtype=torch.float64)

    def loss(fn):
        z, ld = fn(steps, x, context)
        # Weighs z and log-det differently so that both gradient paths are tested.
        return (w * z).sum() + (z.square().sum() - 3.0 * ld.sum())

    expected = _grads(loss(_plain_forward), [x, context, *params])
    actual = _grads(loss(memory_saving_forward), [x, context, *params])
    _assert_close(actual, expected, "grad")
    assert all(g is not None for g in expected[:2])


def test_values_match_and_no_grad_path():
    steps = [_ContextRouter(s) for s in _chain()]
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    z0, ld0 = _plain_forward(steps, x, c)
    z1, ld1 = memory_saving_forward(steps, x.requires_grad_(), c)
    torch.testing.assert_close(z1, z0)
    torch.testing.assert_close(ld1, ld0)
    with torch.no_grad():
        z2, ld2 = memory_saving_forward(steps, x, c)
    torch.testing.assert_close(z2, z0)
    assert z2.grad_fn is None


def test_uninitialized_actnorm_runs_once_ordinarily():
    torch.manual_seed(0)
    steps = [flowplugins.build("actnorm", (2, 4, 4)).double(),
             flowplugins.build("affine_coupling", (2, 4, 4), hidden=4).double()]
    twin = copy.deepcopy(steps)
    assert not is_reversible_now(steps[0])
    x = 3.0 + 2.0 * torch.randn(6, 2, 4, 4, dtype=torch.float64)
    z, ld = memory_saving_forward(steps, x)
    z_ref, ld_ref = _plain_forward(twin, x)
    assert bool(steps[0].initialized) and is_reversible_now(steps[0])
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ld, ld_ref)
    torch.testing.assert_close(steps[0].shift, twin[0].shift)


def test_batchnorm_in_training_falls_back_and_updates_stats_once():
    torch.manual_seed(0)
    steps = [flowplugins.build("affine_coupling", (2, 4, 4), hidden=4).double(),
             flowplugins.build("batchnorm", (2, 4, 4)).double(),
             flowplugins.build("inv_conv1x1_lu", (2, 4, 4), seed=0).double()]
    for s in steps:
        perturb_parameters(s, 0.2, torch.Generator().manual_seed(3))
    twin = copy.deepcopy(steps)
    assert not is_reversible_now(steps[1])
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    params = [p for s in steps for p in s.parameters()]
    params_ref = [p for s in twin for p in s.parameters()]
    z, ld = memory_saving_forward(steps, x)
    g = _grads(z.square().sum() - ld.sum(), params)
    z_ref, ld_ref = _plain_forward(twin, x)
    g_ref = _grads(z_ref.square().sum() - ld_ref.sum(), params_ref)
    _assert_close(g, g_ref, "grad")
    torch.testing.assert_close(steps[1].running_mean, twin[1].running_mean)
    torch.testing.assert_close(steps[1].running_var, twin[1].running_var)


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn`` runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def _deep_chain(depth):
    torch.manual_seed(0)
    steps = []
    for _ in range(depth):
        steps += [flowplugins.build("actnorm", (4, 8, 8)),
                  flowplugins.build("inv_conv1x1_lu", (4, 8, 8)),
                  flowplugins.build("affine_coupling", (4, 8, 8), hidden=16)]
    x = torch.randn(8, 4, 8, 8)
    _plain_forward(steps, x)
    return steps, x


def test_saved_activations_do_not_grow_with_depth():
    sizes = {}
    for depth in (2, 8):
        steps, x = _deep_chain(depth)
        x.requires_grad_(True)
        sizes[depth, "plain"] = _saved_bytes(lambda: _plain_forward(steps, x))
        sizes[depth, "saving"] = _saved_bytes(lambda: memory_saving_forward(steps, x))
    assert sizes[8, "plain"] > 3 * sizes[2, "plain"]
    assert sizes[8, "saving"] == sizes[2, "saving"]
    assert sizes[8, "saving"] < sizes[2, "plain"]


def test_reversible_sequence_module():
    steps, x = _deep_chain(2)
    seq = ReversibleSequence(steps)
    plain = ReversibleSequence(copy.deepcopy(steps), memory_saving=False)
    z, ld = seq(x)
    z_ref, ld_ref = plain(x)
    torch.testing.assert_close(z, z_ref)
    x_back, ld_inv = seq.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-4, rtol=1e-4)
    (z.square().sum() - ld.sum()).backward()
    (z_ref.square().sum() - ld_ref.sum()).backward()
    for p, q in zip(seq.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3)


def test_empty_chain_is_an_error():
    with pytest.raises(ValueError, match="memory_saving_forward: steps must contain"):
        memory_saving_forward([], torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="ReversibleSequence"):
        ReversibleSequence([])


# ------------------------------------------------------------------ composer
composer = pytest.importorskip("flowplugins.composer")


@pytest.mark.parametrize("conditional", [False, True])
def test_composer_glow_memory_saving_matches_float64(conditional):
    kwargs = dict(levels=2, depth=2, hidden=8, split_prior=True, seed=0)
    if conditional:
        kwargs["context_features"] = 3
    with_ms = composer.glow((2, 8, 8), memory_saving=True, **kwargs).double()
    plain = composer.glow((2, 8, 8), memory_saving=False, **kwargs).double()
    plain.load_state_dict(with_ms.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 2, 8, 8, generator=gen, dtype=torch.float64)
    context = torch.randn(4, 3, generator=gen, dtype=torch.float64) if conditional else None
    with torch.no_grad():  # ActNorm init on both from the same batch
        with_ms.log_prob(x, context)
        plain.log_prob(x, context)
    for m in (with_ms, plain):
        perturb_parameters(m, 0.1, torch.Generator().manual_seed(5))
    grads = []
    for model in (with_ms, plain):
        xg = x.clone().requires_grad_(True)
        cg = None if context is None else context.clone().requires_grad_(True)
        loss = -model.log_prob(xg, cg).mean()
        inputs = [xg] + ([cg] if cg is not None else []) + list(model.parameters())
        grads.append(_grads(loss, inputs))
    _assert_close(grads[0], grads[1], "grad")


def test_composer_steps_chain_level_by_level():
    model = composer.glow((1, 8, 8), levels=2, depth=2, hidden=8, seed=0).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        model.log_prob(x)
    start, stop = model.level_bounds[0]
    steps = list(model.steps)[start:stop]
    h = x.clone().requires_grad_(True)
    z, ld = memory_saving_forward(steps, h)
    z_ref, ld_ref = _plain_forward(steps, h)
    g = _grads(z.sum() - ld.sum(), [h])
    g_ref = _grads(z_ref.sum() - ld_ref.sum(), [h])
    _assert_close(g, g_ref, "grad")


@pytest.mark.slow
@pytest.mark.parametrize("memory_saving", [False, True])
def test_torch_compile_training_step(memory_saving):
    torch.manual_seed(0)
    model = composer.glow((1, 8, 8), levels=2, depth=1, hidden=8, memory_saving=memory_saving)
    with torch.no_grad():
        perturb_parameters(model, 0.05, torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        model.log_prob(x)
        reference.log_prob(x)

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        loss = -m.log_prob(x).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    # SGD rather than Adam: Adam rescales round-off-sized gradients to full-size steps, so
    # compiled and eager runs would differ by ±lr on parameters whose gradient is ~0.
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=1e-2)
    compiled = torch.compile(step)
    for _ in range(2):
        loss = compiled(model, opt)
        loss_ref = step(reference, opt_ref)
        torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-4)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4)


def test_steps_with_active_dropout_use_ordinary_backprop():
    """A coupling net with dropout draws a new mask on every call, so recomputing its input
    through the inverse would be wrong; such steps must fall back to stored activations."""
    from flowplugins.memory_saving import is_reversible_now
    from flowplugins.nets import CouplingNet

    class DropoutNet(torch.nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.net = CouplingNet(cin, cout, hidden=8)
            self.drop = torch.nn.Dropout(0.5)

        def forward(self, h):
            return self.net(self.drop(h))

    layer = flowplugins.build("affine_coupling", (4, 4, 4), net=DropoutNet)
    assert not is_reversible_now(layer.train())
    assert is_reversible_now(layer.eval())


def _coupling_chain(context_features=None):
    gen = torch.Generator().manual_seed(3)
    kw = {"hidden": 6, "context_features": context_features}
    steps = [
        flowplugins.build("affine_coupling", (3, 4, 4), **kw),
        flowplugins.build("additive_coupling", (3, 4, 4), **kw),
        flowplugins.build("affine_coupling", (3, 4, 4), **kw),
    ]
    steps = [s.double() for s in steps]
    for s in steps:
        perturb_parameters(s, 0.3, gen)
    return steps


@pytest.mark.parametrize("context_features", [None, 2])
@pytest.mark.parametrize("hooked", [False, True])
def test_coupling_net_is_evaluated_once_per_step_in_backward(context_features, hooked):
    """A coupling's inverse and its re-run forward read the same net output, so memory saving
    evaluates the net once per step in backward (twice with a module hook on the coupling,
    which must see the recomputed forward); gradients equal ordinary backprop either way."""
    steps = _coupling_chain(context_features)
    reference = copy.deepcopy(steps)
    calls = []
    for i, s in enumerate(steps):
        s.net.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
        if hooked:
            s.register_forward_hook(lambda m, inp, out: None)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 2, dtype=torch.float64, requires_grad=True) if context_features else None

    def loss(fn, chain):
        z, ld = fn(chain, x, c)
        weights = torch.linspace(-1.0, 1.0, z.numel(), dtype=z.dtype).view(z.shape)
        return (z * weights).sum() - (ld * torch.arange(4, dtype=z.dtype)).sum()

    params = [p for s in steps for p in s.parameters()]
    ref_params = [p for s in reference for p in s.parameters()]
    inputs = [x] + ([c] if c is not None else [])
    value = loss(memory_saving_forward, steps)
    assert sorted(calls) == [0, 1, 2]  # the forward, run without recording
    calls.clear()
    actual = _grads(value, inputs + params)
    # The backward's recomputation: one shared net call per coupling, or inverse + forward.
    assert sorted(calls) == sorted([0, 1, 2] * (2 if hooked else 1))
    expected = _grads(loss(_plain_forward, reference), inputs + ref_params)
    _assert_close(actual, expected, "grad")
