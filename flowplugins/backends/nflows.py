"""nflows backend: a :class:`~flowplugins.Bijector` seen as an ``nflows.transforms.Transform``.

nflows orients transforms the way flowplugins does (``forward`` = data → latent, returning
``(outputs, logabsdet)``), so the adapter is a pass-through; its job is to be an nflows type, so
that ``CompositeTransform``, ``MultiscaleCompositeTransform`` and ``nflows.flows.Flow`` accept it.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ..base import Bijector, EventShape

try:
    from nflows.transforms import Transform as _NflowsTransformBase
except ImportError as err:  # pragma: no cover - exercised only without nflows installed
    raise ImportError(
        "the nflows backend of flowplugins needs nflows; install it with "
        "`pip install 'nflows>=0.14'`"
    ) from err

__all__ = ["NflowsTransform"]


class NflowsTransform(_NflowsTransformBase):
    """Expose a :class:`~flowplugins.Bijector` as an ``nflows.transforms.Transform``.

    ``forward(x) = bijector.forward(x)`` (data → latent) and ``inverse(z) =
    bijector.inverse(z)`` (latent → data); both return ``(output, logabsdet)`` with
    ``logabsdet = log|det ∂output/∂input|``, exactly as nflows expects. The bijector is a
    submodule, so its parameters, buffers and train/eval mode are the transform's.

    Inside ``MultiscaleCompositeTransform`` give :meth:`output_event_shape` as the
    ``transform_output_shape`` of ``add_transform``; nflows keeps the first half of the channels
    as output and passes the second half on (the order ``split2d_prior`` is built for).

    Shapes:
        inputs: (..., C, H, W) -> outputs: (..., *output_event_shape()); logabsdet: (...)

    Args:
        bijector: the layer to expose.

    Raises:
        TypeError: if ``bijector`` is not a :class:`~flowplugins.Bijector`.

    Example:
        >>> import torch
        >>> from nflows.transforms import CompositeTransform
        >>> from flowplugins.bijectors.squeeze import Squeeze
        >>> t = CompositeTransform([NflowsTransform(Squeeze((1, 4, 4)))])
        >>> z, ld = t(torch.randn(2, 1, 4, 4))
        >>> tuple(z.shape), tuple(ld.shape)
        ((2, 4, 2, 2), (2,))
    """

    def __init__(self, bijector: Bijector) -> None:
        if not isinstance(bijector, Bijector):
            raise TypeError(
                f"NflowsTransform: expected a flowplugins.Bijector; got {type(bijector).__name__}"
            )
        super().__init__()
        self.bijector = bijector

    @property
    def event_shape(self) -> EventShape:
        """The data-side event shape ``(C, H, W)``."""
        return self.bijector.event_shape

    def output_event_shape(self) -> EventShape:
        """The latent-side event shape (what ``add_transform`` calls the output shape)."""
        return self.bijector.output_event_shape()

    def forward(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.bijector.forward(inputs, context)

    def inverse(self, inputs: Tensor, context: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.bijector.inverse(inputs, context)
