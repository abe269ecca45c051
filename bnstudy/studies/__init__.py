"""The seed notebooks' experiments as studies. Each ``bnstudy.studies.<module>.run(seeds, quick, ...)`` returns a
:class:`~bnstudy.studies.result.StudyResult`; :mod:`bnstudy.studies.figures` draws its figures.

This module imports no study (nor torch), so ``bnstudy --help`` can list the studies cheaply. Studies may import
the shared building blocks (data, models, norms, precision, reference, io), distributed, and edge: qat-fold studies
the INT8 models edge builds and ships (the QAT modules, the ONNX writers, deploy/'s quantiser and latency harness as
edge loads them), so it uses those rather than copies. Never training, traces, benchmarks or commands. Their
figures (figures) and fitting helpers (fitting) live here too.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bnstudy.studies.result import DEFAULT_SEEDS, StudyResult


@dataclass(frozen=True)
class StudyInfo:
    name: str
    module: str
    help: str
    dataset: str | None = None
    takes_precision: bool = True  # whether it trains models in a choosable precision (--precision)


STUDIES = {
    info.name: info
    for info in (
        StudyInfo(
            "manual-bn",
            "manual_bn",
            "BN from scratch against nn.BatchNorm1d; the blog's example recomputed",
            takes_precision=False,
        ),
        StudyInfo("modes", "modes", "train vs eval mode: repeated predictions of the same rows"),
        StudyInfo("batch-size", "batch_size", "the plain MLP at batch sizes 8, 32, 128, 512"),
        StudyInfo("bn-vs-nobn", "bn_vs_nobn", "the deep MLP with and without BN, at batch 8 and across batch sizes"),
        StudyInfo("gradients", "gradients", "mean |grad| per layer with and without BN, at init and in training"),
        StudyInfo("mnist", "mnist", "the MNIST MLP with and without BN", dataset="mnist"),
        StudyInfo("cnn-channels", "cnn_channels", "BatchNorm2d per channel, conv bias, seed CNN", dataset="cifar10"),
        StudyInfo(
            "qat-fold",
            "qat_fold",
            "INT8 after training vs QAT, BN folded or not, frozen or not",
            "cifar10",
            takes_precision=False,  # fake quantisation simulates INT8 in float32
        ),
    )
}


def run_study(
    name: str,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    quick: bool | None = None,
    data: str | os.PathLike | None = None,
    precision: str | None = None,
) -> StudyResult:
    """Run study ``name`` over ``seeds``; ``data`` goes to the studies that load images, ``precision`` (the training
    precision, :mod:`bnstudy.precision`) to those that train."""
    info = STUDIES[name]
    module = importlib.import_module(f"bnstudy.studies.{info.module}")
    overrides = {"precision": precision} if precision is not None and info.takes_precision else {}
    if info.dataset is not None:
        overrides["data"] = data
    return module.run(seeds, quick, **overrides)


def save_study(result: StudyResult, out: str | os.PathLike) -> list[Path]:
    """Write ``<out>/<name>/result.json`` and the study's figures as PNGs beside it."""
    from bnstudy.studies.figures import save_figures, study_figures

    directory = Path(out) / result.name
    return [result.save(directory), *save_figures(study_figures(result), directory)]
