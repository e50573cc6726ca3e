"""Peak training memory against depth K, with and without memory-saving backprop.

Builds the Glow of ``benchmarks/_glow.py`` at 3×32×32, L3, h128, batch 16 for K = 8, 16, 32 in
flowplugins (ordinary backprop), flowplugins with ``memory_saving=True``, nflows and
normflows, and measures one training step (forward, mean NLL, backward, Adam step) per child
process:

* ``activations``: peak memory during the step minus the memory held just before it, when the
  parameters, their gradients and Adam's two moments are already allocated. This is what
  memory saving acts on (ordinary backprop keeps every step's activations: linear in K).
* ``total``: peak memory minus the memory after imports, i.e. everything the model costs,
  parameters and optimizer state included (those grow linearly in K whatever the backprop).

On CUDA the numbers are ``torch.cuda.max_memory_allocated`` differences; on CPU they are
differences of the child's peak RSS (``ru_maxrss``), which is why every (library, K) pair gets
its own process and the pre-step state is built without running a step first.

Usage::

    python benchmarks/memory_depth.py --rounds 1
    python benchmarks/memory_depth.py --depths 8,32 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    make_adam,
    MemoryMeter,
    add_common_args,
    child_setup,
    emit,
    log,
    machine_info,
    markdown_table,
    median,
    rotate,
    run_child,
)

VARIANTS = ("flowplugins", "flowplugins-ms", "nflows", "normflows")


def _config(args, depth: int):
    from _glow import GlowConfig

    shape = tuple(int(s) for s in args.shape.split(","))
    return GlowConfig("memory", shape, args.levels, depth, args.hidden, args.batch)


def child(args) -> None:
    device = child_setup(args.threads, args.device)
    import torch

    from _glow import BUILDERS
    from glow_throughput import _prime

    _prime(args.child, device)
    cfg = _config(args, args.depth)
    x = torch.rand(cfg.batch, *cfg.shape, device=device)
    total = MemoryMeter(device)
    if args.child == "flowplugins-ms":
        gut = BUILDERS["flowplugins"](cfg, memory_saving=True)
    else:
        gut = BUILDERS[args.child](cfg)
    model = gut.module.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adam(params)
    with torch.no_grad():
        gut.nll(x)  # ActNorm's data-dependent init; keeps no activations
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates Adam's moments (zero gradients leave the parameters as they are)
    activations = MemoryMeter(device)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)
        loss = gut.nll(x)
        loss.backward()
        optimizer.step()
    n_params = sum(p.numel() for p in params)
    emit({
        "activations_mib": activations.peak_mib(),
        "total_mib": total.peak_mib(),
        "params": n_params,
        "loss": float(loss.detach()),
    })


def parent(args) -> int:
    depths = [int(k) for k in args.depths.split(",")]
    variants = [v.strip() for v in args.libraries.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        log(f"memory_depth: unknown --libraries entries {unknown}; choose from {VARIANTS}")
        return 2
    script = os.path.abspath(__file__)
    runs: Dict[str, Dict[int, List[dict]]] = {v: {k: [] for k in depths} for v in variants}
    for r in range(args.rounds):
        for k in depths:
            for v in rotate(variants, r + k):
                child_args = ["--child", v, "--depth", str(k), "--device", args.device,
                              "--threads", str(args.threads), "--shape", args.shape,
                              "--levels", str(args.levels), "--hidden", str(args.hidden),
                              "--batch", str(args.batch)]
                res = run_child(script, child_args, args.threads)
                runs[v][k].append(res)
                log(f"round {r + 1}/{args.rounds} K={k} {v}: activations "
                    f"{res['activations_mib']:.1f} MiB, total {res['total_mib']:.1f} MiB")
    summary = {
        v: {
            k: {
                "activations_mib": median([x["activations_mib"] for x in runs[v][k]]),
                "total_mib": median([x["total_mib"] for x in runs[v][k]]),
                "params": runs[v][k][0]["params"],
            }
            for k in depths
        }
        for v in variants
    }
    first, last = depths[0], depths[-1]
    for v in variants:
        s = summary[v]
        s["activation_growth"] = s[last]["activations_mib"] / max(s[first]["activations_mib"], 1e-9)
        s["total_growth"] = s[last]["total_mib"] / max(s[first]["total_mib"], 1e-9)
    if args.json:
        print(json.dumps({"machine": machine_info(args.device), "args": vars(args),
                          "summary": summary}, indent=2))
        return 0
    shape = args.shape.replace(",", "×")
    print(f"Glow {shape}, L{args.levels} h{args.hidden}, batch {args.batch}; {args.device}, "
          f"{args.threads} thread(s); one train step per process, medians of {args.rounds} round(s). "
          f"MiB: activations (total)\n")
    header = ["library", *[f"K={k}" for k in depths], f"activations K={last} / K={first}",
              f"total K={last} / K={first}"]
    rows = []
    for v in variants:
        s = summary[v]
        cells = [f"{s[k]['activations_mib']:.0f} ({s[k]['total_mib']:.0f})" for k in depths]
        rows.append([v, *cells, s["activation_growth"], s["total_growth"]])
    print(markdown_table(header, rows))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--depths", default="8,16,32", help="comma-separated K values (default 8,16,32)")
    parser.add_argument("--libraries", default=",".join(VARIANTS))
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(rounds=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.shape, args.levels, args.hidden, args.batch = "1,2", "1,8,8", 2, 8, 4
        args.rounds = min(args.rounds, 1)
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
