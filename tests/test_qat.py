"""Quantisation-aware training with BN folded: the math, the folded fake-quant conv against the plain conv + BN,
frozen statistics, SyncBN under DDP, and onnxruntime INT8 against the torch fake-quant model."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bnstudy.commands import main as cli
from bnstudy.data import CIFAR10_MEAN, CIFAR10_STD, find_real_data, to_model_input
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.edge.fold import fold_layer_bn, randomize_batchnorm
from bnstudy.edge.onnx_export import count_nodes
from bnstudy.edge.qat import ActivationFakeQuant, FoldedConvBn, freeze_bn_statistics, prepare_qat
from bnstudy.edge.qat_export import export_qat_onnx, qat_model_from_checkpoint, qat_parity, runtime_op_counts
from bnstudy.edge.qat_math import (
    ACTIVATION_RANGE,
    WEIGHT_RANGE,
    affine_activation_qparams,
    batch_corrected_output,
    fake_quantize_activation,
    fake_quantize_weight,
    fold_rounding_agreement,
    symmetric_weight_scale,
    training_fold_scale,
    weight_levels,
)
from bnstudy.errors import UserError
from bnstudy.models import CifarResNet, seed_cnn
from bnstudy.training.checkpoint import load_checkpoint, save_checkpoint
from bnstudy.training.launcher import main
from bnstudy.training.run_data import run_test_images
from deploy import bench, infer
from deploy.edge import load_model, run_batched


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


def test_training_without_the_fold_rounds_the_conv_weights_then_runs_bn_and_ships_folded():
    conv, bn = conv_bn()
    x = torch.randn(8, 3, 8, 8, dtype=torch.float64) * 2 + 0.5
    unfolded = FoldedConvBn(copy.deepcopy(conv), copy.deepcopy(bn), simulate_fold=False).train()
    rounded = fake_quantize_weight(conv.weight, symmetric_weight_scale(conv.weight, *WEIGHT_RANGE), *WEIGHT_RANGE)
    expected = bn.train()(F.conv2d(x, rounded, padding=1))
    torch.testing.assert_close(unfolded(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(unfolded.bn.running_var, bn.running_var, rtol=0, atol=1e-12)
    folded = FoldedConvBn(copy.deepcopy(conv), copy.deepcopy(unfolded.bn)).eval()
    with torch.no_grad():
        torch.testing.assert_close(unfolded.eval()(x), folded(x), rtol=0, atol=0)  # what ships is the same


def test_per_channel_rounding_commutes_with_the_fold_scale():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, 3, 3, generator=gen, dtype=torch.float64)
    scale = (torch.rand(16, generator=gen, dtype=torch.float64) * 3 + 0.01) * torch.where(
        torch.arange(16) % 3 == 0, -1, 1
    )
    assert fold_rounding_agreement(weight, scale, *WEIGHT_RANGE) == 1.0
    levels = weight_levels(weight * scale.view(-1, 1, 1, 1), *WEIGHT_RANGE)
    assert levels.abs().flatten(1).amax(1).tolist() == [63.0] * 16
    folded = weight * scale.view(-1, 1, 1, 1)

    def per_tensor(w: torch.Tensor) -> torch.Tensor:  # one scale for the whole tensor
        step = w.abs().max() / 63
        return torch.round(w / step) * step

    off_grid = (per_tensor(weight) * scale.view(-1, 1, 1, 1) - per_tensor(folded)).abs() > 1e-9
    assert off_grid.double().mean() > 0.5  # with one scale per tensor, rounding would not commute with the fold


def test_a_zero_fold_scale_is_divided_out_as_one_and_ships_zero_levels_at_a_normal_scale():
    k = torch.tensor([0.0, -0.0, -1.5, 2.0], dtype=torch.float64)
    assert training_fold_scale(k).tolist() == [1.0, 1.0, -1.5, 2.0]  # q(0)/0 would be NaN
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert fold_rounding_agreement(weight, k, *WEIGHT_RANGE) == 1.0  # level 0 folded or not
    folded = weight * k.view(-1, 1, 1, 1)
    assert symmetric_weight_scale(folded, *WEIGHT_RANGE)[:2].tolist() == [2.0**-23] * 2
    assert weight_levels(folded, *WEIGHT_RANGE)[:2].abs().max() == 0


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
    for model, pairs, quantisers in ((seed_cnn("bn", width=4), 2, 3), (CifarResNet("bn", width=8), 7, 18)):
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


def colour_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 32, 32, 3) images whose class is their mean colour, plus noise, and their labels: a tiny CNN learns
    them in a few dozen steps, so parity is checked on confident, varied predictions."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(10, 1, 1, 3, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, 10, (n,), generator=gen)
    x = colours[labels] + 0.15 * torch.randn(n, 32, 32, 3, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        index = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """seed_cnn(width=8) trained in fp32, then QAT with BN learning and frozen, exported as QDQ ONNX."""
    torch.manual_seed(0)
    pixels, labels = colour_images(512, seed=0)
    x = to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD)
    model = seed_cnn("bn", width=8)
    train_steps(model, x, labels, 30)
    qat = prepare_qat(model)
    train_steps(qat, x, labels, 10)
    train_steps(freeze_bn_statistics(qat), x, labels, 10)
    path = tmp_path_factory.mktemp("qat") / "model.int8.onnx"
    config = {"model": "seed-cnn", "norm": "bn", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    export_qat_onnx(qat.eval(), path, (3, 32, 32), config)
    return qat, path


def test_export_is_int8_qdq_that_onnxruntime_runs_with_integer_kernels(exported):
    qat, path = exported
    proto = onnx.load(str(path))
    weights = [t for t in proto.graph.initializer if t.name.startswith("weight_int8")]
    assert [t.data_type for t in weights] == [onnx.TensorProto.INT8] * 2
    assert all(onnx.numpy_helper.to_array(t).min() >= WEIGHT_RANGE[0] for t in weights)
    assert max(onnx.numpy_helper.to_array(t).max() for t in weights) == WEIGHT_RANGE[1]
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(count_nodes(proto))
    runtime = runtime_op_counts(path)
    assert runtime.get("QLinearConv") == 2 and "Conv" not in runtime and "BatchNormalization" not in runtime


def test_export_parity_with_the_fake_quant_model(exported):
    qat, path = exported
    pixels, labels = colour_images(1000, seed=7)
    parity = qat_parity(path, qat, to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD))
    assert parity.top1_agreement >= 0.99
    assert parity.max_logit_error <= parity.logit_error_bound
    with torch.no_grad():
        accuracy = (qat.eval()(to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD)).argmax(1) == labels).float().mean()
    assert accuracy > 0.5  # confident, varied predictions: agreement is not that of a constant classifier


def test_resnet_export_runs_every_conv_in_int8_and_agrees(tmp_path):
    torch.manual_seed(0)
    pixels, labels = colour_images(512, seed=0)
    x = to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD)
    model = CifarResNet("bn", width=8)
    train_steps(model, x, labels, 10)
    qat = prepare_qat(model)
    train_steps(qat, x, labels, 5)
    path = export_qat_onnx(qat.eval(), tmp_path / "resnet.int8.onnx", (3, 32, 32))
    test_pixels, _ = colour_images(1000, seed=7)
    parity = qat_parity(path, qat, to_model_input(test_pixels, CIFAR10_MEAN, CIFAR10_STD))
    assert parity.runtime_ops.get("QLinearConv") == 7 and "Conv" not in parity.runtime_ops
    assert parity.top1_agreement >= 0.99 and parity.max_logit_error <= parity.logit_error_bound


@pytest.mark.parametrize("simulate_fold", [True, False])
def test_a_channel_with_zero_gamma_and_one_with_negative_gamma_train_export_and_agree(simulate_fold, tmp_path):
    """γ = 0 (a zero-initialised residual γ, a pruned channel) makes the fold's k = γ/σ zero, and γ < 0 flips its
    sign: QAT stays finite with γ learning as in plain BN, and the INT8 export of a channel held at γ = 0, whose
    output is its β, agrees with the fake-quant model."""
    torch.manual_seed(0)
    pixels, labels = colour_images(512, seed=0)
    x = to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD)
    model = CifarResNet("bn", width=4)
    train_steps(model, x, labels, 10)
    with torch.no_grad():
        bn = model.stages[0][4].body[1]  # the residual branch's BN, whose γ zero-init residual training zeroes
        bn.weight[0], bn.weight[1] = 0.0, -bn.weight[1].abs()
    qat = prepare_qat(model, simulate_fold=simulate_fold)
    folded = qat.model.stages[0][4].body[0]
    train_steps(qat, x, labels, 5)
    assert all(t.isfinite().all() for t in qat.state_dict().values() if t.is_floating_point())
    assert folded.bn.weight[0] != 0  # γ = 0 gets a gradient, as in plain BN
    train_steps(freeze_bn_statistics(qat), x, labels, 3)
    with torch.no_grad():  # pruned: γ held at zero, the channel outputs its β
        folded.bn.weight[0], folded.bn.bias[0] = 0.0, 0.5
        folded.bn.weight[1] = -folded.bn.weight[1].abs()
    path = export_qat_onnx(qat.eval(), tmp_path / "pruned.int8.onnx", (3, 32, 32))
    scales = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if "scale" in t.name]
    assert all((s >= np.finfo(np.float32).tiny).all() for s in scales)  # no zero or denormal scale for onnxruntime
    test_pixels, _ = colour_images(1000, seed=7)
    images = to_model_input(test_pixels, CIFAR10_MEAN, CIFAR10_STD)
    parity = qat_parity(path, qat, images)
    with torch.no_grad():
        assert qat(images).isfinite().all()
    assert parity.runtime_ops.get("QLinearConv") == 7 and "Conv" not in parity.runtime_ops
    assert parity.top1_agreement >= 0.99 and parity.max_logit_error <= parity.logit_error_bound


def test_export_refuses_a_bias_beyond_int32_and_writes_nothing(exported, tmp_path):
    qat = copy.deepcopy(exported[0])
    with torch.no_grad():
        qat.model[1][0].bn.bias[0] = 1e9  # the second conv reads a quantised input: its bias is written as int32
    with pytest.raises(UserError) as caught:
        export_qat_onnx(qat.eval(), tmp_path / "model.onnx", (3, 32, 32))
    assert "beyond int32" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "model.onnx").exists()


def test_deploy_runs_the_export_unchanged(exported):
    qat, path = exported
    pixels, _ = colour_images(64, seed=8)
    session, spec = load_model(path)
    logits = run_batched(session, spec, pixels.numpy(), 32).logits
    with torch.no_grad():
        expected = qat.eval()(to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD)).numpy()
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.98


RUN = ["--data", "synthetic", "--synthetic-size", "512", "--batch-size", "32", "--test-subset", "200"]


@pytest.fixture(scope="module")
def qat_runs(tmp_path_factory):
    """A seed-cnn run on the synthetic set, QAT-fine-tuned from it with BN learning and with BN frozen from the
    start, all through the launcher."""
    base = tmp_path_factory.mktemp("qat-runs")
    source, qat, frozen_from_start = base / "fp32", base / "qat", base / "qat-frozen"
    assert main([*RUN, "--model", "seed-cnn", "--width", "4", "--epochs", "1", "--out", str(source)]) == 0
    common = [*RUN, "--qat-from", str(source), "--epochs", "1", "--lr", "0.05"]
    assert main([*common, "--out", str(qat)]) == 0
    assert main([*common, "--freeze-bn-epoch", "0", "--out", str(frozen_from_start)]) == 0
    return source, qat, frozen_from_start


def test_qat_from_a_run_fine_tunes_it_freezes_bn_and_exports(qat_runs, tmp_path):
    source, qat, frozen_from_start = qat_runs
    trained, learning, frozen = (load_checkpoint(run)["model"] for run in (source, qat, frozen_from_start))
    assert not torch.equal(learning["model.0.0.bn.running_var"], trained["0.1.running_var"])
    torch.testing.assert_close(frozen["model.0.0.bn.running_var"], trained["0.1.running_var"], rtol=0, atol=0)
    assert [frozen[f"model.{i}.0.frozen"].item() for i in (0, 1)] == [True, True]

    model, config = qat_model_from_checkpoint(qat)
    assert config["model"] == "seed-cnn" and config["qat_from"] == str(source)
    path = export_qat_onnx(model, tmp_path / "qat.onnx", tuple(config["input_shape"]), config)
    pixels, _ = colour_images(200, seed=3)
    parity = qat_parity(path, model, to_model_input(pixels, CIFAR10_MEAN, CIFAR10_STD))
    assert parity.top1_agreement >= 0.99 and parity.max_logit_error <= parity.logit_error_bound


def test_bnstudy_export_of_a_qat_run_writes_int8_checks_parity_and_deploy_runs_it(qat_runs, tmp_path, capsys):
    source, qat, _ = qat_runs
    out, report = tmp_path / "qat.int8.onnx", tmp_path / "qat.json"
    assert cli(["export", str(qat), "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "2 QLinearConv, 0 float Conv" in printed and "ok" in printed
    verify = json.loads(report.read_text())["verify"]
    assert verify["passed"] and verify["images"] == 200  # the run's own synthetic test set (--test-subset 200)
    assert verify["top1_agreement"] >= 0.995 and verify["max_logit_error"] <= verify["logit_error_bound"]
    assert verify["runtime_ops"]["QLinearConv"] == 2 and "Conv" not in verify["runtime_ops"]

    test, _ = run_test_images(load_checkpoint(qat)["config"])
    np.savez(tmp_path / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    assert infer.main([str(out), str(tmp_path / "test.npz"), "--out", str(tmp_path / "preds.json")]) == 0
    predictions = json.loads((tmp_path / "preds.json").read_text())["predictions"]
    model, config = qat_model_from_checkpoint(qat)
    with torch.no_grad():
        expected = model(to_model_input(test.x, tuple(config["mean"]), tuple(config["std"]))).argmax(1)
    agreement = np.mean([row["class"] == int(e) for row, e in zip(predictions, expected)])
    assert agreement >= 0.995

    fp32 = tmp_path / "fp32.onnx"
    assert cli(["export", str(source), "--out", str(fp32)]) == 0
    bench_out = tmp_path / "bench.json"
    assert bench.main([str(fp32), "--int8", str(out), "--quick", "--threads", "1", "--out", str(bench_out)]) == 0
    rows = {(row["variant"], row["batch"]) for row in json.loads(bench_out.read_text())["rows"]}
    assert {("ort int8", 1), ("ort int8", 64)} <= rows


def test_bnstudy_export_of_a_qat_run_whose_int8_model_disagrees_exits_1_and_keeps_the_whole_file(
    qat_runs, tmp_path, capsys
):
    """A real parity failure: the QAT run's checkpoint with one BN shift raised until that channel's int32 bias is
    2^10 steps (s_input·s_weight) under int32's limit. The exporter accepts it (the bias itself fits), but
    onnxruntime adds the channel's int32 accumulator to it, which wraps to a large negative value wherever the
    accumulator exceeds 2^10, while torch's float conv saturates the activation."""
    checkpoint = load_checkpoint(qat_runs[1])
    model, _ = qat_model_from_checkpoint(qat_runs[1])
    folded, quantiser = model.model[1][0], model.model[0][2]  # the second conv reads the first ReLU's quantiser
    weight, bias = (t.detach() for t in folded.quantized_weight_bias())
    step = float(quantiser.qparams()[0]) * float(folded.weight_scale(weight)[0])
    state = dict(checkpoint["model"])
    state["model.1.0.bn.bias"] = state["model.1.0.bn.bias"].clone()
    state["model.1.0.bn.bias"][0] += (2**31 - 2**10) * step - float(bias[0])
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", checkpoint | {"model": state})

    out, report = tmp_path / "qat.int8.onnx", tmp_path / "qat.json"
    assert cli(["export", str(tmp_path / "run"), "--out", str(out), "--report", str(report)]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"bnstudy: parity FAILED for {out} (kept for inspection): onnxruntime INT8 differs from the fake-quant model"
    )
    assert "FAILED" in captured.out
    verify = json.loads(report.read_text())["verify"]
    assert not verify["passed"] and verify["max_logit_error"] > verify["logit_error_bound"]
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)  # the kept file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qat.int8.onnx", "qat.json", "run"]  # no temp file left
    biases = [t for t in onnx.load(str(out)).graph.initializer if t.name.startswith("bias_int32")]
    assert 2**31 - 2**11 < onnx.numpy_helper.to_array(biases[1])[0] < 2**31  # the setup is the one described


def test_a_run_is_checked_on_its_own_synthetic_test_images_when_its_real_data_is_not_here(tmp_path):
    test, note = run_test_images({"synthetic": True, "seed": 3, "synthetic_size": 512, "test_subset": 100})
    assert len(test) == 100 and note == "" and test.source == "synthetic-cifar10(seed=10003)"
    test, note = run_test_images(
        {"synthetic": False, "data": str(tmp_path / "nowhere"), "seed": 3, "synthetic_size": 512}
    )
    assert len(test) == 1000 and test.source == "synthetic-cifar10(seed=10003)" and "is not here" in note


@pytest.mark.skipif(find_real_data("cifar10") is None, reason="real CIFAR-10 is not here")
def test_a_real_data_run_is_checked_on_the_exact_test_images():
    test, note = run_test_images({"synthetic": False, "data": "auto", "test_subset": 200})
    assert len(test) == 1000 and test.source.endswith("test_lossless_first1000.npz") and note == ""


@pytest.mark.parametrize(
    "option, message",
    [
        (["--no-fold-bn"], "drop --no-fold-bn"),
        (["--keep-bn"], "drop --keep-bn"),
        (["--opset", "18"], "drop --opset"),
        (["--input-shape", "3", "16", "16"], "drop --input-shape"),
    ],
)
def test_bnstudy_export_of_a_qat_run_refuses_options_without_meaning(qat_runs, tmp_path, capsys, option, message):
    out = tmp_path / "qat.onnx"
    assert cli(["export", str(qat_runs[1]), "--out", str(out), *option]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("bnstudy: error: ") and "is a QAT run" in error and message in error and "\n" not in error
    assert not out.exists()


def test_qat_from_refuses_a_path_that_is_not_a_run_and_a_run_without_bn(tmp_path, capsys):
    assert main([*RUN, "--qat-from", str(tmp_path / "nothing"), "--out", str(tmp_path / "a")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("train_cifar: error: --qat-from") and "no checkpoint found" in error
    config = {"model": "seed-cnn", "width": 4, "norm": "gn", "num_classes": 10, "model_kwargs": {"width": 4}}
    save_checkpoint(
        tmp_path / "gn" / "checkpoint.pt", {"model": seed_cnn("gn", width=4).state_dict(), "config": config}
    )
    assert main([*RUN, "--qat-from", str(tmp_path / "gn"), "--out", str(tmp_path / "b")]) == 2
    error = capsys.readouterr().err.strip()
    assert "has no BN to fold" in error and "\n" not in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_qat_refuses_mixed_precision(tmp_path, capsys):
    config = {"model": "seed-cnn", "width": 4, "norm": "bn", "num_classes": 10, "model_kwargs": {"width": 4}}
    save_checkpoint(
        tmp_path / "bn" / "checkpoint.pt", {"model": seed_cnn("bn", width=4).state_dict(), "config": config}
    )
    assert main([*RUN, "--qat-from", str(tmp_path / "bn"), "--precision", "bf16", "--out", str(tmp_path / "q")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "train_cifar: error: --qat-from simulates INT8 in float32, not --precision bf16; pass fp32"
