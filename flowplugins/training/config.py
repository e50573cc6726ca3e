"""Training configuration: plain dataclasses that round-trip through dicts, JSON and YAML.

Checkpoints store the configuration as plain dicts and lists so that they load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

__all__ = ["ConfigError", "ModelConfig", "TrainConfig", "load_config_file", "MODEL_KEYS"]


class ConfigError(ValueError):
    """A configuration file or value is invalid."""


@dataclass
class ModelConfig:
    """The architecture, passed to the composer's presets (``flowplugins.glow`` / ``realnvp``).

    Args:
        arch: ``"glow"``, ``"realnvp"`` or ``"multiscale"`` (the composer's general builder:
            ``options["step"]`` lists the registry names of one flow step, third-party ones
            included; ``coupling``, ``permutation`` and ``hidden`` are then unused).
        levels: number of multi-scale levels L.
        depth: flow steps per level K.
        hidden: channels of each coupling network.
        coupling: ``"affine"`` or ``"additive"``.
        permutation: registry name of the channel mixing (``inv_conv1x1_lu``, ``inv_conv1x1``,
            ``shuffle_permutation``, ``reverse_permutation``).
        split_prior: learned conditional prior at each split (Glow's split2d) instead of a plain
            standard-normal factor-out.
        conditional: condition the priors on the class label.
        dropout: dropout rate on the hidden activations of every Glow coupling net (0: off);
            a regulariser for small data sets.
        memory_saving: recompute each step's activations from its output during backward
            (:mod:`flowplugins.memory_saving`): activation memory roughly constant in depth, at
            about 1.5× the time per step. Needs ``dropout = 0`` (a dropout mask cannot be
            recomputed).
        options: further keyword options of the preset, passed through unchanged.
    """

    arch: str = "glow"
    levels: int = 2
    depth: int = 8
    hidden: int = 64
    coupling: str = "affine"
    permutation: str = "inv_conv1x1_lu"
    split_prior: bool = True
    conditional: bool = False
    dropout: float = 0.0
    memory_saving: bool = False
    options: Dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.arch not in ("glow", "realnvp", "multiscale"):
            raise ConfigError(
                f"model.arch must be 'glow', 'realnvp' or 'multiscale'; got {self.arch!r}"
            )
        if self.arch == "multiscale" and "step" not in self.options:
            raise ConfigError("model.arch 'multiscale' needs model.options.step (a list of step specs)")
        for name in ("levels", "depth", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer; got {value!r}")
        if self.coupling not in ("affine", "additive"):
            raise ConfigError(f"model.coupling must be 'affine' or 'additive'; got {self.coupling!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(f"model.dropout must be in [0, 1); got {self.dropout!r}")
        if self.dropout and self.arch != "glow":
            raise ConfigError("model.dropout is only implemented for arch='glow'")
        if not isinstance(self.memory_saving, bool):
            raise ConfigError(f"model.memory_saving must be true or false; got {self.memory_saving!r}")
        if self.memory_saving and self.dropout:
            raise ConfigError(
                f"model.memory_saving recomputes every step from its output, which a coupling net "
                f"with dropout cannot reproduce (it draws a new mask); set model.dropout to 0 "
                f"(--dropout 0); got dropout={self.dropout!r}"
            )
        if not isinstance(self.options, dict):
            raise ConfigError(f"model.options must be a mapping; got {self.options!r}")


MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


@dataclass
class TrainConfig:
    """Everything ``flowplugins train`` needs; the defaults are the tuned digits recipe.

    Args:
        data: ``digits``, ``mnist``, ``cifar10`` or ``folder:PATH``.
        data_root: where MNIST / CIFAR-10 files live (or are downloaded to).
        download: let torchvision download MNIST / CIFAR-10.
        val_size: validation images carved from the training split (None: the data set's
            default, 150 for digits).
        model: the architecture (default: Glow L=2, K=8, width 64, with dropout 0.2 in the
            coupling nets).
        epochs: maximum number of epochs.
        batch_size: training batch size.
        lr: peak learning rate of Adam(W).
        warmup_steps: linear learning-rate warmup from 0 (deep Glows diverge without it).
        lr_schedule: ``"cosine"`` (decay to ``min_lr_ratio · lr`` at the last epoch) or
            ``"constant"`` after warmup.
        min_lr_ratio: final learning rate as a fraction of ``lr`` for the cosine schedule.
        weight_decay: decoupled (AdamW) weight decay.
        dequantization: ``"uniform"`` noise or a learned ``"variational"`` q(u | k) (Flow++);
            bits/dim are an upper bound on the discrete model's either way.
        grad_clip: clip the gradient norm to this value (0: off).
        ema_decay: exponential moving average of the weights used for evaluation, selection and
            sampling (Polyak averaging; 0: off).
        patience: stop after this many epochs without a better validation bits/dim (0: off).
        min_epochs: never stop early before this epoch.
        max_minutes: stop training after this much wall time (None: no limit).
        eval_batch_size: batch size of evaluation passes.
        eval_samples: dequantization noise draws averaged per image when evaluating.
        seed: seed of the weights, the shuffling and the dequantization noise.
        out: output directory (checkpoints, metrics.json, samples.png, bpd_curve.png).
        threads: ``torch.set_num_threads`` (None: leave torch's default; one thread per
            process for a multi-process CPU run under ``torchrun``).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        progress: show a tqdm progress bar on stderr.
        amp: ``"bf16"`` runs the coupling / prior networks under bf16 autocast, the flow's
            invertible stream, log-determinants and loss in float32 (None: off); see
            :mod:`flowplugins.training.precision`.
        sample_count: images in samples.png.
        sample_temperature: temperature of samples.png (Glow §5).
        compile: run the training pass (dequantizer, flow, log-likelihood) through
            ``torch.compile``; evaluation and sampling stay eager. The first step compiles
            (about a minute for the default model on CPU). Measured on the 2-core CPU machine,
            1 thread, default digits model: train step 45.4 → 37.1 ms without dropout, but
            56.9 → 83.0 ms with the default ``dropout=0.2`` (compiled dropout is slower there).
    """

    data: str = "digits"
    data_root: str = "data"
    download: bool = False
    val_size: Optional[int] = None
    model: ModelConfig = field(default_factory=lambda: ModelConfig(dropout=0.2))
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    dequantization: str = "variational"
    grad_clip: float = 50.0
    ema_decay: float = 0.999
    patience: int = 30
    min_epochs: int = 0
    max_minutes: Optional[float] = None
    eval_batch_size: int = 512
    eval_samples: int = 4
    seed: int = 0
    out: str = "runs/train"
    threads: Optional[int] = None
    device: str = "cpu"
    progress: bool = True
    amp: Optional[str] = None
    sample_count: int = 64
    sample_temperature: float = 0.8
    compile: bool = False

    # ---------------------------------------------------------------- checks
    def validate(self) -> "TrainConfig":
        self.model.validate()
        positive = ("epochs", "batch_size", "eval_batch_size", "eval_samples", "sample_count")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer; got {value!r}")
        for name in ("warmup_steps", "patience", "min_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer; got {value!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive; got {self.lr!r}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1); got {self.ema_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio!r}")
        if self.dequantization not in ("uniform", "variational"):
            raise ConfigError(
                f"dequantization must be 'uniform' or 'variational'; got {self.dequantization!r}"
            )
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr_schedule must be 'cosine' or 'constant'; got {self.lr_schedule!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip must be non-negative")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be a positive integer; got {self.threads!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be positive; got {self.max_minutes!r}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be 'cpu', 'cuda[:N]' or 'auto'; got {self.device!r}")
        if self.amp not in (None, "bf16"):
            raise ConfigError(f"amp must be 'bf16' or None; got {self.amp!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false; got {self.compile!r}")
        if not self.sample_temperature > 0:
            raise ConfigError(f"sample_temperature must be positive; got {self.sample_temperature!r}")
        return self

    # ------------------------------------------------------------ conversion
    def to_dict(self) -> Dict[str, Any]:
        """Plain dicts, lists and scalars only (safe for ``weights_only`` checkpoints)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a (possibly partial) mapping; unknown keys are an error naming them.

        Raises:
            ConfigError: for unknown keys or a non-mapping ``model`` section.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level; got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        values = dict(data)
        model = values.pop("model", None) or {}
        if not isinstance(model, Mapping):
            raise ConfigError(f"{source}: 'model' must be a mapping; got {type(model).__name__}")
        bad = sorted(set(model) - set(MODEL_KEYS))
        if bad:
            raise ConfigError(f"{source}: unknown model key(s) {bad}; known: {sorted(MODEL_KEYS)}")
        return cls(model=ModelConfig(**dict(model)), **values)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with top-level fields (or ``model`` fields) changed."""
        model_changes = {k: changes.pop(k) for k in list(changes) if k in MODEL_KEYS}
        model = dataclasses.replace(self.model, **model_changes)
        return dataclasses.replace(self, model=model, **changes)


def load_config_file(path: str | Path) -> TrainConfig:
    """Read a training configuration from a YAML or JSON file (same keys as :class:`TrainConfig`).

    Raises:
        ConfigError: if the file is missing, unparsable or has unknown keys.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror})") from err
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:  # noqa: BLE001 - json and yaml raise different types
        raise ConfigError(f"config file {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {err}") from err
    try:
        return TrainConfig.from_dict(data or {}, source=f"config file {path}")
    except TypeError as err:
        raise ConfigError(f"config file {path}: {err}") from err
