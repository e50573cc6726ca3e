"""Micro-benchmark: the invertible 1x1 convolution alone, flowplugins vs Pyro vs nflows.

Layers: flowplugins ``LUInvertibleConv1x1``, Pyro ``GeneralizedChannelPermute`` and nflows
``OneByOneConvolution`` (LU, ``using_cache=True``: nflows' best case in eval), all at
C = 48, 16×16, batch 64. Three measurements, each including the log-det:

* ``W x``: the map by W (flowplugins/nflows ``forward``, Pyro ``__call__``), eval, no_grad;
* ``W⁻¹ z``: the map by W⁻¹ (``inverse``; Pyro ``.inv``), eval, no_grad;
* ``train``: ``W x`` in train mode, forward + backward of ``Σ g·Wx + Σ log|det|``.

(A Pyro flow's data → latent direction, the one training runs, is its ``W⁻¹`` side.)

Each library runs in its own process, once per round, in a rotated order; the table gives
median times and medians over rounds of the per-round speed-ups of flowplugins.

Usage::

    python benchmarks/conv1x1_micro.py --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    add_common_args,
    child_setup,
    emit,
    log,
    machine_info,
    markdown_table,
    median,
    rotate,
    run_child,
    time_calls,
)

LIBRARIES = ("flowplugins", "pyro", "nflows")
MODES = ("W x", "W⁻¹ z", "train")


def _build(library: str, channels: int, shape):
    """Return ``(module, apply_w, apply_w_inv)``; each ``apply`` returns ``(out, logabsdet)``."""
    if library == "flowplugins":
        import flowplugins

        layer = flowplugins.build("inv_conv1x1_lu", shape, seed=0)
        return layer, layer.forward, layer.inverse
    if library == "pyro":
        from pyro.distributions.transforms import GeneralizedChannelPermute

        layer = GeneralizedChannelPermute(channels=channels)

        def apply_w(x):
            y = layer(x)
            return y, layer.log_abs_det_jacobian(x, y)

        def apply_w_inv(y):
            x = layer.inv(y)
            return x, -layer.log_abs_det_jacobian(x, y)

        return layer, apply_w, apply_w_inv
    if library == "nflows":
        from nflows.transforms import OneByOneConvolution

        layer = OneByOneConvolution(channels, using_cache=True, identity_init=False)
        return layer, layer.forward, layer.inverse
    raise ValueError(f"conv1x1_micro: unknown library {library!r}; expected one of {LIBRARIES}")


def child(args) -> None:
    device = child_setup(args.threads, args.device)
    import torch

    c, hw, batch = args.channels, args.size, args.batch
    layer, apply_w, apply_w_inv = _build(args.child, c, (c, hw, hw))
    layer.to(device)
    # Two inputs, used alternately: Pyro transforms cache their last (x, y) pair, which would
    # otherwise turn every repeated call into a dictionary look-up.
    xs = [torch.randn(batch, c, hw, hw, device=device) for _ in range(2)]
    g = torch.randn(batch, c, hw, hw, device=device)
    state = {"i": 0}

    def nxt():
        state["i"] ^= 1
        return xs[state["i"]]

    warmup, iters = (2, 5) if args.quick else (10, 50)
    results: Dict[str, float] = {}
    layer.eval()
    with torch.no_grad():
        results["W x"] = time_calls(lambda: apply_w(nxt()), device, warmup, iters)
        results["W⁻¹ z"] = time_calls(lambda: apply_w_inv(nxt()), device, warmup, iters)
    layer.train()

    def train_step():
        y, ld = apply_w(nxt())
        ((y * g).sum() + ld.sum()).backward()

    results["train"] = time_calls(train_step, device, warmup, iters)
    emit(results)


def parent(args) -> int:
    script = os.path.abspath(__file__)
    per_round: List[Dict[str, Dict[str, float]]] = []
    for r in range(args.rounds):
        this_round = {}
        for lib in rotate(LIBRARIES, r):
            child_args = [
                "--child", lib, "--device", args.device, "--threads", str(args.threads),
                "--channels", str(args.channels), "--size", str(args.size),
                "--batch", str(args.batch),
            ] + (["--quick"] if args.quick else [])
            this_round[lib] = run_child(script, child_args, args.threads)
        log(f"round {r + 1}/{args.rounds}: " + json.dumps(this_round))
        per_round.append(this_round)

    def speedup(other: str, mode: str) -> float:
        return median([rd[other][mode] / rd["flowplugins"][mode] for rd in per_round])

    summary: Dict[str, Dict[str, Optional[float]]] = {}
    for mode in MODES:
        summary[mode] = {f"{lib}_ms": median([rd[lib][mode] for rd in per_round]) * 1e3 for lib in LIBRARIES}
        summary[mode]["speedup_vs_pyro"] = speedup("pyro", mode)
        summary[mode]["speedup_vs_nflows"] = speedup("nflows", mode)

    if args.json:
        print(json.dumps({"machine": machine_info(args.device), "args": vars(args), "summary": summary,
                          "rounds": per_round}, indent=2))
        return 0
    print(
        f"1x1 convolution, C={args.channels}, {args.size}×{args.size}, batch {args.batch}, "
        f"{args.threads} thread(s), {args.device}, median of {args.rounds} round(s)\n"
    )
    header = ["mode", "flowplugins ms", "Pyro GCP ms", "nflows ms", "Pyro / flowplugins", "nflows / flowplugins"]
    rows = [
        [mode, s["flowplugins_ms"], s["pyro_ms"], s["nflows_ms"], s["speedup_vs_pyro"], s["speedup_vs_nflows"]]
        for mode, s in summary.items()
    ]
    print(markdown_table(header, rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--channels", type=int, default=48)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    if args.quick:
        args.channels, args.size, args.batch, args.rounds = 8, 4, 4, min(args.rounds, 1)
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
