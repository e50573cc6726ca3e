"""Glow ablations on the digits test split under one training budget (Glow paper §5.1).

Trains the default ``flowplugins train`` model and its ablations — reverse vs shuffle vs LU vs
plain 1x1 convolution, additive vs affine coupling, learned conditional split prior vs a plain
standard-normal factor-out (what nflows does) — each with the same epochs, seed and data split,
through the real CLI, and prints a markdown table of test bits/dim (checkpoint chosen on the
validation split). Runs ``--jobs`` trainings at a time, one thread each.

Usage::

    python scripts/digits_ablations.py --epochs 100 --jobs 2 --out runs/ablations
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

VARIANTS: List[Tuple[str, List[str]]] = [
    ("default: LU 1x1 conv, affine, split prior", []),
    ("reverse permutation", ["--permutation", "reverse_permutation"]),
    ("shuffle permutation", ["--permutation", "shuffle_permutation"]),
    ("plain 1x1 conv (slogdet)", ["--permutation", "inv_conv1x1"]),
    ("additive coupling", ["--coupling", "additive"]),
    ("plain factor-out (no split prior)", ["--no-split-prior"]),
]


def run_variant(name: str, flags: List[str], out: Path, epochs: int, seed: int) -> Dict:
    run_dir = out / name.split(":")[0].replace(" ", "_").replace("(", "").replace(")", "")
    cmd = [sys.executable, "-m", "flowplugins", "train", "--out", str(run_dir), "--epochs",
           str(epochs), "--seed", str(seed), "--threads", "1", "--quiet", "--json", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"{name}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"name": name, "flags": flags, "error": proc.returncode, "wall_s": wall}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"{name}: test {metrics['test_bpd']:.4f} bits/dim in {wall:.0f} s", file=sys.stderr)
    return {"name": name, "flags": flags, "wall_s": wall, **metrics}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"))
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(
            lambda v: run_variant(v[0], v[1], args.out, args.epochs, args.seed), VARIANTS))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"| variant ({args.epochs} epochs, seed {args.seed}) | flags | test bits/dim | "
          f"best val bits/dim (epoch) | wall s |")
    print("|---|---|---|---|---|")
    for r in results:
        flags = " ".join(r["flags"]) or "(defaults)"
        if "error" in r:
            print(f"| {r['name']} | `{flags}` | failed | | {r['wall_s']:.0f} |")
            continue
        print(f"| {r['name']} | `{flags}` | {r['test_bpd']:.3f} | {r['best_val_bpd']:.3f} "
              f"({r['best_epoch']}) | {r['wall_s']:.0f} |")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
