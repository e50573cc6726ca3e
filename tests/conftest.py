"""Test configuration of flowplugins.

Options:
    --device {all,cpu,cuda}: devices of the ``device`` fixture (default all: CPU, and CUDA when a
        GPU is present; CUDA cases are skipped, not failed, without one).
    --dtype {all,float64,float32}: dtypes of the ``dtype`` fixture (default all).
    --runslow: run tests marked ``slow`` (skipped otherwise).

Hypothesis profiles: ``ci`` (few examples, no deadline; the default) and ``dev`` (more
examples); pick one with the environment variable ``HYPOTHESIS_PROFILE``. Torch's thread count
follows ``OMP_NUM_THREADS``; set it to 1 on shared machines.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=4,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flowplugins")
    group.addoption("--device", choices=("all", "cpu", "cuda"), default="all",
                    help="devices to test on (default: all = cpu, plus cuda when available)")
    group.addoption("--dtype", choices=("all", *DTYPES), default="all",
                    help="dtypes to test in (default: all)")
    group.addoption("--runslow", action="store_true", default=False,
                    help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test; pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request: pytest.FixtureRequest) -> str:
    """Each test that asks for ``device`` runs on the CPU and on CUDA (skipped without a GPU)."""
    chosen = request.config.getoption("--device")
    if chosen not in ("all", request.param):
        pytest.skip(f"device {request.param} not selected (--device {chosen})")
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    return request.param


@pytest.fixture(params=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Each test that asks for ``dtype`` runs in float64 and float32 (see ``--dtype``)."""
    chosen = request.config.getoption("--dtype")
    if chosen not in ("all", request.param):
        pytest.skip(f"dtype {request.param} not selected (--dtype {chosen})")
    return DTYPES[request.param]


# Shared test helpers (tests/helpers.py) assert too; rewrite them so failures show the values.
pytest.register_assert_rewrite("helpers")
