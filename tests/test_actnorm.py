"""Tests of flowplugins.bijectors.actnorm."""

from __future__ import annotations

import io

import pytest
import torch

from flowplugins.bijectors import actnorm as actnorm_module
from flowplugins.bijectors.actnorm import ActNorm, channel_moments_from_sums, channel_sums
from helpers import autograd_logabsdet, perturb

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def data(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Per-channel offsets and scales far from (0, 1) so the init has something to undo.
    c = shape[-3]
    offset = torch.linspace(-3.0, 5.0, c).view(c, 1, 1)
    scale = torch.linspace(0.2, 4.0, c).view(c, 1, 1)
    return (offset + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("batch_shape", [(7,), (3, 4), (2, 1, 3)])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_init_standardizes_each_channel_over_all_batch_dims(batch_shape, scale):
    layer = ActNorm((3, 4, 5), scale=scale)
    x = data(*batch_shape, 3, 4, 5)
    z, ld = layer(x)
    assert bool(layer.initialized)
    assert z.shape == x.shape and ld.shape == batch_shape
    per_channel = z.movedim(-3, 0).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.full((3,), scale), atol=1e-4, rtol=1e-4)


def test_init_happens_once():
    layer = ActNorm((2, 3, 3))
    layer(data(8, 2, 3, 3, seed=1))
    params = [p.detach().clone() for p in layer.parameters()]
    layer(data(8, 2, 3, 3, seed=2) * 10)
    for before, after in zip(params, layer.parameters()):
        assert torch.equal(before, after)


def test_init_is_not_tracked_by_autograd():
    layer = ActNorm((2, 3, 3))
    x = data(4, 2, 3, 3).requires_grad_(True)
    z, _ = layer(x)
    assert layer.log_scale.grad_fn is None and layer.shift.grad_fn is None
    z.sum().backward()
    # If the batch statistics were in the graph, ∂z/∂x would not be the constant exp(log_scale).
    expected = layer.log_scale.detach().exp().expand_as(x)
    torch.testing.assert_close(x.grad, expected)


def test_eval_forward_does_not_initialize():
    layer = ActNorm((2, 3, 3)).eval()
    x = data(4, 2, 3, 3)
    z, ld = layer(x)
    assert not bool(layer.initialized)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(ld, torch.zeros(4))


def test_inverse_on_fresh_module_does_not_initialize():
    layer = ActNorm((2, 3, 3))
    z = data(4, 2, 3, 3)
    x, ld = layer.inverse(z)
    assert not bool(layer.initialized)
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(ld, torch.zeros(4))
    assert torch.count_nonzero(layer.log_scale) == 0 and torch.count_nonzero(layer.shift) == 0
    # The first *forward* afterwards still initialises.
    layer(z)
    assert bool(layer.initialized)


def test_flag_survives_save_and_load_into_fresh_module():
    layer = ActNorm((3, 2, 2))
    layer(data(16, 3, 2, 2, seed=3))
    assert "initialized" in layer.state_dict()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = ActNorm((3, 2, 2))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(fresh.initialized)
    fresh.train()
    x = data(16, 3, 2, 2, seed=4) * 7
    z_fresh, ld_fresh = fresh(x)
    z_ref, ld_ref = layer(x)
    torch.testing.assert_close(z_fresh, z_ref)
    torch.testing.assert_close(ld_fresh, ld_ref)
    torch.testing.assert_close(fresh.log_scale, layer.log_scale)


def test_loading_an_uninitialized_state_resets_the_flag():
    layer = ActNorm((2, 2, 2))
    layer(data(8, 2, 2, 2, seed=5))
    layer.load_state_dict(ActNorm((2, 2, 2)).state_dict())
    assert not bool(layer.initialized)
    layer(data(8, 2, 2, 2, seed=6))
    assert bool(layer.initialized)
    assert torch.count_nonzero(layer.shift) == 2


def test_constant_channel_is_finite():
    layer = ActNorm((3, 4, 4))
    x = data(6, 3, 4, 4)
    x[:, 1] = 2.5
    z, ld = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()
    assert torch.isfinite(layer.log_scale).all()
    torch.testing.assert_close(z[:, 1], torch.zeros(6, 4, 4))
    x_back, _ = layer.inverse(z)
    assert torch.isfinite(x_back).all()


def test_single_element_batch_is_finite():
    layer = ActNorm((2, 1, 1))
    z, ld = layer(torch.tensor([[[[1.0]], [[-4.0]]]]))
    assert torch.isfinite(z).all() and torch.isfinite(ld).all()


def test_empty_batch_leaves_layer_uninitialized():
    layer = ActNorm((2, 2, 2))
    z, ld = layer(torch.zeros(0, 2, 2, 2))
    assert z.shape == (0, 2, 2, 2) and ld.shape == (0,)
    assert not bool(layer.initialized)


def test_moments_from_summed_chunks_equal_moments_of_concatenated_batch():
    x = data(12, 4, 3, 3, dtype=torch.float64, seed=7)
    total = sum(channel_sums(chunk) for chunk in x.split([5, 1, 6]))
    mean, var = channel_moments_from_sums(total)
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)


def test_channel_sums_accumulate_in_float64():
    sums = channel_sums(data(4, 2, 2, 2, dtype=torch.float32))
    assert sums.dtype == torch.float64 and sums.shape == (5,) and sums[0].item() == 16


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(3, 1), torch.tensor([0.0, 1.0, 1.0])])
def test_moments_reject_bad_sums(bad):
    with pytest.raises(ValueError, match="ActNorm"):
        channel_moments_from_sums(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distributed_init_uses_global_batch(monkeypatch, dtype):
    """Emulate two ranks: each all-reduce adds the other rank's sums."""
    x = data(10, 3, 2, 2, dtype=dtype, seed=8)
    shards = [x[:3], x[3:]]
    reference = ActNorm((3, 2, 2)).to(dtype)
    reference(x)

    monkeypatch.setattr(actnorm_module, "_distributed_active", lambda: True)
    for rank, shard in enumerate(shards):
        other = shards[1 - rank]

        def fake_all_reduce(tensor, *args, other=other, **kwargs):
            tensor.add_(channel_sums(other))

        monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
        layer = ActNorm((3, 2, 2)).to(dtype)
        layer(shard)
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else {}
        torch.testing.assert_close(layer.shift, reference.shift, **tol)
        torch.testing.assert_close(layer.log_scale, reference.log_scale, **tol)


def _gloo_worker(rank, world_size, init_file, x, out):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        layer = ActNorm((3, 2, 2)).double()
        layer(x.chunk(world_size)[rank])
        out[rank] = torch.cat([layer.shift.flatten(), layer.log_scale.flatten()]).detach()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_distributed_init_with_real_process_group(tmp_path):
    """Two real gloo ranks, each initialising from its half of the batch."""
    import torch.multiprocessing as mp

    x = data(8, 3, 2, 2, dtype=torch.float64, seed=9)
    reference = ActNorm((3, 2, 2)).double()
    reference(x)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), x, out), nprocs=2, join=True)
    expected = torch.cat([reference.shift.flatten(), reference.log_scale.flatten()]).detach()
    for rank in range(2):
        torch.testing.assert_close(out[rank], expected, rtol=1e-10, atol=1e-10)


def test_logabsdet_matches_autograd_jacobian():
    layer = ActNorm((2, 2, 3)).double()
    layer(data(8, 2, 2, 3, dtype=torch.float64))
    perturb(layer, 0.5)
    x = data(3, 2, 2, 3, dtype=torch.float64, seed=10)
    _, ld = layer(x)
    torch.testing.assert_close(ld, autograd_logabsdet(layer, x), rtol=1e-10, atol=1e-10)
    z, _ = layer(x)
    _, ld_inv = layer.inverse(z)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        ld_inv, autograd_logabsdet(layer.inverse, z), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float64, dict(rtol=0, atol=1e-10)), (torch.float32, dict(rtol=1e-5, atol=1e-5))]
)
def test_round_trip_after_perturbation(dtype, tol):
    layer = ActNorm((3, 4, 4)).to(dtype)
    layer(data(8, 3, 4, 4, dtype=dtype))
    perturb(layer, 0.5)
    x = data(2, 5, 3, 4, 4, dtype=dtype, seed=11)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, **tol)
    torch.testing.assert_close(ld_inv, -ld, **tol)


def test_gradients_reach_every_parameter():
    layer = ActNorm((3, 2, 2))
    layer(data(8, 3, 2, 2))
    z, ld = layer(data(8, 3, 2, 2, seed=12))
    (z.pow(2).sum() - ld.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_logabsdet_of_each_sample_is_independent_of_the_batch():
    layer = perturb(ActNorm((2, 3, 3)).eval(), 0.5)
    x = data(4, 2, 3, 3)
    _, ld = layer(x)
    _, ld_one = layer(x[2:3])
    torch.testing.assert_close(ld[2:3], ld_one)


@pytest.mark.parametrize("kwargs", [dict(scale=0.0), dict(scale=-1.0), dict(eps=0.0), dict(eps=float("nan")), dict(scale="1")])
def test_invalid_options_are_rejected(kwargs):
    with pytest.raises(ValueError, match="ActNorm: (scale|eps) must be a positive finite number"):
        ActNorm((2, 2, 2), **kwargs)


def test_class_attributes_and_repr():
    assert ActNorm.data_dependent_init is True
    assert "scale=1.0" in repr(ActNorm((1, 1, 1)))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(dtype):
    layer = ActNorm((3, 4, 4)).to("cuda", dtype)
    x = data(8, 3, 4, 4, dtype=dtype).cuda()
    z, ld = layer(x)
    assert bool(layer.initialized) and z.is_cuda and ld.is_cuda
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(3, device="cuda", dtype=dtype), atol=1e-5, rtol=0)
    x_back, _ = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("restored", [False, True], ids=["fresh", "restored"])
def test_traced_initialisation_matches_eager_and_keeps_restored_parameters(restored):
    """Under torch.compile ActNorm initialises inside the graph: the same parameters as the
    eager two-pass init for a fresh layer, and none changed for a layer loaded from a state
    dict (its Python flag is false, its buffer true)."""
    x = 3 + 2 * torch.randn(16, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    eager = ActNorm((4, 5, 5))
    eager(x)
    layer = ActNorm((4, 5, 5))
    if restored:
        source = ActNorm((4, 5, 5))
        source(x + 1)
        layer.load_state_dict(source.state_dict())
        eager = source
    assert not layer._known_initialized
    torch._dynamo.reset()
    z, ld = torch.compile(layer, backend="eager")(x)
    assert layer._known_initialized and bool(layer.initialized)
    torch.testing.assert_close(layer.shift, eager.shift, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.log_scale, eager.log_scale, rtol=1e-6, atol=1e-6)
    if restored:
        assert torch.equal(layer.shift, source.shift) and torch.equal(layer.log_scale, source.log_scale)
    expected_z, expected_ld = eager(x)
    torch.testing.assert_close(z, expected_z, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ld, expected_ld, rtol=1e-6, atol=1e-6)
