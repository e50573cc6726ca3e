"""Data-parallel training with ``torch.distributed``: what ``torchrun ... -m flowplugins train`` runs.

``train`` asks :func:`~flowplugins.training.loop.init_runtime` where it runs; when ``torchrun``
(or any launcher that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``) started the process,
the answer is a :class:`DistributedRuntime`:

* **Process group.** NCCL with one GPU per process (``cuda:LOCAL_RANK``) for ``--device
  cuda``/``auto`` on a GPU machine; gloo on CPU. On CPU every process gets one thread
  (``torch.set_num_threads(1)`` unless ``--threads`` is given): N processes each spinning an
  N-thread OpenMP pool on N cores spend their time fighting over the cores.
* **Batches.** ``--batch-size`` is the *global* batch; each rank takes ``batch_size /
  world_size`` images. :class:`ShardedEpochSampler` deals the single-process epoch order out
  round-robin, so at every step the union of the ranks' batches is exactly the batch a single
  process would use. Since the loss is each rank's mean and
  :class:`~torch.nn.parallel.DistributedDataParallel` averages gradients over ranks, the
  update equals the single-process update on the global batch: the same command with and
  without ``torchrun`` optimises the same thing, with the same learning rate and schedule.
* **Data-dependent initialisation.** ActNorm's first training forward (and the batch-norm
  flow at every step) reduces per-channel sums over all ranks, so every rank computes the
  statistics of the global batch and ends with identical parameters; that forward runs inside
  DDP's first step, which is fine for DDP (its hooks only see gradients, and the init
  changes parameters under ``no_grad`` before they are used), and it keeps the first step
  identical to a single process's, whose first forward initialises on the same images with
  the same noise. Every buffer (ActNorm's ``initialized``, the batch-norm flow's running
  statistics, fixed permutations) is computed identically on every rank by construction, so
  DDP's rank-0 buffer broadcast before every forward — one collective per step — is switched
  off; buffers are still synchronised once when DDP wraps the model.
* **Noise.** Dequantization noise and dropout masks come from the generator state
  :func:`noise_seed` derives from ``(seed, epoch, step, rank)``: independent between ranks
  (the same noise on every rank would correlate the ranks' gradients), and a pure function
  of the position in the run, so a resumed run draws the noise an uninterrupted one would
  have drawn without having to gather every rank's generator state into the checkpoint.
* **Metrics.** Training bits/dim are all-reduced as (sum, count) pairs, not averaged
  averages. Validation and test passes run on the full split on every rank (identical
  weights and evaluation seed give identical numbers) and are all-reduced as a consistency
  point.
* **Files.** Only rank 0 writes checkpoints, images and metrics (atomically, see
  :mod:`.checkpoint`); all ranks read ``last.pt`` to resume, so ``--out`` must be on a file
  system every node sees. At each epoch start the ranks check they agree on the epoch.

Mixed precision (``--amp bf16``) is :mod:`.precision`; it applies with or without
``torchrun``.
"""

from __future__ import annotations

import atexit
import gc
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

from .config import TrainConfig
from .loop import Runtime, TrainingError

__all__ = [
    "DistributedRuntime", "ShardedEpochSampler", "PerRankNoise", "distributed_env",
    "init_distributed_runtime", "noise_seed", "noise_scope", "describe_runtime",
    "EPOCH_SEED_STRIDE",
]

#: :class:`~flowplugins.data.EpochShuffleSampler` shuffles epoch ``e`` of seed ``s`` with the
#: generator seed ``s * EPOCH_SEED_STRIDE + e``; the sharded sampler uses the same permutation.
EPOCH_SEED_STRIDE = 100_003


def distributed_env() -> Optional[Tuple[int, int, int]]:
    """``(rank, world_size, local_rank)`` from a launcher's environment, or ``None``.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (plus ``MASTER_ADDR`` and
    ``MASTER_PORT`` for the ``env://`` rendezvous) in every process it starts.

    Raises:
        TrainingError: if the variables are set but not integers with ``0 <= RANK <
            WORLD_SIZE``.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    raw = {k: os.environ.get(k, "0") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    try:
        rank, world, local = (int(raw[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as err:
        raise TrainingError(f"distributed launch: RANK/WORLD_SIZE/LOCAL_RANK must be integers; got {raw}") from err
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise TrainingError(f"distributed launch: need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0; got {raw}")
    return rank, world, local


def noise_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit generator seed for the random draws of one rank at one training step.

    Hashes the four numbers with :class:`numpy.random.SeedSequence`, so nearby tuples give
    unrelated streams.

    Example:
        >>> noise_seed(0, 0, 0, 0) != noise_seed(0, 0, 0, 1)
        True
    """
    state = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class noise_scope:  # noqa: N801 - used like a function: ``with noise_scope(...):``
    """Run a block with the global generators seeded by :func:`noise_seed`, then restore them.

    Args:
        seed, epoch, step, rank: the position in the run (see :func:`noise_seed`).
        device: the CUDA device whose generator is forked too (CPU only when ``None`` or CPU).
    """

    def __init__(self, seed: int, epoch: int, step: int, rank: int,
                 device: Optional[torch.device] = None) -> None:
        devices = [device] if device is not None and device.type == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._seed = noise_seed(seed, epoch, step, rank)

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self._seed)

    def __exit__(self, *exc) -> None:
        self._fork.__exit__(*exc)


# torch >= 2.14 renamed DDP's per-forward buffer broadcast switch.
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


@dataclass
class _Clock:
    """The (epoch, step within the epoch) the sampler and the noise share."""

    epoch: int = 0
    step: int = 0


class PerRankNoise(nn.Module):
    """Wraps the objective so that each training forward draws its randomness (dequantization
    noise, dropout) inside :class:`noise_scope` for ``(seed, epoch, step, rank)``.

    The epoch comes from :meth:`ShardedEpochSampler.set_epoch`, which also restarts the step
    count; evaluation-mode calls do not advance it.
    """

    def __init__(self, objective: nn.Module, seed: int, rank: int, clock: _Clock,
                 device: torch.device) -> None:
        super().__init__()
        self.objective = objective
        self.seed, self.rank, self.clock, self.device = int(seed), int(rank), clock, device

    def forward(self, *args, **kwargs) -> Tensor:
        with noise_scope(self.seed, self.clock.epoch, self.clock.step, self.rank, self.device):
            out = self.objective(*args, **kwargs)
        if self.training:
            self.clock.step += 1
        return out


class ShardedEpochSampler(DistributedSampler):
    """A :class:`~torch.utils.data.distributed.DistributedSampler` over the single-process
    epoch order.

    The epoch's permutation is :class:`~flowplugins.data.EpochShuffleSampler`'s (the same
    generator seed); rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, …``, the last
    ``n mod W`` positions are dropped so every rank has as many images. With local batch
    ``B``, step ``s`` on rank ``r`` takes positions ``(sB + j)W + r`` for ``j < B``, whose union
    over ranks is ``[sBW, (s + 1)BW)``: the single-process run's batch ``s`` of size ``BW``.

    :meth:`set_epoch` (called by the loop at every epoch start, with the resumed epoch after a
    restart) restarts the noise step count and, under an initialised process group, checks
    that all ranks agree on the epoch.

    Raises:
        TrainingError: from :meth:`set_epoch` if the ranks are at different epochs (they
            resumed from different checkpoints: ``--out`` is not shared between nodes).
    """

    def __init__(self, n: int, num_replicas: int, rank: int, seed: int = 0,
                 clock: Optional[_Clock] = None) -> None:
        super().__init__(range(int(n)), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=int(seed) * EPOCH_SEED_STRIDE, drop_last=True)
        self.clock = clock if clock is not None else _Clock()
        self._device = torch.device("cpu")

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(int(epoch))
        self.clock.epoch, self.clock.step = int(epoch), 0
        if dist.is_available() and dist.is_initialized():
            bounds = torch.tensor([epoch, -epoch], dtype=torch.float64, device=self._device)
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
            if bounds[0] != -bounds[1]:
                raise TrainingError(
                    f"train: the ranks are at different epochs ({int(-bounds[1])} to "
                    f"{int(bounds[0])}; this is rank {self.rank} at {epoch}): they resumed from "
                    f"different checkpoints. --out must be a directory every node sees"
                )


@dataclass
class DistributedRuntime(Runtime):
    """:class:`~flowplugins.training.loop.Runtime` for one rank of a ``torch.distributed`` run.

    Built by :func:`init_distributed_runtime`; see the module docstring for what each method
    does and why.
    """

    local_rank: int = 0
    seed: int = 0
    clock: _Clock = field(default_factory=_Clock)

    def _reduce(self, values, op=None) -> Tensor:
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
        return t.cpu()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def wrap(self, objective: nn.Module) -> nn.Module:
        objective = super().wrap(objective)
        noisy = PerRankNoise(objective, self.seed, self.rank, self.clock, self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(noisy, device_ids=device_ids, **_NO_BUFFER_SYNC)

    def sampler(self, n: int, seed: int) -> torch.utils.data.Sampler:
        s = ShardedEpochSampler(n, self.world_size, self.rank, seed, self.clock)
        s._device = self._collective_device()
        return s

    def local_batch_size(self, batch_size: int) -> int:
        if batch_size % self.world_size:
            raise TrainingError(
                f"train: --batch-size is the global batch and must be divisible by the "
                f"{self.world_size} processes; got {batch_size} (use "
                f"{batch_size - batch_size % self.world_size or self.world_size})"
            )
        return batch_size // self.world_size

    def mean(self, value: float) -> float:
        return float(self._reduce([value])[0]) / self.world_size

    def average(self, total: float, count: int) -> float:
        total, count = self._reduce([total, count]).tolist()
        return total / count if count else math.nan

    def from_main(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.broadcast(t, src=0)
        return float(t[0])

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def init_distributed_runtime(config: TrainConfig) -> DistributedRuntime:
    """Join the process group described by the launcher's environment.

    Uses NCCL and ``cuda:LOCAL_RANK`` for ``device="cuda"`` (or ``"auto"`` on a machine with
    GPUs), gloo on CPU. Reuses a process group that is already initialised (and leaves it to
    its owner); one it creates is destroyed at interpreter exit.

    Raises:
        TrainingError: without CUDA for ``device="cuda"``, for ``device="cuda:N"`` with
            several processes (each process takes the GPU of its ``LOCAL_RANK``), or with
            fewer GPUs than local processes.
    """
    env = distributed_env()
    if env is None:
        raise TrainingError("train: init_distributed_runtime needs RANK and WORLD_SIZE (run under torchrun)")
    rank, world, local = env
    want_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise TrainingError(f"train: device {config.device!r} asked for but CUDA is not available")
        if ":" in config.device and world > 1:
            raise TrainingError(
                f"train: under torchrun each process uses the GPU of its LOCAL_RANK; pass "
                f"--device cuda, not {config.device!r}"
            )
        if local >= torch.cuda.device_count():
            raise TrainingError(
                f"train: LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible; "
                f"start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if config.threads is None:
            torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
        atexit.register(_destroy_group)
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise TrainingError(
            f"train: the initialised process group (rank {dist.get_rank()} of "
            f"{dist.get_world_size()}) disagrees with RANK={rank}, WORLD_SIZE={world}"
        )
    return DistributedRuntime(rank=rank, world_size=world, device=device, amp=config.amp,
                              local_rank=local, seed=config.seed)


def _destroy_group() -> None:
    if dist.is_initialized():
        # A DDP reducer left in a reference cycle would otherwise be freed during interpreter
        # teardown, after the group, and gloo aborts the process from its worker thread.
        gc.collect()
        dist.destroy_process_group()


def describe_runtime(rt: Runtime) -> Dict[str, object]:
    """Plain-data summary of where a run executes (for logs and benchmarks)."""
    return {"rank": rt.rank, "world_size": rt.world_size, "device": str(rt.device),
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "threads": torch.get_num_threads()}
