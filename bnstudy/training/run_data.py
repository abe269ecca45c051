"""What a training run trains and tests on: CIFAR-10 when found, else the synthetic set; batched augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bnstudy.data import (
    ImageDataset,
    find_or_download_cifar10,
    find_real_data,
    load_images,
    load_test_images,
    synthetic_images,
)
from bnstudy.errors import UserError
from bnstudy.traces.record import SKIPPED_STEPS, WARMUP_STEPS
from bnstudy.training.config import TrainConfig


@dataclass
class RunData:
    train: ImageDataset
    test: ImageDataset
    description: str
    synthetic: bool = False
    notes: list[str] = field(default_factory=list)


def load_run_data(config: TrainConfig) -> RunData:
    """Train and test sets for ``--data`` (auto | synthetic | PATH).

    auto: real CIFAR-10 from $BNSTUDY_DATA, ./data or ../shared/data, else torchvision's download into
    ./data/cifar10 (not with ``--no-download`` or $BNSTUDY_OFFLINE=1), else the synthetic set with a warning. For an
    .npz directory holding ``test_lossless_first1000.npz``, that exact subset is the test set (the rest of that
    test.npz is JPEG-degraded).
    """
    if config.data == "synthetic":
        data = _synthetic(config, "--data synthetic")
    elif config.data == "auto":
        root, why_not = find_or_download_cifar10(config.download)
        data = _real(root, config) if root is not None else _synthetic(config, why_not)
    else:
        data = _real(Path(config.data), config)
    data.train = _subset(data.train, config.train_subset, "--train-subset", data.synthetic)
    data.test = _subset(data.test, config.test_subset, "--test-subset", data.synthetic)
    return data


def _subset(images: ImageDataset, n: int | None, option: str, synthetic: bool) -> ImageDataset:
    """The first ``n`` images (all for None); more than there are is refused rather than quietly read as "all"."""
    if n is None:
        return images
    if n > len(images):
        hint = " or raise --synthetic-size" if synthetic and option == "--train-subset" else ""
        raise UserError(f"{option} {n} is more than the {len(images)} images of {images.source}; lower it{hint}")
    return images.subset(n)


def steps_per_epoch(config: TrainConfig, data: RunData, world_size: int) -> int:
    """Steps every rank runs per epoch: DistributedSampler(drop_last=True) deals each rank len // world_size images."""
    return len(data.train) // world_size // config.batch_size


def check_run_fits(config: TrainConfig, data: RunData, world_size: int) -> int:
    """Steps per epoch, after refusing a batch larger than a rank's share of the data or a profile longer than an
    epoch; the checks of :meth:`TrainConfig.validate` that need the data."""
    steps = steps_per_epoch(config, data, world_size)
    if steps == 0:
        raise UserError(
            f"{len(data.train)} training images over {world_size} process(es) is less than one batch of "
            f"{config.batch_size}; lower --batch-size"
        )
    profiled = SKIPPED_STEPS + WARMUP_STEPS + config.profile_steps
    if config.profile and steps < profiled:
        raise UserError(
            f"--profile records {profiled} steps of the first epoch ({SKIPPED_STEPS} skipped, {WARMUP_STEPS} warm-up, "
            f"{config.profile_steps} recorded), but an epoch has only {steps}; use more data, a smaller --batch-size "
            "or fewer --profile-steps"
        )
    return steps


def _real(root: Path, config: TrainConfig) -> RunData:
    train = load_images("cifar10", root, "train", download=config.download)
    test = load_test_images("cifar10", root, download=config.download)
    return RunData(train, test, f"CIFAR-10 from {root} (test: {test.source}, {len(test)} images)")


def synthetic_test_set(config: TrainConfig) -> ImageDataset:
    """The synthetic test set of a run on synthetic data (before --test-subset)."""
    return synthetic_images("cifar10", max(1000, config.synthetic_size // 10), seed=config.seed + 10_000)


def run_test_images(stored: dict) -> tuple[ImageDataset, str]:
    """The test images a finished run is judged on, found again from its stored config: CIFAR-10's test set (the
    exact 1,000 where the directory has them) when it trained on real data and that data is here, else the run's
    own synthetic test set; and a note when real data was wanted but is not here. Never downloads."""
    config = TrainConfig.from_dict(stored)
    note = ""
    if not stored.get("synthetic", True):
        root = Path(config.data) if config.data not in ("auto", "synthetic") else find_real_data("cifar10")
        if root is not None and root.exists():
            return load_test_images("cifar10", root), note
        note = "the run trained on CIFAR-10, which is not here: its synthetic twin stands in"
    test = synthetic_test_set(config)
    return _subset(test, config.test_subset, "--test-subset", True), note


def _synthetic(config: TrainConfig, reason: str) -> RunData:
    train = synthetic_images("cifar10", config.synthetic_size, seed=config.seed)
    test = synthetic_test_set(config)
    note = f"WARNING: training on SYNTHETIC data ({reason}); accuracies say nothing about CIFAR-10"
    return RunData(train, test, f"synthetic CIFAR-shaped data ({len(train)} train, {len(test)} test)", True, [note])


def augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with reflect padding and horizontal flip for a uint8 (N, H, W, C) batch, as batched tensor ops."""
    n, h, w, _ = x.shape
    padded = nn.functional.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect")
    padded = padded.permute(0, 2, 3, 1).to(x.dtype)
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip.view(n, 1, 1), cols.flip(2), cols)
    return padded[torch.arange(n).view(n, 1, 1), rows, cols]
