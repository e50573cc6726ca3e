"""Smoke tests of the benchmark scripts: each runs in --quick mode and prints its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytest.importorskip("nflows")
pytest.importorskip("normflows")


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )


def _table_rows(stdout: str):
    return [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]


def test_glow_throughput_quick_prints_table_with_equal_coupling_nets():
    proc = _run("glow_throughput.py", "--libraries", "flowplugins,flowplugins-ms,nflows,normflows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    names = [row.split("|")[1].strip() for row in rows[1:]]
    assert names == ["floor", "flowplugins", "flowplugins-ms", "nflows", "normflows"]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    nets = {row.split("|")[1].strip(): row.split("|")[1 + header.index("coupling-net params")].strip()
            for row in rows[1:]}
    assert len(set(nets.values())) == 1, nets
    assert "round 1/1" in proc.stderr  # diagnostics go to stderr, not into the table


def test_glow_throughput_json():
    proc = _run("glow_throughput.py", "--json", "--libraries", "flowplugins")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["coupling_nets_match"] is True
    assert set(data["summary"]) == {"floor", "flowplugins"}
    assert data["summary"]["floor"]["train_ratio"] == pytest.approx(1.0)
    # The floor is its faster layout; against the contiguous floor it can only look better.
    floor = data["summary"]["floor"]
    assert 0 < floor["train_ratio_contiguous"] <= 1.0 and 0 < floor["sample_ratio_contiguous"] <= 1.0
    for got in data["rounds"][0].values():
        assert got["floor_train_layout"] in ("contiguous", "channels_last")
        assert got["floor_sample_layout"] in ("contiguous", "channels_last")
    ours = data["rounds"][0]["flowplugins"]
    if ours["floor_train_layout"] == "contiguous":
        assert ours["train_ratio"] == ours["train_ratio_contiguous"]


@pytest.mark.slow
def test_glow_throughput_compile_json():
    """--compile times the compiled floor beside the eager one and reports no peak memory."""
    proc = _run("glow_throughput.py", "--json", "--compile", "--libraries", "flowplugins")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["args"]["compile"] is True
    variants = ("contiguous", "channels_last", "compiled contiguous", "compiled channels_last")
    for got in data["rounds"][0].values():
        assert got["floor_train_layout"] in variants and got["floor_sample_layout"] in variants
        assert got["peak_mib"] is None
    floor = data["summary"]["floor"]
    assert 0 < floor["train_ratio_contiguous"] <= 1.0 and 0 < floor["sample_ratio_contiguous"] <= 1.0


@pytest.mark.slow
def test_glow_throughput_cpp_wrapper_json():
    """--compile --cpp-wrapper runs end to end, times both phases and records the option."""
    proc = _run("glow_throughput.py", "--json", "--compile", "--cpp-wrapper",
                "--libraries", "flowplugins")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["args"]["cpp_wrapper"] is True
    for got in data["rounds"][0].values():
        assert got["train_s"] > 0 and got["sample_s"] > 0


def test_glow_throughput_rejects_cpp_wrapper_without_compile():
    proc = _run("glow_throughput.py", "--cpp-wrapper")
    assert proc.returncode == 2
    assert "--cpp-wrapper is an option of --compile" in proc.stderr


def test_glow_throughput_trains_through_flat_parameters_when_asked():
    proc = _run("glow_throughput.py", "--json", "--params", "flat", "--block", "2",
                "--libraries", "flowplugins,flowplugins-ms,nflows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["args"]["params"] == "flat" and data["args"]["block"] == 2
    for got in data["rounds"][0].values():
        assert got["train_s"] > 0


def test_glow_throughput_rejects_a_block_below_one():
    proc = _run("glow_throughput.py", "--block", "0")
    assert proc.returncode == 2
    assert "--block must be at least 1; got 0" in proc.stderr


def test_glow_throughput_rejects_unknown_library():
    proc = _run("glow_throughput.py", "--libraries", "flowplugins,tensorflow")
    assert proc.returncode == 2
    assert "tensorflow" in proc.stderr


def test_conv1x1_micro_quick_prints_table():
    proc = _run("conv1x1_micro.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["W x", "W⁻¹ z", "train"]


def test_memory_depth_quick_prints_table():
    proc = _run("memory_depth.py", "--libraries", "flowplugins,flowplugins-ms")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _table_rows(proc.stdout)
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["flowplugins", "flowplugins-ms"]


def test_train_step_quick_times_every_variant_against_torch_defaults():
    proc = _run("train_step.py", "--json", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)["summary"]
    assert list(summary) == ["torch defaults", "+ fused AdamW", "+ foreach EMA", "flowplugins"]
    assert summary["torch defaults"]["speedup"] == pytest.approx(1.0)
    assert all(v["ms"] > 0 and v["speedup"] > 0 for v in summary.values())


@pytest.mark.parametrize("library", ["flowplugins", "nflows", "normflows"])
def test_flat_parameters_train_every_benchmarked_glow_exactly(library, monkeypatch):
    """The benchmark trains every library through FlatParameters by default: the gradients it
    hands Adam must be each library's own per-tensor gradients."""
    import copy

    import torch

    from flowplugins.training import FlatParameters

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _glow import BUILDERS, CONFIGS

    torch.manual_seed(0)
    gut = BUILDERS[library](CONFIGS["quick"])
    model = gut.module.double().train()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        gut.nll(x)  # data-dependent initialisation, as in the benchmark
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = copy.deepcopy(model)
    loss_ref = -reference.log_prob(x).mean() if library != "normflows" else -reference.log_prob(x, None).mean()
    loss_ref.backward()
    flat = FlatParameters(model)
    loss = flat.call(gut.nll, x)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref)
    grads = flat.vector.grad.split([p.numel() for p in reference.parameters()])
    for (name, p), g in zip(reference.named_parameters(), grads):
        # Each segment holds its parameter in the parameter's memory order (channels-last
        # conv weights included), which its strides describe.
        torch.testing.assert_close(torch.as_strided(g, p.shape, p.stride()), p.grad,
                                   rtol=1e-9, atol=1e-12, msg=name)
