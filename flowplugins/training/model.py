"""Building a torch-backend model from a :class:`ModelConfig`, and loading one from a checkpoint."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_checkpoint, load_state_strict
from ..nets import CouplingNet
from .config import ConfigError, ModelConfig

__all__ = ["build_model", "make_context", "load_model", "model_config_from"]


def model_config_from(value: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    try:
        return ModelConfig(**dict(value))
    except TypeError as err:
        raise ConfigError(f"model config: {err}") from err


def build_model(model: ModelConfig | Mapping[str, Any], data: Mapping[str, Any]) -> nn.Module:
    """Build the torch-backend model described by ``model`` for the data set ``data``.

    ``data`` is :meth:`flowplugins.data.ImageData.describe`'s dict (``event_shape``,
    ``num_classes`` are used). A conditional model gets the one-hot class label as context.

    Raises:
        ConfigError: for an invalid configuration.
    """
    from .. import composer

    cfg = model_config_from(model)
    cfg.validate()
    preset = getattr(composer, cfg.arch)
    if cfg.arch == "multiscale":
        options = dict(cfg.options)
        step = options.pop("step")
        if cfg.conditional:
            options["context_features"] = int(data["num_classes"])
        try:
            return composer.multiscale(
                tuple(int(s) for s in data["event_shape"]), cfg.levels, step, depth=cfg.depth,
                split_prior=cfg.split_prior, memory_saving=cfg.memory_saving, **options,
            )
        except TypeError as err:
            raise ConfigError(f"model: flowplugins.multiscale(...) rejected the options: {err}") from err
    kwargs: Dict[str, Any] = dict(
        levels=cfg.levels,
        depth=cfg.depth,
        hidden=cfg.hidden,
        coupling=cfg.coupling,
        split_prior=cfg.split_prior,
        memory_saving=cfg.memory_saving,
        backend="torch",
    )
    if cfg.arch == "glow":
        kwargs["permutation"] = cfg.permutation
    if cfg.conditional:
        kwargs["context_features"] = int(data["num_classes"])
    kwargs.update(cfg.options)
    event_shape = tuple(int(s) for s in data["event_shape"])
    try:
        if cfg.dropout:
            return _glow_with_dropout(event_shape, cfg, kwargs)
        return preset(event_shape, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model: flowplugins.{cfg.arch}(...) rejected the options: {err}") from err


def _glow_with_dropout(event_shape, cfg: ModelConfig, kwargs: Dict[str, Any]) -> nn.Module:
    """The Glow preset's architecture with dropout in its coupling nets (:class:`CouplingNet`'s
    ``dropout``), the nets also conditioned on the context of a conditional model."""
    from .. import composer

    context_features = kwargs.pop("context_features", None)
    hidden = kwargs.pop("hidden")

    def net(in_channels: int, out_channels: int) -> nn.Module:
        return CouplingNet(in_channels, out_channels, hidden, context_features, cfg.dropout)

    coupling = {"affine": "affine_coupling", "additive": "additive_coupling"}[kwargs.pop("coupling")]
    step = [{"name": "actnorm"}, {"name": kwargs.pop("permutation")},
            {"name": coupling, "net": net, "context_features": context_features}]
    levels, depth = kwargs.pop("levels"), kwargs.pop("depth")
    return composer.multiscale(event_shape, levels, step, depth=depth,
                               context_features=context_features, **kwargs)


def make_context(model_cfg: ModelConfig | Mapping[str, Any], num_classes: int,
                 labels: Tensor) -> Optional[Tensor]:
    """The context tensor a (conditional) model expects for ``labels``: one-hot, or ``None``."""
    cfg = model_config_from(model_cfg)
    if not cfg.conditional:
        return None
    return nn.functional.one_hot(labels.long(), num_classes).to(torch.get_default_dtype())


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model stored in a checkpoint (``best.pt`` or ``last.pt``) in eval mode.

    Returns ``(model, checkpoint)``; the checkpoint dict holds ``config`` and ``data``.

    Raises:
        CheckpointError: if the file is damaged or does not match the architecture it names.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    config = ckpt["config"]
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"checkpoint {path}: its config has no 'model' section")
    model = build_model(config["model"], ckpt["data"])
    # Data-dependent initialisations are buffers in the state dict, so loading restores them.
    load_state_strict(model, ckpt["model"], f"checkpoint {path}")
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval()
    return model, ckpt
