"""The entry-point registry: agreement of registry.yaml and pyproject, and plugin failure modes.

Third-party distributions are simulated with temporary ``*.dist-info`` directories on
``sys.path`` (what an installed wheel leaves behind), so discovery runs through real metadata.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import inspect
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
from flowplugins.registry import (
    DuplicatePluginError,
    PluginLoadError,
    RegistryError,
    UnknownBijectorError,
    load_registry_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
GROUP = registry.ENTRY_POINT_GROUP


def _pyproject_entry_points() -> dict:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["project"]["entry-points"][GROUP])


def _import_target(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


GOOD_MODULE = '''
from flowplugins import Bijector

class Layer(Bijector):
    """A third-party identity layer."""

    def __init__(self, event_shape, gain=1.0):
        super().__init__(event_shape)
        self.gain = gain

    def _forward(self, x, context):
        return x, x.new_zeros(x.shape[0])

    def _inverse(self, z, context):
        return z, z.new_zeros(z.shape[0])
'''


@pytest.fixture
def fake_dist(tmp_path):
    """``make(dist_name, {entry name: target}, {module name: source})`` installs a fake
    distribution for the duration of the test."""
    added, modules = [], []

    def make(dist_name: str, entry_points: dict, sources: dict = None) -> None:
        root = tmp_path / dist_name
        info = root / f"{dist_name.replace('-', '_')}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
        lines = [f"[{GROUP}]"] + [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (sources or {}).items():
            (root / f"{module}.py").write_text(source)
            modules.append(module)
        sys.path.insert(0, str(root))
        added.append(str(root))
        registry.refresh()

    yield make
    for path in added:
        sys.path.remove(path)
    for module in modules:
        sys.modules.pop(module, None)
    registry.refresh()


def test_registry_yaml_matches_pyproject_entry_points():
    described = {name: entry["class"] for name, entry in load_registry_yaml().items()}
    declared = _pyproject_entry_points()
    assert described == declared, (
        f"registry.yaml and pyproject.toml disagree: only in yaml "
        f"{sorted(set(described) - set(declared))}, only in pyproject "
        f"{sorted(set(declared) - set(described))}, different targets "
        f"{sorted(n for n in set(described) & set(declared) if described[n] != declared[n])}"
    )


def test_installed_entry_points_match_pyproject():
    installed = {
        ep.name: ep.value
        for ep in metadata.entry_points(group=GROUP)
        if registry._dist_name(ep) == "flowplugins"
    }
    assert installed == _pyproject_entry_points(), (
        "the installed metadata is stale; reinstall with `pip install -e .`"
    )
    assert set(installed) <= set(flowplugins.names())


@pytest.mark.parametrize("name", sorted(load_registry_yaml()))
def test_yaml_options_are_the_constructor_defaults(name):
    entry = load_registry_yaml()[name]
    cls = _import_target(entry["class"])
    params = inspect.signature(cls.__init__).parameters
    defaults = {
        n: p.default
        for n, p in params.items()
        if n not in ("self", "event_shape") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    assert entry["options"] == defaults, f"{name}: registry.yaml options != {cls.__name__}.__init__"
    assert flowplugins.info(name).summary == entry["summary"]


def test_unknown_name_lists_close_matches():
    with pytest.raises(UnknownBijectorError, match="did you mean 'squeeze'"):
        flowplugins.build("sqeeze", (1, 2, 2))
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        flowplugins.build("squeeze", (1, 2, 2), backend="jax")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['facter'\]"):
        flowplugins.build("squeeze", (1, 2, 2), facter=2)


def test_third_party_plugin_is_discovered_and_described(fake_dist):
    fake_dist("good-flowplugin", {"good_layer": "fp_good_mod:Layer"}, {"fp_good_mod": GOOD_MODULE})
    assert "good_layer" in flowplugins.names()
    info = flowplugins.info("good_layer")
    assert info.distribution == "good-flowplugin" and not info.builtin
    assert info.summary == "A third-party identity layer."
    for backend in registry.BACKENDS:
        flowplugins.build("good_layer", (1, 2, 2), backend=backend, gain=2.0)


def test_broken_plugin_is_reported_by_distribution_and_others_still_build(fake_dist):
    fake_dist(
        "broken-flowplugin",
        {"broken_layer": "fp_broken_mod:Layer", "not_a_bijector": "fp_broken_ok:Layer"},
        {"fp_broken_mod": "raise ImportError('missing dependency xyz')\n",
         "fp_broken_ok": "class Layer:\n    pass\n"},
    )
    assert {"broken_layer", "not_a_bijector"} <= set(flowplugins.names())
    with pytest.raises(PluginLoadError, match=r"'broken-flowplugin'.*missing dependency xyz"):
        flowplugins.build("broken_layer", (1, 2, 2))
    with pytest.raises(PluginLoadError, match="not a subclass of flowplugins.Bijector"):
        flowplugins.get_class("not_a_bijector")
    z, _ = flowplugins.build("squeeze", (1, 2, 2))(torch.zeros(1, 1, 2, 2))
    assert z.shape == (1, 4, 1, 1)


def test_duplicate_name_names_both_distributions(fake_dist):
    fake_dist("dup-one", {"dup_layer": "fp_dup_one:Layer"}, {"fp_dup_one": GOOD_MODULE})
    fake_dist("dup-two", {"dup_layer": "fp_dup_two:Layer"}, {"fp_dup_two": GOOD_MODULE})
    with pytest.warns(UserWarning, match="dup-one, dup-two"):
        assert "dup_layer" in flowplugins.names()
    with pytest.raises(DuplicatePluginError, match="dup-one, dup-two"):
        flowplugins.build("dup_layer", (1, 2, 2))
    flowplugins.build("squeeze", (1, 2, 2))


def test_a_plugin_does_not_override_a_builtin(fake_dist):
    fake_dist("shadowing-plugin", {"squeeze": "fp_shadow:Layer"}, {"fp_shadow": GOOD_MODULE})
    with pytest.warns(UserWarning, match=r"ignoring bijector 'squeeze' from distribution\(s\) shadowing-plugin"):
        flowplugins.names()
    assert flowplugins.info("squeeze").distribution == "flowplugins"
    z, _ = flowplugins.build("squeeze", (1, 2, 2))(torch.zeros(1, 1, 2, 2))
    assert z.shape == (1, 4, 1, 1)


def test_invalid_names_are_skipped_with_a_warning(fake_dist):
    fake_dist("oddly-named", {"Bad-Name": "fp_odd:Layer"}, {"fp_odd": GOOD_MODULE})
    with pytest.warns(UserWarning, match=r"'Bad-Name' from distribution 'oddly-named'"):
        names = flowplugins.names()
    assert "Bad-Name" not in names and "squeeze" in names


def test_refresh_forgets_removed_plugins(fake_dist, tmp_path):
    fake_dist("temp-plugin", {"temp_layer": "fp_temp:Layer"}, {"fp_temp": GOOD_MODULE})
    assert "temp_layer" in flowplugins.names()
    sys.path.remove(str(tmp_path / "temp-plugin"))
    registry.refresh()
    assert "temp_layer" not in flowplugins.names()
    sys.path.insert(0, str(tmp_path / "temp-plugin"))  # the fixture removes it


GOOD_ENTRY = """\
    class: flowplugins.bijectors.squeeze:Squeeze
    summary: s
    shape: s
    options: {factor: 2}
    reference: r
"""


@pytest.mark.parametrize(
    "text, message",
    [
        ("bijectors: [\n", "not valid YAML"),
        ("other: 1\n", "expected a mapping with a 'bijectors' mapping"),
        ("bijectors:\n  Bad-Name:\n" + GOOD_ENTRY, "entry 'Bad-Name': names must be snake_case"),
        ("bijectors:\n  sq: 3\n", "entry 'sq': expected a mapping, got int"),
        ("bijectors:\n  sq:\n" + GOOD_ENTRY.replace("    reference: r\n", ""),
         "entry 'sq': missing field 'reference'"),
        ("bijectors:\n  sq:\n" + GOOD_ENTRY.replace("{factor: 2}", "[2]"),
         "entry 'sq': field 'options' must be a dict, got list"),
        ("bijectors:\n  sq:\n" + GOOD_ENTRY + "    extra: 1\n", r"entry 'sq': unknown field\(s\) \['extra'\]"),
        ("bijectors:\n  sq:\n" + GOOD_ENTRY.replace("flowplugins.bijectors.squeeze:Squeeze", "Squeeze"),
         "entry 'sq': field 'class' must look like 'package.module:Class'"),
    ],
)
def test_load_registry_yaml_names_file_entry_and_field(tmp_path, text, message):
    path = tmp_path / "registry.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message) as info:
        load_registry_yaml(path)
    assert str(path) in str(info.value)


def test_load_registry_yaml_accepts_a_good_file(tmp_path):
    path = tmp_path / "registry.yaml"
    path.write_text("bijectors:\n  sq:\n" + GOOD_ENTRY)
    assert load_registry_yaml(path)["sq"]["options"] == {"factor": 2}
