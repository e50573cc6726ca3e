"""Training loop, configuration, checkpoints (atomic, resumable, safe to load), metrics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from flowplugins.nets import CouplingNet
from flowplugins.data import ImageData, load_digits
from flowplugins.training import (
    EMA,
    CheckpointError,
    ConfigError,
    ModelConfig,
    NonFiniteLossError,
    TrainConfig,
    TrainingError,
    build_model,
    evaluate_bpd,
    load_checkpoint,
    load_config_file,
    load_model,
    save_checkpoint,
    train,
)
from flowplugins.training.checkpoint import load_state_strict
from flowplugins.training.loop import _lr_factor, build_adamw

TINY_MODEL = ModelConfig(levels=2, depth=1, hidden=8)


@pytest.fixture(scope="module")
def small_digits() -> ImageData:
    data = load_digits()
    return ImageData("digits", data.train.subset(range(128)), data.val.subset(range(32)),
                     data.test.subset(range(32)), data.n_levels, data.num_classes)


def tiny_config(out, **changes) -> TrainConfig:
    base = dict(model=TINY_MODEL, epochs=1, batch_size=32, warmup_steps=2, eval_samples=1,
                sample_count=4, progress=False, out=str(out), patience=0)
    base.update(changes)
    return TrainConfig(**base)


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)


# ------------------------------------------------------------------------------ config
def test_config_round_trips_through_plain_dicts(tmp_path):
    config = TrainConfig(model=ModelConfig(depth=3, options={"preprocess": "logit"}), lr=3e-4)
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert TrainConfig.from_dict(data) == config
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 3, "model": {"depth": 2}}))
    (tmp_path / "c.yaml").write_text("epochs: 4\nmodel:\n  hidden: 16\n")
    assert load_config_file(tmp_path / "c.json").model.depth == 2
    loaded = load_config_file(tmp_path / "c.yaml")
    assert (loaded.epochs, loaded.model.hidden, loaded.model.depth) == (4, 16, TrainConfig().model.depth)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*'epoch'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="unknown model key.*'width'"):
        TrainConfig.from_dict({"model": {"width": 3}})
    with pytest.raises(ConfigError, match="lr must be positive"):
        TrainConfig(lr=0).validate()
    with pytest.raises(ConfigError, match="compile must be true or false"):
        TrainConfig(compile="yes").validate()
    with pytest.raises(ConfigError, match="model.coupling"):
        TrainConfig(model=ModelConfig(coupling="spline")).validate()
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.yaml")


def test_lr_warmup_then_cosine():
    f = _lr_factor(TrainConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=100)
    assert f(0) == pytest.approx(0.1 * (0.1 + 0.9 * 1.0))
    assert f(9) == pytest.approx(1.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09))))
    assert f(100) == pytest.approx(0.1)
    g = _lr_factor(TrainConfig(warmup_steps=4, lr_schedule="constant"), total_steps=100)
    assert [g(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------ checkpoints
def test_save_checkpoint_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}, "config": {}, "data": {}}, path)
    before = path.read_bytes()

    def torch_save_that_dies(obj, fh):
        fh.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_that_dies)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "config": {}, "data": {}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.randn(100)}, "config": {}, "data": {}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=str(path).replace("\\", "\\\\")):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_foreign_files_are_rejected(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a flowplugins checkpoint"):
        load_checkpoint(tmp_path / "other.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "x", "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):  # weights_only refuses the pickled callable
        load_checkpoint(tmp_path / "evil.pt")


def test_architecture_mismatch_lists_keys():
    a = nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatches .*weight: checkpoint \(4, 2\) vs model \(3, 2\)"):
        load_state_strict(a, nn.Linear(2, 4).state_dict(), "ckpt")
    with pytest.raises(CheckpointError, match="missing keys bias"):
        load_state_strict(a, {"weight": torch.zeros(3, 2)}, "ckpt")


# ------------------------------------------------------------------------------ EMA
def test_ema_averages_and_restores():
    m = nn.Linear(1, 1, bias=False)
    ema = EMA(0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # starts at the current weights
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)  # decay warmed up: min(0.5, 2/11)
    d = 2 / 11
    with ema.applied(m):
        assert m.weight.item() == pytest.approx(d * 1 + (1 - d) * 3)
    assert m.weight.item() == 3.0
    other = EMA(0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 2 and torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_ema_update_matches_the_per_parameter_formula_exactly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Linear(4, 5))
    ema = EMA(0.99)
    reference = {}
    for t in range(6):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m)
        if t == 0:
            reference = {k: p.detach().clone() for k, p in m.named_parameters()}
        else:
            d = min(0.99, (1.0 + t) / (10.0 + t))  # t updates so far
            for k, p in m.named_parameters():
                reference[k].mul_(d).add_(p.detach(), alpha=1.0 - d)  # the per-tensor update
    assert reference.keys() == ema.shadow.keys()
    for k in reference:
        assert torch.equal(ema.shadow[k], reference[k]), k


def test_build_adamw_is_fused_where_torch_has_it_and_falls_back(monkeypatch):
    params = [nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.zeros(2))]
    opt = build_adamw([{"params": params, "weight_decay": 0.1}], lr=1e-3)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    if "fused" in torch.optim.AdamW.__init__.__code__.co_varnames:
        try:
            torch.optim.AdamW([nn.Parameter(torch.zeros(1))], fused=True)
            fused_available = True
        except RuntimeError:
            fused_available = False
        assert bool(opt.param_groups[0].get("fused")) == fused_available

    real = torch.optim.AdamW

    def no_fused(groups, lr, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point CUDA")
        return real(groups, lr=lr, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = build_adamw([{"params": params, "weight_decay": 0.0}], lr=1e-3)
    assert isinstance(opt, real) and not opt.param_groups[0].get("fused")
    opt.zero_grad()
    (params[0].sum() + params[1].sum()).backward()
    opt.step()  # the fallback optimizer works


def test_fused_adamw_steps_never_meet_a_stale_eval_cache(small_digits):
    """A fused optimizer step does not bump parameters' version counters, which the eval-mode
    caches of W, W⁻¹ and the fused runs key on; the mode switch that training needs clears them."""
    import copy

    torch.manual_seed(0)
    model = build_model(TINY_MODEL, small_digits.describe())
    x = small_digits.train.images[:16].float().add(0.5).div(small_digits.n_levels)
    model(x)  # ActNorm's data init
    opt = build_adamw([{"params": list(model.parameters())}], lr=0.05)
    for _ in range(2):
        model.eval()
        with torch.no_grad():
            model.log_prob(x)  # fills the caches
            model.sample(2)
        model.train()
        opt.zero_grad()
        (-model.log_prob(x).mean()).backward()
        opt.step()
        model.eval()
        twin = copy.deepcopy(model)
        twin.train()
        twin.eval()  # a fresh model with the same weights builds everything anew
        with torch.no_grad():
            torch.testing.assert_close(model.log_prob(x), twin.log_prob(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ training
def test_train_writes_outputs_and_resumes(tmp_path, small_digits):
    log = Log()
    result = train(tiny_config(tmp_path), data=small_digits, log=log)
    for name in ("last.pt", "best.pt", "metrics.json", "samples.png", "bpd_curve.png"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs_run"] == 1 and metrics["stop_reason"] == "max_epochs"
    assert math.isfinite(metrics["test_bpd"]) and metrics["test_bpd"] == result.metrics["test_bpd"]
    assert metrics["uniform_bpd"] == pytest.approx(math.log2(17))
    assert not any("resuming" in m for m in log)

    log = Log()
    result = train(tiny_config(tmp_path, epochs=2), data=small_digits, log=log)
    assert any(m.startswith(f"resuming from {tmp_path / 'last.pt'}") for m in log)
    assert result.metrics["epochs_run"] == 2 and len(result.metrics["history"]) == 2
    assert result.metrics["steps"] == 2 * (128 // 32)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["train_state"]["epoch"] == 2
    fused = build_adamw([{"params": [nn.Parameter(torch.zeros(1))]}], lr=1.0)
    for group in state["optimizer"]["param_groups"]:
        assert group.get("fused") == fused.param_groups[0].get("fused")


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, small_digits):
    # A constant schedule after warmup: a cosine schedule depends on the epoch count itself.
    def config(out, epochs):
        return tiny_config(out, epochs=epochs, lr_schedule="constant")

    train(config(tmp_path / "a", 2), data=small_digits, log=Log())
    train(config(tmp_path / "b", 1), data=small_digits, log=Log())
    train(config(tmp_path / "b", 2), data=small_digits, log=Log())
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_resume_refuses_a_different_architecture(tmp_path, small_digits):
    train(tiny_config(tmp_path), data=small_digits, log=Log())
    other = tiny_config(tmp_path, epochs=2, model=ModelConfig(levels=2, depth=2, hidden=8))
    with pytest.raises(CheckpointError, match="model.depth: 1 in the checkpoint, 2 now"):
        train(other, data=small_digits, log=Log())
    train(other, data=small_digits, resume="never", log=Log())  # explicit restart is allowed
    with pytest.raises(TrainingError, match="does not exist"):
        train(tiny_config(tmp_path / "empty"), data=small_digits, resume="always", log=Log())


def test_corrupted_last_checkpoint_stops_resume_with_clear_error(tmp_path, small_digits):
    train(tiny_config(tmp_path), data=small_digits, log=Log())
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted.*--no-resume"):
        train(tiny_config(tmp_path, epochs=2), data=small_digits, log=Log())


class NaNAfter(nn.Module):
    """A model whose log-density becomes NaN after ``good_steps`` training calls."""

    def __init__(self, model: nn.Module, good_steps: int) -> None:
        super().__init__()
        self.model, self.good_steps, self.calls = model, good_steps, 0

    def log_prob(self, x, context=None):
        out = self.model.log_prob(x, context=context)
        if self.training:
            self.calls += 1
            if self.calls > self.good_steps:
                return out * float("nan")
        return out

    def sample(self, n, temperature=1.0, context=None):
        return self.model.sample(n, temperature=temperature, context=context)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, small_digits):
    config = tiny_config(tmp_path, epochs=3)
    torch.manual_seed(0)
    inner = build_model(config.model, small_digits.describe())
    model = NaNAfter(inner, good_steps=4 + 2)  # one full epoch (4 steps) and two more
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 7") as info:
        train(config, data=small_digits, model=model, log=Log())
    assert "last good checkpoint" in str(info.value) and "epoch 1" in str(info.value)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["train_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_early_stopping_selects_on_validation(tmp_path, small_digits):
    config = tiny_config(tmp_path, epochs=30, patience=1, lr=3e-2, warmup_steps=0, ema_decay=0)
    log = Log()
    result = train(config, data=small_digits, log=log)
    m = result.metrics
    vals = [h["val_bpd"] for h in m["history"]]
    assert m["best_val_bpd"] == pytest.approx(min(vals))
    assert m["best_epoch"] == 1 + vals.index(min(vals))
    if m["stop_reason"] == "early_stopping":
        assert m["epochs_run"] < 30 and any("early stopping" in x for x in log)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == m["best_epoch"]


def test_load_model_rebuilds_the_checkpointed_model(tmp_path, small_digits):
    train(tiny_config(tmp_path), data=small_digits, log=Log())
    model, ckpt = load_model(tmp_path / "best.pt")
    assert not model.training and ckpt["data"]["n_levels"] == 17
    bpd = evaluate_bpd(model, small_digits.test, 17, samples=1, seed=1)
    again = evaluate_bpd(model, small_digits.test, 17, samples=1, seed=1)
    assert bpd == again and 0 < bpd < 10


def test_conditional_model_trains(tmp_path, small_digits):
    config = tiny_config(tmp_path, model=ModelConfig(levels=2, depth=1, hidden=8, conditional=True),
                         sample_count=10)
    result = train(config, data=small_digits, log=Log())
    assert math.isfinite(result.metrics["test_bpd"])


@pytest.mark.slow
def test_default_training_reaches_the_quality_target(tmp_path):
    """The issue's bar: default `flowplugins train` ≤ 2.20 test bits/dim on digits, < 10 min."""
    config = TrainConfig(out=str(tmp_path), progress=False)
    result = train(config, log=Log())
    assert result.metrics["test_bpd"] <= 2.20
    assert result.metrics["train_seconds"] < 600


# ------------------------------------------------------------------------------ options
def test_variational_dequantization_trains_and_resumes(tmp_path, small_digits):
    config = tiny_config(tmp_path, dequantization="variational")
    first = train(config, data=small_digits, log=Log())
    assert math.isfinite(first.metrics["test_bpd"])
    state = load_checkpoint(tmp_path / "last.pt")
    assert any(k.startswith("net.") for k in state["dequantizer"])
    log = Log()
    train(config.replace(epochs=2), data=small_digits, log=log)
    assert any(m.startswith("resuming from") for m in log)


def test_variational_dequantizer_log_density_matches_autograd():
    from flowplugins.training.dequantization import VariationalDequantizer

    torch.manual_seed(0)
    deq = VariationalDequantizer((1, 2, 2), n_levels=17).double()
    for p in deq.parameters():
        nn.init.normal_(p, std=0.3)
    levels = torch.randint(0, 17, (1, 1, 2, 2))
    g = torch.Generator().manual_seed(3)
    x, log_q = deq(levels, generator=g)
    assert bool(((x > levels / 17) & (x < (levels + 1) / 17)).all())
    # log q(u) = log N(eps) - log|du/deps|, with du/deps diagonal: check against autograd.
    eps = torch.randn(levels.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = deq.net(levels.double() / 16 - 0.5)
    mu, log_sigma = h.chunk(2, dim=1)
    u_of = lambda e: torch.sigmoid(mu + log_sigma.clamp(-7, 3).exp() * e)  # noqa: E731
    jac = torch.autograd.functional.jacobian(u_of, eps).reshape(4, 4)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum() - torch.logdet(jac)
    assert log_q.item() == pytest.approx(expected.item(), abs=1e-9)


def test_dropout_and_multiscale_architectures_build(tmp_path, small_digits):
    info = small_digits.describe()
    drop = build_model(ModelConfig(levels=2, depth=1, hidden=8, dropout=0.1), info)
    assert any(isinstance(m, CouplingNet) and m.drop is not None and m.drop.p == 0.1
               for m in drop.modules())
    step = ["actnorm", "shuffle_permutation", {"name": "additive_coupling", "hidden": 8}]
    custom = ModelConfig(arch="multiscale", levels=2, depth=1, options={"step": step})
    result = train(tiny_config(tmp_path, model=custom), data=small_digits, log=Log())
    assert math.isfinite(result.metrics["test_bpd"])
    model, _ = load_model(tmp_path / "best.pt")
    assert any(type(s).__name__ == "AdditiveCoupling" for s in model.steps)
    with pytest.raises(ConfigError, match="options.step"):
        ModelConfig(arch="multiscale").validate()


def test_compiled_training_matches_eager_and_resumes_eagerly(tmp_path, small_digits, monkeypatch):
    """``compile=True`` trains the same model as eager (float32 round-off apart): the losses
    and the final weights agree. A run may resume with the option switched, and the
    checkpoints hold the plain modules' state."""
    changes = dict(dequantization="uniform", ema_decay=0.0, grad_clip=0.0)
    # Inductor draws its own random numbers unless told otherwise: the dequantization noise,
    # hence ActNorm's data init, would differ from the eager run's.
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(tiny_config(tmp_path / "compiled", compile=True, **changes), data=small_digits)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    eager = train(tiny_config(tmp_path / "eager", **changes), data=small_digits)
    got, want = compiled.metrics["history"][0], eager.metrics["history"][0]
    assert got["train_bpd"] == pytest.approx(want["train_bpd"], rel=1e-4)
    assert got["val_bpd"] == pytest.approx(want["val_bpd"], rel=1e-4)
    state = load_checkpoint(compiled.last_checkpoint)["model"]
    reference = load_checkpoint(eager.last_checkpoint)["model"]
    assert state.keys() == reference.keys() and not any("_orig_mod" in k for k in state)
    # Adam(W) turns round-off-sized gradients into full steps of size lr, so a weight may
    # differ by up to (steps · lr) between the two runs; 4 steps here, lr ramping to 1e-3.
    for key in state:
        torch.testing.assert_close(state[key], reference[key], rtol=0, atol=4e-3, msg=key)
    log = Log()
    again = train(tiny_config(tmp_path / "compiled", epochs=2, **changes), data=small_digits, log=log)
    assert again.metrics["history"][-1]["epoch"] == 2
    assert any("compile True -> False" in line for line in log), log
