"""DerivedTensorCache: values are rebuilt exactly when a source tensor changes."""

from __future__ import annotations

import copy
import doctest
import pickle

import pytest
import torch

from flowplugins import derived_cache as derived_cache_module
from flowplugins.derived_cache import DerivedTensorCache, derive_all, register_derivation


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


def test_unregistered_values_are_built_in_the_graph_while_torch_compile_traces():
    """Dynamo cannot trace the key (storage addresses): ``get`` under torch.compile builds the
    value in the graph each call, and a source changed in place between calls is seen."""
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


_BUILDS = {"n": 0}


def _counted_inverse(weight):
    _BUILDS["n"] += 1
    return torch.linalg.inv(weight)


register_derivation("tests.counted_inverse", _counted_inverse)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_registered_derivations_stay_cached_inside_compiled_graphs(backend):
    """``derive`` under torch.compile is one call of ``flowplugins::derived_tensors``, which
    checks the key each time the graph runs: built once while the source stays, rebuilt (and
    right) after an in-place change, with the graph unchanged (no recompilation)."""
    if derived_cache_module._DERIVED_TENSORS_OP is None:
        pytest.skip("this torch cannot register the operator's fake version")
    torch._dynamo.reset()
    w = torch.eye(3) * 2.0
    cache = DerivedTensorCache()

    def inverse_plus_one(x):
        return cache.derive("tests.counted_inverse", [w]) @ x + 1.0

    compiled = torch.compile(inverse_plus_one, backend=backend)
    x = torch.randn(3, 4)
    torch.testing.assert_close(compiled(x), 0.5 * x + 1.0)  # tracing builds on fake tensors
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _BUILDS["n"] = 0
    for _ in range(3):
        torch.testing.assert_close(compiled(x), 0.5 * x + 1.0)
    assert _BUILDS["n"] == 0 and len(cache) == 1  # built once, by the first call
    with torch.no_grad():
        w.mul_(2.0)
    torch.testing.assert_close(compiled(x), 0.25 * x + 1.0)
    assert _BUILDS["n"] == 1
    torch.testing.assert_close(compiled(x), 0.25 * x + 1.0)
    assert _BUILDS["n"] == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_lookups_see_clear_and_replaced_storage(backend):
    """A compiled graph's batched lookup keeps its answer under the sources' versions and
    addresses: a write that bypasses the version counter stays invisible until ``clear()``
    of any cache in the batch (as for eager calls), and storage swapped in through ``.data``
    is seen at once."""
    if derived_cache_module._DERIVED_TENSORS_OP is None:
        pytest.skip("this torch cannot register the operator's fake version")
    torch._dynamo.reset()
    a, w = torch.eye(3) * 10.0, torch.eye(3) * 2.0
    first, cache = DerivedTensorCache(), DerivedTensorCache()
    requests = [(first, "tests.counted_inverse", [a]), (cache, "tests.counted_inverse", [w])]

    def apply(x):
        inv_a, inv_w = derive_all(requests)
        return inv_a @ x, inv_w @ x

    compiled = torch.compile(apply, backend=backend)
    x = torch.randn(3, 4)
    for _ in range(2):
        torch.testing.assert_close(compiled(x), (0.1 * x, 0.5 * x))
    w.data.copy_(torch.eye(3) * 4.0)  # no version bump
    torch.testing.assert_close(compiled(x), (0.1 * x, 0.5 * x))
    cache.clear()  # not the first cache of the batch
    torch.testing.assert_close(compiled(x), (0.1 * x, 0.25 * x))
    w.data = torch.eye(3) * 8.0  # new storage, same tensor object
    torch.testing.assert_close(compiled(x), (0.1 * x, 0.125 * x))
    torch.testing.assert_close(cache.derive("tests.counted_inverse", [w]), torch.eye(3) * 0.125)


def test_a_cached_value_is_handed_out_of_a_compiled_graph_as_a_copy():
    """Inductor may write later results into an external kernel's output buffer: the cache
    keeps its own tensor."""
    if derived_cache_module._DERIVED_TENSORS_OP is None:
        pytest.skip("this torch cannot register the operator's fake version")
    w = torch.eye(2) * 4.0
    cache = DerivedTensorCache()
    compiled = torch.compile(lambda: cache.derive("tests.counted_inverse", [w]).mul_(3.0),
                             backend="inductor")
    compiled()
    compiled()
    torch.testing.assert_close(cache.derive("tests.counted_inverse", [w]), torch.eye(2) * 0.25)


def test_copies_and_unpickled_caches_start_empty_under_their_own_id():
    w = torch.eye(2)
    cache = DerivedTensorCache()
    cache.derive("tests.counted_inverse", [w])
    for other in (copy.deepcopy(cache), copy.copy(cache), pickle.loads(pickle.dumps(cache))):
        assert len(other) == 0 and other._id != cache._id
        assert derived_cache_module._LIVE_CACHES[other._id] is other


def test_register_derivation_refuses_a_second_function_under_a_taken_name():
    register_derivation("tests.counted_inverse", _counted_inverse)  # the same one: fine
    with pytest.raises(ValueError, match="tests.counted_inverse"):
        register_derivation("tests.counted_inverse", torch.linalg.inv)


def test_derive_all_matches_derive_one_by_one_and_under_compile():
    a, b = torch.eye(2) * 2.0, torch.eye(3) * 5.0
    ca, cb = DerivedTensorCache(), DerivedTensorCache()
    requests = [(ca, "tests.counted_inverse", [a]), (cb, "tests.counted_inverse", [b])]
    eager = derive_all(requests)
    compiled = torch.compile(lambda: derive_all(requests), backend="eager")()
    for e, c, expected in zip(eager, compiled, (torch.eye(2) * 0.5, torch.eye(3) * 0.2)):
        torch.testing.assert_close(e, expected)
        torch.testing.assert_close(c, expected)
    assert derive_all([]) == []


register_derivation("tests.inverse_with_a_wrong_shape_rule", torch.linalg.inv, shape=lambda w: (1,))
register_derivation("tests.trace", torch.trace, shape=lambda w: ())


def test_a_wrong_shape_rule_is_reported_when_the_graph_is_traced():
    """Compiled graphs cut the flat result by the shape rule: one that disagrees with the
    derivation is an error naming the derivation, not a silently misshapen value."""
    if derived_cache_module._DERIVED_TENSORS_OP is None:
        pytest.skip("this torch cannot register the operator's fake version")
    torch._dynamo.reset()
    w, cache = torch.eye(2) * 2.0, DerivedTensorCache()
    compiled = torch.compile(lambda: cache.derive("tests.inverse_with_a_wrong_shape_rule", [w]),
                             backend="eager")
    with pytest.raises(Exception, match="shape rule of 'tests.inverse_with_a_wrong_shape_rule'"):
        compiled()


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_derive_all_under_compile_mixes_dtypes_and_shapes(backend):
    """Requests in two dtypes, a matrix and a scalar among them: one flat tensor per dtype,
    every value back in its own shape."""
    if derived_cache_module._DERIVED_TENSORS_OP is None:
        pytest.skip("this torch cannot register the operator's fake version")
    torch._dynamo.reset()
    a, b, c = torch.eye(2) * 2.0, torch.eye(3, dtype=torch.float64) * 4.0, torch.eye(3) * 5.0
    caches = [DerivedTensorCache() for _ in range(3)]
    requests = [(caches[0], "tests.counted_inverse", [a]), (caches[1], "tests.counted_inverse", [b]),
                (caches[2], "tests.trace", [c])]
    compiled = torch.compile(lambda: derive_all(requests), backend=backend)
    for _ in range(2):
        got = compiled()
        torch.testing.assert_close(got[0], torch.eye(2) * 0.5)
        torch.testing.assert_close(got[1], torch.eye(3, dtype=torch.float64) * 0.25)
        torch.testing.assert_close(got[2], torch.tensor(15.0))
