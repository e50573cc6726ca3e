"""flowplugins: RealNVP and Glow image normalizing flows for Pyro and nflows.

Every bijector maps data → latent in ``forward`` and latent → data in ``inverse``; see
:mod:`flowplugins.base` for the conventions shared by the whole package.
"""

from .base import Bijector, EventShape
from .registry import build, get_class, info, names

__all__ = ["Bijector", "EventShape", "build", "get_class", "info", "names"]
__version__ = "0.1.0"
