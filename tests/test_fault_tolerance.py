"""A training run killed with SIGKILL mid-epoch resumes from its last checkpoint.

The run is the public CLI, ``python -m flowplugins train``, on tiny settings (the digits data,
a 2-level Glow of width 16). The first process is killed with SIGKILL shortly after it has
written a checkpoint, i.e. in the middle of the next epoch; the same command is then run
again. It must say ``resuming from …``, start from an epoch no earlier than the checkpoint
seen before the kill (so at most the unfinished epoch is lost), run every epoch exactly once,
and leave checkpoints that load.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

EPOCHS = 4
TIMEOUT = 240


def _command(out: Path):
    return [
        sys.executable, "-m", "flowplugins", "train", "--out", str(out), "--epochs", str(EPOCHS),
        "--levels", "2", "--depth", "4", "--hidden", "16", "--batch-size", "16",
        "--eval-samples", "1", "--ema-decay", "0", "--threads", "1", "--seed", "3",
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _checkpoint_epoch(path: Path) -> int:
    # Checkpoints are renamed into place, so a file that exists is complete.
    state = torch.load(path, map_location="cpu", weights_only=True)
    return int(state["train_state"]["epoch"])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_mid_epoch_then_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    last = out / "last.pt"
    log = (tmp_path / "first.stderr").open("w")
    first = subprocess.Popen(_command(out), stdout=subprocess.DEVNULL, stderr=log, env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while not last.exists():
            if first.poll() is not None:
                pytest.fail(f"the first run exited ({first.returncode}) before writing "
                            f"{last}:\n{(tmp_path / 'first.stderr').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within the time limit")
            time.sleep(0.05)
        seen_epoch = _checkpoint_epoch(last)
        time.sleep(0.3)  # into the next epoch (each takes seconds)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        log.close()
    assert first.returncode == -signal.SIGKILL
    assert 1 <= seen_epoch < EPOCHS, "the first run was not killed mid-training"

    second = subprocess.run(_command(out), capture_output=True, text=True, env=_env(),
                            timeout=TIMEOUT)
    assert second.returncode == 0, second.stderr[-3000:]
    match = re.search(rf"resuming from {re.escape(str(last))} \(epoch (\d+)", second.stderr)
    assert match, f"no 'resuming from …' on stderr:\n{second.stderr[-3000:]}"
    resumed_epoch = int(match.group(1))
    # At most the unfinished epoch is lost: the run restarts where the last checkpoint was.
    assert seen_epoch <= resumed_epoch <= seen_epoch + 1

    metrics = json.loads((out / "metrics.json").read_text())
    epochs = [h["epoch"] for h in metrics["history"]]
    assert epochs == list(range(1, EPOCHS + 1)), f"epochs run: {epochs}"
    assert metrics["epochs_run"] == EPOCHS and math.isfinite(metrics["test_bpd"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"

    from flowplugins.training import load_model

    for name in ("best.pt", "last.pt"):
        model, _ = load_model(out / name)
        assert torch.isfinite(model.sample(4)).all()
        assert torch.isfinite(model.log_prob(torch.rand(2, 1, 8, 8))).all()
