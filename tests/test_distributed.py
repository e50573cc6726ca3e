"""Data-parallel training (DDP) on CPU with gloo: two processes, one thread each.

The multi-process tests start their ranks with ``torch.multiprocessing`` (spawn) or ``torchrun``
and compare them against a single-process computation done here, in the test process, which
has no process group (so ActNorm and the batch-norm flow reduce nothing).
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from flowplugins.data import EpochShuffleSampler, ImageData, ImageSplit, batch_loader, bits_per_dim
from flowplugins.training import ConfigError, ModelConfig, TrainConfig, TrainingError, build_model, load_checkpoint
from flowplugins.training.dequantization import build_dequantizer
from flowplugins.training.distributed import (
    DistributedRuntime, ShardedEpochSampler, distributed_env, noise_scope, noise_seed)
from flowplugins.training.loop import LogProbObjective, Runtime, init_runtime
from flowplugins.training.precision import autocast_conditioners

WORLD = 2
LOCAL_BATCH = 8
STEPS = 4
N_LEVELS = 17


def tiny_data(n_train: int = 96, n_val: int = 16, n_test: int = 16) -> ImageData:
    """Random 1x8x8 images with 17 levels: enough for the equivalences tested here."""
    g = torch.Generator().manual_seed(123)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, N_LEVELS, (n, 1, 8, 8), generator=g).to(torch.uint8)
        return ImageSplit(images, torch.randint(0, 10, (n,), generator=g))

    return ImageData("tiny", split(n_train), split(n_val), split(n_test), N_LEVELS, 10)


def model_config(arch: str) -> ModelConfig:
    if arch == "glow":
        return ModelConfig(arch="glow", levels=2, depth=2, hidden=16, dropout=0.0)
    return ModelConfig(arch="realnvp", levels=2, depth=1, hidden=8, dropout=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def actnorm_params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if ".log_scale" in k or ".shift" in k}


# ------------------------------------------------------------------------- no processes
def test_sharded_sampler_deals_out_the_single_process_batches():
    n, seed, batch = 101, 7, 5
    single = EpochShuffleSampler(n, seed)
    shards = [ShardedEpochSampler(n, WORLD, r, seed) for r in range(WORLD)]
    for epoch in (0, 3):
        single.set_epoch(epoch)
        for s in shards:
            s.set_epoch(epoch)
        order = list(single)
        local = [list(s) for s in shards]
        assert all(len(x) == len(local[0]) for x in local)
        for step in range(len(local[0]) // batch):
            union = sorted(i for x in local for i in x[step * batch:(step + 1) * batch])
            assert union == sorted(order[step * batch * WORLD:(step + 1) * batch * WORLD])


def test_noise_seed_is_a_function_of_the_position_only():
    assert noise_seed(1, 2, 3, 0) == noise_seed(1, 2, 3, 0)
    assert len({noise_seed(1, 2, 3, r) for r in range(8)}) == 8
    assert noise_seed(1, 2, 3, 0) != noise_seed(1, 3, 2, 0)
    before = torch.get_rng_state()
    with noise_scope(0, 1, 2, 1):
        a = torch.rand(3)
    with noise_scope(0, 1, 2, 1):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)


def test_without_launcher_variables_training_is_single_process(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed_env() is None
    rt = init_runtime(TrainConfig())
    assert type(rt) is Runtime and rt.world_size == 1 and rt.local_batch_size(64) == 64
    assert rt.average(6.0, 4) == 1.5


def test_launcher_variables_are_validated(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="RANK < WORLD_SIZE"):
        distributed_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(TrainingError, match="integers"):
        distributed_env()


def test_global_batch_must_divide_among_ranks():
    rt = DistributedRuntime(rank=0, world_size=3)
    assert rt.local_batch_size(48) == 16
    with pytest.raises(TrainingError, match="divisible by the 3 processes; got 64"):
        rt.local_batch_size(64)


def test_amp_option_is_validated():
    assert TrainConfig(amp="bf16").validate().amp == "bf16"
    with pytest.raises(ConfigError, match="amp must be 'bf16' or None; got 'fp16'"):
        TrainConfig(amp="fp16").validate()


def test_bf16_conditioners_keep_the_flow_and_its_log_det_in_float32():
    torch.manual_seed(0)
    data = tiny_data()
    model = build_model(model_config("glow"), data.describe())
    x = (data.train.images[:16].float() + 0.5) / N_LEVELS
    model.log_prob(x)  # ActNorm's data-dependent init, in float32
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv_out" in name:  # move the zero-initialised last convs off zero
                p.normal_(0, 0.05)
        reference = model.log_prob(x)
    names = autocast_conditioners(model, "cpu")
    assert names and all(n.endswith(("net", "conv")) for n in names)
    assert autocast_conditioners(model, "cpu") == names  # idempotent
    log_prob = model.log_prob(x)
    assert log_prob.dtype == torch.float32
    torch.testing.assert_close(log_prob, reference, rtol=2e-2, atol=0.5)
    (-log_prob.mean()).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    assert set(model.state_dict()) == set(build_model(model_config("glow"), data.describe()).state_dict())


# ----------------------------------------------------- (a) + (b): DDP steps vs one process
def make_optimizer(module):
    # Not Adam: its first step is lr·sign(g), and right after ActNorm's data-dependent init the
    # gradients of its parameters cancel to ~0 by construction (the batch's output has mean 0
    # and std 1), so their signs are float rounding noise; Adam would amplify a change of
    # summation order — two ranks, or another thread count in one process — into 1e-3 steps.
    # The training loop's AdamW is exercised by the resume test below.
    return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)


def _steps_worker(rank: int, world: int, port: int, out: str) -> None:
    rank_env(rank, world, port)
    torch.set_num_threads(1)
    data = tiny_data()
    results = {}
    for arch in ("glow", "realnvp"):
        config = TrainConfig(model=model_config(arch)).validate()
        rt = init_runtime(config)
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.describe())
        deq = build_dequantizer(config.dequantization, data.event_shape, N_LEVELS)
        trainable = LogProbObjective(model, deq)
        objective = rt.wrap(trainable)
        optimizer = make_optimizer(trainable)
        sampler = rt.sampler(len(data.train), config.seed)
        loader = batch_loader(data.train, rt.local_batch_size(LOCAL_BATCH * world), sampler=sampler)
        sampler.set_epoch(0)
        losses, first = [], None
        for step, (levels, _) in zip(range(STEPS), loader):
            bpd = bits_per_dim(objective(levels), 64, N_LEVELS)
            losses.append(rt.average(float(bpd.detach().sum()), len(bpd)))
            if first is None:
                first = actnorm_params(model)
            optimizer.zero_grad()
            bpd.mean().backward()
            optimizer.step()
        results[arch] = {"first": first, "losses": losses,
                         "state": {k: v.clone() for k, v in trainable.state_dict().items()}}
    torch.save(results, Path(out) / f"rank{rank}.pt")
    gc.collect()
    torch.distributed.destroy_process_group()


def _single_process_reference(arch: str, data: ImageData):
    """The same steps in one process on the concatenated global batches, with each image's
    dequantization noise drawn as its rank drew it."""
    config = TrainConfig(model=model_config(arch)).validate()
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.describe())
    deq = build_dequantizer(config.dequantization, data.event_shape, N_LEVELS)
    trainable = LogProbObjective(model, deq)
    optimizer = make_optimizer(trainable)
    sampler = EpochShuffleSampler(len(data.train), config.seed)
    sampler.set_epoch(0)
    order = list(sampler)
    losses, first = [], None
    global_batch = LOCAL_BATCH * WORLD
    for step in range(STEPS):
        xs, log_qs = [], []
        for r in range(WORLD):  # rank r holds global positions step*GB + j*WORLD + r
            index = order[step * global_batch + r:(step + 1) * global_batch:WORLD]
            with noise_scope(config.seed, 0, step, r):
                x, log_q = deq(data.train.images[index])
            xs.append(x)
            log_qs.append(log_q)
        elbo = model.log_prob(torch.cat(xs)) - torch.cat(log_qs)
        bpd = bits_per_dim(elbo, 64, N_LEVELS)
        losses.append(float(bpd.detach().mean()))
        if first is None:
            first = actnorm_params(model)
        optimizer.zero_grad()
        bpd.mean().backward()
        optimizer.step()
    return first, losses, trainable.state_dict()


def test_ddp_matches_one_process_on_the_global_batch(tmp_path):
    mp.start_processes(_steps_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = tiny_data()
    for arch in ("glow", "realnvp"):
        got = [r[arch] for r in ranks]
        first, losses, state = _single_process_reference(arch, data)
        # (a) ActNorm's init after the first batch: identical on both ranks, equal to the init
        # on the concatenated batch
        for key, value in first.items():
            assert torch.equal(got[0]["first"][key], got[1]["first"][key]), key
            torch.testing.assert_close(got[0]["first"][key], value, rtol=0, atol=1e-6, msg=key)
        # (b) after a few optimizer steps: identical on both ranks (every buffer too), and the
        # loss trajectory of one process on the same global batches
        for key, value in got[0]["state"].items():
            assert torch.equal(value, got[1]["state"][key]), key
        assert got[0]["losses"] == got[1]["losses"]
        for a, b in zip(got[0]["losses"], losses):
            assert math.isclose(a, b, rel_tol=1e-5), (arch, got[0]["losses"], losses)
        for key, value in state.items():
            torch.testing.assert_close(got[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---------------------------------------------------------- (c): killed and resumed under DDP
class _Killed(Exception):
    pass


def _train_worker(rank: int, world: int, port: int, out: str, kill_at_epoch) -> None:
    rank_env(rank, world, port)
    from flowplugins.training import train
    from flowplugins.training import distributed

    if kill_at_epoch is not None:
        original = distributed.ShardedEpochSampler.set_epoch

        def set_epoch(self, epoch):
            if epoch == kill_at_epoch:  # rank 0 wrote last.pt for the epoch before
                raise _Killed
            original(self, epoch)

        distributed.ShardedEpochSampler.set_epoch = set_epoch
    config = TrainConfig(
        model=model_config("glow"), epochs=2, batch_size=2 * LOCAL_BATCH, warmup_steps=3,
        ema_decay=0.9, eval_samples=1, eval_batch_size=64, sample_count=4, progress=False,
        out=out, seed=3,
    )
    try:
        train(config, data=tiny_data(n_train=64))
    except _Killed:
        # Both ranks stop at the same epoch; meet before tearing the group down, so neither
        # destroys it while the other is still inside a collective (gloo aborts then).
        torch.distributed.barrier()
    finally:
        gc.collect()  # free DDP reducers before their group (see distributed._destroy_group)
        torch.distributed.destroy_process_group()


def _spawn_train(out: Path, kill_at_epoch=None) -> None:
    mp.start_processes(_train_worker, args=(WORLD, free_port(), str(out), kill_at_epoch),
                       nprocs=WORLD, start_method="spawn")


def test_ddp_run_killed_after_an_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    _spawn_train(tmp_path / "straight")
    _spawn_train(tmp_path / "resumed", kill_at_epoch=1)
    killed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert killed["train_state"]["epoch"] == 1 and not (tmp_path / "resumed" / "metrics.json").exists()
    _spawn_train(tmp_path / "resumed")
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["train_state"]["step"] == b["train_state"]["step"] == 2 * (64 // (2 * LOCAL_BATCH))
    for part in ("model", "dequantizer"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for key, value in a["ema"]["shadow"].items():
        assert torch.equal(value, b["ema"]["shadow"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert metrics["history"] == [
        dict(h, seconds=metrics["history"][i]["seconds"])
        for i, h in enumerate(json.loads((tmp_path / "straight" / "metrics.json").read_text())["history"])
    ]


# ------------------------------------------------------------- torchrun, end to end, 2 procs
def test_torchrun_launches_the_training_cli(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flowplugins", "train", "--epochs", "1", "--levels", "1", "--depth", "1",
           "--hidden", "8", "--batch-size", "128", "--eval-samples", "1", "--ema-decay", "0",
           "--dequantization", "uniform", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test_bpd") == 1, proc.stdout  # one summary, from rank 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1350 // 128 and math.isfinite(metrics["test_bpd"])
    for name in ("last.pt", "best.pt", "samples.png", "bpd_curve.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*.tmp"))
