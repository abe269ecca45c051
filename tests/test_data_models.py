"""Data loading (npz, torchvision root, synthetic, toy), the norm factory and the models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnstudy.data import DataError, find_real_data, load_images, synthetic_images, to_model_input, toy_classification
from bnstudy.distributed.syncbn import SyncBatchNorm
from bnstudy.models import MODELS, CifarResNet, create_model
from bnstudy.norms import NORM_KINDS, make_norm


def _write_npz(directory, split="train", n=6, shape=(32, 32, 3), labels=None, dtype=np.uint8):
    directory.mkdir(parents=True, exist_ok=True)
    y = np.arange(n) % 10 if labels is None else labels
    np.savez_compressed(directory / f"{split}.npz", x=np.zeros((n, *shape), dtype), y=y.astype(np.int64))


def test_npz_directory_loads_as_uint8_nhwc(tmp_path):
    _write_npz(tmp_path, "train")
    ds = load_images("cifar10", tmp_path, "train")
    assert ds.x.shape == (6, 32, 32, 3) and ds.x.dtype == torch.uint8 and ds.y.dtype == torch.int64
    assert len(ds.classes) == 10


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda d: None, "not found"),
        (lambda d: _write_npz(d, shape=(28, 28, 3)), "expected images of shape (N, 32, 32, 3)"),
        (lambda d: _write_npz(d, labels=np.array([0, 1, 2, 3, 4, 10])), "labels must lie in 0..9"),
        (lambda d: _write_npz(d, dtype=np.float32), "expected uint8"),
        (lambda d: (d.mkdir(), (d / "train.npz").write_bytes(b"garbage")), "not a readable .npz"),
    ],
    ids=["missing", "shape", "labels", "dtype", "corrupt"],
)
def test_bad_data_gives_one_line_error_naming_the_file(tmp_path, make, fragment):
    target = tmp_path / "data"
    make(target)
    with pytest.raises(DataError) as info:
        load_images("cifar10", target, "train")
    message = str(info.value)
    assert fragment in message and "\n" not in message and str(target) in message


def test_missing_torchvision_root_without_download_says_how_to_fix(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(DataError, match="--download"):
        load_images("cifar10", tmp_path / "root", "test")


def test_mnist_npz_without_channel_axis_is_accepted(tmp_path):
    _write_npz(tmp_path, "test", shape=(28, 28))
    ds = load_images("mnist", tmp_path, "test")
    assert ds.x.shape == (6, 28, 28, 1)
    assert to_model_input(ds.x, ds.mean, ds.std).shape == (6, 1, 28, 28)


def test_synthetic_set_is_deterministic_balanced_and_shares_classes_across_seeds():
    a, b = synthetic_images(n=2000, seed=0), synthetic_images(n=2000, seed=0)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    counts = torch.bincount(a.y, minlength=10)
    assert counts.min() > 150
    # class means from seed 0 classify samples drawn with seed 1 far above chance: the classes are shared
    c = synthetic_images(n=1000, seed=1)
    means = torch.stack([a.x[a.y == k].float().mean(0) for k in range(10)]).flatten(1)
    nearest = torch.cdist(c.x.float().flatten(1), means).argmin(1)
    assert (nearest == c.y).float().mean() > 0.3


def test_to_model_input_normalises_per_channel():
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    out = to_model_input(x, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_toy_classification_is_seed_000_problem():
    split = toy_classification()
    assert split.x_train.shape == (800, 20) and split.x_test.shape == (200, 20)
    assert split.x_train.mean(0).abs().max() < 1e-5
    assert set(split.y_train.unique().tolist()) == {0.0, 1.0}


def test_real_cifar_when_present():
    root = find_real_data("cifar10")
    if root is None:
        pytest.skip("no real CIFAR-10 on this machine")
    ds = load_images("cifar10", root, "test")
    assert ds.x.shape == (10000, 32, 32, 3)


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_make_norm_kinds(kind):
    layer = make_norm(kind, 16, 2)
    expected = {"bn": nn.BatchNorm2d, "syncbn": SyncBatchNorm, "gn": nn.GroupNorm, "none": nn.Identity}[kind]
    assert isinstance(layer, expected)
    assert layer(torch.randn(4, 16, 3, 3)).shape == (4, 16, 3, 3)


def test_make_norm_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        make_norm("layer", 8)


INPUTS = {
    "resnet": (2, 3, 32, 32),
    "seed-cnn": (2, 3, 32, 32),
    "small-mlp": (2, 20),
    "deep-mlp": (2, 20),
    "mnist-mlp": (2, 1, 28, 28),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_models_take_every_norm_and_drop_bias_before_norms(name, kind):
    model = create_model(name, kind)
    assert model(torch.randn(INPUTS[name])).shape[0] == 2
    modules = list(model.modules())
    for layer, following in zip(modules, modules[1:]):
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and isinstance(
            following, (nn.BatchNorm1d, nn.BatchNorm2d, SyncBatchNorm, nn.GroupNorm)
        ):
            assert layer.bias is None


def test_seed_model_shapes():
    assert [m.out_features for m in create_model("deep-mlp") if isinstance(m, nn.Linear)] == [64, 64, 64, 32, 1]
    assert [m.out_features for m in create_model("small-mlp") if isinstance(m, nn.Linear)] == [64, 32, 1]
    assert [m.out_features for m in create_model("mnist-mlp") if isinstance(m, nn.Linear)] == [32, 32, 10]
    assert CifarResNet(width=16).head.in_features == 64
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg")
