"""Quantisation-aware training with BN folded: the math, the folded fake-quant conv against the plain conv + BN,
frozen statistics, SyncBN under DDP, and onnxruntime INT8 against the torch fake-quant model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.edge.fold import fold_layer_bn, randomize_batchnorm
from bnstudy.edge.qat import ActivationFakeQuant, FoldedConvBn, freeze_bn_statistics, prepare_qat
from bnstudy.edge.qat_math import (
    ACTIVATION_RANGE,
    WEIGHT_RANGE,
    affine_activation_qparams,
    batch_corrected_output,
    fake_quantize_activation,
    fake_quantize_weight,
    symmetric_weight_scale,
)
from bnstudy.errors import UserError
from bnstudy.models import CifarResNet, seed_cnn


def test_weight_scale_uses_the_range_without_clipping():
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64).view(-1, 1, 1, 1)
    scale = symmetric_weight_scale(weight, *WEIGHT_RANGE)
    q = fake_quantize_weight(weight, scale, *WEIGHT_RANGE)
    levels = torch.round(q / scale.double().view(-1, 1, 1, 1))
    assert levels.abs().flatten(1).amax(1).tolist() == [63.0] * 6  # the largest magnitude uses the last level
    assert ((q - weight).abs() <= scale.double().view(-1, 1, 1, 1) / 2 + 1e-12).all()


def test_activation_grid_holds_zero_exactly():
    scale, zero_point = affine_activation_qparams(torch.tensor(-0.37), torch.tensor(2.9), *ACTIVATION_RANGE)
    x = torch.tensor([0.0, -0.37, 2.9, 1.0])
    q = fake_quantize_activation(x, scale, zero_point, *ACTIVATION_RANGE)
    assert q[0] == 0
    assert ((q - x).abs() <= scale / 2 + 1e-7).all()
    scale, zero_point = affine_activation_qparams(torch.tensor(0.5), torch.tensor(2.0), *ACTIVATION_RANGE)
    assert zero_point == 0 and torch.isclose(scale, torch.tensor(2.0 / 255))  # widened to contain 0


def test_batch_correction_without_rounding_is_training_batchnorm():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(8, 5, 4, 4, generator=gen, dtype=torch.float64) * 3 + 1
    gamma, beta = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5, torch.randn(5, generator=gen).double()
    running_var = torch.rand(5, generator=gen, dtype=torch.float64) + 0.5
    batch_var, batch_mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
    folded_running = y * (gamma * torch.rsqrt(running_var + 1e-5)).view(1, -1, 1, 1)  # conv(x, W·γ/σ_r), q = id
    got = batch_corrected_output(folded_running, running_var, batch_mean, batch_var, gamma, beta, 1e-5)
    expected = F.batch_norm(y, None, None, gamma, beta, training=True, eps=1e-5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def conv_bn(channels_in: int = 3, channels_out: int = 6, seed: int = 0) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A float64 conv → BN with non-trivial running statistics and affine parameters."""
    torch.manual_seed(seed)
    conv, bn = nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False).double(), nn.BatchNorm2d(channels_out)
    randomize_batchnorm(bn, torch.Generator().manual_seed(seed))
    return conv, bn.double()


def test_eval_mode_is_fold_then_fake_quantise():
    conv, bn = conv_bn()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    folded = FoldedConvBn(copy.deepcopy(conv), copy.deepcopy(bn)).eval()
    plain = fold_layer_bn(conv, bn.eval())
    weight = fake_quantize_weight(plain.weight, symmetric_weight_scale(plain.weight, *WEIGHT_RANGE), *WEIGHT_RANGE)
    expected = F.conv2d(x, weight, plain.bias, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)
        assert (expected - bn(conv(x))).abs().max() > 1e-3  # the rounding is really there


def test_training_mode_without_rounding_is_conv_then_batchnorm_in_training():
    conv, bn = conv_bn()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64) * 2 + 0.5
    folded = FoldedConvBn(copy.deepcopy(conv), copy.deepcopy(bn)).train()
    folded.fake_quant = False
    expected = bn.train()(conv(x))
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(folded.bn.running_mean, bn.running_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(folded.bn.running_var, bn.running_var, rtol=0, atol=1e-12)


def test_training_mode_with_rounding_is_the_batch_correction():
    conv, bn = conv_bn()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64) * 2 + 0.5
    folded = FoldedConvBn(conv, bn).train()
    running_var = bn.running_var.clone()
    weight, _ = folded.quantized_weight_bias()
    rounded = F.conv2d(x, weight, padding=1)  # conv(x, q(W·γ/σ_r))
    scale = bn.weight * torch.rsqrt(running_var + bn.eps)
    batch_var, batch_mean = torch.var_mean(rounded / scale.view(1, -1, 1, 1), dim=(0, 2, 3), unbiased=False)
    expected = batch_corrected_output(rounded, running_var, batch_mean, batch_var, bn.weight, bn.bias, bn.eps)
    torch.testing.assert_close(folded(x), expected, rtol=0, atol=1e-12)


def test_frozen_statistics_stop_changing():
    conv, bn = conv_bn()
    folded = FoldedConvBn(conv.float(), bn.float()).train()
    optimizer = torch.optim.SGD(folded.parameters(), lr=0.05)

    def steps(n: int) -> list[torch.Tensor]:
        seen = []
        for _ in range(n):
            loss = folded(torch.randn(8, 3, 8, 8) + 1).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen.append(torch.cat([folded.bn.running_mean, folded.bn.running_var]).clone())
        return seen

    before = steps(3)
    assert all(not torch.equal(a, b) for a, b in zip(before, before[1:]))
    freeze_bn_statistics(folded)
    after = steps(3)
    assert all(torch.equal(before[-1], seen) for seen in after)
    assert folded.bn.num_batches_tracked == 3
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), folded.eval()(x), rtol=0, atol=0)  # training uses running statistics


@pytest.mark.parametrize("norm", ["gn", "none"])
def test_prepare_refuses_a_model_without_batchnorm(norm):
    with pytest.raises(UserError) as caught:
        prepare_qat(seed_cnn(norm, width=4))
    assert "no conv → BatchNorm" in str(caught.value) and "\n" not in str(caught.value)


def test_prepare_rewrites_the_image_models():
    for model, pairs, quantisers in ((seed_cnn("bn", width=4), 2, 3), (CifarResNet("bn", width=8), 7, 11)):
        qat = prepare_qat(model)
        assert sum(isinstance(m, FoldedConvBn) for m in qat.modules()) == pairs
        assert sum(isinstance(m, ActivationFakeQuant) for m in qat.modules()) == quantisers
        assert not any(isinstance(m, FoldedConvBn) for m in model.modules())  # the input model is untouched
        assert qat(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def _train_sync_qat(rank: int, world_size: int, out: str) -> None:
    torch.manual_seed(0)
    model = prepare_qat(seed_cnn("syncbn", width=8))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different images
    for _ in range(6):
        x = torch.randn(8, 3, 16, 16, generator=gen) * (1 + rank)
        loss = F.cross_entropy(ddp(x), (x.mean((1, 2, 3)) > 0).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    buffers = {name: value for name, value in model.state_dict().items() if "running" in name or "_val" in name}
    torch.save(buffers, f"{out}/rank{rank}.pt")


def test_ddp_qat_with_syncbn_keeps_rank_statistics_identical(tmp_path):
    spawn_gloo(_train_sync_qat, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    assert len([name for name in ranks[0] if "running_var" in name]) == 2
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(ranks[0]["model.0.0.bn.running_var"], torch.ones(8))  # the statistics did move
