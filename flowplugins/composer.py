"""Compose registered bijectors into multi-scale RealNVP / Glow models, for three backends.

A multi-scale model (RealNVP §3.6, Glow §3) with ``levels = L`` and ``depth = K``::

    x ─ preprocess ─ level 1 ─ level 2 ─ … ─ level L ─ [final] ─ top prior ─► z_top
                        │         │
                        ▼ z_1     ▼ z_2  …
    level ℓ < L:  pre ─ squeeze ─ step × K ─ split2d prior ─ factor out ceil(C/2) channels
    level L:      pre ─ squeeze ─ step × K   (with ``final``, level L splits too)

Every ``step``/``pre``/``final`` entry names a registered bijector (third-party ones too), built
through :func:`flowplugins.build` at the shape the previous bijector's ``output_event_shape()``
says; nobody writes a shape by hand. A split factors out the first ``ceil(C/2)`` channels
(``torch.chunk``'s first half, the half ``split2d_prior`` standardises); with
``split_prior=False`` they are factored out as plain ``N(0, I)`` latents (what nflows does).
When ``final`` is given (RealNVP's last scale), level L also splits and ``final`` runs on what is
left. All priors are bijectors, so every backend has a standard-normal base.

Backends, all built from one torch model (one build, one RNG stream, shared modules), so the
same seed gives the same ``log_prob`` in all three:

* ``"torch"``: :class:`flowplugins.models.MultiscaleFlow`;
* ``"nflows"``: an ``nflows.flows.Flow`` (:func:`flowplugins.models.nflows.nflows_flow`);
* ``"pyro"``: :class:`flowplugins.models.pyro.MultiscaleFlowDistribution`.

Configuration files (``configs/glow.yaml``, ``configs/realnvp.yaml``, shipped inside the package
as ``flowplugins/configs/``) hold :func:`multiscale`'s keyword arguments; :func:`from_config`
builds them.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import yaml

from .base import Bijector, EventShape, as_event_shape
from .models.multiscale import Center, MultiscaleFlow
from .registry import build

__all__ = [
    "StepSpec",
    "BACKENDS",
    "CONFIG_DIR",
    "multiscale",
    "glow",
    "realnvp",
    "from_config",
    "config_names",
    "parse_step",
]

StepSpec = Union[str, Tuple[str, Mapping[str, Any]], Mapping[str, Any]]
"""A registry name, a ``(name, options)`` pair, or a mapping ``{"name": name, **options}``."""

BACKENDS = ("torch", "nflows", "pyro")
CONFIG_DIR = Path(__file__).with_name("configs")
_SQUEEZE_FACTOR = 2  # the factor every level's squeeze is built with
_COUPLINGS = {"affine": "affine_coupling", "additive": "additive_coupling"}
_PERMUTATIONS = ("reverse_permutation", "shuffle_permutation", "inv_conv1x1_lu", "inv_conv1x1")


# --------------------------------------------------------------------------- specs
def parse_step(spec: StepSpec, owner: str = "multiscale") -> Tuple[str, Dict[str, Any]]:
    """Normalise one step specification to ``(name, options)``.

    Raises:
        ValueError: naming ``owner`` and the value, if ``spec`` is none of the accepted forms.

    Example:
        >>> parse_step({"name": "affine_coupling", "hidden": 64})
        ('affine_coupling', {'hidden': 64})
        >>> parse_step(("actnorm", {"scale": 1.0})), parse_step("squeeze")
        (('actnorm', {'scale': 1.0}), ('squeeze', {}))
    """
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("name"), str):
            raise ValueError(
                f"{owner}: a step mapping needs a 'name' key holding a registry name; got {dict(spec)!r}"
            )
        options = {k: v for k, v in spec.items() if k != "name"}
        return spec["name"], options
    if (
        isinstance(spec, (tuple, list))
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], Mapping)
    ):
        return spec[0], dict(spec[1])
    raise ValueError(
        f"{owner}: a step must be a registry name, a (name, options) pair or a mapping with a "
        f"'name' key; got {spec!r}"
    )


def _parse_steps(specs: Any, what: str) -> List[Tuple[str, Dict[str, Any]]]:
    if specs is None:
        return []
    if isinstance(specs, (str, Mapping)) or (
        isinstance(specs, tuple) and len(specs) == 2 and isinstance(specs[1], Mapping)
    ):
        specs = [specs]
    if not isinstance(specs, (list, tuple)):
        raise ValueError(f"multiscale: {what} must be a list of steps; got {specs!r}")
    return [parse_step(s, f"multiscale: {what}[{i}]") for i, s in enumerate(specs)]


def _check_count(owner: str, label: str, value: Any, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{owner}: {label} must be a {kind} integer; got {value!r}")
    return value


def _check_backend(owner: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _coupling_name(owner: str, coupling: str) -> str:
    """The registry name of a preset's ``coupling`` argument (a short or a registry name)."""
    name = _COUPLINGS.get(coupling, coupling)
    if name not in _COUPLINGS.values():
        raise ValueError(
            f"{owner}: coupling must be one of {', '.join(_COUPLINGS)} (or {', '.join(_COUPLINGS.values())}); "
            f"got {coupling!r}"
        )
    return name


# ------------------------------------------------------------------------- builder
class _LevelBuilder:
    """Builds bijectors one after the other, each at the previous one's output shape."""

    def __init__(self, shape: EventShape) -> None:
        self.shape = shape
        self.levels: List[List[Bijector]] = [[]]

    def add(self, name: str, options: Mapping[str, Any]) -> None:
        self.add_bijector(build(name, self.shape, backend="torch", **options))

    def add_bijector(self, bijector: Bijector) -> None:
        self.levels[-1].append(bijector)
        self.shape = tuple(bijector.output_event_shape())

    def split(self) -> None:
        c, h, w = self.shape
        if c < 2:
            raise ValueError(
                f"multiscale: a split needs at least 2 channels to factor half out; level "
                f"{len(self.levels)} ends with shape {self.shape}"
            )
        self.levels.append([])
        self.shape = (c // 2, h, w)


def multiscale(
    event_shape: Sequence[int],
    levels: int,
    step: Union[StepSpec, Sequence[StepSpec]],
    *,
    depth: int = 1,
    pre: Optional[Sequence[StepSpec]] = None,
    final: Optional[Sequence[StepSpec]] = None,
    split_prior: bool = True,
    top_prior: bool = True,
    preprocess: Optional[StepSpec] = "center",
    context_features: Optional[int] = None,
    backend: str = "torch",
    memory_saving: bool = False,
    seed: Optional[int] = None,
):
    """Build a multi-scale flow from registered bijectors (see the module docstring's diagram).

    Per level: ``pre`` (once) → squeeze → ``step`` repeated ``depth`` times → split (the
    ``split2d_prior`` conditional prior and a factor-out of ``ceil(C/2)`` channels, or a plain
    factor-out with ``split_prior=False``). The last level does not split, unless ``final`` is
    given: then it splits too and ``final`` runs on the remaining channels without a squeeze.
    ``gaussian_prior`` (the learned top prior) ends the model when ``top_prior``. With
    ``context_features=K`` both priors are conditioned on a context of shape ``(N, K)``.

    .. math::

        \\log p(x) = \\sum_{\\text{bijectors}} \\log|\\det J| + \\sum_\\ell \\log N(z_\\ell; 0, I)

    Shapes:
        x: (N, C, H, W) with H and W divisible by 2**levels -> log_prob: (N,)

    Args:
        event_shape: the data shape ``(C, H, W)``.
        levels: number of levels ``L`` (squeezes).
        step: one flow step, a list of :data:`StepSpec` (a registry name, ``(name, options)`` or
            ``{"name": name, **options}``), e.g. ``["actnorm", "inv_conv1x1_lu",
            {"name": "affine_coupling", "hidden": 512}]``; a single spec is a one-bijector step.
        depth: ``K``, how many times ``step`` is repeated per level (each repetition is built
            afresh, so its parameters are its own).
        pre: bijectors applied once per level before its squeeze (RealNVP's checkerboard
            couplings).
        final: bijectors applied after the last level's split, without a squeeze (RealNVP's
            last scale).
        split_prior: Glow's learned conditional prior at each split.
        top_prior: the learned Gaussian top prior (``gaussian_prior``).
        preprocess: ``"center"`` (``x - ½``, log-det 0), ``"logit"`` (the ``logit`` bijector),
            ``None``, or any step spec.
        context_features: size ``K`` of the context (e.g. the number of classes of a one-hot
            label) of a class-conditional model, or ``None``.
        backend: ``"torch"``, ``"nflows"`` or ``"pyro"``.
        memory_saving: recompute activations through the exact inverses during backward
            instead of storing them (torch and Pyro backends; values and gradients unchanged;
            see :mod:`flowplugins.memory_saving`).
        seed: if given, the parameters are drawn from ``torch.manual_seed(seed)`` without
            touching the global random state.

    Returns:
        a :class:`~flowplugins.models.MultiscaleFlow` (torch), an ``nflows.flows.Flow`` (nflows)
        or a :class:`~flowplugins.models.pyro.MultiscaleFlowDistribution` (pyro).

    Raises:
        ValueError: if H or W does not survive ``levels`` squeezes, a count is not a positive
            integer, a step spec is malformed, the backend is unknown, ``context_features`` is
            given with neither prior nor a step that uses it, ``memory_saving`` is asked of the
            nflows backend, or a bijector rejects its shape.
        UnknownBijectorError: for an unregistered name (with close matches).
        TypeError: for an option a bijector does not take.

    References:
        Dinh et al., Density estimation using Real NVP, arXiv:1605.08803, §3.6;
        Kingma & Dhariwal, Glow, arXiv:1807.03039, §3.

    Example:
        >>> import torch
        >>> model = multiscale((1, 8, 8), levels=2, depth=2,
        ...                    step=["actnorm", "inv_conv1x1_lu", ("affine_coupling", {"hidden": 8})])
        >>> model.latent_shapes
        [(2, 4, 4), (8, 2, 2)]
        >>> model.log_prob(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3])
    """
    owner = "multiscale"
    shape = as_event_shape(event_shape, owner)
    _check_count(owner, "levels", levels)
    _check_count(owner, "depth", depth)
    _check_backend(owner, backend)
    if context_features is not None:
        _check_count(owner, "context_features", context_features)
    if memory_saving and backend == "nflows":
        raise ValueError(
            "multiscale: memory_saving=True needs backend 'torch' or 'pyro'; an nflows Flow runs "
            "nflows' own loop over the steps"
        )
    divisor = _SQUEEZE_FACTOR ** levels
    c, h, w = shape
    if h % divisor or w % divisor:
        raise ValueError(
            f"multiscale: H and W must be divisible by {_SQUEEZE_FACTOR}**levels = {divisor} to "
            f"survive {levels} squeeze(s); got event shape {shape} with levels={levels}"
        )
    step_specs = _parse_steps(step, "step")
    pre_specs = _parse_steps(pre, "pre")
    final_specs = _parse_steps(final, "final")
    prior_options = {"context_features": context_features}

    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        builder = _LevelBuilder(shape)
        if preprocess == "center":
            builder.add_bijector(Center(shape))
        elif preprocess is not None:
            builder.add(*parse_step(preprocess, "multiscale: preprocess"))
        for level in range(levels):
            for name, options in pre_specs:
                builder.add(name, options)
            builder.add("squeeze", {"factor": _SQUEEZE_FACTOR})
            for _ in range(depth):
                for name, options in step_specs:
                    builder.add(name, options)
            if level < levels - 1 or final_specs:
                if split_prior:
                    builder.add("split2d_prior", prior_options)
                builder.split()
        for name, options in final_specs:
            builder.add(name, options)
        if top_prior:
            builder.add("gaussian_prior", prior_options)
        model = MultiscaleFlow(
            builder.levels, context_features=context_features, memory_saving=memory_saving
        )
    return _for_backend(model, backend)


def _for_backend(model: MultiscaleFlow, backend: str):
    if backend == "torch":
        return model
    if backend == "nflows":
        from .models.nflows import nflows_flow

        return nflows_flow(model)
    from .models.pyro import MultiscaleFlowDistribution

    return MultiscaleFlowDistribution(model)


# ------------------------------------------------------------------------- presets
def glow(
    event_shape: Sequence[int],
    levels: int = 3,
    depth: int = 32,
    hidden: int = 512,
    coupling: str = "affine",
    permutation: str = "inv_conv1x1_lu",
    split_prior: bool = True,
    backend: str = "torch",
    context_features: Optional[int] = None,
    *,
    top_prior: bool = True,
    preprocess: Optional[StepSpec] = "center",
    memory_saving: bool = False,
    seed: Optional[int] = None,
    dropout: float = 0.0,
):
    """Glow (Kingma & Dhariwal 2018): per level squeeze → K × (actnorm → permutation → coupling)
    → split2d prior, a learned top prior, data centred to ``[-½, ½)``.

    The defaults are the paper's CIFAR-10 / ImageNet model (L = 3, K = 32, 512-channel coupling
    nets, affine coupling, LU-decomposed 1x1 convolution, learned conditional split priors and
    top prior). ``permutation`` and ``coupling`` select the paper's ablations (§5.1).

    Shapes:
        x: (N, C, H, W) with H and W divisible by 2**levels -> log_prob: (N,)

    Args:
        event_shape: ``(C, H, W)``.
        levels: ``L``.
        depth: ``K`` flow steps per level.
        hidden: width of every coupling net.
        coupling: ``"affine"`` or ``"additive"`` (or the registry names ``affine_coupling`` /
            ``additive_coupling``).
        permutation: ``"inv_conv1x1_lu"``, ``"inv_conv1x1"``, ``"shuffle_permutation"`` or
            ``"reverse_permutation"``.
        split_prior: learned conditional prior at the splits (``False``: plain factor-out).
        backend: ``"torch"``, ``"nflows"`` or ``"pyro"``.
        context_features: size of the class-conditioning context, or ``None``.
        top_prior: learned top prior.
        preprocess: see :func:`multiscale`.
        memory_saving: see :func:`multiscale`.
        seed: see :func:`multiscale`.
        dropout: dropout rate in the hidden layers of every coupling net, training mode only
            (a regulariser for small data sets; the digits recipe of ``flowplugins train`` uses
            0.2). The learned priors' nets get none, and memory saving runs steps with active
            dropout by ordinary backprop.

    Raises:
        ValueError: for an unknown ``coupling`` or ``permutation``, and as :func:`multiscale`.

    References:
        Kingma & Dhariwal, Glow: Generative Flow with Invertible 1x1 Convolutions,
        arXiv:1807.03039.

    Example:
        >>> import torch
        >>> model = glow((3, 8, 8), levels=2, depth=2, hidden=16)
        >>> [type(s).__name__ for s in model.steps[:6]]
        ['Center', 'Squeeze', 'ActNorm', 'LUInvertibleConv1x1', 'AffineCoupling', 'ActNorm']
        >>> model.sample(4, temperature=0.7).shape
        torch.Size([4, 3, 8, 8])
    """
    coupling_name = _coupling_name("glow", coupling)
    if permutation not in _PERMUTATIONS:
        raise ValueError(
            f"glow: permutation must be one of {', '.join(_PERMUTATIONS)}; got {permutation!r}"
        )
    _check_count("glow", "hidden", hidden)
    coupling_spec = {"name": coupling_name, "hidden": hidden}
    if dropout:
        coupling_spec["dropout"] = dropout
    step = [{"name": "actnorm"}, {"name": permutation}, coupling_spec]
    return multiscale(
        event_shape,
        levels,
        step,
        depth=depth,
        split_prior=split_prior,
        top_prior=top_prior,
        preprocess=preprocess,
        context_features=context_features,
        backend=backend,
        memory_saving=memory_saving,
        seed=seed,
    )


def realnvp(
    event_shape: Sequence[int],
    levels: int = 2,
    depth: int = 3,
    hidden: int = 64,
    coupling: str = "affine",
    split_prior: bool = False,
    backend: str = "torch",
    context_features: Optional[int] = None,
    *,
    checkerboard: int = 3,
    final_checkerboard: int = 4,
    batch_norm: bool = True,
    top_prior: bool = False,
    preprocess: Optional[StepSpec] = "logit",
    memory_saving: bool = False,
    seed: Optional[int] = None,
):
    """RealNVP (Dinh et al. 2016): per level ``checkerboard`` checkerboard couplings of
    alternating parity → squeeze → ``depth`` channel-wise couplings of alternating halves →
    factor out half; then ``final_checkerboard`` checkerboard couplings on the rest. Batch
    norm follows every coupling, and the data are logit-transformed.

    The paper's defaults: 3 checkerboard and 3 channel-wise couplings per scale, 4 checkerboard
    couplings at the last scale, batch normalisation of the coupling outputs (§3.7), logit
    preprocessing with ``alpha = 0.05`` (§4.1), plain ``N(0, I)`` factor-outs and top
    (``split_prior=False``, ``top_prior=False``). ``levels`` counts squeezes, so the model has
    ``levels + 1`` scales in the paper's wording. The channel-wise halves alternate through a
    ``reverse_permutation`` after each coupling (which changes which channels are factored
    out, not the model class). Coupling nets are flowplugins' conv nets of width ``hidden``
    (the paper uses ResNets). A class-conditional model needs a prior to condition: set
    ``split_prior`` and/or ``top_prior`` with ``context_features``.

    Shapes:
        x: (N, C, H, W) in [0, 1) with H and W divisible by 2**levels -> log_prob: (N,)

    Args:
        event_shape: ``(C, H, W)``.
        levels: number of squeeze levels.
        depth: channel-wise couplings per level.
        hidden: width of every coupling net.
        coupling: ``"affine"`` or ``"additive"`` for the channel-wise couplings (checkerboard
            couplings are affine).
        split_prior: Glow's learned conditional prior at the splits instead of ``N(0, I)``.
        backend: ``"torch"``, ``"nflows"`` or ``"pyro"``.
        context_features: size of the class-conditioning context, or ``None``.
        checkerboard: checkerboard couplings per level, before the squeeze.
        final_checkerboard: checkerboard couplings of the last scale (0: none, and then the
            last level does not split).
        batch_norm: a ``batchnorm`` bijector after every coupling.
        top_prior: learned top prior.
        preprocess: see :func:`multiscale`.
        memory_saving: see :func:`multiscale`.
        seed: see :func:`multiscale`.

    Raises:
        ValueError: for an unknown ``coupling``, a negative count, and as :func:`multiscale`.

    References:
        Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP, arXiv:1605.08803.

    Example:
        >>> import torch
        >>> model = realnvp((1, 8, 8), levels=2, hidden=8)
        >>> model.latent_shapes
        [(2, 4, 4), (4, 2, 2), (4, 2, 2)]
        >>> model.log_prob(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5])
    """
    coupling_name = _coupling_name("realnvp", coupling)
    _check_count("realnvp", "hidden", hidden)
    _check_count("realnvp", "checkerboard", checkerboard, allow_zero=True)
    _check_count("realnvp", "final_checkerboard", final_checkerboard, allow_zero=True)
    bn = [{"name": "batchnorm"}] if batch_norm else []

    def checkers(count: int) -> List[Dict[str, Any]]:
        out: List[Dict[str, Any]] = []
        for k in range(count):
            out += [{"name": "checkerboard_coupling", "parity": k % 2, "hidden": hidden}, *bn]
        return out

    step = [{"name": coupling_name, "hidden": hidden}, *bn, {"name": "reverse_permutation"}]
    return multiscale(
        event_shape,
        levels,
        step,
        depth=depth,
        pre=checkers(checkerboard),
        final=checkers(final_checkerboard) or None,
        split_prior=split_prior,
        top_prior=top_prior,
        preprocess=preprocess,
        context_features=context_features,
        backend=backend,
        memory_saving=memory_saving,
        seed=seed,
    )


# ------------------------------------------------------------------------- configs
_PRESETS = {"glow": glow, "realnvp": realnvp}


def config_names() -> List[str]:
    """Names of the configuration files shipped with the package (``from_config(name)``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def _load_config(config: Union[str, Path, Mapping[str, Any]]) -> Tuple[Dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "config"
    path = Path(config)
    if not path.is_file():
        name = path.stem if path.suffix == ".yaml" and path.parent == Path(".") else str(config)
        if name not in config_names():
            raise FileNotFoundError(
                f"from_config: no file {str(config)!r} and no packaged config of that name "
                f"(packaged: {', '.join(config_names())})"
            )
        path = CONFIG_DIR / f"{name}.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"from_config: {path} is not valid YAML: {err}") from err
    if not isinstance(data, Mapping):
        raise ValueError(f"from_config: {path}: expected a mapping at the top level; got {type(data).__name__}")
    return dict(data), str(path)


def from_config(
    config: Union[str, Path, Mapping[str, Any]],
    event_shape: Optional[Sequence[int]] = None,
    backend: Optional[str] = None,
    **overrides: Any,
):
    """Build a model from a configuration file or mapping.

    A configuration holds :func:`multiscale`'s keyword arguments (``levels``, ``step``,
    ``depth``, ``pre``, ``final``, ``split_prior``, ``top_prior``, ``preprocess``,
    ``context_features``, ``memory_saving``, ``seed``, optionally ``event_shape`` and
    ``backend``), steps naming registry entries. Alternatively ``preset: glow`` or
    ``preset: realnvp`` with that preset's keyword arguments. Keyword ``overrides`` replace
    top-level keys.

    Args:
        config: a path to a YAML file, the name of a packaged config (``"glow"``,
            ``"realnvp"``; see :func:`config_names`), or a mapping.
        event_shape: ``(C, H, W)``; overrides the config's ``event_shape``.
        backend: overrides the config's ``backend`` (default ``"torch"``).
        **overrides: further top-level keys, e.g. ``levels=2, depth=4``.

    Raises:
        FileNotFoundError: for a missing file that is not a packaged config name.
        ValueError: for invalid YAML, a missing ``event_shape``, or an unknown key (naming it
            and the accepted ones); otherwise as :func:`multiscale`.

    Example:
        >>> model = from_config("glow", event_shape=(1, 8, 8), levels=2, depth=1)
        >>> [type(s).__name__ for s in model.steps[:5]]
        ['Center', 'Squeeze', 'ActNorm', 'LUInvertibleConv1x1', 'AffineCoupling']
    """
    data, source = _load_config(config)
    data.update(overrides)
    if event_shape is not None:
        data["event_shape"] = event_shape
    if backend is not None:
        data["backend"] = backend
    preset = data.pop("preset", None)
    if preset is not None and preset not in _PRESETS:
        raise ValueError(f"from_config: {source}: unknown preset {preset!r}; choose one of {', '.join(_PRESETS)}")
    target = _PRESETS[preset] if preset is not None else multiscale
    accepted = [n for n in inspect.signature(target).parameters]
    unknown = sorted(set(data) - set(accepted))
    if unknown:
        raise ValueError(
            f"from_config: {source}: unknown key(s) {unknown} for {target.__name__}; accepted: "
            f"{', '.join(accepted)}"
        )
    if "event_shape" not in data:
        raise ValueError(f"from_config: {source}: no event_shape; pass event_shape=(C, H, W)")
    return target(**data)
