"""Train and sampling throughput of the same Glow in flowplugins, nflows and normflows.

Builds one multi-scale Glow (see ``benchmarks/_glow.py`` for the architecture) in each library,
checks that their coupling nets have the same parameter count, and measures in one run, on one
device:

* train step (forward, mean NLL, backward, Adam step), images/s. Under ``--compile`` every
  library trains through ``flowplugins.training.FlatParameters`` by default: after the
  data-dependent ActNorm initialisation its parameters are gathered into one vector, which Adam
  updates (on CPU fused Adam and autograd pay a fixed cost per tensor, and this Glow has 88-264
  small ones). Eager steps train their parameter tensors: there the per-call parameter swap
  costs more than Adam saves (``BENCHMARKS.md``). ``--params flat`` / ``per-tensor`` sets one
  way for every library;
* sampling (eval mode, temperature 1, no_grad), images/s;
* peak memory of the training phase: CUDA peak allocated, or on CPU the child process's peak
  RSS minus its RSS after imports and data;
* the floor: the same coupling nets' forward + backward alone (train floor; inputs require
  grad, as inside a flow) and every coupling net run once without grad (sampling floor), each
  in its faster memory layout. The nets run in both layouts, contiguous ``(N, C, H, W)`` and
  channels-last (inputs and weights), interleaved with the model's call, and the ratio is
  taken to whichever layout is faster on this device: on these CPUs oneDNN runs the nets
  10-25% faster channels-last, so a floor fixed to one layout could be beaten. The ratio to
  the contiguous floor alone is reported as well.

With ``--compile`` every library's NLL and sampling call goes through ``torch.compile`` (the
default Inductor backend), and so do the floor's nets: the floor is then the fastest of four
variants, eager or compiled in either layout. Compilation happens in the warm-up calls, before
anything is timed. Peak memory is not reported under ``--compile``: the compiler's own peak
RSS would swamp the train step's. ``--cpp-wrapper`` adds Inductor's ``cpp_wrapper`` option to
every one of those calls, floor included: the compiled graphs then launch their kernels from
generated C++ rather than from a Python wrapper, which is most of a small model's fixed cost
per call on a CPU.

Each library runs in its own process, once per round, in a rotated order. Inside that process
its train step (and its sampling call) alternates with the floor's variants, so the ratio
``library time / floor time`` is measured side by side, immune to load swings between
processes; the table reports medians over rounds of those ratios. The floor also runs alone in
a process of its own for its memory and absolute throughput.

Usage::

    python benchmarks/glow_throughput.py --config small --threads 1 --rounds 5
    python benchmarks/glow_throughput.py --config large --threads 2 --rounds 3 --json
    python benchmarks/glow_throughput.py --config small --threads 1 --rounds 3 --compile
    python benchmarks/glow_throughput.py --config small --threads 2 --rounds 3 --compile --cpp-wrapper
    python benchmarks/glow_throughput.py --quick        # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    make_adam,
    MemoryMeter,
    add_common_args,
    child_setup,
    emit,
    fmt,
    log,
    machine_info,
    markdown_table,
    median,
    rotate,
    run_child,
    time_interleaved,
)

VARIANTS = ("flowplugins", "flowplugins-ms", "nflows", "normflows")
DEFAULT_VARIANTS = "flowplugins,nflows,normflows"
# (warmup, timed iterations) per phase.
ITERS = {"small": (5, 30), "large": (2, 8), "quick": (1, 2)}


def _prime(variant: str, device) -> None:
    """Run one tiny train step and sample before the memory baseline.

    Libraries and torch import modules lazily (backends, the optimizer's helpers); priming
    loads them all so that the baseline-subtracted peak RSS is the model's, not the imports'.
    """
    import torch

    from _glow import BUILDERS, CONFIGS

    library = "flowplugins" if variant.startswith("flowplugins") else variant
    if library == "floor":
        library = "nflows"  # any model: it only loads torch's own lazy modules
    gut = BUILDERS[library](CONFIGS["quick"])
    gut.module.to(device)
    optimizer = make_adam(list(gut.module.parameters()))
    gut.nll(torch.rand(2, *CONFIGS["quick"].shape, device=device)).backward()
    optimizer.step()
    gut.module.eval()
    with torch.no_grad():
        gut.sample(2)


FLOOR_LAYOUTS = ("contiguous", "channels_last")
COMPILED = "compiled "  # prefix of the compiled floor variants' names


def floor_variants(compile_: bool) -> List[str]:
    """The floor's variants timed beside every model: its layouts, eager and (with
    ``--compile``) compiled."""
    return [*FLOOR_LAYOUTS, *(COMPILED + layout for layout in FLOOR_LAYOUTS if compile_)]


class _Floor:
    """The floor's two workloads: every coupling net's forward + backward (inputs require
    grad, as inside a flow), and every coupling net once without grad, in one memory layout:
    ``"contiguous"`` (N, C, H, W) or ``"channels_last"`` (inputs, seeds and weights), eager or,
    for a variant named ``"compiled <layout>"``, through ``torch.compile``."""

    def __init__(self, cfg, device, variant: str = "contiguous",
                 compile_options: Optional[dict] = None) -> None:
        import torch

        from _glow import floor_nets

        layout = variant[len(COMPILED):] if variant.startswith(COMPILED) else variant
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        self.nets, shapes = floor_nets(cfg)
        self.nets.to(device=device, memory_format=fmt)
        self.inputs = [
            torch.randn(cfg.batch, *s, device=device).contiguous(memory_format=fmt) for s in shapes
        ]
        with torch.no_grad():
            self.seeds = [torch.randn_like(net(inp)) for net, inp in zip(self.nets, self.inputs)]
        self.leaves = [inp.clone().requires_grad_(True) for inp in self.inputs]
        self.run = self._run_nets
        if variant.startswith(COMPILED):
            self.run = torch.compile(self._run_nets, options=compile_options)

    def _run_nets(self, inputs):
        return [net(inp) for net, inp in zip(self.nets, inputs)]

    def train(self) -> None:
        import torch

        for p in self.nets.parameters():
            p.grad = None
        for leaf in self.leaves:
            leaf.grad = None
        torch.autograd.backward(self.run(self.leaves), self.seeds)

    def sample(self) -> None:
        import torch

        with torch.no_grad():
            self.run(self.inputs)


def run_model(variant: str, cfg, device, warmup: int, iters: int,
              compile_: bool = False, params: str = "per-tensor",
              block: int = 1, compile_options: Optional[dict] = None) -> Dict[str, object]:
    """Memory of the train step first (nothing else allocated yet), then the model's train
    and sampling times, each alternated with the floor's in this same process."""
    import torch

    from _glow import BUILDERS, coupling_nets_of, parameter_counts

    x = torch.rand(cfg.batch, *cfg.shape, device=device)
    meter = MemoryMeter(device)
    if variant == "flowplugins-ms":
        gut = BUILDERS["flowplugins"](cfg, memory_saving=True)
        library = "flowplugins"
    else:
        gut = BUILDERS[variant](cfg)
        library = variant
    model = gut.module.to(device)
    counts = parameter_counts(model, lambda m: coupling_nets_of(library, m))
    model.train()
    with torch.no_grad():
        loss0 = float(gut.nll(x))  # every library's ActNorm initialises from this batch
    nll, draw = gut.nll, gut.sample
    if params == "flat" and variant != "flowplugins-ms":
        # Memory-saving backprop recomputes steps with their own parameters (FlatParameters
        # refuses it), so that variant keeps one tensor per parameter.
        from flowplugins.training import FlatParameters

        flat = FlatParameters(model)
        optimizer = make_adam([flat.vector])
        nll = lambda x: flat.call(gut.nll, x)  # noqa: E731
    else:
        optimizer = make_adam([p for p in model.parameters() if p.requires_grad])
    if compile_:
        nll = torch.compile(nll, options=compile_options)
        draw = torch.compile(draw, options=compile_options)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss = nll(x)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup):
        train_step()
    peak = None if compile_ else meter.peak_mib()
    floors = {name: _Floor(cfg, device, name, compile_options)
              for name in floor_variants(compile_)}
    train = time_interleaved(
        {"model": train_step, **{k: f.train for k, f in floors.items()}}, device, warmup, iters,
        block,
    )
    model.eval()

    def sample():
        with torch.no_grad():
            draw(cfg.batch)

    sampling = time_interleaved(
        {"model": sample, **{k: f.sample for k, f in floors.items()}}, device, warmup, iters,
        block,
    )
    return {"train_s": train["model"]["s"], "sample_s": sampling["model"]["s"], "peak_mib": peak,
            **_against_floor("train", train), **_against_floor("sample", sampling),
            "params": counts, "first_loss": loss0}


def _fastest_floor(timed: Dict[str, dict]) -> str:
    """The fastest floor variant among those timed."""
    return min((name for name in timed if name != "model"), key=lambda name: timed[name]["s"])


def _against_floor(phase: str, timed: Dict[str, dict]) -> Dict[str, object]:
    """The ratio to the fastest floor variant, and to the eager contiguous one."""
    best = _fastest_floor(timed)
    return {f"{phase}_ratio": timed[best]["ratio"], f"floor_{phase}_s": timed[best]["s"],
            f"floor_{phase}_layout": best,
            f"{phase}_ratio_contiguous": timed["contiguous"]["ratio"]}


def run_floor(cfg, device, warmup: int, iters: int, compile_: bool = False,
              block: int = 1, compile_options: Optional[dict] = None) -> Dict[str, object]:
    """The floor alone in its own process: its memory and absolute times (fastest variant)."""
    meter = MemoryMeter(device)
    floors = {name: _Floor(cfg, device, name, compile_options)
              for name in floor_variants(compile_)}
    train = time_interleaved({k: f.train for k, f in floors.items()}, device, warmup, iters, block)
    peak = None if compile_ else meter.peak_mib()
    sampling = time_interleaved({k: f.sample for k, f in floors.items()}, device, warmup, iters,
                                block)
    n_params = sum(p.numel() for p in floors["contiguous"].nets.parameters())
    out: Dict[str, object] = {
        "peak_mib": peak,
        "params": {"stored": n_params, "effective": n_params, "coupling_nets": n_params},
    }
    for phase, timed in (("train", train), ("sample", sampling)):
        best = _fastest_floor(timed)
        out.update({f"{phase}_s": timed[best]["s"], f"{phase}_ratio": 1.0,
                    f"floor_{phase}_layout": best,
                    f"{phase}_ratio_contiguous": timed[best]["s"] / timed["contiguous"]["s"]})
    return out


def child(args) -> None:
    device = child_setup(args.threads, args.device)
    from _glow import CONFIGS

    cfg = CONFIGS[args.config]
    warmup, iters = ITERS[args.config]
    _prime(args.child, device)
    options = compile_options(args)
    if args.child == "floor":
        emit(run_floor(cfg, device, warmup, iters, args.compile, args.block, options))
    else:
        emit(run_model(args.child, cfg, device, warmup, iters, args.compile, args.params,
                       args.block, options))


def compile_options(args) -> Optional[dict]:
    """The Inductor options every ``torch.compile`` call of a run gets (models and floor alike)."""
    return {"cpp_wrapper": True} if args.cpp_wrapper else None


def summarize(per_round: List[Dict[str, dict]], variants: List[str], batch: int) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    for v in ["floor", *variants]:
        train = median([rd[v]["train_s"] for rd in per_round])
        sample = median([rd[v]["sample_s"] for rd in per_round])
        out[v] = {
            "params": per_round[0][v]["params"],
            "train_img_s": batch / train,
            "train_ratio": median([rd[v]["train_ratio"] for rd in per_round]),
            "train_ratio_contiguous": median([rd[v]["train_ratio_contiguous"] for rd in per_round]),
            "sample_img_s": batch / sample,
            "sample_ratio": median([rd[v]["sample_ratio"] for rd in per_round]),
            "sample_ratio_contiguous": median([rd[v]["sample_ratio_contiguous"] for rd in per_round]),
            "floor_layouts": sorted({f"{rd[v]['floor_train_layout']}/{rd[v]['floor_sample_layout']}"
                                     for rd in per_round}),
            "peak_mib": median([rd[v]["peak_mib"] for rd in per_round
                                if rd[v]["peak_mib"] is not None]),
        }
    return out


def parent(args) -> int:
    from _glow import CONFIGS

    cfg = CONFIGS[args.config]
    variants = [v.strip() for v in args.libraries.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        log(f"glow_throughput: unknown --libraries entries {unknown}; choose from {VARIANTS}")
        return 2
    script = os.path.abspath(__file__)
    per_round: List[Dict[str, dict]] = []
    for r in range(args.rounds):
        this_round = {}
        for v in rotate(["floor", *variants], r):
            child_args = ["--child", v, "--config", args.config, "--device", args.device,
                          "--threads", str(args.threads), "--params", args.params,
                          "--block", str(args.block),
                          *(["--compile"] if args.compile else []),
                          *(["--cpp-wrapper"] if args.cpp_wrapper else [])]
            this_round[v] = run_child(script, child_args, args.threads)
            got = this_round[v]
            log(f"round {r + 1}/{args.rounds} {v}: train {got['train_s'] * 1e3:.1f} ms "
                f"({got['train_ratio']:.2f}× floor, {got['floor_train_layout']}), "
                f"sample {got['sample_s'] * 1e3:.1f} ms ({got['sample_ratio']:.2f}× floor, "
                f"{got['floor_sample_layout']}), peak {fmt(got['peak_mib'], 0)} MiB")
        per_round.append(this_round)
    summary = summarize(per_round, variants, cfg.batch)
    nets = {v: s["params"]["coupling_nets"] for v, s in summary.items()}
    nets_match = len(set(nets.values())) == 1
    if not nets_match:
        log(f"glow_throughput: coupling-net parameter counts differ: {nets}")
    if args.json:
        print(json.dumps({"machine": machine_info(args.device), "config": cfg.__dict__,
                          "args": vars(args), "coupling_nets_match": nets_match,
                          "summary": summary, "rounds": per_round}, indent=2, default=str))
        return 0 if nets_match else 1
    compiled = "; torch.compile (models and floor)" if args.compile else ""
    compiled += " with Inductor's C++ wrapper" if args.cpp_wrapper else ""
    compiled += {"flat": "; Adam over one flat vector", "per-tensor": "; Adam per tensor"}[args.params]
    print(f"Glow {cfg.describe()}; {args.device}, {args.threads} thread(s){compiled}; medians of "
          f"{args.rounds} round(s)\n")
    header = ["library", "params (stored)", "params (effective)", "coupling-net params",
              "train img/s", "train / floor", "train / contiguous floor", "sample img/s",
              "sample / floor", "sample / contiguous floor", "peak MiB"]
    rows = []
    for v, s in summary.items():
        p = s["params"]
        rows.append([v, p["stored"], p["effective"], p["coupling_nets"], s["train_img_s"],
                     s["train_ratio"], s["train_ratio_contiguous"], s["sample_img_s"],
                     s["sample_ratio"], s["sample_ratio_contiguous"], s["peak_mib"]])
    print(markdown_table(header, rows))
    layouts = sorted({layout for s in summary.values() for layout in s["floor_layouts"]})
    print(f"\nfastest floor variant (train/sample), over rounds and processes: {', '.join(layouts)}")
    return 0 if nets_match else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--config", choices=("small", "large", "quick"), default="small",
                        help="small: 1×8×8 L2 K4 h64 batch 64; large: 3×32×32 L3 K8 h128 batch 16")
    parser.add_argument("--libraries", default=DEFAULT_VARIANTS,
                        help=f"comma-separated, from {','.join(VARIANTS)} (default {DEFAULT_VARIANTS})")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model's NLL and sampling call and the floor's nets")
    parser.add_argument("--cpp-wrapper", action="store_true",
                        help="with --compile: every torch.compile call (every library's and the "
                             "floor's) gets Inductor's cpp_wrapper option, which calls the "
                             "compiled kernels from generated C++ instead of Python")
    parser.add_argument("--params", choices=("auto", "flat", "per-tensor"), default="auto",
                        help="what Adam updates: 'flat', one vector holding every parameter "
                             "(flowplugins.training.FlatParameters); 'per-tensor', each parameter "
                             "tensor; 'auto' (default), flat under --compile and per-tensor "
                             "otherwise (the memory-saving variant is always per-tensor)")
    parser.add_argument("--block", type=int, default=1,
                        help="consecutive calls of each workload per timed turn (default 1: "
                             "every call follows the other workloads' calls)")
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error(f"--block must be at least 1; got {args.block}")
    if args.cpp_wrapper and not args.compile:
        parser.error("--cpp-wrapper is an option of --compile; pass both")
    if args.params == "auto":
        args.params = "flat" if args.compile else "per-tensor"
    if args.quick:
        args.config, args.rounds = "quick", min(args.rounds, 1)
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
