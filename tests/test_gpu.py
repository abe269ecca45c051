"""Issue 12, item 6: what only a CUDA GPU can check. Every test here is marked ``cuda`` and skips without one;
``bash scripts/gpu_check.sh`` runs them in one go on a GPU machine."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.distributed.syncbn import SyncBatchNorm
from bnstudy.precision import resolve_precision
from tests.conftest import ROOT, run_cli

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh on one)"),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (3, 5)  # uneven batches on the two ranks
C = 6


def _inputs() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(sum(SIZES), C, 5, 5, generator=gen) * 2.5 + 1.5


def _syncbn_worker(rank: int, world_size: int, dtype_name: str, out: str) -> None:
    """Both ranks share GPU 0 over gloo: SyncBatchNorm forward + backward under CUDA autocast on its own rows."""
    device = torch.device("cuda", 0)
    x = _inputs()
    start = sum(SIZES[:rank])
    mine = x[start : start + SIZES[rank]].to(device).requires_grad_()
    bn = SyncBatchNorm(C).to(device)
    with torch.autocast("cuda", dtype=DTYPES[dtype_name]):
        y = bn(mine.to(DTYPES[dtype_name]))
    (y.float() * torch.arange(1.0, C + 1, device=device).view(1, C, 1, 1)).sum().backward()
    state = {"y": y.float().cpu(), "y_dtype": str(y.dtype), "grad": mine.grad.cpu(), "rm": bn.running_mean.cpu()}
    state |= {"rv": bn.running_var.cpu(), "rm_dtype": str(bn.running_mean.dtype), "gw": bn.weight.grad.cpu()}
    torch.save(state, f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_cuda_syncbn_under_autocast_behaves_like_batchnorm(dtype_name, tmp_path):
    spawn_gloo(_syncbn_worker, 2, dtype_name, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    device = torch.device("cuda", 0)
    x = _inputs().to(device).requires_grad_()
    bn = nn.BatchNorm2d(C).to(device)
    with torch.autocast("cuda", dtype=DTYPES[dtype_name]):
        y = bn(x.to(DTYPES[dtype_name]))
    (y.float() * torch.arange(1.0, C + 1, device=device).view(1, C, 1, 1)).sum().backward()
    tol = {"bf16": 2 * 2**-8, "fp16": 2 * 2**-11}[dtype_name] * 8  # a few units in the last place at |y| <= 8
    assert ranks[0]["y_dtype"] == str(y.dtype) and ranks[0]["rm_dtype"] == "torch.float32"
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.float().cpu(), atol=tol, rtol=0)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad.cpu(), atol=tol, rtol=0)
    for r in ranks:  # statistics and their reductions in fp32: far tighter than the output's precision
        torch.testing.assert_close(r["rm"], bn.running_mean.cpu(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r["rv"], bn.running_var.cpu(), atol=1e-4, rtol=1e-4)


def test_auto_precision_is_bf16_on_a_gpu_with_native_bf16():
    chosen = resolve_precision("auto", torch.device("cuda", 0))
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert chosen.name == ("bf16" if native else "fp32") and chosen.capability.startswith("native" if native else "e")
    assert resolve_precision("fp16", torch.device("cuda", 0)).grad_scaler().is_enabled()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_short_cuda_training_run_and_export_from_its_checkpoint(precision, tmp_path):
    out = tmp_path / precision
    train = run_cli(
        sys.executable, str(ROOT / "launch" / "train_cifar.py"), "--device", "cuda", "--precision", precision,
        "--data", "synthetic", "--synthetic-size", "2048", "--test-subset", "512", "--width", "16", "--epochs", "2",
        "--batch-size", "64", "--out", str(out),
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["precision_used"] == precision and config["device"].startswith("cuda")
    accuracies = [json.loads(line)["test_acc"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= a <= 1 for a in accuracies) and accuracies[-1] > 0.1  # learnt something, no NaN
    report = tmp_path / f"{precision}-export.json"
    export = run_cli(
        sys.executable, "-m", "bnstudy", "export", str(out), "--fold-bn", "--out", str(tmp_path / f"{precision}.onnx"),
        "--report", str(report),
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    assert json.loads(report.read_text())["verify"]["passed"]
