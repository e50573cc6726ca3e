"""A generative classifier p(y) · p(x | y) with Glow layers inside a Pyro program, trained by SVI.

The class-conditional Glow (its split and top priors conditioned on a one-hot label) is the
composer's Pyro backend: a distribution over 8x8 images used as ``pyro.sample("x", d, obs=x)``.
Only some training images keep their label; for the others the label is a latent variable that
``TraceEnum_ELBO`` enumerates exactly, so the ELBO of an unlabelled image is its marginal
likelihood ``log Σ_y p(y) p(x | y)``. At test time the classifier is Bayes' rule,
``argmax_y p(y) p(x | y)``, and bits/dim are those of the marginal ``p(x)``.

    python examples/pyro_glow.py            # a few minutes on 2 cores
    python examples/pyro_glow.py --fast     # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import ClippedAdam
from torch.nn.functional import one_hot

from flowplugins.composer import glow
from flowplugins.data import bits_per_dim, dequantize, load_digits

NUM_CLASSES = 10


def make_program(d):
    """The Pyro model; ``d`` is the conditional flow distribution (Pyro backend)."""

    def model(x_labelled, labels, x_unlabelled):
        pyro.module("glow", d.model)
        class_probs = pyro.param("class_probs", torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES),
                                 constraint=dist.constraints.simplex)
        with pyro.plate("labelled", x_labelled.shape[0]):
            y = pyro.sample("y_known", dist.Categorical(class_probs), obs=labels)
            pyro.sample("x_known", d.condition(one_hot(y, NUM_CLASSES).float()), obs=x_labelled)
        with pyro.plate("unlabelled", x_unlabelled.shape[0]):
            # Enumerated y has shape (NUM_CLASSES, 1): the flow scores every image under every
            # label at once, log p(x | y) of shape (NUM_CLASSES, N), and the ELBO sums y out.
            y = pyro.sample("y", dist.Categorical(class_probs), infer={"enumerate": "parallel"})
            pyro.sample("x", d.condition(one_hot(y, NUM_CLASSES).float()), obs=x_unlabelled)

    def guide(x_labelled, labels, x_unlabelled):
        pass  # nothing to infer but the enumerated label, which the ELBO sums out exactly

    return model, guide


@torch.no_grad()
def evaluate(flow, class_probs, levels, labels, n_levels, draws=2):
    """Accuracy of argmax_y p(y) p(x|y) and bits/dim of the marginal p(x)."""
    flow.eval()
    generator = torch.Generator().manual_seed(1)
    dims = math.prod(levels.shape[1:])
    correct, bpd = 0, 0.0
    for _ in range(draws):
        x = dequantize(levels, n_levels, generator=generator)
        joint = torch.stack([
            flow.log_prob(x, context=one_hot(torch.full((len(x),), k), NUM_CLASSES).float())
            for k in range(NUM_CLASSES)
        ], dim=1) + class_probs.log()
        correct += int((joint.argmax(1) == labels).sum())
        bpd += float(bits_per_dim(torch.logsumexp(joint, 1), dims, n_levels).mean())
    flow.train()
    return correct / (draws * len(labels)), bpd / draws


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="tiny model, few steps")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--labelled", type=float, default=0.2,
                        help="fraction of training images that keep their label")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_digits()
    train, test, n_levels = data.train, data.test, data.n_levels
    if args.fast:
        train, test = train.subset(range(128)), test.subset(range(64))
    epochs = 1 if args.fast else args.epochs
    d = glow(data.event_shape, levels=2, depth=1 if args.fast else 4, hidden=8 if args.fast else 48,
             context_features=NUM_CLASSES, backend="pyro")
    flow = d.model
    model, guide = make_program(d)
    svi = SVI(model, guide, ClippedAdam({"lr": 1e-3, "clip_norm": 50.0}),
              loss=TraceEnum_ELBO(max_plate_nesting=1))

    n_labelled = int(args.labelled * len(train))
    batch = 64
    dims = math.prod(data.event_shape)
    for epoch in range(epochs):
        order = torch.randperm(len(train))
        total = 0.0
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start:start + batch]
            x = dequantize(train.images[idx], n_levels)
            known = idx < n_labelled
            total += svi.step(x[known], train.labels[idx][known], x[~known])
        nats = total / (len(order) // batch * batch)
        print(f"epoch {epoch + 1}/{epochs}  -ELBO {nats / dims / math.log(2) + math.log2(n_levels):.3f}"
              f" bits/dim (train)", file=sys.stderr)

    accuracy, bpd = evaluate(flow, pyro.param("class_probs"), test.images, test.labels, n_levels)
    print(f"test accuracy {accuracy:.3f} with {n_labelled} labelled training images; "
          f"test bits/dim of p(x) = sum_y p(y) p(x|y): {bpd:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
