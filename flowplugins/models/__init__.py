"""Whole models built by :mod:`flowplugins.composer`: the torch model and its two host views.

* :class:`MultiscaleFlow` (``backend="torch"``): an ``nn.Module`` with ``log_prob``,
  ``bits_per_dim``, ``sample``, ``encode``/``decode`` and the flat ``steps`` list.
* :func:`flowplugins.models.nflows.nflows_flow` (``backend="nflows"``): an ``nflows.flows.Flow``
  over a ``MultiscaleCompositeTransform`` of the same bijector modules.
* :class:`flowplugins.models.pyro.MultiscaleFlowDistribution` (``backend="pyro"``): a Pyro
  distribution over ``(C, H, W)`` images wrapping the torch model.

The host views import nflows / Pyro and are therefore imported from their own modules.
"""

from .multiscale import Center, MultiscaleFlow

__all__ = ["Center", "MultiscaleFlow"]
