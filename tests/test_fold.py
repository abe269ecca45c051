"""BN folding: the math per layer type against the unfused module in float64, the dataflow rules of the graph
rewrite (what must and must not be folded), and precision against torch's own fusion helper."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse as torch_fx_fuse
from torch.nn.modules.batchnorm import _BatchNorm

from bnstudy.distributed.syncbn import SyncBatchNorm, convert_sync_batchnorm
from bnstudy.edge.fold import ChannelAffine, fold_batchnorm, fold_batchnorm_with_report, randomize_batchnorm
from bnstudy.edge.onnx_export import relative_error
from bnstudy.errors import UserError
from bnstudy.models import CifarResNet, deep_mlp, mnist_mlp, seed_cnn, small_mlp

EXACT = 1e-12  # float64 fold vs float64 unfused


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-identity BN statistics (a fresh BN is the identity in eval mode and hides fold bugs)."""
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed)).eval()


def batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def assert_same_function(model: nn.Module, folded: nn.Module, x: torch.Tensor, tol: float = EXACT) -> None:
    with torch.no_grad():
        expected, got = model.eval()(x), folded(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("c_in", "c_out", "groups", "bias"), [(4, 6, 1, False), (4, 6, 2, True), (6, 6, 6, False)])
def test_conv_then_bn_folds_exactly(dim, c_in, c_out, groups, bias):
    model = nn.Sequential(CONV[dim](c_in, c_out, 3, padding=1, groups=groups, bias=bias), BN[dim](c_out)).double()
    result = fold_batchnorm_with_report(randomized(model))
    assert not batchnorms(result.model) and result.model.get_submodule("0").bias is not None
    assert [(e["layer"], e["bn"], e["side"]) for e in result.report.folded] == [("0", "1", "output")]
    assert_same_function(model, result.model, torch.randn(3, c_in, *SPATIAL[dim], dtype=torch.float64))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(4, 6, 1), (4, 6, 2), (6, 9, 3), (4, 4, 4)])
def test_grouped_conv_transpose_then_bn_folds_exactly(dim, c_in, c_out, groups):
    # torch.nn.utils.fusion scales weight dim 1 by all C_out channels, which is wrong for groups > 1.
    conv = CONV_T[dim](c_in, c_out, 3, stride=2, padding=1, output_padding=1, groups=groups, bias=True)
    model = nn.Sequential(conv, BN[dim](c_out)).double()
    folded = fold_batchnorm(randomized(model, seed=groups))
    assert not batchnorms(folded)
    assert_same_function(model, folded, torch.randn(2, c_in, *SPATIAL[dim], dtype=torch.float64))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_then_bn1d_folds_exactly_including_affine_false(affine, bias):
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.BatchNorm1d(7, affine=affine)).double()
    folded = fold_batchnorm(randomized(model))
    assert isinstance(folded.get_submodule("0"), nn.Linear) and not batchnorms(folded)
    assert_same_function(model, folded, torch.randn(4, 5, dtype=torch.float64))


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_bn_before_a_conv_folds_into_its_input_side(groups, padding_mode):
    # Zero padding is allowed only at padding 0; reflect padding copies inputs, so BN commutes with it.
    padding = 0 if padding_mode == "zeros" else 1
    model = nn.Sequential(
        nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=padding, padding_mode=padding_mode, groups=groups)
    ).double()
    result = fold_batchnorm_with_report(randomized(model))
    assert [(e["bn"], e["layer"], e["side"]) for e in result.report.folded] == [("1", "2", "input")]
    assert not batchnorms(result.model)
    assert_same_function(model, result.model, torch.randn(2, 4, 8, 7, dtype=torch.float64))


def test_bn_before_a_linear_folds_into_its_input_side():
    model = nn.Sequential(nn.Tanh(), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    result = fold_batchnorm_with_report(randomized(model), x)
    assert [e["side"] for e in result.report.folded] == ["input"]
    assert_same_function(model, result.model, x)


def test_bn_before_a_zero_padded_conv_becomes_affine():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)).double()
    result = fold_batchnorm_with_report(randomized(model))
    assert not result.report.folded and [e["bn"] for e in result.report.affine] == ["1"]
    assert "pads with zeros" in result.report.affine[0]["reason"]
    assert_same_function(model, result.model, torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_bn_on_both_sides_of_a_conv_fold_into_it():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)).double()
    result = fold_batchnorm_with_report(randomized(model))
    assert sorted(e["side"] for e in result.report.folded) == ["input", "output"]
    assert_same_function(model, result.model, torch.randn(2, 4, 5, 5, dtype=torch.float64))


class ConvCalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


def test_a_conv_called_twice_is_not_folded():
    model = randomized(ConvCalledTwice().double())
    result = fold_batchnorm_with_report(model)
    assert not result.report.folded
    assert "used 2 times" in result.report.affine[0]["reason"]
    assert_same_function(model, result.model, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    # torch.fx's own fuse folds the BN into the shared conv, so the second call changes: the bug we avoid.
    with torch.no_grad():
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        assert (torch_fx_fuse(model)(x) - model(x)).abs().max() > 1e-3


class ConvOutputReusedAfterAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.bn_after_add = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn_after_add(self.bn(y) + y)


def test_conv_output_with_another_user_and_bn_after_add_become_affine():
    model = randomized(ConvOutputReusedAfterAdd().double())
    result = fold_batchnorm_with_report(model)
    reasons = {e["bn"]: e["reason"] for e in result.report.affine}
    assert not result.report.folded and set(reasons) == {"bn", "bn_after_add"}
    assert "'conv' has 2 users" in reasons["bn"] and "add" in reasons["bn_after_add"]
    assert not batchnorms(result.model) and sum(isinstance(m, ChannelAffine) for m in result.model.modules()) == 2
    assert_same_function(model, result.model, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_keep_option_and_batch_statistics_bn_stay_batchnorm():
    model = nn.Sequential(
        nn.ReLU(), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)
    )
    result = fold_batchnorm_with_report(randomized(model.double()), affine_fallback=False)
    assert [e["bn"] for e in result.report.folded] == ["1"]  # input side: the padding-free conv
    assert [e["bn"] for e in result.report.kept] == ["3"] and "track_running_stats=False" in result.report.kept[0][
        "reason"
    ]
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU())
    result = fold_batchnorm_with_report(randomized(model), affine_fallback=False)
    assert len(batchnorms(result.model)) == 1 and "on request" in result.report.kept[0]["reason"]


def test_linear_on_rank3_input_is_not_folded_when_the_example_shows_it():
    # Linear acts on the last dim, BatchNorm1d on dim 1: with L == F the shapes fit but the fold would be wrong.
    model = randomized(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double())
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    result = fold_batchnorm_with_report(model, x)
    assert not result.report.folded and "rank-3" in result.report.affine[0]["reason"]
    assert_same_function(model, result.model, x)


def test_input_model_is_untouched_and_sync_bn_is_reverted():
    model = convert_sync_batchnorm(randomized(seed_cnn("bn", width=4)).train())
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    assert model.training and any(isinstance(m, SyncBatchNorm) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not folded.training and not batchnorms(folded)
    assert_same_function(model, folded, torch.randn(2, 3, 8, 8), tol=1e-5)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.tail = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        return self.tail(y) if y.sum() > -1e9 else y  # data-dependent control flow: torch.fx cannot trace it


def test_untraceable_model_falls_back_to_sequential_pairs_with_a_warning():
    model = randomized(Untraceable().double())
    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        result = fold_batchnorm_with_report(model)
    assert result.report.method == "sequential"
    assert [(e["layer"], e["bn"]) for e in result.report.folded] == [("body.0", "body.1")]
    assert [e["bn"] for e in result.report.affine] == ["tail"]
    assert_same_function(model, result.model, torch.randn(2, 3, 6, 6, dtype=torch.float64))


def test_damaged_statistics_are_a_one_line_error():
    model = randomized(seed_cnn("bn", width=4))
    model[0][1].running_var[0] = float("nan")
    with pytest.raises(UserError, match=r"'0\.1' has non-finite running statistics"):
        fold_batchnorm(model)


SEED_MODELS = {
    "small_mlp": (lambda: small_mlp("bn"), (20,)),
    "deep_mlp": (lambda: deep_mlp("bn"), (20,)),
    "mnist_mlp": (lambda: mnist_mlp("bn"), (1, 28, 28)),
    "seed_cnn": (lambda: seed_cnn("bn"), (3, 32, 32)),
    "CifarResNet": (lambda: CifarResNet("bn"), (3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (3, 32, 32)),
}


def test_models_fold_completely_and_more_precisely_than_torch_fusion():
    """Every BN of these models folds into a conv/linear, and the fold's rounding error is smaller than
    torch.nn.utils.fusion's (via torch.fx's fuse): both folded float32 models are evaluated in float64 against
    the float64 unfused model, so float32 forward rounding (noise larger than the fold's) does not mask it."""
    ours_total = theirs_total = 0.0
    for name, (build, shape) in SEED_MODELS.items():
        torch.manual_seed(0)
        model = randomized(build())
        x = torch.randn(4, *shape)
        result = fold_batchnorm_with_report(model, x)
        assert not batchnorms(result.model) and not result.report.affine, name
        assert len(result.report.folded) == len(batchnorms(model)), name
        with torch.no_grad():
            reference = copy.deepcopy(model).double()(x.double()).numpy()
            ours = relative_error(result.model.double()(x.double()).numpy(), reference)
            theirs = relative_error(torch_fx_fuse(model).double()(x.double()).numpy(), reference)
        assert ours < 1e-6, name
        ours_total, theirs_total = ours_total + ours, theirs_total + theirs
    assert ours_total < theirs_total
