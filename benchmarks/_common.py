"""Shared machinery of the benchmark scripts: child processes, timing, memory, tables.

Every measurement runs in a fresh child process (``python <script> --child ...``) so that each
library is imported alone, its peak RSS is its own, and no allocator or thread-pool state leaks
from one library into the next. A round runs every library once, in a rotated order; the
parent reports medians over rounds of per-round ratios, which cancels most of the drift of a
shared machine (±20% between rounds here).

Diagnostics go to stderr, tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

__all__ = [
    "add_common_args",
    "child_setup",
    "emit",
    "peak_rss_mib",
    "MemoryMeter",
    "time_calls",
    "time_interleaved",
    "run_child",
    "rotate",
    "median",
    "machine_info",
    "markdown_table",
    "fmt",
    "log",
    "glow_net",
    "make_adam",
]

CHILD_MARKER = "BENCH_RESULT "


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def add_common_args(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (smoke test)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    # Set by the parent when it runs this script as a measuring child process.
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def child_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def child_setup(threads: int, device: str):
    """Configure torch in a child: thread count, determinism of the data, the device."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch.device(device)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024.0


class MemoryMeter:
    """Peak memory of one phase: CUDA peak allocated, or peak RSS minus a baseline on CPU.

    On CPU ``ru_maxrss`` only grows, so the number is the peak of the whole process after the
    baseline, which is why every measured phase gets its own process (or comes first).
    """

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device) / 2**20
        else:
            self.base = peak_rss_mib()

    def peak_mib(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return peak_rss_mib() - self.base


def time_calls(fn: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Median wall time of one call of ``fn`` in seconds, after ``warmup`` untimed calls."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: Dict[str, Callable[[], object]], device, warmup: int,
                     iters: int, block: int = 1) -> Dict[str, dict]:
    """Time several calls in turn, ``block`` consecutive calls of each per iteration (the first
    one first).

    Returns, per name, the median per-call time ``s`` and ``ratio``: the median over iterations
    of the first call's time divided by this one's (so the first call's own ratio is 1). Calls
    interleaved inside one process see the same load, which on a shared machine shifts whole
    processes' timings by ±20-50%, so their ratios are far steadier than their times. With
    ``block`` 1 every timed call follows the other workloads' calls and starts with their data
    in the caches; a larger ``block`` times calls that follow themselves, as consecutive steps
    of a training loop do.
    """
    import torch

    if block < 1:
        raise ValueError(f"time_interleaved: block must be at least 1; got {block}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(block):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / block)
    first = times[next(iter(fns))]
    return {
        name: {"s": statistics.median(ts), "ratio": statistics.median(a / b for a, b in zip(first, ts))}
        for name, ts in times.items()
    }


def emit(result: dict) -> None:
    """Child side: hand a result dict back to the parent (one marked line on stdout)."""
    print(CHILD_MARKER + json.dumps(result), flush=True)


def run_child(script: str, args: Sequence[str], threads: int, timeout: float = 1800) -> dict:
    """Parent side: run ``script --child ...`` in a fresh interpreter and return its result."""
    cmd = [sys.executable, script, *args]
    proc = subprocess.run(
        cmd, env=child_env(threads), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark child failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}"
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARKER):
            return json.loads(line[len(CHILD_MARKER):])
    raise RuntimeError(f"benchmark child printed no result: {' '.join(cmd)}\n{proc.stdout[-2000:]}")


def rotate(items: Sequence[str], r: int) -> List[str]:
    """The round-``r`` order: a rotation, so no library always runs first or last."""
    r %= len(items)
    return list(items[r:]) + list(items[:r])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_info(device: str) -> Dict[str, object]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: Dict[str, object] = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib import metadata

    for dist in ("flowplugins", "nflows", "normflows", "pyro-ppl"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    return info


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != value:
            return "—"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def make_adam(params, lr: float = 1e-4):
    """The optimizer of every library's train step: Adam, fused where torch supports it.

    On CPU the default (for-loop) Adam costs ~6 ms per step for the ~90 tensors of the small
    Glow, a third of its whole train step; the fused kernel costs ~0.4 ms. Every library gets
    the same optimizer, so this only removes a cost none of them controls.
    """
    import torch

    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr)


def glow_net(in_channels: int, out_channels: int, hidden: int):
    """Glow's coupling net as a plain ``nn.Sequential``: the floor's net and nflows' net.

    conv3x3(in→h) - ReLU - conv1x1(h→h) - ReLU - conv3x3(h→out), last layer zero-initialised;
    the same layers and parameter count as :class:`flowplugins.nets.CouplingNet`.
    """
    from torch import nn

    net = nn.Sequential(
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, hidden, 1),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 3, padding=1),
    )
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net
