"""Image data for the studies: real data when there is some (``--data`` or :func:`bnstudy.data.find_real_data`),
else a synthetic set of the same shape, turned into normalised float tensors once."""

from __future__ import annotations

import os
from pathlib import Path

from bnstudy.data import (
    DataError,
    ImageDataset,
    TabularSplit,
    find_real_data,
    load_images,
    load_test_images,
    synthetic_images,
    to_model_input,
)

SYNTHETIC = "synthetic"


def load_train_test(
    name: str,
    data: str | os.PathLike | None,
    train_size: int | None,
    test_size: int | None,
    synthetic_sizes: tuple[int, int],
) -> tuple[ImageDataset, ImageDataset]:
    """Train and test sets of ``name``, the first ``train_size``/``test_size`` samples (None: all).

    ``data`` is a directory or torchvision root, ``"synthetic"``, or None to use real data when found.
    A directory holding CIFAR-10's exact test subset uses it (:func:`bnstudy.data.load_test_images`).
    """
    if data is None:
        root = find_real_data(name)
    elif str(data) == SYNTHETIC:
        root = None
    else:
        root = Path(data)
        if not root.exists():
            raise DataError(
                f"{root}: not found; pass a directory with train.npz and test.npz, a torchvision {name} root, "
                f"or 'synthetic'"
            )
    if root is None:
        train = synthetic_images(name, n=train_size or synthetic_sizes[0], seed=1)
        test = synthetic_images(name, n=test_size or synthetic_sizes[1], seed=2)
        return train, test
    train = load_images(name, root, "train")
    test = load_test_images(name, root)
    return train.subset(train_size or len(train)), test.subset(test_size or len(test))


def as_split(train: ImageDataset, test: ImageDataset) -> TabularSplit:
    """Normalised float NCHW inputs and int64 labels."""
    return TabularSplit(
        to_model_input(train.x, train.mean, train.std),
        train.y,
        to_model_input(test.x, test.mean, test.std),
        test.y,
    )
