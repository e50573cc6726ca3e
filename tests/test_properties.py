"""The property suite: every registered bijector × every backend × device × dtype.

Each test draws structure with hypothesis (event shape fitting the layer, batch shape, seed) and
runs :func:`flowplugins.testing.check_bijector`. ``CASES`` is the one table of per-name
constructor options, shape constraints, tolerances and exclusions, each with its reason. A
registered name absent from the table still gets a default attempt (no options, ``C >= 2``,
even sides), so a plugin the suite cannot exercise fails instead of going unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import pytest
from hypothesis import given

import flowplugins
from flowplugins.registry import BACKENDS
from flowplugins.testing import batch_shapes, check_bijector, event_shapes, seeds


@dataclass(frozen=True)
class Case:
    """How the suite exercises one registered name."""

    options: Dict[str, Any] = field(default_factory=dict)
    min_channels: int = 2
    channel_multiple: int = 1
    levels: int = 1  # H and W are multiples of 2**levels
    context_shape: Optional[Tuple[int, ...]] = None
    atol: Optional[float] = None  # None: check_bijector's defaults (1e-10 f64, 1e-5 f32)
    rtol: Optional[float] = None
    skip_backends: Dict[str, str] = field(default_factory=dict)  # backend -> reason
    reason: str = ""  # why this entry differs from the default


# Couplings use hidden=8 so that the suite stays well under two minutes on one CPU thread.
SMALL_NET = {"hidden": 8}
CASES: Dict[str, Tuple[Case, ...]] = {
    "actnorm": (Case(min_channels=1),),
    "inv_conv1x1_lu": (Case(min_channels=1),),
    "inv_conv1x1": (Case(min_channels=1),),
    "affine_coupling": (
        Case(options=SMALL_NET, reason="channel split needs C >= 2"),
        Case(options={**SMALL_NET, "context_features": 3}, context_shape=(3,),
             reason="conditional variant"),
    ),
    "additive_coupling": (
        Case(options=SMALL_NET, reason="channel split needs C >= 2"),
        Case(options={**SMALL_NET, "context_features": 3}, context_shape=(3,),
             reason="conditional variant"),
    ),
    "checkerboard_coupling": (
        Case(options={**SMALL_NET, "parity": 0}, min_channels=1),
        Case(options={**SMALL_NET, "parity": 1}, min_channels=1),
        Case(options={**SMALL_NET, "context_features": 2}, min_channels=1, context_shape=(2,),
             reason="conditional variant"),
    ),
    "squeeze": (Case(min_channels=1),),
    "split2d_prior": (Case(reason="splits channels in two, needs C >= 2"),),
    "batchnorm": (Case(min_channels=1, reason="batch-dependent; checked in eval mode"),),
    "reverse_permutation": (Case(min_channels=1),),
    "shuffle_permutation": (Case(min_channels=1, options={"seed": 3}),),
    "logit": (Case(min_channels=1, reason="inputs in (0.05, 0.95) via input_domain"),),
    "gaussian_prior": (
        Case(min_channels=1),
        Case(min_channels=1, options={"context_features": 4}, context_shape=(4,),
             reason="class-conditional variant"),
    ),
}
DEFAULT_CASES = (Case(reason="not in CASES: default attempt"),)


def _params():
    for name in flowplugins.names():
        cases = CASES.get(name, DEFAULT_CASES)
        for i, case in enumerate(cases):
            for backend in BACKENDS:
                marks = ()
                if backend in case.skip_backends:
                    marks = (pytest.mark.skip(reason=case.skip_backends[backend]),)
                yield pytest.param(name, case, backend, id=f"{name}-{i}-{backend}", marks=marks)


@pytest.mark.parametrize("name, case, backend", list(_params()))
def test_bijector_properties(name: str, case: Case, backend: str, device: str, dtype) -> None:
    @given(
        event_shape=event_shapes(
            levels=case.levels,
            min_channels=case.min_channels,
            max_channels=max(4, case.min_channels),
            max_size=4 * 2**case.levels,
            channel_multiple=case.channel_multiple,
        ),
        batch_shape=batch_shapes(max_dims=2, max_side=3),
        seed=seeds(),
    )
    def run(event_shape, batch_shape, seed):
        check_bijector(
            name,
            event_shape,
            options=case.options,
            batch_shape=batch_shape,
            dtype=dtype,
            device=device,
            backend=backend,
            atol=case.atol,
            rtol=case.rtol,
            context_shape=case.context_shape,
            seed=seed,
        )

    run()


def test_table_names_are_registered() -> None:
    stale = sorted(set(CASES) - set(flowplugins.names()))
    assert not stale, f"CASES has entries for unregistered names {stale}; remove them"


def test_every_registered_name_builds_for_every_backend() -> None:
    failures = []
    for name in flowplugins.names():
        case = CASES.get(name, DEFAULT_CASES)[0]
        shape = (max(2, case.min_channels), 2**case.levels, 2**case.levels)
        for backend in BACKENDS:
            try:
                flowplugins.build(name, shape, backend=backend, **case.options)
            except Exception as err:  # noqa: BLE001 - collect them all for one report
                failures.append(f"{name} ({backend}): {type(err).__name__}: {err}")
    assert not failures, "\n".join(failures)
