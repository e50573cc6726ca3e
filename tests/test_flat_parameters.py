"""FlatParameters: one vector per group, exact gradients, aliases that stay current."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flowplugins.composer import glow
from flowplugins.training import FlatParameters


def _glow(memory_saving: bool = False, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    model = glow((1, 8, 8), levels=2, depth=2, hidden=8, preprocess=None,
                 memory_saving=memory_saving, backend="torch").to(dtype)
    model.train()
    with torch.no_grad():  # ActNorm's data-dependent init, before flattening
        model.log_prob(torch.rand(16, 1, 8, 8, dtype=dtype))
    # Move every parameter off its initial value so that no gradient is trivially zero.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batch(dtype=torch.float64) -> torch.Tensor:
    return torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_gradients_equal_per_tensor_backprop():
    reference = _glow()
    model = copy.deepcopy(reference)
    x = _batch()
    (-reference.log_prob(x).mean()).backward()
    names = [n for n, p in model.named_parameters()]
    flat = FlatParameters(model)
    (-flat.call(model.log_prob, x).mean()).backward()
    grads = dict(zip(flat.views().keys(), flat.vector.grad.split(
        [v.numel() for v in flat.views().values()])))
    assert set(grads) == set(names)
    for name, p in reference.named_parameters():
        # Segments hold parameters in memory order (the nets' weights are channels-last).
        torch.testing.assert_close(torch.as_strided(grads[name], p.shape, p.stride()), p.grad,
                                   rtol=1e-10, atol=1e-12)
    assert bool(flat.vector.grad.ne(0).any())


def test_adam_steps_equal_per_tensor_training():
    reference = _glow(dtype=torch.float32)
    model = copy.deepcopy(reference)
    x = _batch(torch.float32)
    opt_ref = torch.optim.Adam(reference.parameters(), lr=1e-3)
    flat = FlatParameters(model)
    opt = torch.optim.Adam([flat.vector], lr=1e-3)
    for _ in range(3):
        opt_ref.zero_grad()
        (-reference.log_prob(x).mean()).backward()
        opt_ref.step()
        flat.zero_grad()
        (-flat.call(model.log_prob, x).mean()).backward()
        opt.step()
    for (name, p_ref), (name2, p) in zip(reference.named_parameters(), model.named_parameters()):
        assert name == name2
        torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)


def test_aliases_follow_the_vector_and_keep_the_state_dict():
    model = _glow()
    keys = list(model.state_dict())
    flat = FlatParameters(model)
    assert list(model.state_dict()) == keys
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        flat.vector.mul_(1.5)
    for name, view in flat.views().items():
        torch.testing.assert_close(model.get_parameter(name), view.detach())
    # load_state_dict writes into the vector, not into new tensors.
    other = _glow()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())
    for name, p in other.named_parameters():
        torch.testing.assert_close(flat.views()[name].detach(), p)


def test_eval_caches_see_optimizer_steps():
    """The LU convolutions cache W⁻¹ in eval mode, keyed on version counters: an optimizer
    step on the vector must reach them through the aliases."""
    model = _glow()
    flat = FlatParameters(model)
    model.eval()
    with torch.no_grad():
        model.sample(4)  # fills the caches
        flat.vector.add_(0.01 * torch.randn_like(flat.vector))
    fresh = _glow()
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    for bij_a, bij_b in zip(model.modules(), fresh.modules()):
        if hasattr(bij_a, "weight_matrix") and callable(bij_a.weight_matrix):
            with torch.no_grad():
                torch.testing.assert_close(bij_a.weight_matrix(), bij_b.weight_matrix())
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.sample(4)
        torch.manual_seed(3)
        b = fresh.sample(4)
    torch.testing.assert_close(a, b)


def test_strides_and_tied_parameters_are_kept():
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    shared = nn.Linear(2, 2)
    module = nn.ModuleDict({"conv": conv, "a": shared, "b": nn.Sequential(shared)})
    stride = conv.weight.stride()
    flat = FlatParameters(module)
    assert module["conv"].weight.stride() == stride
    assert module["a"].weight is module["b"][0].weight
    assert flat.vector.numel() == sum(p.numel() for p in (conv.weight, conv.bias, shared.weight,
                                                          shared.bias))
    out = flat.call(lambda x: module["conv"](x).sum() + module["b"](x[:, 0, 0, :2]).sum(),
                    torch.randn(2, 3, 5, 5))
    out.backward()
    assert flat.vector.grad.shape == flat.vector.shape


def test_groups():
    model = nn.Linear(3, 2)
    flat = FlatParameters(model, groups=[[model.weight], [model.bias]])
    assert [v.numel() for v in flat.vectors] == [6, 2]
    with pytest.raises(AttributeError, match="2 vectors"):
        flat.vector
    flat.call(model, torch.ones(1, 3)).sum().backward()
    torch.testing.assert_close(flat.vectors[1].grad, torch.ones(2))


@pytest.mark.parametrize("groups, match", [
    (lambda m: [[m.weight]], "miss 1 trainable parameter"),
    (lambda m: [[m.weight], [m.weight, m.bias]], "more than one group"),
    (lambda m: [[m.weight, m.bias, nn.Parameter(torch.ones(1))]], "not trainable parameters"),
    (lambda m: [[m.weight, m.bias], []], "group 1 is empty"),
])
def test_bad_groups_are_named(groups, match):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        FlatParameters(model, groups=groups(model))


def test_bad_modules_are_named():
    with pytest.raises(ValueError, match="no parameters that require grad"):
        FlatParameters(nn.ReLU())
    mixed = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="mixes torch.float32"):
        FlatParameters(mixed)
    with pytest.raises(ValueError, match="memory-saving backprop"):
        FlatParameters(_glow(memory_saving=True))


def test_in_place_writes_during_a_call_are_refused():
    torch.manual_seed(0)
    model = glow((1, 8, 8), levels=1, depth=1, hidden=8, preprocess=None, backend="torch")
    model.train()
    flat = FlatParameters(model)  # ActNorm not initialised yet
    with pytest.raises(RuntimeError, match="data-dependent"):
        flat.call(model.log_prob, torch.rand(4, 1, 8, 8))


def test_compiled_training_step_equals_eager():
    model = _glow(dtype=torch.float32)
    twin = copy.deepcopy(model)
    x = _batch(torch.float32)
    flat, flat_twin = FlatParameters(model), FlatParameters(twin)
    compiled = torch.compile(lambda x: -flat.call(model.log_prob, x).mean())
    for _ in range(2):
        flat.zero_grad()
        flat_twin.zero_grad()
        loss = compiled(x)
        loss.backward()
        loss_twin = -flat_twin.call(twin.log_prob, x).mean()
        loss_twin.backward()
        torch.testing.assert_close(loss, loss_twin, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flat.vector.grad, flat_twin.vector.grad, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            flat.vector.sub_(1e-3 * flat.vector.grad)
            flat_twin.vector.sub_(1e-3 * flat_twin.vector.grad)
