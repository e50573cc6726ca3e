"""Round-trip error of a full Glow in float32 and float64: max |x − decode(encode(x))|.

The model is the composer's default Glow (3 levels × 32 steps, 512-wide coupling nets, affine
couplings, LU 1x1 convolutions, split and top priors) on 3×32×32 images. ActNorm is
initialised from a batch of data as in training, then every parameter is moved away from its
init by :func:`flowplugins.diagnostics.perturb_fan_in` (noise ``perturb/sqrt(fan_in)``), so the
couplings are not the near-identity of a fresh model. One row group per ``--perturb`` value:
the larger it is, the more the 96 steps stretch the data (``max|z|`` in the table; a trained
model keeps it near 4) and the more the inverse amplifies rounding. Inputs are uniform in the data range
[0, 1). The float64 model is an exact copy of the float32 one (same parameter values).

Usage (a few minutes on one CPU thread)::

    OMP_NUM_THREADS=1 python scripts/roundtrip_stability.py            # the table
    python scripts/roundtrip_stability.py --depth 4 --hidden 64 --json  # smaller, machine-readable

Prints a table to stdout (``--json`` for JSON); progress goes to stderr. Exit status 0, or 1
with ``--check`` when float32 exceeds 1e-4 or float64 exceeds 1e-10.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import List, Optional

import torch

from flowplugins import composer
from flowplugins.diagnostics import perturb_fan_in, roundtrip_error

BOUNDS = {"float32": 1e-4, "float64": 1e-10}


def measure(args: argparse.Namespace, perturb: float) -> List[dict]:
    shape = (args.channels, args.size, args.size)
    model = composer.glow(shape, levels=args.levels, depth=args.depth, hidden=args.hidden,
                          seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        model.train().log_prob(torch.rand(args.init_batch, *shape, generator=gen))  # ActNorm init
    perturb_fan_in(model, perturb, gen)
    model.eval()
    x = torch.rand(args.batch, *shape, generator=gen, dtype=torch.float64)
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        model_copy = copy.deepcopy(model).to(dtype)
        start = time.perf_counter()
        report = roundtrip_error(model_copy, x.to(dtype))
        seconds = time.perf_counter() - start
        print(f"perturb {perturb} {name}: done in {seconds:.1f} s", file=sys.stderr)
        rows.append({
            "perturb": perturb,
            "dtype": name,
            "max_abs_error": report.max_abs_error,
            "bound": BOUNDS[name],
            "within_bound": report.finite and report.max_abs_error <= BOUNDS[name],
            "max_log_det_gap": report.max_log_det_gap,
            "max_abs_latent": report.max_abs_latent,
            "finite": report.finite,
            "seconds": round(seconds, 2),
        })
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="images in the measured batch")
    p.add_argument("--init-batch", type=int, default=8, help="images of the ActNorm init batch")
    p.add_argument("--perturb", type=float, nargs="+", default=[0.01, 0.03, 0.05, 0.1],
                   help="fan-in-scaled noise added to every parameter; one row group per value "
                        "(default 0.01 0.03 0.05 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=sorted(BOUNDS))
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 if a dtype exceeds its bound")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for perturb in args.perturb for row in measure(args, perturb)]
    if args.json:
        print(json.dumps({"config": vars(args), "rows": rows}, indent=2))
    else:
        print(f"Glow {args.channels}x{args.size}x{args.size}, levels={args.levels}, "
              f"depth={args.depth}, hidden={args.hidden}, batch={args.batch}, seed={args.seed}; "
              f"parameters perturbed by perturb/sqrt(fan_in) noise")
        print(f"{'perturb':>7} {'dtype':<8} {'max|x-dec(enc(x))|':>19} {'bound':>7} "
              f"{'max|ld+ld_inv|':>15} {'max|z|':>8} {'finite':>6} {'seconds':>8}")
        for r in rows:
            print(f"{r['perturb']:>7} {r['dtype']:<8} {r['max_abs_error']:>19.3e} {r['bound']:>7.0e} "
                  f"{r['max_log_det_gap']:>15.3e} {r['max_abs_latent']:>8.2f} "
                  f"{str(r['finite']):>6} {r['seconds']:>8.1f}")
    if args.check and not all(r["within_bound"] for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
