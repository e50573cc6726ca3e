"""Adapters that expose a :class:`~flowplugins.Bijector` to a host flow library.

Each adapter lives in its own module and imports its host lazily, so flowplugins imports without
Pyro or nflows being importable.
"""

from __future__ import annotations

from ..base import Bijector

__all__ = ["wrap"]


def wrap(bijector: Bijector, backend: str = "torch"):
    """Return ``bijector`` as seen by ``backend`` (``"torch"``, ``"nflows"`` or ``"pyro"``)."""
    if backend == "torch":
        return bijector
    if backend == "nflows":
        from .nflows import NflowsTransform

        return NflowsTransform(bijector)
    if backend == "pyro":
        from .pyro import PyroTransformModule

        return PyroTransformModule(bijector)
    raise ValueError(f"unknown backend {backend!r}; choose one of torch, nflows, pyro")
