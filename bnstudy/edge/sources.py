"""Where a model to export comes from: a training run directory, a checkpoint, or ``torchvision:<name>`` (random
weights, BN statistics randomised so BN is not the identity); and real test images to verify it on."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bnstudy.data import find_real_data, load_images, to_model_input
from bnstudy.edge.fold import randomize_batchnorm
from bnstudy.errors import UserError, first_line
from bnstudy.training.checkpoint import model_from_checkpoint

TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REAL_IMAGES = 64


def load_source(source: str, seed: int) -> tuple[nn.Module, dict]:
    """(model, config) from a run directory, checkpoint or ``torchvision:<name>`` (random weights, BN statistics
    randomised so BN is not the identity)."""
    if not source.startswith(TORCHVISION_PREFIX):
        try:
            return model_from_checkpoint(source)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            reason = f"{type(exc).__name__}: {first_line(exc)}"
            raise UserError(f"{source}: its config cannot rebuild a model ({reason})") from None
    import torchvision

    name = source[len(TORCHVISION_PREFIX) :]
    if name not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown torchvision model {name!r}; see torchvision.models.list_models() (e.g. resnet18)")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    config = {
        "model": source,
        "norm": "bn",
        "num_classes": None,  # read from the output once the input shape is known
        "input_shape": [3, 32, 32],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "classes": None,
        "dataset": None,
        "weights": f"random (seed {seed}, BN statistics randomised)",
    }
    return model.eval(), config


def check_input(model: nn.Module, shape: list[int], source: str) -> object:
    """The model's output on zeros of ``shape``, or a one-line UserError naming the shape."""
    try:
        with torch.no_grad():
            return model(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, IndexError) as exc:
        raise UserError(
            f"input shape {' '.join(map(str, shape))} does not fit {source} ({first_line(exc)}); "
            "pass --input-shape C H W"
        ) from None


def real_test_images(config: dict, shape: list[int]) -> tuple[str, Tensor | None]:
    """(name, tensor) of CIFAR-10 test images when the config names cifar10 and the data is here, else (note, None)."""
    dataset = config.get("dataset")
    if dataset != "cifar10":
        named = "the source names no dataset" if dataset is None else f"dataset {dataset!r} is not cifar10"
        return f"real images: none ({named}); verified on random inputs only", None
    if list(shape) != [3, 32, 32]:
        return f"real images: none (input shape {shape} is not CIFAR-10's); verified on random inputs only", None
    root = find_real_data("cifar10")
    if root is None:
        return "real images: CIFAR-10 data not found here; verified on random inputs only", None
    images = load_images("cifar10", root, "test").subset(REAL_IMAGES)
    mean, std = config.get("mean") or images.mean, config.get("std") or images.std
    return "cifar10-test", to_model_input(images.x, tuple(mean), tuple(std))
