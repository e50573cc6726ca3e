"""flowplugins: RealNVP and Glow image normalizing flows for Pyro and nflows.

Every bijector maps data → latent in ``forward`` and latent → data in ``inverse``; see
:mod:`flowplugins.base` for the conventions shared by the whole package.
"""

from .base import Bijector, EventShape
from .composer import from_config, glow, multiscale, realnvp
from .models import MultiscaleFlow
from .registry import build, get_class, info, names

__all__ = [
    "Bijector",
    "EventShape",
    "MultiscaleFlow",
    "build",
    "from_config",
    "get_class",
    "glow",
    "info",
    "multiscale",
    "names",
    "realnvp",
]
__version__ = "0.1.0"
