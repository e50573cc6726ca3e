"""The example plugin package under examples/example_plugin is discovered through its entry point.

It is made discoverable without pip-installing it: a temporary ``*.dist-info`` directory with
the package's entry point goes on ``sys.path`` next to the package source, which is exactly what
an installation leaves behind.
"""

from __future__ import annotations

import sys
try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib
from pathlib import Path

import pytest
import torch

import flowplugins
from flowplugins import registry
from flowplugins.testing import check_bijector, check_registered

PLUGIN_ROOT = Path(__file__).resolve().parents[1] / "examples" / "example_plugin"
PACKAGE = "flowplugins_example_plugin"


@pytest.fixture
def example_plugin(tmp_path):
    project = tomllib.loads((PLUGIN_ROOT / "pyproject.toml").read_text())["project"]
    entry_points = project["entry-points"][registry.ENTRY_POINT_GROUP]
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\n"
        + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    paths = [str(tmp_path), str(PLUGIN_ROOT)]
    sys.path[:0] = paths
    registry.refresh()
    yield project
    for path in paths:
        sys.path.remove(path)
    for module in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[module]
    registry.refresh()


def test_example_plugin_is_discovered(example_plugin):
    assert "leaky_relu_flow" in flowplugins.names()
    info = flowplugins.info("leaky_relu_flow")
    assert info.distribution == example_plugin["name"] and not info.builtin
    assert info.summary.startswith("Leaky ReLU with a learned")


def test_example_plugin_builds_for_every_backend(example_plugin):
    from nflows.transforms import Transform
    from pyro.distributions import TransformModule

    kinds = {"torch": flowplugins.Bijector, "nflows": Transform, "pyro": TransformModule}
    for backend, kind in kinds.items():
        assert isinstance(flowplugins.build("leaky_relu_flow", (3, 4, 4), backend=backend), kind)


def test_example_plugin_passes_the_property_checks(example_plugin):
    check_registered("leaky_relu_flow", [(3, 4, 4)], seeds=(0,))
    check_bijector("leaky_relu_flow", (2, 2, 6), options={"negative_slope": 0.2},
                   batch_shape=(3, 2), dtype=torch.float32, backend=("nflows", "pyro"))

