"""Tests of flowplugins.bijectors.conv1x1 (LU and full-matrix invertible 1x1 convolutions)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from flowplugins.bijectors.conv1x1 import InvertibleConv1x1, LUInvertibleConv1x1, random_rotation

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CLASSES = [LUInvertibleConv1x1, InvertibleConv1x1]
LINALG = ["inv", "solve_triangular", "slogdet", "lu", "lu_factor", "qr", "det", "solve"]


def jacobian_logabsdet(fn, x):
    """Per-sample log|det ∂fn/∂x| by brute-force autograd (float64, tiny inputs only)."""

    def single(xi):
        return fn(xi.unsqueeze(0))[0].reshape(-1)

    dets = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(single, xi)
        dets.append(torch.linalg.slogdet(jac.reshape(xi.numel(), xi.numel()))[1])
    return torch.stack(dets)


def randn(*shape, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device)


def perturb(layer, seed=1, size=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    return layer


def count_linalg(monkeypatch):
    """Wrap the O(C³) torch.linalg routines with call counters."""
    calls = {"n": 0}
    for name in LINALG:
        original = getattr(torch.linalg, name)

        def wrapper(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, wrapper)
    return calls


@pytest.mark.parametrize("cls", CLASSES)
def test_initial_weight_is_a_rotation(cls):
    layer = cls((5, 2, 2), seed=3)
    w = layer.weight_matrix().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)
    _, ld = layer(torch.randn(2, 5, 2, 2))
    torch.testing.assert_close(ld, torch.zeros(2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", CLASSES)
def test_seed_is_reproducible_and_local(cls):
    torch.manual_seed(0)
    a = cls((4, 1, 1), seed=7)
    state = torch.random.get_rng_state()
    b = cls((4, 1, 1), seed=7)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded init must not touch the global RNG"
    c = cls((4, 1, 1), seed=8)
    assert torch.equal(a.weight_matrix(), b.weight_matrix())
    assert not torch.equal(a.weight_matrix(), c.weight_matrix())
    torch.manual_seed(1)
    d = cls((4, 1, 1))
    torch.manual_seed(1)
    e = cls((4, 1, 1))
    assert torch.equal(d.weight_matrix(), e.weight_matrix())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("seed", [-1, 1.5, "1", True])
def test_invalid_seed_is_rejected(cls, seed):
    with pytest.raises(ValueError, match=f"{cls.__name__}: seed must be None or a non-negative integer"):
        cls((2, 2, 2), seed=seed)


def test_lu_weight_has_the_documented_structure():
    layer = perturb(LUInvertibleConv1x1((4, 1, 1), seed=0).double())
    lower = torch.tril(layer.lower, -1) + torch.eye(4, dtype=torch.float64)
    upper = torch.triu(layer.upper, 1) + torch.diag(layer.sign * layer.log_abs_s.exp())
    p = torch.eye(4, dtype=torch.float64)[layer.permutation]
    torch.testing.assert_close(layer.weight_matrix(), p @ lower @ upper)
    assert set(layer.sign.tolist()) <= {-1.0, 1.0}
    assert sorted(layer.permutation.tolist()) == [0, 1, 2, 3]


def test_lu_logabsdet_equals_slogdet_of_rebuilt_weight():
    layer = perturb(LUInvertibleConv1x1((6, 3, 2), seed=0).double(), size=0.5)
    _, ld = layer(randn(4, 6, 3, 2))
    expected = 3 * 2 * torch.linalg.slogdet(layer.weight_matrix())[1]
    torch.testing.assert_close(ld, expected.expand(4), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_logabsdet_matches_autograd_jacobian(cls):
    layer = perturb(cls((3, 2, 2), seed=0).double(), size=0.4)
    x = randn(2, 3, 2, 2, seed=5)
    z, ld = layer(x)
    torch.testing.assert_close(ld, jacobian_logabsdet(layer, x), rtol=1e-10, atol=1e-10)
    _, ld_inv = layer.inverse(z)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_inv, jacobian_logabsdet(layer.inverse, z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, dict(rtol=0, atol=1e-10)), (torch.float32, dict(rtol=1e-5, atol=1e-5))]
)
def test_round_trip_after_perturbation(cls, grad, dtype, tol):
    layer = perturb(cls((8, 4, 4), seed=0).to(dtype), size=0.3)
    x = randn(2, 3, 8, 4, 4, dtype=dtype, seed=6)
    with torch.set_grad_enabled(grad):
        z, ld = layer(x)
        x_back, ld_inv = layer.inverse(z)
    assert z.shape == x.shape and ld.shape == (2, 3)
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(ld_inv, -ld, **tol)


@pytest.mark.parametrize("cls", CLASSES)
def test_applied_as_one_1x1_convolution(cls, monkeypatch):
    """One C×C matrix per direction, applied at every pixel (a batched matmul, not conv2d)."""
    import flowplugins.bijectors.conv1x1 as conv1x1

    seen = []
    original = conv1x1.apply_channel_matrix

    def spy(weight, x, *args, **kwargs):
        seen.append((tuple(x.shape), tuple(weight.shape)))
        return original(weight, x, *args, **kwargs)

    monkeypatch.setattr(conv1x1, "apply_channel_matrix", spy)
    layer = cls((5, 3, 3), seed=0).double()
    x = randn(7, 5, 3, 3)
    z, _ = layer(x)
    assert seen == [((7, 5, 3, 3), (5, 5))]
    w = layer.weight_matrix().detach()
    torch.testing.assert_close(z, F.conv2d(x, w.view(5, 5, 1, 1)), rtol=0, atol=1e-12)
    layer.inverse(z)
    assert seen == [((7, 5, 3, 3), (5, 5))] * 2


def _count_builds(layer, monkeypatch):
    builds = {"n": 0}
    for name in ("_build_weight", "_build_inverse_weight", "_build_logabsdet"):
        original = getattr(layer, name)

        def counted(_original=original):
            builds["n"] += 1
            return _original()

        monkeypatch.setattr(layer, name, counted)
    return builds


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen"])
def test_eval_calls_do_no_cubic_work_after_the_first(cls, context, monkeypatch):
    layer = perturb(cls((6, 4, 4), seed=0)).eval()
    if context == "frozen":
        layer.requires_grad_(False)
    modes = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "frozen": torch.enable_grad}
    x = torch.randn(3, 6, 4, 4)
    calls = count_linalg(monkeypatch)
    with modes[context]():
        z, _ = layer(x)
        layer.inverse(z)
        first = calls["n"]
        builds = _count_builds(layer, monkeypatch)
        for _ in range(5):
            z, _ = layer(x)
            x_back, _ = layer.inverse(z)
    assert calls["n"] == first
    assert builds["n"] == 0, "W, W⁻¹ and log|det W| must come from the cache"
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", CLASSES)
def test_training_mode_never_uses_the_cache(cls, monkeypatch):
    """Fused optimizers update parameters without bumping version counters."""
    layer = cls((4, 2, 2), seed=0)
    builds = _count_builds(layer, monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            layer.inverse(torch.randn(1, 4, 2, 2))
    assert builds["n"] == 3 * 2
    assert len(layer._derived) == 0


@pytest.mark.parametrize("cls", CLASSES)
def test_fused_optimizer_step_in_training_then_eval_is_fresh(cls):
    layer = cls((4, 2, 2), seed=0).double()
    z = randn(2, 4, 2, 2)
    layer.eval()
    with torch.no_grad():
        layer.inverse(z)
    layer.train()
    opt = torch.optim.Adam(layer.parameters(), lr=0.05, fused=True)
    for _ in range(3):
        out, ld = layer(randn(4, 4, 2, 2, seed=1))
        opt.zero_grad()
        (out.pow(2).sum() - ld.sum()).backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        x = layer.inverse(z)[0]
    torch.testing.assert_close(x, _fresh_inverse(layer, z), rtol=0, atol=1e-12)


def test_clear_cache_after_a_write_that_bypasses_version_counters():
    layer = LUInvertibleConv1x1((3, 1, 1), seed=0).double().eval()
    z = randn(2, 3, 1, 1)
    with torch.no_grad():
        layer.inverse(z)
        layer.log_abs_s.data.add_(0.5)  # .data writes are invisible to autograd's version counter
        layer.clear_cache()
        torch.testing.assert_close(layer.inverse(layer(z)[0])[0], z, rtol=0, atol=1e-12)


def test_frozen_parameters_use_the_cache_and_inputs_still_get_gradients(monkeypatch):
    layer = perturb(LUInvertibleConv1x1((4, 2, 2), seed=0)).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    with torch.inference_mode():
        layer.inverse(torch.randn(1, 4, 2, 2))  # cache built inside inference mode
    calls = count_linalg(monkeypatch)
    z = torch.randn(2, 4, 2, 2, requires_grad=True)
    x, _ = layer.inverse(z)
    x.sum().backward()
    assert calls["n"] == 0
    expected = layer.weight_matrix().inverse().sum(0).view(1, 4, 1, 1).expand_as(z)
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-5)


def _fresh_inverse(layer, z):
    """The inverse computed without any cache (autograd recording forces a fresh build)."""
    with torch.enable_grad():
        return layer.inverse(z)[0].detach()


@pytest.mark.parametrize("cls", CLASSES)
def test_cache_invalidated_by_optimizer_step(cls):
    layer = cls((5, 3, 3), seed=0).double().eval()
    z = randn(2, 5, 3, 3, seed=2)
    with torch.no_grad():
        before = layer.inverse(z)[0]
    opt = torch.optim.SGD(layer.parameters(), lr=0.01)
    x = randn(4, 5, 3, 3, seed=3)
    out, ld = layer(x)  # eval mode, grad enabled: the differentiable path
    (out.pow(2).sum() - ld.sum()).backward()
    opt.step()
    with torch.no_grad():
        after = layer.inverse(z)[0]
        x_back = layer.inverse(layer(x)[0])[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _fresh_inverse(layer, z), rtol=0, atol=1e-12)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", CLASSES)
def test_cache_invalidated_by_load_state_dict(cls):
    a = cls((4, 2, 2), seed=0).double().eval()
    b = perturb(cls((4, 2, 2), seed=1).double().eval())
    z = randn(3, 4, 2, 2)
    with torch.no_grad():
        a(z), a.inverse(z)
        assert len(a._derived) > 0
        buffer = io.BytesIO()
        torch.save(b.state_dict(), buffer)
        buffer.seek(0)
        a.load_state_dict(torch.load(buffer, weights_only=True))
        torch.testing.assert_close(a.inverse(z), b.inverse(z), rtol=0, atol=1e-12)
        torch.testing.assert_close(a(z), b(z), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", CLASSES)
def test_cache_invalidated_by_dtype_change(cls):
    layer = perturb(cls((4, 2, 2), seed=0)).eval()
    with torch.no_grad():
        layer.inverse(randn(1, 4, 2, 2, dtype=torch.float32))
        layer.double()
        x = randn(3, 4, 2, 2, seed=4)
        z, _ = layer(x)
        x_back, _ = layer.inverse(z)
    assert z.dtype == x_back.dtype == torch.float64
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)


def test_buffers_follow_dtype_changes():
    layer = LUInvertibleConv1x1((3, 1, 1)).double()
    assert layer.sign.dtype == torch.float64 and layer.permutation.dtype == torch.long


@pytest.mark.parametrize("cls", CLASSES)
def test_deepcopy_gets_its_own_cache(cls):
    layer = cls((3, 2, 2), seed=0).double().eval()
    z = randn(2, 3, 2, 2)
    with torch.no_grad():
        layer.inverse(z)
        clone = copy.deepcopy(layer)
        perturb(clone)
        torch.testing.assert_close(clone.inverse(clone(z)[0])[0], z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradients_reach_every_parameter(cls, direction):
    layer = perturb(cls((4, 3, 3), seed=0))
    out, ld = getattr(layer, direction)(torch.randn(5, 4, 3, 3))
    (out.pow(2).sum() - ld.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    if cls is LUInvertibleConv1x1:
        # Only the used triangles receive gradient.
        assert torch.count_nonzero(torch.triu(layer.lower.grad)) == 0
        assert torch.count_nonzero(torch.tril(layer.upper.grad)) == 0


class _Inverse(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, z):
        return self.layer.inverse(z)


@pytest.mark.parametrize("cls", CLASSES)
def test_inverse_is_differentiable_in_the_parameters(cls):
    """gradcheck of the inverse (triangular solves / inv) against finite differences."""
    layer = perturb(cls((3, 1, 2), seed=0).double())
    wrapper = _Inverse(layer)
    z = randn(2, 3, 1, 2, seed=8)
    names = [f"layer.{n}" for n, _ in layer.named_parameters()]

    def inverse_of(*values):
        return torch.func.functional_call(wrapper, dict(zip(names, values)), (z,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in layer.parameters())
    assert torch.autograd.gradcheck(inverse_of, inputs)


@pytest.mark.parametrize("cls", CLASSES)
def test_wrong_channel_count_is_a_clear_error(cls):
    layer = cls((4, 2, 2))
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.forward: expected input of shape \(\.\.\., 4, 2, 2\)"):
        layer(torch.randn(1, 3, 2, 2))


def test_random_rotation_is_orthogonal():
    q = random_rotation(7, seed=0, dtype=torch.float64)
    torch.testing.assert_close(q @ q.T, torch.eye(7, dtype=torch.float64))


@cuda
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(cls, dtype):
    layer = perturb(cls((6, 4, 4), seed=0)).to("cuda", dtype)
    x = randn(3, 6, 4, 4, dtype=dtype, device="cuda")
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(ld_inv, -ld, **tol)
    layer.eval()
    with torch.no_grad():
        x_back = layer.inverse(layer(x)[0])[0]
        layer.cpu()
        x_cpu = layer.inverse(layer(x.cpu())[0])[0]
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(x_cpu, x.cpu(), **tol)


def test_a_subclass_that_overrides_a_builder_is_not_served_the_parents_cached_inverse():
    """Registered derivations are the exact class's: under torch.compile a subclass's own
    ``_build_inverse_weight`` is what its eval-mode inverse uses."""

    class Scaled(LUInvertibleConv1x1):
        def _build_inverse_weight(self):
            return 0.5 * super()._build_inverse_weight()

    layer = Scaled((4, 2, 2), seed=0).eval()
    z = torch.randn(3, 4, 2, 2)
    with torch.no_grad():
        expected, _ = layer.inverse(z)
        torch._dynamo.reset()
        actual, _ = torch.compile(layer.inverse, backend="eager")(z)
    torch.testing.assert_close(actual, expected)
    assert Scaled._derivations == {} and LUInvertibleConv1x1._derivations


@pytest.mark.parametrize("channels", [3, 12])
@pytest.mark.parametrize("grad", [False, True])
def test_apply_channel_matrix_traced_matches_eager(grad, channels):
    """Traced, the product takes the form chosen for the channel count: without autograd
    multiply-adds (up to UNROLLED_CHANNELS) or pixel-major; with autograd pixel-major (up to
    PIXEL_MAJOR_TRAINING_CHANNELS, a channels-last result) or the bmm (a contiguous one).
    Values and gradients match the eager ones either way."""
    from flowplugins.bijectors.conv1x1 import (
        PIXEL_MAJOR_TRAINING_CHANNELS, UNROLLED_CHANNELS, apply_channel_matrix,
    )

    assert 3 <= UNROLLED_CHANNELS < 12 and 3 <= PIXEL_MAJOR_TRAINING_CHANNELS < 12
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, channels, generator=g, requires_grad=grad)
    bias = torch.randn(5, generator=g)
    x = torch.randn(4, channels, 2, 6, generator=g, requires_grad=grad)
    torch._dynamo.reset()
    compiled = torch.compile(apply_channel_matrix, backend="eager")
    with torch.set_grad_enabled(grad):
        for b in (None, bias):
            expected = torch.einsum("oc,nchw->nohw", weight, x) + (0 if b is None else b.view(1, -1, 1, 1))
            actual = compiled(weight, x, b)
            assert actual.shape == (4, 5, 2, 6)
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
            if not grad:
                continue
            pixel_major = channels <= PIXEL_MAJOR_TRAINING_CHANNELS
            assert actual.is_contiguous(memory_format=torch.channels_last) == pixel_major
            assert actual.is_contiguous() != pixel_major
            seed = torch.randn(actual.shape, generator=g)
            want = torch.autograd.grad(expected, (weight, x), seed)
            got = torch.autograd.grad(actual, (weight, x), seed)
            for a, e in zip(got, want):
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
