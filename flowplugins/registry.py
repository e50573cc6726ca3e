"""Entry-point registry of bijectors.

Bijectors are discovered through the entry-point group ``flowplugins.bijectors``. Entry points are
stored unloaded and imported on first use, so a plugin whose import fails only affects its own
name: :func:`build` on it raises :class:`PluginLoadError` naming the distribution, every other
name keeps working. Built-in bijectors are described in ``registry.yaml`` (read with a safe loader
and validated); third-party ones describe themselves through their class docstring.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import inspect
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from .base import Bijector

__all__ = [
    "ENTRY_POINT_GROUP",
    "BACKENDS",
    "PluginInfo",
    "RegistryError",
    "UnknownBijectorError",
    "PluginLoadError",
    "DuplicatePluginError",
    "names",
    "info",
    "get_class",
    "build",
    "refresh",
    "load_registry_yaml",
]

ENTRY_POINT_GROUP = "flowplugins.bijectors"
BACKENDS = ("torch", "nflows", "pyro")
REGISTRY_YAML = Path(__file__).with_name("registry.yaml")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_BUILTIN_DIST = "flowplugins"


class RegistryError(Exception):
    """Base class of registry errors."""


class UnknownBijectorError(RegistryError, KeyError):
    """An unregistered bijector name was asked for."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class PluginLoadError(RegistryError, ImportError):
    """A plugin's entry point could not be imported or does not name a Bijector subclass."""


class DuplicatePluginError(RegistryError):
    """Two distributions registered the same bijector name."""


@dataclass
class PluginInfo:
    """What the registry knows about one bijector name (without importing it)."""

    name: str
    target: str
    distribution: str
    entry_point: Any = field(repr=False, default=None)
    summary: str = ""
    shape: str = ""
    options: Dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    conflicts: Tuple[str, ...] = ()

    @property
    def builtin(self) -> bool:
        return self.distribution == _BUILTIN_DIST


_REQUIRED_FIELDS = {"class": str, "summary": str, "shape": str, "options": dict, "reference": str}


def load_registry_yaml(path: Path = REGISTRY_YAML) -> Dict[str, Dict[str, Any]]:
    """Read and validate ``registry.yaml``.

    Raises:
        RegistryError: naming the file, the entry and the field when the file is malformed.
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("bijectors"), dict):
        raise RegistryError(f"{path}: expected a mapping with a 'bijectors' mapping at the top")
    entries = data["bijectors"]
    for name, entry in entries.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RegistryError(f"{path}: entry {name!r}: names must be snake_case identifiers")
        if not isinstance(entry, dict):
            raise RegistryError(f"{path}: entry {name!r}: expected a mapping, got {type(entry).__name__}")
        for key, kind in _REQUIRED_FIELDS.items():
            if key not in entry:
                raise RegistryError(f"{path}: entry {name!r}: missing field {key!r}")
            if not isinstance(entry[key], kind):
                raise RegistryError(
                    f"{path}: entry {name!r}: field {key!r} must be a {kind.__name__}, "
                    f"got {type(entry[key]).__name__}"
                )
        unknown = set(entry) - set(_REQUIRED_FIELDS)
        if unknown:
            raise RegistryError(f"{path}: entry {name!r}: unknown field(s) {sorted(unknown)}")
        if not re.match(r"^[\w.]+:[\w.]+$", entry["class"]):
            raise RegistryError(
                f"{path}: entry {name!r}: field 'class' must look like 'package.module:Class'; "
                f"got {entry['class']!r}"
            )
    return entries


_cache: Optional[Dict[str, PluginInfo]] = None
_loaded: Dict[str, type] = {}


def refresh() -> None:
    """Forget discovered plugins, so entry points installed since are found."""
    global _cache
    _cache = None
    _loaded.clear()
    importlib.invalidate_caches()


def _dist_name(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    if not name and dist is not None:
        name = dist.metadata["Name"]
    return name or "<unknown distribution>"


def _discover() -> Dict[str, PluginInfo]:
    global _cache
    if _cache is not None:
        return _cache
    described = load_registry_yaml()
    candidates: Dict[str, List[Tuple[str, Any]]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = _dist_name(ep)
        if not _NAME_RE.match(ep.name):
            warnings.warn(
                f"flowplugins: skipping bijector {ep.name!r} from distribution {dist!r}: "
                "names must be snake_case identifiers",
                stacklevel=3,
            )
            continue
        seen = candidates.setdefault(ep.name, [])
        # The same distribution can be seen twice on sys.path (editable installs).
        if not any(d == dist and e.value == ep.value for d, e in seen):
            seen.append((dist, ep))
    found: Dict[str, PluginInfo] = {}
    for name, seen in candidates.items():
        builtin = [(d, e) for d, e in seen if d == _BUILTIN_DIST]
        if builtin and len(seen) > 1:
            # Built-ins are never overridden: a plugin reusing a built-in name is ignored, loudly.
            others = sorted(d for d, _ in seen if d != _BUILTIN_DIST)
            warnings.warn(
                f"flowplugins: ignoring bijector {name!r} from distribution(s) "
                f"{', '.join(others)}: the name belongs to a built-in bijector",
                stacklevel=3,
            )
            seen = builtin
        dist, ep = seen[0]
        entry = described.get(name, {}) if dist == _BUILTIN_DIST else {}
        conflicts = tuple(sorted({d for d, _ in seen})) if len(seen) > 1 else ()
        if conflicts:
            warnings.warn(
                f"flowplugins: bijector name {name!r} is registered by several "
                f"distributions: {', '.join(conflicts)}",
                stacklevel=3,
            )
        found[name] = PluginInfo(
            name=name,
            target=ep.value,
            distribution=dist,
            entry_point=ep,
            summary=entry.get("summary", ""),
            shape=entry.get("shape", ""),
            options=dict(entry.get("options", {})),
            reference=entry.get("reference", ""),
            conflicts=conflicts,
        )
    _cache = found
    return found


def names() -> List[str]:
    """Every registered bijector name, third-party ones included, sorted."""
    return sorted(_discover())


def _lookup(name: str) -> PluginInfo:
    plugins = _discover()
    if name not in plugins:
        close = difflib.get_close_matches(str(name), list(plugins), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownBijectorError(
            f"unknown bijector {name!r}{hint} (registered: {', '.join(sorted(plugins))})"
        )
    plugin = plugins[name]
    if plugin.conflicts:
        raise DuplicatePluginError(
            f"bijector name {name!r} is registered by several distributions: "
            f"{', '.join(plugin.conflicts)}; uninstall one of them"
        )
    return plugin


def get_class(name: str) -> type:
    """Import and return the Bijector subclass registered as ``name``.

    Raises:
        UnknownBijectorError: with close matches, if ``name`` is not registered.
        DuplicatePluginError: if several distributions registered ``name``.
        PluginLoadError: naming the distribution, if the plugin's import fails.
    """
    plugin = _lookup(name)
    if name in _loaded:
        return _loaded[name]
    try:
        cls = plugin.entry_point.load()
    except Exception as err:  # a broken plugin must not take the others down
        raise PluginLoadError(
            f"bijector {name!r} from distribution {plugin.distribution!r} failed to import "
            f"({plugin.target}): {type(err).__name__}: {err}"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, Bijector)):
        raise PluginLoadError(
            f"bijector {name!r} from distribution {plugin.distribution!r}: {plugin.target} is "
            f"not a subclass of flowplugins.Bijector"
        )
    _loaded[name] = cls
    return cls


def info(name: str) -> PluginInfo:
    """Registry description of ``name``; third-party summaries come from the class docstring."""
    plugin = _lookup(name)
    if not plugin.summary:
        try:
            doc = inspect.getdoc(get_class(name)) or ""
        except PluginLoadError:
            doc = ""
        plugin.summary = doc.strip().splitlines()[0] if doc.strip() else ""
    return plugin


def build(
    name: str,
    event_shape: Sequence[int],
    backend: str = "torch",
    **options: Any,
):
    """Build the bijector registered as ``name`` for ``event_shape`` on ``backend``.

    Args:
        name: a registry name (see :func:`names`).
        event_shape: the data-side event shape ``(C, H, W)``.
        backend: ``"torch"`` (a :class:`~flowplugins.Bijector`), ``"nflows"`` (an
            ``nflows.transforms.Transform``, forward = data → latent) or ``"pyro"`` (a
            ``pyro.distributions.TransformModule``, forward = latent → data).
        **options: keyword options of the bijector.

    Raises:
        ValueError: for an unknown backend.
        UnknownBijectorError, PluginLoadError, DuplicatePluginError: see :func:`get_class`.
        TypeError: for an option the bijector does not take.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cls = get_class(name)
    _check_options(name, cls, options)
    bijector = cls(event_shape, **options)
    from .backends import wrap

    return wrap(bijector, backend)


def _check_options(name: str, cls: type, options: Mapping[str, Any]) -> None:
    sig = inspect.signature(cls.__init__)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n for n, p in params.items()
        if n not in ("self", "event_shape") and p.kind is not p.VAR_POSITIONAL
    ]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise TypeError(
            f"bijector {name!r} ({cls.__name__}) got unknown option(s) {unknown}; "
            f"it accepts {accepted}"
        )
