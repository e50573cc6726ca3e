"""An nflows ``Flow`` built by hand from ``MultiscaleCompositeTransform`` and flowplugins pieces.

Every piece comes from the registry with ``flowplugins.build(name, shape, backend="nflows")``
(an ``nflows.transforms.Transform``, forward = data → latent); nflows' own
``MultiscaleCompositeTransform`` does the factoring-out between levels, with our learned
``split2d_prior`` as the last transform of each level, and nflows' ``StandardNormal`` is the
base. Trained with plain PyTorch on the 8x8 digits; reports test bits/dim and writes samples.

    python examples/nflows_multiscale.py           # a few minutes on 2 cores
    python examples/nflows_multiscale.py --fast    # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from nflows.distributions import StandardNormal
from nflows.flows import Flow
from nflows.transforms import CompositeTransform, MultiscaleCompositeTransform

import flowplugins
from flowplugins.data import batch_loader, bits_per_dim, dequantize, load_digits, EpochShuffleSampler
from flowplugins.training import save_grid


def build_flow(event_shape, levels: int, depth: int, hidden: int) -> Flow:
    transform = MultiscaleCompositeTransform(levels, split_dim=1)
    shape = tuple(event_shape)
    for level in range(levels):
        pieces = []

        def add(name, **options):
            nonlocal shape
            piece = flowplugins.build(name, shape, backend="nflows", **options)
            pieces.append(piece)
            shape = tuple(piece.bijector.output_event_shape())  # shapes come from the layers

        add("squeeze")
        for _ in range(depth):
            add("actnorm")
            add("inv_conv1x1_lu")
            add("affine_coupling", hidden=hidden)
        add("split2d_prior" if level < levels - 1 else "gaussian_prior")
        # nflows factors out the first torch.chunk half, the half split2d_prior standardised,
        # and returns the shape the next level receives.
        shape = tuple(transform.add_transform(CompositeTransform(pieces), shape) or shape)
    return Flow(transform, StandardNormal([math.prod(event_shape)]))


@torch.no_grad()
def test_bpd(flow: Flow, split, n_levels: int) -> float:
    flow.eval()
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for levels, _ in batch_loader(split, 512, drop_last=False):
        x = dequantize(levels, n_levels, generator=g)
        total += float(bits_per_dim(flow.log_prob(x), math.prod(x.shape[1:]), n_levels).sum())
    flow.train()
    return total / len(split)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="runs/nflows_multiscale")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    data = load_digits()
    train = data.train.subset(range(256)) if args.fast else data.train
    flow = build_flow(data.event_shape, levels=2, depth=1 if args.fast else 4,
                      hidden=8 if args.fast else 64)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    warmup = 100
    sampler = EpochShuffleSampler(len(train))
    step, dims = 0, math.prod(data.event_shape)
    for epoch in range(1 if args.fast else args.epochs):
        sampler.set_epoch(epoch)
        for levels, _ in batch_loader(train, 64, sampler=sampler):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * min(1.0, (step + 1) / warmup)
            loss = bits_per_dim(flow.log_prob(dequantize(levels, data.n_levels)), dims,
                                data.n_levels).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 50.0)
            optimizer.step()
            step += 1
        print(f"epoch {epoch + 1}: train {loss.item():.3f} bits/dim", file=sys.stderr)

    bpd = test_bpd(flow, data.test, data.n_levels)
    flow.eval()
    with torch.no_grad():
        x = flow.sample(36)
    path = save_grid(torch.clamp(torch.floor(x * data.n_levels), 0, data.n_levels - 1)
                     / (data.n_levels - 1), f"{args.out}/samples.png")
    print(f"nflows Flow: test bits/dim {bpd:.4f} (uniform {math.log2(data.n_levels):.2f}); "
          f"samples -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
