"""flowplugins: RealNVP and Glow image normalizing flows for Pyro and nflows.

Every bijector maps data → latent in ``forward`` and latent → data in ``inverse``; see
:mod:`flowplugins.base` for the conventions shared by the whole package.

The public names are imported lazily: the ``pytest11`` plugin imports this package in every
pytest run on a machine where flowplugins is installed, and importing torch there would cost
seconds for projects that never use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Bijector": ".base",
    "EventShape": ".base",
    "MultiscaleFlow": ".models",
    "build": ".registry",
    "get_class": ".registry",
    "info": ".registry",
    "names": ".registry",
    "from_config": ".composer",
    "glow": ".composer",
    "multiscale": ".composer",
    "realnvp": ".composer",
    "check_finite": ".diagnostics",
    "NonFiniteError": ".diagnostics",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .base import Bijector, EventShape
    from .composer import from_config, glow, multiscale, realnvp
    from .diagnostics import NonFiniteError, check_finite
    from .models import MultiscaleFlow
    from .registry import build, get_class, info, names


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowplugins' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_EXPORTS))
