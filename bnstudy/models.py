"""The study's models, each taking a norm kind ("bn" | "syncbn" | "gn" | "none").

A conv or linear layer followed by a norm has ``bias=False``: the norm's own shift makes the bias redundant
(and BN's mean subtraction cancels it exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from bnstudy.errors import UserError, check_at_least, check_choice
from bnstudy.norms import has_norm, make_norm


def mlp(sizes: Sequence[int], norm: str = "bn") -> nn.Sequential:
    """Linear → norm → ReLU for each hidden layer, then a plain linear output layer."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(fan_in, fan_out, bias=not has_norm(norm)), make_norm(norm, fan_out, 1), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


def small_mlp(norm: str = "none") -> nn.Sequential:
    """Seed 000's binary classifier, 20→64→32→1 (logit output)."""
    return mlp([20, 64, 32, 1], norm)


def deep_mlp(norm: str = "bn") -> nn.Sequential:
    """Seed 000's deeper classifier, 20→64→64→64→32→1 (logit output)."""
    return mlp([20, 64, 64, 64, 32, 1], norm)


def mnist_mlp(norm: str = "bn") -> nn.Sequential:
    """The MNIST MLP, 784→32→32→10, taking (N, 1, 28, 28) or (N, 784)."""
    return nn.Sequential(nn.Flatten(), *mlp([784, 32, 32, 10], norm))


def conv_norm_act(c_in: int, c_out: int, norm: str, stride: int = 1, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """3×3 conv (no bias when a norm follows) → norm → activation."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=not has_norm(norm)), make_norm(norm, c_out, 2), act()
    )


def seed_cnn(norm: str = "bn", num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """Seed 004's CIFAR CNN: conv → norm → ReLU, a stride-2 conv block, global average pooling, linear head."""
    return nn.Sequential(
        conv_norm_act(3, width, norm),
        conv_norm_act(width, 2 * width, norm, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class Residual(nn.Module):
    """x + f(x)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def conv_stage(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """conv → 2×2 max-pool → norm → GELU, then a residual conv → norm → GELU (airbench's conv group, with a
    skip connection)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=not has_norm(norm)),
        nn.MaxPool2d(2),
        make_norm(norm, c_out, 2),
        nn.GELU(),
        Residual(conv_norm_act(c_out, c_out, norm, act=nn.GELU)),
    )


class CifarResNet(nn.Module):
    """The training default: a compact residual CNN shaped like Keller Jordan's airbench network (stem, three
    conv stages with max-pooling, global max pool, linear head), fast on CPU in channels_last."""

    def __init__(self, norm: str = "bn", num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        stem = width // 2
        self.stem = conv_norm_act(3, stem, norm, act=nn.GELU)
        chans = [stem, *widths]
        self.stages = nn.Sequential(*(conv_stage(a, b, norm) for a, b in zip(chans[:-1], chans[1:])))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet": CifarResNet,
    "seed-cnn": seed_cnn,
    "small-mlp": small_mlp,
    "deep-mlp": deep_mlp,
    "mnist-mlp": mnist_mlp,
}


# The models that take CIFAR-shaped images (N, 3, 32, 32), ``num_classes`` and ``width``: what training and the
# training benchmarks build. The value is the smallest width the model can be built with (CifarResNet's stem has
# width // 2 channels).
IMAGE_MODELS = {"resnet": 2, "seed-cnn": 1}


def check_image_model(name: str, width: int | None = None) -> None:
    """Refuse, in one line, a model training cannot build: an unknown name, a model that does not take CIFAR
    images, or a width too small for it. Checked before any process starts or any file is written."""
    if name in MODELS and name not in IMAGE_MODELS:
        raise UserError(f"--model {name} does not take CIFAR images; choose one of {', '.join(IMAGE_MODELS)}")
    check_choice("--model", name, IMAGE_MODELS)
    if width is not None:
        check_at_least("--width", width, IMAGE_MODELS[name])


def create_model(name: str, norm: str = "bn", **kwargs) -> nn.Module:
    """Build a model from :data:`MODELS` by name with the given norm kind."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](norm=norm, **kwargs)
