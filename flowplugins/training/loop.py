"""``train(config)``: maximum-likelihood training of an image flow, with resumable checkpoints.

The pieces are kept apart so that distributed training can be slotted in without touching the
loop: :class:`Runtime` is the process-group view (one process today; DDP wraps the objective
and swaps :class:`~flowplugins.data.EpochShuffleSampler` for a ``DistributedSampler``, and only
the main rank writes files), :func:`~flowplugins.training.model.build_model` builds the model,
:func:`~flowplugins.data.load_data` the data, and :func:`train` runs the loop.

Files in ``config.out``:

* ``last.pt`` — the full training state after the latest finished epoch (model, optimizer,
  scheduler, EMA, epoch, step, best validation bits/dim, history, RNG state), written
  atomically; a rerun with the same ``--out`` resumes from it.
* ``best.pt`` — the (averaged) weights of the epoch with the best *validation* bits/dim.
* ``metrics.json``, ``samples.png``, ``bpd_curve.png`` — written at the end, from ``best.pt``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..data import EpochShuffleSampler, ImageData, batch_loader, bits_per_dim, load_data
from .checkpoint import (CheckpointError, load_checkpoint, load_state_strict,
                         remove_stale_temporaries, save_checkpoint)
from .config import TrainConfig
from .dequantization import build_dequantizer
from .metrics import EMA, evaluate_bpd
from .model import build_model, make_context
from .plotting import plot_bpd_curve, save_grid

__all__ = ["Runtime", "TrainingError", "NonFiniteLossError", "TrainResult", "train",
           "LogProbObjective", "write_json_atomic"]

Logger = Callable[[str], None]


class TrainingError(RuntimeError):
    """Training cannot go on (the message says why and what is kept)."""


class NonFiniteLossError(TrainingError):
    """The loss or its gradient became NaN/Inf; the weights were not updated with it."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _silent(msg: str) -> None:
    pass


@dataclass
class Runtime:
    """Where this process sits in a (possibly distributed) run.

    This class is the single-process run; under ``torchrun``
    :class:`~flowplugins.training.distributed.DistributedRuntime` overrides :meth:`wrap` (DDP),
    :meth:`sampler` (a ``DistributedSampler``), :meth:`local_batch_size` and the reductions
    (``all_reduce``); everything that writes files checks :attr:`is_main`. ``amp="bf16"`` runs
    the conditioner networks under autocast (:mod:`.precision`).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, objective: nn.Module) -> nn.Module:
        if self.amp is not None:
            from .precision import autocast_conditioners

            autocast_conditioners(objective, self.device.type, self.amp)
        return objective

    def sampler(self, n: int, seed: int) -> torch.utils.data.Sampler:
        return EpochShuffleSampler(n, seed)

    def local_batch_size(self, batch_size: int) -> int:
        """This process's share of the global ``batch_size``."""
        return batch_size

    def mean(self, value: float) -> float:
        """The mean over ranks of a number every rank computed."""
        return value

    def average(self, total: float, count: int) -> float:
        """``Σ total / Σ count`` over ranks (not a mean of per-rank means)."""
        return total / count if count else math.nan

    def from_main(self, value: float) -> float:
        """Rank 0's ``value`` on every rank (decisions that must agree, e.g. time limits)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (before reading a file rank 0 wrote)."""


def init_runtime(config: TrainConfig) -> Runtime:
    from .distributed import distributed_env, init_distributed_runtime

    if distributed_env() is not None:
        return init_distributed_runtime(config)
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainingError(f"train: device {config.device!r} asked for but CUDA is not available")
    return Runtime(device=device, amp=config.amp)


class LogProbObjective(nn.Module):
    """``forward(levels, context) = log p(x | context) − log q(u | levels)`` with
    ``x = (levels + u) / n_levels``, ``u ~ q``: the per-image evidence lower bound on the
    discrete log-likelihood (in nats, before the ``D log n_levels`` constant).

    It holds both the flow and the dequantizer, so it is the one module DDP would wrap and the
    gradient all-reduce hooks see the whole pass that produces the loss.
    """

    def __init__(self, model: nn.Module, dequantizer: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.dequantizer = dequantizer

    def forward(self, levels: Tensor, context: Optional[Tensor] = None) -> Tensor:
        x, log_q = self.dequantizer(levels)
        return self.model.log_prob(x, context=context) - log_q


@dataclass
class TrainResult:
    out: Path
    metrics: Dict[str, Any]
    best_checkpoint: Path
    last_checkpoint: Path


def write_json_atomic(data: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = config.warmup_steps

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        if config.lr_schedule == "constant":
            return w
        progress = min(1.0, step / max(1, total_steps))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return w * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)

    return factor


def _compatible(saved: Dict[str, Any], config: TrainConfig, data: ImageData, path: Path) -> List[str]:
    """Raise if the checkpoint is for another model or data set; return harmless differences."""
    now = config.to_dict()
    then = saved["config"]
    model_diff = [
        f"model.{k}: {then.get('model', {}).get(k)!r} in the checkpoint, {v!r} now"
        for k, v in now["model"].items() if then.get("model", {}).get(k) != v
    ]
    for key in ("data", "dequantization"):
        if then.get(key) != now[key]:
            model_diff.append(f"{key}: {then.get(key)!r} in the checkpoint, {now[key]!r} now")
    if model_diff:
        raise CheckpointError(
            f"{path} was written for a different run ({'; '.join(model_diff)}); pass another "
            f"--out, or --no-resume to overwrite it"
        )
    skip = {"model", "data", "dequantization", "out", "progress", "threads"}
    return [f"{k} {then.get(k)!r} -> {v!r}" for k, v in now.items()
            if k not in skip and then.get(k) != v]


def _rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _display(x: Tensor, n_levels: int) -> Tensor:
    """Data in [0, 1) → quantized levels scaled to [0, 1] for a picture."""
    return torch.clamp(torch.floor(x * n_levels), 0, n_levels - 1) / (n_levels - 1)


def build_adamw(param_groups: List[Dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where this torch and the parameters' device have one.

    On CPU torch's default AdamW is a Python loop over the parameters: 4.5 ms per step for the
    186 tensors of the default digits model, against 0.8 ms fused (~8% of its train step). The
    fused kernel is the same update up to rounding. A run resumed from a checkpoint keeps the
    implementation it was saved with (``load_state_dict`` restores the group's ``fused`` flag).
    """
    try:
        return torch.optim.AdamW(param_groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # torch < 2.4 on CPU, or an unsupported device
        return torch.optim.AdamW(param_groups, lr=lr)


def train(
    config: TrainConfig,
    *,
    data: Optional[ImageData] = None,
    model: Optional[nn.Module] = None,
    resume: str = "auto",
    log: Logger = _stderr,
) -> TrainResult:
    """Train a flow by maximum likelihood on dequantized images.

    Args:
        config: the run's configuration (validated here).
        data: the data set (default: ``load_data(config.data, ...)``).
        model: a prebuilt model (default: ``build_model(config.model, data)``).
        resume: ``"auto"`` (resume when ``out/last.pt`` exists), ``"always"`` (it must exist)
            or ``"never"`` (start over, overwriting the directory's checkpoints).
        log: where messages go (stderr by default): "resuming from …", early stopping, the
            final summary, and — with ``config.progress`` — a line per epoch.

    Raises:
        NonFiniteLossError: the loss or gradient norm went NaN/Inf; ``last.pt`` is left as it
            was after the last finished epoch.
        CheckpointError: the checkpoint to resume from is damaged or from another run.
        TrainingError: ``resume="always"`` without a checkpoint.
    """
    config.validate()
    if resume not in ("auto", "always", "never"):
        raise ValueError(f"train: resume must be 'auto', 'always' or 'never'; got {resume!r}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rt = init_runtime(config)
    if not rt.is_main:
        log = _silent  # one copy of each message, from rank 0
    out = Path(config.out)
    last_path, best_path = out / "last.pt", out / "best.pt"

    data = data if data is not None else load_data(
        config.data, config.data_root, config.download, config.val_size
    )
    info = data.describe()
    n_levels, dims = data.n_levels, math.prod(data.event_shape)

    torch.manual_seed(config.seed)
    model = model if model is not None else build_model(config.model, info)
    model.to(rt.device)
    dequantizer = build_dequantizer(config.dequantization, data.event_shape, n_levels).to(rt.device)
    trainable = LogProbObjective(model, dequantizer)
    objective = rt.wrap(trainable)
    if config.compile:
        # Only the training pass: checkpoints, evaluation and sampling use the eager modules.
        objective = torch.compile(objective)
    decay, no_decay = [], []
    for p in trainable.parameters():
        (decay if p.dim() > 1 else no_decay).append(p)
    optimizer = build_adamw(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    sampler = rt.sampler(len(data.train), config.seed)
    loader = batch_loader(data.train, rt.local_batch_size(config.batch_size), sampler=sampler,
                          drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError(
            f"train: batch size {config.batch_size} is larger than the {len(data.train)} "
            f"training images"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(config, config.epochs * steps_per_epoch)
    )
    ema = EMA(config.ema_decay) if config.ema_decay > 0 else None

    def context_of(labels: Tensor) -> Optional[Tensor]:
        ctx = make_context(config.model, data.num_classes, labels)
        return ctx.to(rt.device) if ctx is not None else None

    state: Dict[str, Any] = {
        "epoch": 0, "step": 0, "best_val_bpd": math.inf, "best_epoch": None,
        "bad_epochs": 0, "history": [], "train_seconds": 0.0, "stop_reason": None,
    }

    if rt.is_main:
        for stale in remove_stale_temporaries(out):
            log(f"removed {stale}, left by a run killed while writing a checkpoint")
    if resume == "always" and not last_path.exists():
        raise TrainingError(f"train: --resume given but {last_path} does not exist")
    if resume != "never" and last_path.exists():
        saved = load_checkpoint(last_path, map_location=rt.device)
        changes = _compatible(saved, config, data, last_path)
        load_state_strict(model, saved["model"], f"checkpoint {last_path}")
        load_state_strict(dequantizer, saved.get("dequantizer") or {},
                          f"checkpoint {last_path} (dequantizer)")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None and saved.get("ema"):
            ema.load_state_dict(saved["ema"])
        for key in state:
            if key in saved["train_state"]:
                state[key] = saved["train_state"][key]
        _set_rng_state(saved["rng"])
        best = state["best_val_bpd"]
        log(
            f"resuming from {last_path} (epoch {state['epoch']}, step {state['step']}, "
            f"best val {best:.4f} bits/dim)" + (f"; changed: {', '.join(changes)}" if changes else "")
        )
        # A rerun with more epochs or a fresh time budget continues a run that stopped for those
        # reasons; an early-stopped run stays stopped.
        if state["stop_reason"] in ("max_epochs", "time_limit"):
            state["stop_reason"] = None
            if config.max_minutes is not None:
                state["train_seconds"] = 0.0

    def checkpoint_state() -> Dict[str, Any]:
        return {
            "model": model.state_dict(),
            "dequantizer": dequantizer.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "config": config.to_dict(),
            "data": info,
            "train_state": dict(state),
            "rng": _rng_state(),
        }

    from tqdm.auto import tqdm

    t_start = time.perf_counter() - state["train_seconds"]
    while state["stop_reason"] is None:
        epoch = state["epoch"]
        if epoch >= config.epochs:
            state["stop_reason"] = "max_epochs"
        elif config.max_minutes is not None and state["train_seconds"] >= 60 * config.max_minutes:
            state["stop_reason"] = "time_limit"
        if state["stop_reason"] is not None:
            if rt.is_main and state["history"]:
                save_checkpoint(checkpoint_state(), last_path)
            break
        sampler.set_epoch(epoch)
        model.train()
        running, seen = 0.0, 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}",
                   file=sys.stderr, disable=not (config.progress and rt.is_main),
                   leave=False, dynamic_ncols=True)
        try:
            for levels, labels in loader:
                elbo = objective(levels.to(rt.device), context_of(labels))
                bpd = bits_per_dim(elbo, dims, n_levels).mean()
                if not torch.isfinite(bpd):
                    raise NonFiniteLossError(
                        f"train: non-finite loss ({bpd.item()}) at epoch {epoch + 1}, step "
                        f"{state['step'] + 1}; the weights were not updated with it. "
                        + _kept(last_path, state)
                    )
                optimizer.zero_grad(set_to_none=True)
                bpd.backward()
                norm = nn.utils.clip_grad_norm_(
                    trainable.parameters(), config.grad_clip if config.grad_clip > 0 else math.inf
                )
                if not torch.isfinite(norm):
                    raise NonFiniteLossError(
                        f"train: non-finite gradient norm ({float(norm)}) at epoch {epoch + 1}, "
                        f"step {state['step'] + 1}; the weights were not updated with it. "
                        + _kept(last_path, state)
                    )
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update(trainable)
                state["step"] += 1
                running += float(bpd.detach()) * len(levels)
                seen += len(levels)
                bar.update(1)
                bar.set_postfix(loss=f"{float(bpd.detach()) * dims * math.log(2):.2f}",
                                bpd=f"{running / seen:.3f}", refresh=False)
        finally:
            bar.close()

        averaged = ema.applied(trainable) if ema is not None else contextlib.nullcontext()
        with averaged:
            val_bpd = rt.mean(evaluate_bpd(
                model, data.val, n_levels, config.eval_batch_size, config.eval_samples,
                seed=config.seed + 1, context_fn=context_of, device=rt.device,
                dequantizer=dequantizer,
            ))
            improved = val_bpd < state["best_val_bpd"] - 1e-6
            state["epoch"] = epoch + 1
            if improved:
                state["best_val_bpd"], state["best_epoch"], state["bad_epochs"] = val_bpd, epoch + 1, 0
                if rt.is_main:
                    save_checkpoint({
                        "model": model.state_dict(), "dequantizer": dequantizer.state_dict(),
                        "config": config.to_dict(), "data": info,
                        "epoch": epoch + 1, "val_bpd": val_bpd, "averaged": ema is not None,
                    }, best_path)
            else:
                state["bad_epochs"] += 1
        state["train_seconds"] = rt.from_main(time.perf_counter() - t_start)
        train_bpd = rt.average(running, seen)
        state["history"].append({
            "epoch": epoch + 1, "step": state["step"], "train_bpd": train_bpd,
            "val_bpd": val_bpd, "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(state["train_seconds"], 2),
        })
        if config.progress:
            log(
                f"epoch {epoch + 1}/{config.epochs}  train {train_bpd:.4f}  "
                f"val {val_bpd:.4f} bits/dim  best {state['best_val_bpd']:.4f} @ "
                f"{state['best_epoch']}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                f"{state['train_seconds']:.0f}s"
            )
        if (config.patience and state["bad_epochs"] >= config.patience
                and state["epoch"] >= config.min_epochs):
            state["stop_reason"] = "early_stopping"
            log(f"early stopping: no better validation bits/dim for {config.patience} epochs")
        if rt.is_main:
            save_checkpoint(checkpoint_state(), last_path)

    rt.barrier()  # rank 0 may still be writing best.pt, which every rank reads next
    metrics = _finish(config, data, model, dequantizer, state, best_path, out, rt, context_of, log)
    return TrainResult(out=out, metrics=metrics, best_checkpoint=best_path, last_checkpoint=last_path)


def _kept(last_path: Path, state: Dict[str, Any]) -> str:
    if last_path.exists():
        where = f"The last good checkpoint, {last_path} (epoch {state['epoch']}), is kept"
    else:
        where = "No checkpoint had been written yet"
    return f"{where}; lower --lr or raise --warmup-steps and rerun (it resumes from there)."


def _finish(config: TrainConfig, data: ImageData, model: nn.Module, dequantizer: nn.Module,
            state: Dict[str, Any], best_path: Path, out: Path, rt: Runtime, context_of,
            log: Logger) -> Dict[str, Any]:
    """Test the best-validation weights; write metrics.json, samples.png and bpd_curve.png."""
    if not best_path.exists():
        raise TrainingError(f"train: no {best_path} was written (did any epoch finish?)")
    best = load_checkpoint(best_path, map_location=rt.device)
    load_state_strict(model, best["model"], f"checkpoint {best_path}")
    load_state_strict(dequantizer, best.get("dequantizer") or {},
                      f"checkpoint {best_path} (dequantizer)")
    model.eval()
    test_bpd = rt.mean(evaluate_bpd(
        model, data.test, data.n_levels, config.eval_batch_size, config.eval_samples,
        seed=config.seed + 2, context_fn=context_of, device=rt.device, dequantizer=dequantizer,
    ))
    uniform = math.log2(data.n_levels)
    metrics: Dict[str, Any] = {
        "test_bpd": test_bpd,
        "best_val_bpd": state["best_val_bpd"],
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "steps": state["step"],
        "stop_reason": state["stop_reason"],
        "train_seconds": round(state["train_seconds"], 2),
        "uniform_bpd": uniform,
        "data": data.describe(),
        "config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": state["history"],
        "checkpoint": str(best_path),
    }
    if rt.is_main:
        n = config.sample_count
        with torch.no_grad():
            context = None
            if config.model.conditional:
                labels = torch.arange(n) % data.num_classes
                context = context_of(labels)
            torch.manual_seed(config.seed + 3)
            samples = model.sample(n, temperature=config.sample_temperature, context=context)
        save_grid(_display(samples.cpu(), data.n_levels), out / "samples.png",
                  nrow=data.num_classes if config.model.conditional else None)
        plot_bpd_curve(state["history"], out / "bpd_curve.png", best_epoch=state["best_epoch"],
                       test_bpd=test_bpd, uniform_bpd=uniform,
                       title=f"{config.model.arch} on {data.name}")
        write_json_atomic(metrics, out / "metrics.json")
    log(
        f"test {test_bpd:.4f} bits/dim (best validation {state['best_val_bpd']:.4f} at epoch "
        f"{state['best_epoch']}; uniform {uniform:.2f}); wrote {out / 'metrics.json'}, "
        f"{out / 'samples.png'}, {out / 'bpd_curve.png'}"
    )
    return metrics
