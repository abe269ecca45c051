"""ONNX export end to end: fold → export → onnxruntime (optimisations disabled and default) → parity, the
metadata a deployment reads, and the ``bnstudy export`` command with its one-line errors."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torchvision
from onnx import numpy_helper

from bnstudy.commands import main
from bnstudy.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, find_real_data
from bnstudy.edge.fold import randomize_batchnorm
from bnstudy.edge.onnx_export import BATCH_SIZES, count_nodes, export_onnx, read_metadata, verify_onnx
from bnstudy.models import CifarResNet, create_model, deep_mlp, mnist_mlp, seed_cnn, small_mlp
from bnstudy.training.checkpoint import save_checkpoint

MODELS = {
    "small_mlp": (lambda: small_mlp("bn"), (20,)),
    "deep_mlp": (lambda: deep_mlp("bn"), (20,)),
    "mnist_mlp": (lambda: mnist_mlp("bn"), (1, 28, 28)),
    "seed_cnn": (lambda: seed_cnn("bn"), (3, 32, 32)),
    "CifarResNet": (lambda: CifarResNet("bn"), (3, 32, 32)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(), (3, 32, 32)),
}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    return randomize_batchnorm(model, torch.Generator().manual_seed(seed)).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_export_has_no_batchnorm_and_matches_torch_in_onnxruntime(name, tmp_path):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomized(build())
    # An example batch of 1 must not pin the batch axis: verification runs batches 1, 2, 7 and 64.
    report = export_onnx(model, torch.randn(1, *shape), tmp_path / "m.onnx", count_unfolded=False)
    assert report.dynamic_batch and report.node_counts.get("BatchNormalization", 0) == 0
    assert report.fold["folded"] and not report.fold["kept"]
    verify = verify_onnx(report.path, model, torch.randn(64, *shape))
    assert verify.passed, verify.summary()
    assert {(row["setting"], row["batch"]) for row in verify.rows} == {
        (setting, batch) for setting in ("disabled", "default") for batch in BATCH_SIZES
    }
    assert count_nodes(report.path) == report.node_counts == verify.node_counts


def test_unfolded_export_keeps_batchnorm_nodes_and_matches(tmp_path):
    model = randomized(seed_cnn("bn", width=4))
    report = export_onnx(model, torch.randn(2, 3, 16, 16), tmp_path / "m.onnx", fold_bn=False)
    assert report.node_counts["BatchNormalization"] == 2 and report.fold is None
    assert read_metadata(report.path)["fold_bn"] is False
    assert verify_onnx(report.path, model, torch.randn(8, 3, 16, 16), batch_sizes=(1, 8)).passed


def test_verification_catches_wrong_weights_even_when_onnxruntime_optimises(tmp_path):
    model = randomized(seed_cnn("bn", width=4))
    path = tmp_path / "m.onnx"
    export_onnx(model, torch.randn(2, 3, 16, 16), path, count_unfolded=False)
    proto = onnx.load(str(path))
    conv_weight = next(node.input[1] for node in proto.graph.node if node.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == conv_weight)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.001, init.name))
    onnx.save(proto, str(path))
    verify = verify_onnx(path, model, torch.randn(4, 3, 16, 16), batch_sizes=(1, 4))
    assert not verify.passed
    assert not any(row["passed"] for row in verify.rows) and max(row["max_rel"] for row in verify.rows) > 1e-4


def test_metadata_holds_what_a_deployment_needs(tmp_path):
    config = {"model": "seed-cnn", "norm": "bn", "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD)}
    config["classes"] = list(CIFAR10_CLASSES)
    path = tmp_path / "m.onnx"
    export_onnx(
        randomized(seed_cnn("bn", width=4)), torch.randn(2, 3, 32, 32), path, config=config, count_unfolded=False
    )
    onnx.checker.check_model(str(path), full_check=True)
    meta = read_metadata(path)
    assert meta["config"] == config and meta["classes"] == list(CIFAR10_CLASSES) and meta["fold_bn"] is True
    assert meta["preprocess"] == {
        "input_name": "input",
        "output_names": ["output"],
        "input_shape": [3, 32, 32],
        "layout": "NCHW",
        "dtype": "float32",
        "pixel_scale": 1 / 255,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "source_layout": "HWC",
    }
    assert [f["layer"] for f in meta["fold_report"]["folded"]] == ["0.0", "1.0"]
    assert onnx.load(str(path)).graph.input[0].name == "input"


def test_cli_exports_torchvision_resnet18_with_parity(tmp_path, capsys):
    out, report_path = tmp_path / "r18.onnx", tmp_path / "report.json"
    code = main(["export", "torchvision:resnet18", "--fold-bn", "--out", str(out), "--report", str(report_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "folded  conv1 ← bn1" in printed and "parity:" in printed and "verified on random inputs only" in printed
    report = json.loads(report_path.read_text())
    assert report["export"]["node_counts_unfolded"]["BatchNormalization"] == 20
    assert "BatchNormalization" not in report["export"]["node_counts"] == count_nodes(out)
    assert report["verify"]["passed"] and report["export"]["dynamic_batch"]
    assert {row["setting"] for row in report["verify"]["rows"]} == {"disabled", "default"}


def tiny_checkpoint(path, **config_changes):
    torch.manual_seed(0)
    model = randomized(create_model("seed-cnn", "bn", num_classes=10, width=4))
    config = {
        "model": "seed-cnn",
        "norm": "bn",
        "num_classes": 10,
        "input_shape": [3, 32, 32],
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "classes": list(CIFAR10_CLASSES),
        "dataset": "cifar10",
        "model_kwargs": {"width": 4},
    }
    save_checkpoint(path, {"model": model.state_dict(), "config": config | config_changes})
    return path


@pytest.mark.parametrize("fold", ["--fold-bn", "--no-fold-bn"])
def test_cli_exports_a_checkpoint(fold, tmp_path, capsys):
    source = tiny_checkpoint(tmp_path / "run" / "checkpoint.pt").parent  # a run directory
    out, report_path = tmp_path / "m.onnx", tmp_path / "report.json"
    code = main(["export", str(source), fold, "--out", str(out), "--report", str(report_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(report_path.read_text())
    assert report["export"]["node_counts"].get("BatchNormalization", 0) == (0 if fold == "--fold-bn" else 2)
    assert read_metadata(out)["config"]["model"] == "seed-cnn"
    input_sets = {row["inputs"] for row in report["verify"]["rows"]}
    if find_real_data("cifar10") is None:
        assert input_sets == {"random"} and "CIFAR-10 data not found" in printed
    else:
        assert input_sets == {"random", "cifar10-test"}


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnstudy: error: "), captured.err
    return lines[0]


def test_cli_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert "no checkpoint found" in one_line_error(capsys, ["export", str(tmp_path / "missing"), "--out", out])
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in one_line_error(capsys, ["export", str(tmp_path / "corrupt.pt"), "--out", out])
    (tmp_path / "file").write_text("")
    blocked = str(tmp_path / "file" / "m.onnx")
    assert "is a file" in one_line_error(capsys, ["export", "torchvision:resnet18", "--out", blocked])
    shape = ["--input-shape", "5", "32", "32"]
    assert "input shape 5 32 32" in one_line_error(capsys, ["export", "torchvision:resnet18", "--out", out, *shape])
    assert "unknown torchvision model" in one_line_error(capsys, ["export", "torchvision:nonet", "--out", out])
    nan_source = tiny_checkpoint(tmp_path / "nan.pt")
    state = torch.load(nan_source, weights_only=True)
    state["model"]["0.1.running_var"][0] = float("nan")
    save_checkpoint(nan_source, state)
    assert "non-finite running statistics" in one_line_error(capsys, ["export", str(nan_source), "--out", out])
    unknown = tiny_checkpoint(tmp_path / "unknown.pt", model="no-such-model")
    assert "cannot rebuild a model" in one_line_error(capsys, ["export", str(unknown), "--out", out])
    assert not (tmp_path / "m.onnx").exists()
