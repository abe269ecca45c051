"""Per-rank BN statistics: observing what BN normalised with, and making running stats consistent (--eval-bn)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnstudy.distributed.bn_statistics import bn_statistics_report, precise_bn, sync_bn_buffers, used_statistics
from bnstudy.distributed.process_group import spawn_gloo
from bnstudy.models import seed_cnn


@pytest.mark.parametrize("affine", [True, False])
def test_used_statistics_recovers_batch_mean_and_variance(affine):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, -1.5, 2.0, 1.0]))
            bn.bias.uniform_(-1, 1)
    x = torch.randn(8, 4, 5, 5) * torch.tensor([1.0, 3.0, 0.5, 2.0]).view(1, 4, 1, 1) + 2
    mean, var = used_statistics(x, bn(x), bn)
    torch.testing.assert_close(mean, x.double().mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, x.double().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


def test_report_restores_running_buffers():
    model = seed_cnn("bn", width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = bn_statistics_report(model, torch.randn(6, 3, 8, 8))
    assert [r["layer"] for r in records] == ["0.1", "1.1"]
    assert all(r["running_mean_max_abs_diff"] == 0 for r in records)  # a single process agrees with itself
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_precise_bn_recomputes_population_statistics_with_frozen_weights():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    data = torch.randn(400, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.0])
    precise_bn(bn, data.split(50))
    torch.testing.assert_close(bn.running_mean, data.mean(0), rtol=1e-5, atol=1e-5)
    # PreciseBN averages the per-batch unbiased variances
    expected_var = torch.stack([b.var(0) for b in data.split(50)]).mean(0)
    torch.testing.assert_close(bn.running_var, expected_var, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1 and bn.training


EXPECTED = {  # per mode: (running_mean, running_var) on rank 0 and rank 1
    "local": ([1.0, 2.0], [10.0, 20.0]),
    "reduce": ([1.5, 1.5], [15.0, 15.0]),
    "broadcast": ([1.0, 1.0], [10.0, 10.0]),
    "precise": ([2.0, 2.0], [5 / 3, 5 / 3]),  # batches rank+[0..3]: means 1.5 and 2.5, unbiased variance 5/3
}


def _eval_bn_worker(rank: int, world_size: int, out: str) -> None:
    for mode in EXPECTED:
        bn = nn.BatchNorm1d(2)
        with torch.no_grad():
            bn.running_mean.fill_(float(rank + 1))
            bn.running_var.fill_(float(10 * (rank + 1)))
        sync_bn_buffers(bn, mode, lambda: [torch.full((4, 2), float(rank)) + torch.arange(4.0).view(4, 1)])
        torch.save({"mean": bn.running_mean, "var": bn.running_var}, f"{out}/{mode}{rank}.pt")


def test_eval_bn_modes_across_two_ranks(tmp_path):
    spawn_gloo(_eval_bn_worker, 2, str(tmp_path))
    for mode, (mean, var) in EXPECTED.items():
        for rank in range(2):
            state = torch.load(tmp_path / f"{mode}{rank}.pt", weights_only=True)
            torch.testing.assert_close(state["mean"], torch.full((2,), mean[rank]), msg=mode)
            torch.testing.assert_close(state["var"], torch.full((2,), var[rank]), msg=mode)
