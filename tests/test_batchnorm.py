"""Tests of RealNVP's batch-norm flow (flowplugins.bijectors.batchnorm)."""

import doctest
import math

import pytest
import torch

import flowplugins.bijectors.batchnorm as batchnorm_module
from flowplugins.bijectors.batchnorm import BatchNormFlow, channel_mean_var
from flowplugins.testing import perturb_parameters
from helpers import assert_options_match_registry, autograd_logabsdet

F64 = torch.float64


@torch.no_grad()
def perturb(layer: BatchNormFlow, scale: float = 0.3, seed: int = 0) -> None:
    """Move the parameters and the running statistics away from their initial values."""
    gen = torch.Generator().manual_seed(seed)
    perturb_parameters(layer, scale, gen)
    layer.running_mean.add_(torch.randn(layer.running_mean.shape, generator=gen, dtype=F64))
    layer.running_var.mul_(torch.rand(layer.running_var.shape, generator=gen, dtype=F64) + 0.5)


def test_constructor_options_match_the_registry():
    assert_options_match_registry(BatchNormFlow, "batchnorm")
    assert BatchNormFlow.batch_dependent_in_training is True


def test_fresh_layer_in_eval_is_the_identity_with_logabsdet_near_zero():
    c, h, w = 3, 4, 4
    layer = BatchNormFlow((c, h, w)).eval()
    assert torch.equal(layer.running_mean, torch.zeros(c))
    assert torch.equal(layer.running_var, torch.ones(c))
    x = torch.randn(5, c, h, w, dtype=F64)
    z, ld = layer.to(F64)(x)
    torch.testing.assert_close(z, x / math.sqrt(1 + 1e-5))
    assert torch.isfinite(ld).all() and ld.abs().max() < 1e-3
    torch.testing.assert_close(ld, torch.full((5,), -0.5 * c * h * w * math.log1p(1e-5), dtype=F64))


def test_training_forward_normalises_with_batch_statistics():
    layer = BatchNormFlow((3, 4, 5), eps=1e-5).to(F64)
    x = 3 + 2 * torch.randn(8, 3, 4, 5, dtype=F64)
    z, ld = layer(x)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3, dtype=F64))
    torch.testing.assert_close(z.var((0, 2, 3), unbiased=False), var / (var + 1e-5))
    expected = 4 * 5 * (-0.5 * torch.log(var + 1e-5)).sum()
    assert ld.shape == (8,)
    torch.testing.assert_close(ld, expected.repeat(8))
    ld.add_(1.0)  # a real tensor, not an expanded view


def test_training_updates_running_statistics_with_momentum():
    layer = BatchNormFlow((2, 3, 3), momentum=0.25).to(F64)
    x = 1 + 3 * torch.randn(10, 2, 3, 3, dtype=F64)
    layer(x)
    mean = x.mean((0, 2, 3))
    var = x.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.running_mean, 0.25 * mean)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * var)
    assert not layer.running_mean.requires_grad and not layer.running_var.requires_grad
    layer.eval()
    before = layer.running_mean.clone()
    layer(x)
    assert torch.equal(layer.running_mean, before)


def test_gradients_reach_parameters_and_flow_through_batch_statistics():
    layer = BatchNormFlow((2, 3, 3)).to(F64)
    x = torch.randn(4, 2, 3, 3, dtype=F64, requires_grad=True)
    z, ld = layer(x)
    # z[:, 0] sums to N·H·W·beta_0 whatever x is, once the mean's gradient is counted.
    z[:, 0].sum().backward(retain_graph=True)
    torch.testing.assert_close(x.grad, torch.zeros_like(x))
    (z.square().sum() + ld.sum()).backward()
    assert layer.log_gamma.grad.abs().sum() > 0 and layer.beta.grad.abs().sum() > 0


def test_eval_round_trip_and_logabsdet_after_perturbation():
    layer = BatchNormFlow((3, 2, 3)).to(F64)
    perturb(layer)
    layer.eval()
    x = 2 * torch.randn(4, 3, 2, 3, dtype=F64)
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert (x_back - x).abs().max() < 1e-10
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld, autograd_logabsdet(layer, x), rtol=0, atol=1e-10)
    torch.testing.assert_close(ld_inv, autograd_logabsdet(layer.inverse, z), rtol=0, atol=1e-10)


def test_training_logabsdet_is_the_jacobian_with_statistics_held_fixed():
    layer = BatchNormFlow((2, 2, 2)).to(F64)
    perturb(layer)
    x = torch.randn(6, 2, 2, 2, dtype=F64)
    ld_train = layer(x)[1]
    mean, var = channel_mean_var(x)
    frozen = BatchNormFlow((2, 2, 2)).to(F64)
    frozen.load_state_dict(layer.state_dict())
    with torch.no_grad():
        frozen.running_mean.copy_(mean)
        frozen.running_var.copy_(var)
    frozen.eval()
    torch.testing.assert_close(ld_train, autograd_logabsdet(frozen, x))


def test_training_mode_inverse_uses_running_statistics():
    layer = BatchNormFlow((2, 3, 3)).to(F64)
    perturb(layer)
    x = 5 + torch.randn(8, 2, 3, 3, dtype=F64)
    z_train, _ = layer(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x_back_train, ld_train = layer.inverse(z_train)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    # Not the inverse of the training-mode forward (that used the batch's statistics) ...
    assert (x_back_train - x).abs().max() > 1e-3
    # ... but exactly the eval-mode inverse.
    layer.eval()
    x_back_eval, ld_eval = layer.inverse(z_train)
    assert torch.equal(x_back_train, x_back_eval) and torch.equal(ld_train, ld_eval)


def test_extra_batch_dims_pool_statistics_over_all_samples():
    layer = BatchNormFlow((2, 3, 3)).to(F64)
    flat = BatchNormFlow((2, 3, 3)).to(F64)
    x = torch.randn(3, 4, 2, 3, 3, dtype=F64)
    z, ld = layer(x)
    z_flat, ld_flat = flat(x.reshape(12, 2, 3, 3))
    assert z.shape == x.shape and ld.shape == (3, 4)
    torch.testing.assert_close(z.reshape(12, 2, 3, 3), z_flat)
    torch.testing.assert_close(ld.reshape(12), ld_flat)
    torch.testing.assert_close(layer.running_var, flat.running_var)
    layer.eval()
    z, _ = layer(x)
    assert (layer.inverse(z)[0] - x).abs().max() < 1e-10


def test_float32_eval_round_trip():
    layer = BatchNormFlow((3, 4, 4))
    layer(3 * torch.randn(16, 3, 4, 4) + 1)
    layer.eval()
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, rtol=1e-5, atol=1e-5)


def test_state_dict_holds_running_statistics():
    layer = BatchNormFlow((2, 3, 3)).to(F64)
    layer(torch.randn(8, 2, 3, 3, dtype=F64))
    other = BatchNormFlow((2, 3, 3)).to(F64)
    other.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == {"log_gamma", "beta", "running_mean", "running_var"}
    torch.testing.assert_close(other.running_var, layer.running_var)


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_momentum_is_validated(momentum):
    with pytest.raises(ValueError, match=r"BatchNormFlow: momentum must be in \[0, 1\]"):
        BatchNormFlow((2, 3, 3), momentum=momentum)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_is_validated(eps):
    with pytest.raises(ValueError, match="BatchNormFlow: eps must be > 0"):
        BatchNormFlow((2, 3, 3), eps=eps)


def test_channel_mean_var_without_a_process_group():
    x = torch.randn(5, 3, 4, 2, dtype=F64)
    mean, var = channel_mean_var(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False))


def _distributed_worker(rank: int, world_size: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        full = torch.randn(8, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
        sizes = [3, 5]  # unequal local batches
        start = sum(sizes[:rank])
        local = full[start : start + sizes[rank]].clone().requires_grad_(True)
        mean, var = channel_mean_var(local)
        torch.testing.assert_close(mean, full.mean((0, 2, 3)))
        torch.testing.assert_close(var, full.var((0, 2, 3), unbiased=False))

        weights = torch.linspace(0.5, 2.0, 8 * 2 * 9, dtype=F64).reshape(8, 2, 3, 3)
        layer = BatchNormFlow((2, 3, 3)).to(F64)
        z, ld = layer(local)
        ((z * weights[start : start + sizes[rank]]).square().sum() + ld.sum()).backward()

        reference = BatchNormFlow((2, 3, 3)).to(F64)
        full_x = full.clone().requires_grad_(True)
        dist.destroy_process_group()  # the reference runs on the whole batch, locally
        z_ref, ld_ref = reference(full_x)
        ((z_ref * weights).square().sum() + ld_ref.sum()).backward()
        torch.testing.assert_close(z, z_ref[start : start + sizes[rank]])
        torch.testing.assert_close(layer.running_var, reference.running_var)
        # Gradients of the sum of every rank's loss reach each rank's inputs.
        torch.testing.assert_close(local.grad, full_x.grad[start : start + sizes[rank]])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _require_gloo():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    return dist


def test_distributed_code_path_in_a_one_rank_group(tmp_path):
    """Fast, in-process: the all-reduce path (one rank) gives the local statistics and gradients."""
    dist = _require_gloo()
    x = torch.randn(6, 3, 2, 2, dtype=F64, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        z, ld = BatchNormFlow((3, 2, 2)).to(F64)(x)
        (z.pow(3).sum() + ld.sum()).backward()
    finally:
        dist.destroy_process_group()
    z_ref, ld_ref = BatchNormFlow((3, 2, 2)).to(F64)(ref_x)
    (z_ref.pow(3).sum() + ld_ref.sum()).backward()
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(ld, ld_ref)
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.slow  # two spawned processes each import torch: ~10 s on a loaded 2-core machine
def test_statistics_are_global_under_torch_distributed(tmp_path):
    import torch.multiprocessing as mp

    _require_gloo()
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)


def test_train_and_eval_on_device(device):
    layer = BatchNormFlow((3, 4, 4)).to(device=device, dtype=F64)
    x = 2 + torch.randn(6, 3, 4, 4, dtype=F64, device=device)
    z, ld = layer(x)
    assert z.device == ld.device == layer.running_var.device and ld.shape == (6,)
    layer.eval()
    z, ld = layer(x)
    x_back, ld_inv = layer.inverse(z)
    assert (x_back - x).abs().max() < 1e-10
    torch.testing.assert_close(ld_inv, -ld)


def test_docstring_examples_run():
    result = doctest.testmod(batchnorm_module)
    assert result.attempted > 0 and result.failed == 0
