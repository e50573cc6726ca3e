"""Atomic, safely loadable checkpoints.

A checkpoint is a ``dict`` of tensors, plain containers and scalars written with
:func:`torch.save` to a temporary file in the target's directory, flushed to disk and renamed
over the target with :func:`os.replace` — a reader (or a run killed mid-write) sees the old file
or the new one, never half of one. Loading uses ``torch.load(..., weights_only=True)``, which
refuses arbitrary pickled objects, and turns every way a file can be damaged into a
:class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping

import torch
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint",
           "load_state_strict", "remove_stale_temporaries"]

CHECKPOINT_FORMAT = "flowplugins-checkpoint-v1"
_REQUIRED = ("format", "model", "config", "data")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted, or does not fit the model."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file + fsync + :func:`os.replace`).

    If anything fails before the rename, the temporary file is removed and ``path`` keeps its
    previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state, format=CHECKPOINT_FORMAT), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def remove_stale_temporaries(directory: str | os.PathLike) -> list:
    """Delete temporary files that a run killed in the middle of :func:`save_checkpoint` left.

    Only names :func:`save_checkpoint` creates (``.NAME.pt.*.tmp``) are touched.
    """
    removed = []
    folder = Path(directory)
    if folder.is_dir():
        for p in folder.glob(".*.pt.*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises:
        CheckpointError: if the file is missing, truncated, corrupted, not a flowplugins
            checkpoint, or lacks a required entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean "damaged"
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted and cannot be loaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"delete it (or train with --no-resume) to start over"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} is not a flowplugins checkpoint (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r})"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the entries {missing}")
    return state


def load_state_strict(module: nn.Module, state_dict: Mapping[str, Any], what: str) -> None:
    """``module.load_state_dict(strict=True)`` with a :class:`CheckpointError` that lists the
    mismatched keys instead of a partial load.

    Raises:
        CheckpointError: if any key is missing, unexpected, or has another shape.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if hasattr(state_dict[k], "shape") and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        def short(items):
            return ", ".join(items[:5]) + (f", … ({len(items)} in all)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys {short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {short(shapes)}")
        raise CheckpointError(
            f"{what} does not match the model architecture: {'; '.join(parts)}"
        )
    module.load_state_dict(state_dict, strict=True)
