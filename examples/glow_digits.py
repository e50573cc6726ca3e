"""Train Glow (torch backend) on scikit-learn's 8x8 digits and draw samples at several temperatures.

    python examples/glow_digits.py                  # the default recipe (a few minutes on 2 cores)
    python examples/glow_digits.py --fast           # a tiny model for one epoch (smoke test)
    python examples/glow_digits.py --plugin leaky_relu_flow   # a third-party bijector in every step

Writes ``OUT/samples.png``, ``OUT/bpd_curve.png``, ``OUT/metrics.json`` (from the training run)
and ``OUT/temperatures.png``: one row per temperature T (z ~ N(0, T²), Glow §5).
"""

from __future__ import annotations

import argparse
import sys

import torch

import flowplugins
from flowplugins.training import ModelConfig, TrainConfig, save_rows, train

TEMPERATURES = (0.5, 0.7, 0.8, 0.9, 1.0)


def model_config(args: argparse.Namespace) -> ModelConfig:
    base = ModelConfig(depth=1, hidden=8) if args.fast else TrainConfig().model
    if args.plugin is None:
        return base
    if args.plugin not in flowplugins.names():
        raise SystemExit(
            f"bijector {args.plugin!r} is not registered; install the example plugin with\n"
            f"    pip install -e examples/example_plugin"
        )
    # The composer's general builder takes any registered name as part of a step.
    step = ["actnorm", base.permutation, args.plugin,
            {"name": f"{base.coupling}_coupling", "hidden": base.hidden}]
    return ModelConfig(arch="multiscale", levels=base.levels, depth=base.depth,
                       split_prior=base.split_prior, options={"step": step})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny model, one epoch")
    parser.add_argument("--out", default="runs/glow_digits")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--plugin", metavar="NAME", help="registered bijector to add to each step")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)

    config = TrainConfig(model=model_config(args), out=args.out, threads=args.threads)
    if args.fast:
        config = config.replace(epochs=1, eval_samples=1, warmup_steps=5, progress=False)
    if args.epochs:
        config = config.replace(epochs=args.epochs)
    result = train(config)

    from flowplugins.training import load_model

    model, ckpt = load_model(result.best_checkpoint)
    n_levels = ckpt["data"]["n_levels"]
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for t in TEMPERATURES:
            x = model.sample(10, temperature=t)
            rows.append(torch.clamp(torch.floor(x * n_levels), 0, n_levels - 1) / (n_levels - 1))
    path = save_rows(rows, f"{args.out}/temperatures.png")
    print(f"test bits/dim {result.metrics['test_bpd']:.4f} (best validation epoch "
          f"{result.metrics['best_epoch']}); temperatures {TEMPERATURES} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
