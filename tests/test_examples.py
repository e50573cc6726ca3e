"""Every script in examples/ runs in its --fast mode (as a subprocess, one thread)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import flowplugins

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py"))


def run_example(name: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(EXAMPLES / name), "--fast", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_every_example_is_covered():
    assert set(SCRIPTS) == {"glow_digits.py", "pyro_glow.py", "nflows_multiscale.py",
                            "realnvp_checkerboard.py"}


@pytest.mark.parametrize("name, expect, files", [
    ("glow_digits.py", "test bits/dim", ["runs/glow_digits/temperatures.png",
                                         "runs/glow_digits/samples.png"]),
    ("pyro_glow.py", "test accuracy", []),
    ("nflows_multiscale.py", "nflows Flow: test bits/dim", ["runs/nflows_multiscale/samples.png"]),
    ("realnvp_checkerboard.py", "RealNVP test bits/dim",
     ["runs/realnvp_checkerboard/masks.png", "runs/realnvp_checkerboard/metrics.json"]),
])
def test_example_runs_fast(tmp_path, name, expect, files):
    done = run_example(name, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout
    for f in files:
        assert (tmp_path / f).is_file(), f


def test_glow_digits_with_the_third_party_plugin(tmp_path):
    if "leaky_relu_flow" not in flowplugins.names():
        pytest.skip("the example plugin is not installed (pip install -e examples/example_plugin)")
    done = run_example("glow_digits.py", tmp_path, "--plugin", "leaky_relu_flow")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test bits/dim" in done.stdout
