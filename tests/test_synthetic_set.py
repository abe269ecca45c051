"""Issue 15: the built-in synthetic set is hard enough that the choice of normalisation shows (README, "The
synthetic set")."""

from __future__ import annotations

import json

import pytest
import torch

from bnstudy.data import synthetic_images
from bnstudy.distributed.process_group import DistEnv, spawn_gloo
from bnstudy.training.config import TrainConfig
from bnstudy.training.loop import train


def test_synthetic_set_is_deterministic_and_prefix_stable():
    a, b = synthetic_images(n=600, seed=3), synthetic_images(n=600, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    longer = synthetic_images(n=1500, seed=3)
    assert torch.equal(longer.x[:600], a.x) and torch.equal(longer.y[:600], a.y)
    assert not torch.equal(synthetic_images(n=600, seed=4).x, a.x)


def test_synthetic_lighting_varies_per_image_more_than_a_batch_of_two_can_average_out():
    """Per-image means spread about as much as CIFAR-10's (std 0.13 on [0, 1]): that is what makes statistics over two
    images noisy."""
    x = synthetic_images(n=2000, seed=0).x.float() / 255
    per_image_mean = x.mean((1, 2, 3))
    assert 0.08 < per_image_mean.std().item() < 0.25


def test_synthetic_set_is_below_saturation_on_a_short_run(tmp_path):
    """A cheap proxy for the main job (3 epochs, width 16, 64 images/process): one process, the same model and per-step
    batch, fewer images. The old set reached 100% here within an epoch; this one must stay well below while still
    being learnt."""
    config = TrainConfig(
        out=str(tmp_path / "run"), data="synthetic", synthetic_size=6000, test_subset=1000, width=16,
        batch_size=64, lr=0.05, epochs=2, seed=0,
    )  # fmt: skip
    summary = train(config, DistEnv())
    assert 0.3 < summary["final_test_acc"] < 0.9, summary["final_test_acc"]


# The ordering at 2 images per process, in a real 2-process gloo group running the launcher's training loop (DDP with
# per-rank BN buffers, the CPU SyncBN, GN). One group trains every (seed, norm) point in turn, so the test pays for
# process start-up once. Measured at lr 0.006 (the sweep's linear scaling gives 0.003), test accuracy for seeds 0/1/2:
# BN 21.1/18.0/20.0, SyncBN 26.9/56.1/49.3, GN 51.0/60.5/55.3; about 7 minutes on 2 idle cores. BN and GN are stable
# across seeds and numerics; SyncBN is bimodal at this length (a run either takes off or stays near BN: seed 0 gave
# 17.8% with the statistics computed through another kernel), so the order is asserted on the mean over three seeds,
# and per seed only for GN.
ORDER_NORMS = ("bn", "syncbn", "gn")
ORDER_SEEDS = (0, 1, 2)
ORDER_MARGIN = 0.04
ORDER_RUN = {
    "data": "synthetic", "synthetic_size": 8000, "test_subset": 1000, "width": 8, "batch_size": 2, "epochs": 1,
    "lr": 0.006,
}  # fmt: skip


def _points() -> list[tuple[str, int]]:
    return [(norm, seed) for seed in ORDER_SEEDS for norm in ORDER_NORMS]


def _order_worker(rank: int, world_size: int, out: str) -> None:
    env = DistEnv(rank, rank, world_size, "gloo", torch.device("cpu"))
    for norm, seed in _points():
        train(TrainConfig(out=f"{out}/{norm}-s{seed}", norm=norm, seed=seed, **ORDER_RUN), env)


@pytest.mark.slow
def test_plain_bn_at_two_images_per_process_trails_syncbn_and_gn(tmp_path):
    """Real CIFAR-10 (README's sweep) puts plain BN at 2 images/process below SyncBN and GN; so must this set."""
    spawn_gloo(_order_worker, 2, str(tmp_path))
    summaries = {(n, s): json.loads((tmp_path / f"{n}-s{s}" / "summary.json").read_text()) for n, s in _points()}
    acc = {n: [summaries[n, s]["final_test_acc"] for s in ORDER_SEEDS] for n in ORDER_NORMS}
    mean = {norm: sum(values) / len(values) for norm, values in acc.items()}
    assert mean["syncbn"] - mean["bn"] > ORDER_MARGIN and mean["gn"] - mean["bn"] > ORDER_MARGIN, acc
    assert all(acc["bn"][i] < acc["gn"][i] for i in range(len(ORDER_SEEDS))), acc
