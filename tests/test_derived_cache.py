"""DerivedTensorCache: values are rebuilt exactly when a source tensor changes."""

from __future__ import annotations

import doctest

import torch

from flowplugins import derived_cache as derived_cache_module
from flowplugins.derived_cache import DerivedTensorCache


def test_doctests():
    result = doctest.testmod(derived_cache_module)
    assert result.failed == 0 and result.attempted > 0


def _counting_build(source, counter):
    def build():
        counter["n"] += 1
        return source * 2
    return build


def test_rebuilds_only_when_a_source_changes():
    a, b = torch.ones(3), torch.zeros(2)
    cache, counter = DerivedTensorCache(), {"n": 0}
    for _ in range(3):
        cache.get("twice", _counting_build(a, counter), [a, b])
    assert counter["n"] == 1 and len(cache) == 1
    with torch.no_grad():
        b.add_(1)  # another source changed: every value is stale
    assert torch.equal(cache.get("twice", _counting_build(a, counter), [a, b]), a * 2)
    assert counter["n"] == 2


def test_new_storage_or_dtype_is_a_change_and_clear_empties():
    a = torch.ones(3)
    cache, counter = DerivedTensorCache(), {"n": 0}
    cache.get("v", _counting_build(a, counter), [a])
    replaced = a.clone()  # same values and version, other storage
    cache.get("v", _counting_build(replaced, counter), [replaced])
    doubled = a.double()
    cache.get("v", _counting_build(doubled, counter), [doubled])
    assert counter["n"] == 3
    cache.clear()
    assert len(cache) == 0
    cache.get("v", _counting_build(doubled, counter), [doubled])
    assert counter["n"] == 4


def test_values_built_in_inference_mode_can_be_saved_for_backward():
    w = torch.randn(2, 2)
    cache = DerivedTensorCache()
    with torch.inference_mode():
        cache.get("w", lambda: w + 0, [w])
    x = torch.randn(2, requires_grad=True)
    (cache.get("w", lambda: w + 0, [w]) @ x).sum().backward()
    assert x.grad is not None


def test_nothing_is_cached_while_torch_compile_traces():
    """Dynamo cannot trace the key (storage addresses): under torch.compile the value is built
    in the graph each call, and a source changed in place between calls is seen."""
    w = torch.eye(2) * 2.0
    cache = DerivedTensorCache()

    def inverse_plus_one(source):
        return cache.get("inverse", lambda: torch.linalg.inv(source), [source]) + 1.0

    compiled = torch.compile(inverse_plus_one, backend="eager")
    torch.testing.assert_close(compiled(w), torch.eye(2) * 0.5 + 1.0)
    assert len(cache) == 0
    w.mul_(2.0)
    torch.testing.assert_close(compiled(w), torch.eye(2) * 0.25 + 1.0)
    assert len(cache) == 0
