"""DDP's gradient all-reduce through shared memory, on real gloo process groups: the same averages as DDP's own
gloo hook, bitwise identical on every rank, buckets larger than a chunk, the transport choice and its errors."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from bnstudy.distributed.collectives import SYNCBN_ALL_REDUCE
from bnstudy.distributed.ddp_gradients import (
    CHUNK_NUMEL,
    DDP_ALL_REDUCE,
    DDP_TRANSPORT_ENV,
    requested_ddp_transport,
    wrap_ddp,
)
from bnstudy.distributed.shm_allreduce import fast_path_supported
from bnstudy.errors import UserError
from bnstudy.traces.cpu_attribution import BN_BACKWARD, BN_SYNC, DDP_ALLREDUCE, classify
from tests.test_shm_allreduce import run_ranks, shm_entries

needs_shm = pytest.mark.skipif(not fast_path_supported(), reason="the shared-memory path needs x86-64")
STEPS = 3


def _model() -> nn.Module:
    """A conv and BN (small buckets) and a linear layer whose weight alone is more than one chunk."""
    torch.manual_seed(0)
    features = 8 * 4 * 4
    outputs = CHUNK_NUMEL // features + 7
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(features, outputs),
    )  # fmt: skip


def _train(rank: int, requested: str) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """STEPS SGD steps on rank-specific data; the transport, the last step's gradients and the parameters."""
    model = _model()
    ddp, transport = wrap_ddp(model, requested=requested)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(STEPS):
        x = torch.randn(4 + rank, 3, 8, 8, generator=gen)
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    return transport, [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]


def _compare_worker(rank: int, world: int) -> dict:
    shm, gloo = _train(rank, "shm"), _train(rank, "gloo")
    return {
        "transports": (shm[0], gloo[0]),
        "grad_bits": [g.numpy().tobytes() for g in shm[1]],
        "param_bits": [p.numpy().tobytes() for p in shm[2]],
        "max_rel_diff": max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(shm[1], gloo[1])),
        "params_close": all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(shm[2], gloo[2])),
        "largest_grad": max(g.numel() for g in shm[1]),
    }


@needs_shm
@pytest.mark.parametrize("world", [2, 3])
def test_shared_memory_gradients_average_like_gloo_and_agree_bitwise_across_ranks(world):
    before = shm_entries()
    results = run_ranks(_compare_worker, world)
    for rank, result in results.items():
        assert result["transports"] == ("shm", "gloo"), rank
        assert result["largest_grad"] > CHUNK_NUMEL  # a bucket of several chunks
        assert result["max_rel_diff"] < 1e-5, (rank, result["max_rel_diff"])  # the same average, other rounding
        assert result["params_close"], rank
    assert len({tuple(r["grad_bits"]) for r in results.values()}) == 1, "ranks got different gradients"
    assert len({tuple(r["param_bits"]) for r in results.values()}) == 1, "ranks' parameters drifted apart"
    assert shm_entries() <= before


def _hosts_worker(rank: int, world: int) -> dict:
    result = {"auto": wrap_ddp(_model(), requested="auto")[1]}
    try:
        wrap_ddp(_model(), requested="shm")
    except UserError as exc:
        result["forced"] = str(exc)
    return result


@needs_shm
def test_ranks_on_different_hosts_keep_gloo_and_forcing_shared_memory_is_a_one_line_error():
    results = run_ranks(_hosts_worker, 2, env={r: {"BNSTUDY_HOST_ID": f"host-{r}"} for r in range(2)})
    for result in results.values():
        assert result["auto"] == "gloo"
        assert result["forced"] == (
            f"{DDP_TRANSPORT_ENV}=shm but the ranks are not all on this host; use {DDP_TRANSPORT_ENV}=auto or gloo"
        )


def test_a_bad_transport_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv(DDP_TRANSPORT_ENV, "Pigeon")
    with pytest.raises(UserError, match=f"^{DDP_TRANSPORT_ENV}='pigeon' is not a transport; use one of auto, shm"):
        requested_ddp_transport()
    monkeypatch.setenv(DDP_TRANSPORT_ENV, " GLOO ")
    assert requested_ddp_transport() == "gloo"
    monkeypatch.delenv(DDP_TRANSPORT_ENV)
    assert requested_ddp_transport() == "auto" and DDP_TRANSPORT_ENV not in os.environ


def test_trace_attribution_counts_the_shared_memory_gradient_exchange_as_ddp():
    assert classify(DDP_ALL_REDUCE, None) == DDP_ALLREDUCE
    assert classify(DDP_ALL_REDUCE, BN_BACKWARD) == DDP_ALLREDUCE  # even where a BN layer's backward encloses it
    assert classify(SYNCBN_ALL_REDUCE, BN_BACKWARD) == BN_SYNC
