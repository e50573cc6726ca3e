"""Data-parallel scaling of ``flowplugins train``: training images/s with 1 and N processes.

Every configuration trains the default digits recipe (Glow L=2, K=8, width 64, dropout 0.2,
variational dequantization, AdamW) with the same *global* batch, through the same pieces
``train`` uses (``init_runtime``, ``Runtime.wrap``, the sampler, ``batch_loader``), for a
fixed number of steps after a warm-up; a multi-process configuration is started with
``torchrun --standalone``. Configurations run in rotated order for several rounds and the
table reports the median images/s, with the load average seen around each run (other jobs
share the machine).

    python benchmarks/ddp_scaling.py                    # CPU: 1 proc x {1,2} threads, 2 procs x 1
    python benchmarks/ddp_scaling.py --device cuda --procs 1 2 4 --amp none bf16

Diagnostics go to stderr, the Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List


def child(args: argparse.Namespace) -> None:
    import torch

    from flowplugins.data import batch_loader, bits_per_dim, load_data
    from flowplugins.training import TrainConfig, build_model
    from flowplugins.training.dequantization import build_dequantizer
    from flowplugins.training.loop import LogProbObjective, init_runtime

    config = TrainConfig(batch_size=args.batch_size, device=args.device, threads=args.threads,
                         amp=None if args.amp == "none" else args.amp).validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rt = init_runtime(config)
    data = load_data("digits")
    torch.manual_seed(0)
    model = build_model(config.model, data.describe()).to(rt.device)
    deq = build_dequantizer(config.dequantization, data.event_shape, data.n_levels).to(rt.device)
    trainable = LogProbObjective(model, deq)
    objective = rt.wrap(trainable)
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-4)
    sampler = rt.sampler(len(data.train), 0)
    loader = batch_loader(data.train, rt.local_batch_size(config.batch_size), sampler=sampler)
    dims = 64

    def step(levels):
        bpd = bits_per_dim(objective(levels.to(rt.device)), dims, data.n_levels).mean()
        optimizer.zero_grad(set_to_none=True)
        bpd.backward()
        optimizer.step()

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for levels, _ in loader:
                yield levels
            epoch += 1

    it = batches()
    for _ in range(args.warmup):
        step(next(it))
    rt.barrier()
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(next(it))
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = rt.from_main(time.perf_counter() - start)
    seconds = max(seconds, rt.mean(time.perf_counter() - start))
    if rt.is_main:
        print(json.dumps({"images_per_s": args.steps * config.batch_size / seconds,
                          "threads": torch.get_num_threads(), "world_size": rt.world_size,
                          "device": str(rt.device)}))


def run(args: argparse.Namespace, procs: int, threads: int, amp: str) -> Dict[str, float]:
    script = [str(Path(__file__).resolve()), "--child", "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
              "--device", args.device, "--threads", str(threads), "--amp", amp]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if procs == 1:
        cmd = [sys.executable] + script
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={procs}"] + script
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"ddp_scaling: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = max(load_before, os.getloadavg()[0])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=40, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--amp", default="none", help="(child) none or bf16")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--amps", nargs="+", default=["none"], choices=["none", "bf16"])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    cpus = os.cpu_count() or 1
    configs = []
    for amp in args.amps:
        for procs in args.procs:
            # On CPU also the fair single-process baseline: one process using every core.
            thread_options = [1] if args.device != "cpu" or procs > 1 else sorted({1, cpus // procs or 1})
            for threads in thread_options:
                configs.append((procs, threads, amp))
    results: Dict[tuple, List[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs[r % len(configs):] + configs[:r % len(configs)]:
            res = run(args, *c)
            results[c].append(res)
            print(f"round {r + 1}: procs {c[0]} threads {c[1]} amp {c[2]}: "
                  f"{res['images_per_s']:.0f} images/s (load {res['load']:.1f})", file=sys.stderr)
    base = statistics.median(x["images_per_s"] for x in results[configs[0]])
    print(f"| processes | threads each | amp | images/s (median of {args.rounds}) | vs first row | load avg seen |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        ips = statistics.median(x["images_per_s"] for x in results[c])
        loads = [x["load"] for x in results[c]]
        print(f"| {c[0]} | {c[1]} | {c[2]} | {ips:.0f} | {ips / base:.2f}x | "
              f"{min(loads):.1f}–{max(loads):.1f} |")


if __name__ == "__main__":
    main()
