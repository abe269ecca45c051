"""Checkpoints: written atomically, read with ``weights_only=True``, and turned back into models.

A checkpoint is a dict with ``model`` (state dict), ``config`` (plain data: at least ``model``, ``norm``,
``num_classes``, ``input_shape``, ``mean``, ``std``, ``classes``) and, for training runs, ``optimizer``,
``scheduler``, ``epoch`` and ``rng``. A run directory holds its latest checkpoint as ``checkpoint.pt``.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnstudy.errors import UserError, first_line
from bnstudy.io import atomic_write
from bnstudy.models import create_model
from bnstudy.training.run_directory import CHECKPOINT


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` via a temp file and rename, so the previous checkpoint survives a crash."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A checkpoint file, or the ``checkpoint.pt`` inside a run directory."""
    path = Path(source)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint found; pass a run directory (runs/NAME) or a checkpoint file")
    return path


def load_checkpoint(source: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) with a one-line error for corrupt or foreign files."""
    path = resolve_checkpoint(source)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on stderr before refusing a file
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        message = f"{path}: corrupt or not a bnstudy checkpoint ({_unreadable(path, exc)}); retrain or pick another"
        raise UserError(message) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a bnstudy checkpoint (expected keys 'model' and 'config')")
    return state


def _unreadable(path: Path, exc: BaseException) -> str:
    """Why torch could not load ``path``, in bnstudy's words: torch's own messages suggest ``weights_only=False``,
    which would run whatever code the file holds."""
    if not zipfile.is_zipfile(path):
        return "not a complete torch zip archive"
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds Python objects that a safe load refuses"
    return first_line(exc)


def inference_norm(norm: str) -> str:
    """SyncBN and BN are the same layer in eval mode; inference builds plain BN so export and folding see it."""
    return "bn" if norm == "syncbn" else norm


def model_from_checkpoint(
    source: str | os.PathLike,
    *,
    for_inference: bool = True,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights; returns (model, config). ``prepare`` turns the
    built model into the form the checkpoint holds before its weights are loaded (e.g. QAT form)."""
    state = load_checkpoint(source)
    config = state["config"]
    norm = inference_norm(config["norm"]) if for_inference else config["norm"]
    model = create_model(config["model"], norm, num_classes=config["num_classes"], **config.get("model_kwargs", {}))
    if prepare is not None:
        model = prepare(model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        message = f"{resolve_checkpoint(source)}: weights do not match model {config['model']!r} ({first_line(exc)})"
        raise UserError(message) from None
    if for_inference:
        model.eval()
    return model, config
