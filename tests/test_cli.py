"""The `flowplugins` command line: exit codes, stdout/stderr, list/check/train/sample/... ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowplugins.cli import main

TINY = ["--levels", "2", "--depth", "1", "--hidden", "8", "--batch-size", "64",
        "--warmup-steps", "2", "--eval-samples", "1", "--quiet"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch through the CLI (shared by the picture commands)."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--epochs", "1", "--out", str(out), *TINY]) == 0
    return out


# ---------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["train", "--epochs", "many"],
    ["train", "--coupling", "spline"],
    ["sample"],
    ["manipulate", "x.pt", "--from-class", "1"],
    ["check"],
])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and "usage:" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "--no-split-prior" in out


def test_invalid_values_exit_2_with_a_message(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--data", "mnits", "--out", str(tmp_path))
    assert code == 2 and "unknown data set 'mnits'" in err
    code, _, err = run(capsys, "train", "--lr", "-1", "--out", str(tmp_path))
    assert code == 2 and "lr must be positive" in err
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "cannot read" in err


def test_missing_mnist_says_how_to_download(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--data", "mnist", "--data-root", str(tmp_path),
                         "--out", str(tmp_path / "run"))
    assert code == 2 and out == ""
    assert "--download" in err and "MNIST" in err


# ---------------------------------------------------------------------------- list / check
def test_list_json(capsys):
    code, out, err = run(capsys, "list", "--json")
    rows = json.loads(out)
    assert code == 0 and err == ""
    by_name = {r["name"]: r for r in rows}
    assert {"squeeze", "actnorm", "affine_coupling", "split2d_prior"} <= set(by_name)
    assert by_name["squeeze"]["distribution"] == "flowplugins"
    assert set(by_name["squeeze"]) == {"name", "backends", "distribution", "summary"}
    assert "torch" in by_name["squeeze"]["backends"] and by_name["squeeze"]["summary"]


def test_list_table(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["name", "backends", "distribution"]
    assert any(line.startswith("squeeze ") for line in out.splitlines())


def test_check_a_registered_name(capsys):
    code, out, _ = run(capsys, "check", "squeeze", "--json")
    assert code == 0 and json.loads(out)["status"] == "ok"
    code, out, _ = run(capsys, "check", "actnorm", "--backend", "torch", "--shape", "2,4,4")
    assert code == 0 and out.startswith("ok")


def test_check_unknown_name_is_a_usage_error(capsys):
    code, _, err = run(capsys, "check", "squeez")
    assert code == 2 and "did you mean 'squeeze'" in err


def test_check_failure_exits_1(capsys, monkeypatch):
    import flowplugins.testing as testing

    def failing(*args, **kwargs):
        raise testing.BijectorCheckError("squeeze: inverse(forward(x)) != x (max error 0.5)")

    monkeypatch.setattr(testing, "check_bijector", failing)
    code, out, _ = run(capsys, "check", "squeeze")
    assert code == 1 and "failed" in out and "max error 0.5" in out


# ---------------------------------------------------------------------------- train
def test_train_writes_outputs_and_resumes(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--epochs", "1", "--out", str(tmp_path), *TINY[:-1],
                         "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["epochs_run"] == 1 and "test_bpd" in metrics
    for name in ("last.pt", "best.pt", "metrics.json", "samples.png", "bpd_curve.png"):
        assert (tmp_path / name).is_file()
    assert "resuming" not in err and "epoch 1/1" in err  # diagnostics on stderr
    code, out, err = run(capsys, "train", "--epochs", "2", "--out", str(tmp_path), *TINY[:-1])
    assert code == 0 and f"resuming from {tmp_path / 'last.pt'}" in err
    assert out.startswith("test_bpd ") and "epochs 2" in out


def test_train_with_memory_saving(capsys, tmp_path):
    """``--memory-saving`` trains a model built with memory_saving=True; with the default
    recipe's dropout it is a usage error that says what to change."""
    import torch

    from flowplugins.training import load_model

    code, _, err = run(capsys, "train", "--memory-saving", "--out", str(tmp_path / "a"), *TINY)
    assert code == 2 and "model.memory_saving" in err and "--dropout 0" in err
    code, out, err = run(capsys, "train", "--memory-saving", "--dropout", "0", "--epochs", "1",
                         "--out", str(tmp_path / "b"), *TINY)
    assert code == 0, err
    model, ckpt = load_model(tmp_path / "b" / "last.pt")
    assert model.memory_saving and ckpt["config"]["model"]["memory_saving"] is True
    assert torch.isfinite(model.bits_per_dim(torch.rand(2, *model.event_shape))).all()


def test_train_from_config_file_with_override(capsys, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("epochs: 1\nbatch_size: 64\neval_samples: 1\nmodel:\n  levels: 2\n  depth: 1\n"
                   "  hidden: 4\n")
    code, out, err = run(capsys, "train", "--config", str(cfg), "--hidden", "8",
                         "--out", str(tmp_path / "run"), "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["config"]["model"]["hidden"] == 8


def test_corrupted_checkpoint_exits_1(capsys, tmp_path, trained):
    bad = tmp_path / "last.pt"
    bad.write_bytes((trained / "last.pt").read_bytes()[:500])
    code, _, err = run(capsys, "train", "--epochs", "2", "--out", str(tmp_path), *TINY)
    assert code == 1 and "truncated or corrupted" in err
    code, _, err = run(capsys, "sample", str(bad), "--out", str(tmp_path / "s.png"))
    assert code == 1 and "truncated or corrupted" in err


def test_resume_flags(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--resume", "--out", str(tmp_path), *TINY)
    assert code == 1 and "does not exist" in err
    code, _, _ = run(capsys, "train", "--resume", "--no-resume", "--out", str(tmp_path), *TINY)
    assert code == 2


# ---------------------------------------------------------------------------- pictures
def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_writes_a_png(capsys, tmp_path, trained):
    target = tmp_path / "grid.png"
    code, out, _ = run(capsys, "sample", str(trained / "best.pt"), "--n", "16",
                       "--temperature", "0.7", "--out", str(target))
    assert code == 0 and _png(target) and out.strip() == str(target)


def test_interpolate_writes_a_png(capsys, tmp_path, trained):
    target = tmp_path / "interp.png"
    code, out, _ = run(capsys, "interpolate", str(trained / "best.pt"), "--pairs", "2",
                       "--steps", "5", "--out", str(target))
    assert code == 0 and _png(target)
    from PIL import Image

    with Image.open(target) as im:  # 2 rows x 5 columns of 8x8 tiles (+1 px padding), x4
        assert im.size == (4 * (5 * 9 + 1), 4 * (2 * 9 + 1))


def test_manipulate_writes_a_png(capsys, tmp_path, trained):
    target = tmp_path / "manip.png"
    code, _, err = run(capsys, "manipulate", str(trained / "best.pt"), "--from-class", "1",
                       "--to-class", "7", "--n", "2", "--steps", "4", "--out", str(target))
    assert code == 0 and _png(target), err
    code, _, err = run(capsys, "manipulate", str(trained / "best.pt"), "--from-class", "1",
                       "--to-class", "12", "--out", str(target))
    assert code == 2 and "0..9" in err


def test_picture_commands_reject_bad_values(capsys, trained):
    code, _, err = run(capsys, "sample", str(trained / "best.pt"), "--temperature", "0")
    assert code == 2 and "--temperature" in err


# ---------------------------------------------------------------------------- fault tolerance
def test_sigkill_mid_run_then_rerun_resumes(tmp_path):
    """SIGKILL a training process after its first checkpoint; the same command resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "flowplugins", "train", "--epochs", "3", "--out", str(out),
           *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming from {out / 'last.pt'}" in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
