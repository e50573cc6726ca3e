"""The ``flowplugins`` command line: list and check bijectors, train flows, draw pictures.

Data go to stdout, diagnostics (progress, "resuming from …") to stderr. Exit status: 0 ok,
1 a check or run failed, 2 usage error (bad arguments, unknown names, missing data files).

    flowplugins list [--json]
    flowplugins check NAME [--shape C,H,W] [--backend torch|nflows|pyro ...] [--json]
    flowplugins train [--config FILE] [--data digits|mnist|cifar10|folder:PATH] [--epochs N] ...
    flowplugins sample CKPT [--n 64] [--temperature 0.7] [--out grid.png]
    flowplugins interpolate CKPT [--pairs 4] [--steps 8] [--out interpolation.png]
    flowplugins manipulate CKPT --from-class A --to-class B [--out manipulation.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command-line value is invalid (exit status 2)."""


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ list
def cmd_list(args: argparse.Namespace) -> int:
    import flowplugins
    from flowplugins.registry import BACKENDS

    rows: List[Dict[str, Any]] = []
    for name in flowplugins.names():
        try:
            info = flowplugins.info(name)
        except Exception as err:  # noqa: BLE001 - a broken plugin is a row, not a crash
            rows.append({"name": name, "backends": [], "distribution": "?",
                         "summary": f"<error: {err}>"})
            continue
        rows.append({
            "name": name,
            "backends": list(BACKENDS),
            "distribution": info.distribution,
            "summary": info.summary,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max([len(r["name"]) for r in rows] + [4])
    dist_width = max([len(r["distribution"]) for r in rows] + [12])
    print(f"{'name':<{width}}  {'backends':<19}  {'distribution':<{dist_width}}  summary")
    for r in rows:
        print(f"{r['name']:<{width}}  {','.join(r['backends']):<19}  "
              f"{r['distribution']:<{dist_width}}  {r['summary']}")
    return EXIT_OK


# ----------------------------------------------------------------------------------- check
def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 2,4,4); got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers C,H,W; got {text!r}")
    return shape


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    import flowplugins
    from flowplugins.registry import RegistryError, UnknownBijectorError
    from flowplugins.testing import BijectorCheckError, check_bijector

    backends = tuple(dict.fromkeys(args.backend or ("torch", "nflows", "pyro")))
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    try:
        flowplugins.get_class(args.name)
    except UnknownBijectorError as err:
        raise UsageError(str(err)) from err
    except RegistryError as err:
        return _report_check(args, "error", str(err))
    try:
        check_bijector(args.name, args.shape, backend=backends, dtype=dtype, seed=args.seed)
    except BijectorCheckError as err:
        return _report_check(args, "failed", str(err), backends)
    except Exception as err:  # noqa: BLE001 - any exception of the bijector fails the check
        return _report_check(args, "error", f"{type(err).__name__}: {err}", backends)
    return _report_check(args, "ok", "", backends)


def _report_check(args: argparse.Namespace, status: str, message: str,
                  backends: Sequence[str] = ()) -> int:
    result = {"name": args.name, "status": status, "shape": list(args.shape),
              "backends": list(backends), "dtype": args.dtype, "message": message}
    if args.json:
        print(json.dumps(result, indent=2))
    elif status == "ok":
        print(f"ok      {args.name}  shape {tuple(args.shape)}  backends {', '.join(backends)}  "
              f"{args.dtype}")
    else:
        print(f"{status:<7} {args.name}: {message}")
    return EXIT_OK if status == "ok" else EXIT_FAILED


# ----------------------------------------------------------------------------------- train
#: argparse destination -> TrainConfig / ModelConfig field, for options that override the file.
_TRAIN_FIELDS = [
    "data", "data_root", "download", "val_size", "epochs", "batch_size", "lr", "warmup_steps",
    "lr_schedule", "weight_decay", "dequantization", "grad_clip", "ema_decay", "patience", "max_minutes",
    "eval_samples", "seed", "out", "threads", "device", "sample_temperature", "amp", "compile",
]
_MODEL_FIELDS = ["arch", "levels", "depth", "hidden", "coupling", "permutation", "split_prior",
                 "conditional", "dropout", "memory_saving"]


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    # Every default is None so that only options given on the command line override --config.
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with TrainConfig keys")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="NAME", help="digits (default), mnist, cifar10 or folder:PATH")
    g.add_argument("--data-root", metavar="DIR", help="where MNIST/CIFAR-10 live (default ./data)")
    g.add_argument("--download", action="store_true", default=None,
                   help="let torchvision download MNIST/CIFAR-10 into --data-root")
    g.add_argument("--val-size", type=int, metavar="N",
                   help="validation images carved from the training split")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["glow", "realnvp"],
                   help="(arch 'multiscale' with a custom step is available through --config)")
    g.add_argument("--levels", type=int, metavar="L")
    g.add_argument("--depth", type=int, metavar="K", help="flow steps per level")
    g.add_argument("--hidden", type=int, metavar="H", help="coupling network width")
    g.add_argument("--coupling", choices=["affine", "additive"])
    g.add_argument("--permutation",
                   choices=["inv_conv1x1_lu", "inv_conv1x1", "shuffle_permutation",
                            "reverse_permutation"])
    g.add_argument("--no-split-prior", dest="split_prior", action="store_false", default=None,
                   help="plain standard-normal factor-out instead of the learned split prior")
    g.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional priors")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout in the coupling nets")
    g.add_argument("--memory-saving", action="store_true", default=None,
                   help="recompute activations through the exact inverses in backward: memory "
                        "about constant in depth, ~1.5x the time per step (needs --dropout 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, metavar="N")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help="global batch; under torchrun each process takes B / processes")
    g.add_argument("--lr", type=float)
    g.add_argument("--warmup-steps", type=int, metavar="N")
    g.add_argument("--lr-schedule", choices=["cosine", "constant"])
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--dequantization", choices=["uniform", "variational"])
    g.add_argument("--grad-clip", type=float, metavar="NORM")
    g.add_argument("--ema-decay", type=float, metavar="D", help="weight averaging (0: off)")
    g.add_argument("--patience", type=int, metavar="N", help="early stopping (0: off)")
    g.add_argument("--max-minutes", type=float, metavar="M")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int)
    g.add_argument("--out", metavar="DIR", help="output directory (default runs/train)")
    g.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads")
    g.add_argument("--device", metavar="DEV", help="cpu (default), cuda or auto")
    g.add_argument("--amp", choices=["bf16"],
                   help="mixed precision: coupling nets in bf16, log-dets and loss in float32")
    g.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the training pass (the first step compiles; pays off "
                        "without dropout, see TrainConfig.compile)")
    g.add_argument("--eval-samples", type=int, metavar="N",
                   help="dequantization draws per image when evaluating")
    g.add_argument("--sample-temperature", type=float, metavar="T")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar or per-epoch lines (notices such as resuming stay)")
    g.add_argument("--json", action="store_true", help="print metrics.json to stdout at the end")
    r = g.add_mutually_exclusive_group()
    r.add_argument("--resume", dest="resume", action="store_const", const="always",
                   default="auto", help="require a checkpoint in --out to resume from")
    r.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                   help="start over even if --out holds a checkpoint")


def config_from_args(args: argparse.Namespace):
    from flowplugins.training import TrainConfig, load_config_file

    config = load_config_file(args.config) if args.config else TrainConfig()
    changes = {k: getattr(args, k) for k in _TRAIN_FIELDS + _MODEL_FIELDS
               if getattr(args, k, None) is not None}
    if args.quiet:
        changes["progress"] = False
    if changes.get("arch", "glow") != "glow" and "dropout" not in changes:
        changes["dropout"] = 0.0  # the default recipe's dropout is Glow's coupling nets only
    return config.replace(**changes).validate()


def cmd_train(args: argparse.Namespace) -> int:
    from flowplugins.data import DataError
    from flowplugins.training import (CheckpointError, ConfigError, TrainingError, train)

    try:
        config = config_from_args(args)
    except ConfigError as err:
        raise UsageError(str(err)) from err
    try:
        result = train(config, resume=args.resume, log=_err)
    except (ConfigError, DataError) as err:
        raise UsageError(str(err)) from err
    except (TrainingError, CheckpointError) as err:
        _err(f"flowplugins train: {err}")
        return EXIT_FAILED
    if os.environ.get("RANK", "0") != "0":
        return EXIT_OK  # under torchrun, rank 0 prints the one summary
    m = result.metrics
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(f"test_bpd {m['test_bpd']:.4f}  best_val_bpd {m['best_val_bpd']:.4f}  "
              f"best_epoch {m['best_epoch']}  epochs {m['epochs_run']}  "
              f"train_seconds {m['train_seconds']:.0f}  out {result.out}")
    return EXIT_OK


# ------------------------------------------------------------------- pictures from a checkpoint
def _load(args: argparse.Namespace):
    import torch

    from flowplugins.training import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, ckpt = load_model(args.checkpoint)
    torch.manual_seed(args.seed)
    return model, ckpt


def _picture(x, n_levels: int):
    import torch

    return torch.clamp(torch.floor(x * n_levels), 0, n_levels - 1) / (n_levels - 1)


def _test_split(ckpt: Dict[str, Any]):
    from flowplugins.data import load_data

    cfg = ckpt["config"]
    return load_data(cfg["data"], cfg.get("data_root", "data"), False, cfg.get("val_size")).test


def _context(ckpt: Dict[str, Any], labels):
    from flowplugins.training import make_context

    return make_context(ckpt["config"]["model"], int(ckpt["data"]["num_classes"]), labels)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from flowplugins.training import save_grid

    model, ckpt = _load(args)
    n_levels = int(ckpt["data"]["n_levels"])
    context = None
    if ckpt["config"]["model"].get("conditional"):
        k = int(ckpt["data"]["num_classes"])
        labels = (torch.full((args.n,), args.label) if args.label is not None
                  else torch.arange(args.n) % k)
        context = _context(ckpt, labels)
    elif args.label is not None:
        raise UsageError("--label needs a class-conditional model (trained with --conditional)")
    with torch.no_grad():
        x = model.sample(args.n, temperature=args.temperature, context=context)
    path = save_grid(_picture(x, n_levels), args.out, nrow=args.nrow)
    print(path)
    return EXIT_OK


def _encode(model, x, context):
    import torch

    with torch.no_grad():
        return model.encode(x, context=context)


def cmd_interpolate(args: argparse.Namespace) -> int:
    import torch

    from flowplugins.data import levels_to_unit
    from flowplugins.training import save_rows

    model, ckpt = _load(args)
    n_levels = int(ckpt["data"]["n_levels"])
    test = _test_split(ckpt)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(test), generator=g)[: 2 * args.pairs]
    if len(idx) < 2 * args.pairs:
        raise UsageError(f"--pairs {args.pairs} needs {2 * args.pairs} test images; have {len(test)}")
    x = levels_to_unit(test.images[idx], n_levels)
    context = _context(ckpt, test.labels[idx])
    z = _encode(model, x, context)
    t = torch.linspace(0, 1, args.steps)
    rows = []
    with torch.no_grad():
        for i in range(args.pairs):
            za, zb = z[2 * i], z[2 * i + 1]
            zs = torch.stack([(1 - s) * za + s * zb for s in t])
            ctx = None
            if context is not None:
                # Conditional models decode with the first image's class.
                ctx = context[2 * i].expand(args.steps, *context.shape[1:])
            rows.append(_picture(model.decode(zs, context=ctx), n_levels))
    path = save_rows(rows, args.out)
    print(path)
    return EXIT_OK


def cmd_manipulate(args: argparse.Namespace) -> int:
    import torch

    from flowplugins.data import levels_to_unit
    from flowplugins.training import save_rows

    model, ckpt = _load(args)
    n_levels = int(ckpt["data"]["n_levels"])
    k = int(ckpt["data"]["num_classes"])
    for flag, value in (("--from-class", args.from_class), ("--to-class", args.to_class)):
        if not 0 <= value < k:
            raise UsageError(f"{flag} must be a class in 0..{k - 1}; got {value}")
    if ckpt["config"]["model"].get("conditional"):
        raise UsageError(
            "manipulate moves latents of an unconditional model; this checkpoint is "
            "class-conditional (its classes live in the prior, not the latent)"
        )
    test = _test_split(ckpt)
    x_all = levels_to_unit(test.images, n_levels)
    z_all = _encode(model, x_all, None)
    a, b = test.labels == args.from_class, test.labels == args.to_class
    if not a.any() or not b.any():
        raise UsageError(f"the test split has no images of class {args.from_class if not a.any() else args.to_class}")
    # Glow §5: the attribute direction is the difference of the groups' mean latents.
    direction = z_all[b].mean(0) - z_all[a].mean(0)
    sources = z_all[a][: args.n]
    alphas = torch.linspace(0, args.scale, args.steps)
    rows = []
    with torch.no_grad():
        for z in sources:
            zs = torch.stack([z + s * direction for s in alphas])
            rows.append(_picture(model.decode(zs, context=None), n_levels))
    path = save_rows(rows, args.out)
    print(path)
    return EXIT_OK


# ---------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so :func:`main` returns its status."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}\n{self.format_usage().strip()}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowplugins", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("list", help="registered bijectors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check", help="run the property checks on one registered bijector")
    p.add_argument("name")
    p.add_argument("--shape", type=_parse_shape, default=(2, 4, 4), metavar="C,H,W")
    p.add_argument("--backend", action="append", choices=["torch", "nflows", "pyro"],
                   help="repeatable; default: all three")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help="train a flow (default: Glow on the 8x8 digits)")
    _add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    def picture_parser(name: str, help: str, out: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help)
        q.add_argument("checkpoint", metavar="CKPT", help="best.pt or last.pt of a training run")
        q.add_argument("--out", default=out, help=f"PNG to write (default {out})")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, metavar="N")
        return q

    p = picture_parser("sample", "draw samples at a temperature", "samples.png")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--nrow", type=int, help="images per row")
    p.add_argument("--label", type=int, help="class of every sample (conditional models)")
    p.set_defaults(func=cmd_sample)

    p = picture_parser("interpolate", "latent interpolation between test images",
                       "interpolation.png")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.set_defaults(func=cmd_interpolate)

    p = picture_parser("manipulate", "move latents from one class towards another (Glow §5)",
                       "manipulation.png")
    p.add_argument("--from-class", type=int, required=True)
    p.add_argument("--to-class", type=int, required=True)
    p.add_argument("--n", type=int, default=4, help="source images (rows)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--scale", type=float, default=1.0,
                   help="how far along the direction the last column goes")
    p.set_defaults(func=cmd_manipulate)
    return parser


def _check_positive(args: argparse.Namespace) -> None:
    for name in ("n", "pairs", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be a positive integer; got {value}")
    temperature = getattr(args, "temperature", None)
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature must be positive; got {temperature}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``flowplugins`` command line; returns the exit status."""
    from flowplugins.training import CheckpointError

    args = None
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help and --version exit through argparse
            return int(done.code or 0)
        _check_positive(args)
        return int(args.func(args))
    except UsageError as err:
        _err(str(err))
        return EXIT_USAGE
    except CheckpointError as err:
        _err(f"flowplugins {getattr(args, 'command', '')}: {err}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        _err("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
