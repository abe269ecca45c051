"""What a training run trains and tests on: CIFAR-10 when found, else the synthetic set; batched augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from bnstudy.data import ImageDataset, find_real_data, load_images, load_test_images, synthetic_images
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

    auto: real CIFAR-10 from $BNSTUDY_DATA, ./data or ../shared/data (or torchvision's download with
    ``--download``), else the synthetic set. For an .npz directory holding ``test_lossless_first1000.npz``, that
    exact subset is the test set (the rest of that test.npz is JPEG-degraded).
    """
    if config.data == "synthetic":
        data = _synthetic(config, "--data synthetic")
    elif config.data == "auto":
        root = find_real_data("cifar10")
        if root is not None:
            data = _real(root, config)
        elif config.download:
            data = _real(Path("data/cifar10"), config)
        else:
            data = _synthetic(config, "no CIFAR-10 found ($BNSTUDY_DATA, ./data/cifar10, ../shared/data/cifar10)")
    else:
        data = _real(Path(config.data), config)
    if config.train_subset:
        data.train = data.train.subset(config.train_subset)
    if config.test_subset:
        data.test = data.test.subset(config.test_subset)
    return data


def _real(root: Path, config: TrainConfig) -> RunData:
    train = load_images("cifar10", root, "train", download=config.download)
    test = load_test_images("cifar10", root, download=config.download)
    return RunData(train, test, f"CIFAR-10 from {root} (test: {test.source}, {len(test)} images)")


def _synthetic(config: TrainConfig, reason: str) -> RunData:
    train = synthetic_images("cifar10", config.synthetic_size, seed=config.seed)
    test = synthetic_images("cifar10", max(1000, config.synthetic_size // 10), seed=config.seed + 10_000)
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
