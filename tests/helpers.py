"""Helpers shared by the per-bijector test files (``from helpers import ...``).

They sit on top of :mod:`flowplugins.testing` where it has the piece (``perturb_parameters``)
and add what it keeps private or does not do: the per-sample autograd Jacobian that the tests
compare log-dets against with their own tolerances, and checks that several bijector test files
made word for word. ``conftest.py`` registers this module for pytest's assertion rewriting.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Tuple, TypeVar

import torch
from torch import Tensor, nn

from flowplugins.registry import load_registry_yaml
from flowplugins.testing import perturb_parameters

ModuleT = TypeVar("ModuleT", bound=nn.Module)
BijectorFn = Callable[[Tensor, Optional[Tensor]], Tuple[Tensor, Tensor]]


def perturb(module: ModuleT, scale: float = 0.2, seed: int = 0) -> ModuleT:
    """Move every parameter of ``module`` away from its (often identity) init, reproducibly.

    :func:`flowplugins.testing.perturb_parameters` with a generator seeded by ``seed``, so the
    global random state is left alone and each call draws the same noise.
    """
    return perturb_parameters(module, scale, torch.Generator().manual_seed(seed))


def autograd_jacobians(fn: BijectorFn, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
    """Per-sample Jacobians of ``fn`` (a bijector's ``forward`` or ``inverse``) by autograd.

    Each sample ``x[i]`` goes through ``fn`` alone (with ``context[i]``), so the result holds
    only the diagonal blocks. Meant for float64 and tiny events.

    Shapes:
        x: (N, C, H, W), context: (N, K) or None -> (N, D_out, D_in) with D = C·H·W
    """
    jacobians = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        ci = None if context is None else context[i : i + 1]
        jacobians.append(
            torch.autograd.functional.jacobian(
                lambda v: fn(v.reshape(xi.shape), ci)[0].reshape(-1), xi.reshape(-1)
            )
        )
    return torch.stack(jacobians)


def autograd_logabsdet(fn: BijectorFn, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
    """Per-sample ``log|det J|`` of ``fn`` from :func:`autograd_jacobians`; shape ``(N,)``."""
    return torch.linalg.slogdet(autograd_jacobians(fn, x, context))[1]


def assert_options_match_registry(cls: type, entry: str) -> None:
    """``cls(event_shape, ...)``: its keyword defaults are registry.yaml's ``options`` of ``entry``."""
    options = load_registry_yaml()[entry]["options"]
    params = list(inspect.signature(cls).parameters.values())
    assert params[0].name == "event_shape"
    assert {p.name: p.default for p in params[1:]} == options


def assert_extra_batch_dims(layer: nn.Module, x: Tensor, context: Optional[Tensor] = None) -> None:
    """A float64 ``layer`` on ``x`` with several batch dims: the log-det has the batch shape, the
    outputs equal those of the flattened batch, and ``x`` comes back to 1e-10.

    Shapes:
        x: (*batch, C, H, W), context: (*batch, K) or None
    """
    batch = x.shape[:-3]
    n = batch.numel()
    z, ld = layer(x, context)
    assert z.shape == x.shape and ld.shape == batch
    flat_context = None if context is None else context.reshape(n, -1)
    z_flat, ld_flat = layer(x.reshape(n, *x.shape[-3:]), flat_context)
    torch.testing.assert_close(z.reshape(n, *x.shape[-3:]), z_flat)
    torch.testing.assert_close(ld.reshape(n), ld_flat)
    assert (layer.inverse(z, context)[0] - x).abs().max() < 1e-10


def assert_round_trip_on_device(layer: nn.Module, x: Tensor, context: Optional[Tensor]) -> None:
    """Forward and inverse of a float64 ``layer`` stay on ``x``'s device, ``x`` comes back to
    1e-10 and the inverse log-det is minus the forward's.

    Shapes:
        x: (N, C, H, W), context: (N, K) or None
    """
    z, ld = layer(x, context)
    x_back, ld_inv = layer.inverse(z, context)
    assert z.device == ld.device == x.device and ld.shape == x.shape[:1]
    assert (x_back - x).abs().max() < 1e-10
    torch.testing.assert_close(ld_inv, -ld)
