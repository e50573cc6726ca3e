"""The training CLI's step against the same step built from torch's defaults.

``flowplugins train`` runs, per batch: the model's NLL (dequantized), backward, gradient-norm
clipping, an AdamW step and an EMA update of the weights. This script times that step on the
CLI's default model and data (the embedded 8x8 digits, batch 64) in four variants that differ
in one ingredient each, added in turn:

* ``torch defaults``: ``nn.Dropout`` in the coupling nets, ``torch.optim.AdamW`` as torch
  builds it on CPU (a Python loop over the parameters) and an EMA updated tensor by tensor;
* ``+ fused AdamW``: :func:`flowplugins.training.loop.build_adamw` (torch's fused kernel);
* ``+ foreach EMA``: :class:`flowplugins.training.EMA` (one foreach call per operation);
* ``flowplugins``: also :class:`flowplugins.nets.Dropout` (its CPU mask is one uniform draw
  and a comparison, not ``bernoulli_``): exactly the CLI's step.

All four models live in one process and are timed in turn, one step of each per iteration, so
they see the same load; the table reports each variant's median per-iteration speed-up over
``torch defaults`` (timings here drift ±20% between rounds, their ratios far less).

Usage::

    python benchmarks/train_step.py --threads 1
    python benchmarks/train_step.py --threads 2 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import add_common_args, child_setup, log, machine_info, markdown_table, median  # noqa: E402

VARIANTS = ["torch defaults", "+ fused AdamW", "+ foreach EMA", "flowplugins"]


class PerTensorEMA:
    """The same average as :class:`flowplugins.training.EMA`, updated one tensor at a time."""

    def __init__(self, decay: float) -> None:
        self.decay, self.num_updates, self.shadow = decay, 0, {}

    def update(self, model) -> None:
        import torch

        with torch.no_grad():
            params = dict(model.named_parameters())
            if not self.shadow:
                self.shadow = {k: p.detach().clone() for k, p in params.items()}
            else:
                d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
                for k, p in params.items():
                    self.shadow[k].mul_(d).add_(p.detach(), alpha=1.0 - d)
        self.num_updates += 1


def build_step(variant: str, config, data, device):
    import torch
    from torch import nn

    from flowplugins.nets import CouplingNet
    from flowplugins.training import EMA, build_model
    from flowplugins.training.dequantization import build_dequantizer
    from flowplugins.training.loop import LogProbObjective, build_adamw
    from flowplugins.training.metrics import bits_per_dim

    torch.manual_seed(config.seed)
    model = build_model(config.model, data.describe())
    if variant != "flowplugins":
        for m in model.modules():
            if isinstance(m, CouplingNet) and m.drop is not None:
                m.drop = nn.Dropout(m.drop.p)
    dequantizer = build_dequantizer(config.dequantization, data.event_shape, data.n_levels)
    objective = LogProbObjective(model, dequantizer).to(device)
    decay = [p for p in objective.parameters() if p.dim() > 1]
    no_decay = [p for p in objective.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = (torch.optim.AdamW(groups, lr=config.lr) if variant == "torch defaults"
                 else build_adamw(groups, config.lr))
    ema = (PerTensorEMA if variant in ("torch defaults", "+ fused AdamW") else EMA)(config.ema_decay)
    dims = math.prod(data.event_shape)
    images = data.train.images
    batches = [images[i:i + config.batch_size].to(device)
               for i in range(0, len(images) - config.batch_size + 1, config.batch_size)]
    state = {"i": 0}

    def step() -> None:
        levels = batches[state["i"] % len(batches)]
        state["i"] += 1
        bpd = bits_per_dim(objective(levels, None), dims, data.n_levels).mean()
        optimizer.zero_grad(set_to_none=True)
        bpd.backward()
        nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(objective)

    return step


def run(args) -> Dict[str, object]:
    from _common import time_interleaved

    from flowplugins.data import load_digits
    from flowplugins.training import TrainConfig

    device = child_setup(args.threads, args.device)
    config = TrainConfig()
    data = load_digits()
    steps = {v: build_step(v, config, data, device) for v in VARIANTS}
    iters = 3 if args.quick else 20
    rounds: List[Dict[str, dict]] = []
    for r in range(args.rounds):
        # time_interleaved's ratios are against its first entry: keep the baseline first.
        got = time_interleaved(steps, device, warmup=1 if args.quick else 3, iters=iters)
        rounds.append(got)
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{v} {got[v]['s'] * 1e3:.1f} ms" for v in VARIANTS))
    summary = {v: {"ms": median([g[v]["s"] * 1e3 for g in rounds]),
                   "speedup": median([g[v]["ratio"] for g in rounds])} for v in VARIANTS}
    return {"machine": machine_info(args.device), "args": vars(args), "rounds": rounds,
            "summary": summary}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.set_defaults(rounds=3)
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"flowplugins train's default step (digits 1x8x8, batch 64); {args.device}, "
          f"{args.threads} thread(s), {args.rounds} round(s)")
    print(markdown_table(
        ["variant", "step ms (median)", "speed-up over torch defaults"],
        [[v, result["summary"][v]["ms"], result["summary"][v]["speedup"]] for v in VARIANTS],
    ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
