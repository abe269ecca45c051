"""SyncBatchNorm on real gloo process groups equals one process running plain BN on the concatenated batch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import bnstudy.distributed.syncbn_math as syncbn_math
from bnstudy.distributed.collectives import TIMEOUT_ENV, TRANSPORT_ENV, select_transport, world_group_for_syncbn
from bnstudy.distributed.process_group import shutdown, spawn_gloo
from bnstudy.distributed.shm_allreduce import PeerLostError, fast_path_supported
from bnstudy.distributed.syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from bnstudy.distributed.syncbn_kernels import KERNELS_ENV, cpu_kernels
from bnstudy.models import seed_cnn

C = 3
# Both sync-BN transports where this CPU has the shared-memory one (x86-64); gloo alone elsewhere.
TRANSPORTS_HERE = ["gloo", "shm"] if fast_path_supported() else ["gloo"]
# Both builds of the per-layer arithmetic where the compiled one builds (tests/test_syncbn_kernels.py checks that
# it does wherever a compiler is), with each transport.
KERNELS_HERE = ["python", "compiled"] if cpu_kernels().name == "compiled" else ["python"]
SHAPES = {"bn1d-2d": (), "bn1d-3d": (5,), "bn2d": (4, 3), "bn3d": (2, 3, 2)}
PLAIN = {"bn1d-2d": nn.BatchNorm1d, "bn1d-3d": nn.BatchNorm1d, "bn2d": nn.BatchNorm2d, "bn3d": nn.BatchNorm3d}
# (layer, per-rank batch sizes, options)
CASES_2 = [
    ("bn1d-2d", (4, 4), {}),
    ("bn1d-2d", (3, 5), {}),
    ("bn1d-3d", (3, 5), {}),
    ("bn2d", (4, 4), {}),
    ("bn2d", (3, 5), {}),
    ("bn3d", (3, 5), {}),
    ("bn2d", (3, 5), {"momentum": None}),
    ("bn2d", (3, 5), {"affine": False}),
    ("bn2d", (3, 5), {"track_running_stats": False}),
    ("bn2d", (0, 5), {}),
    ("bn1d-2d", (5, 0), {}),
]
CASES_3 = [("bn1d-2d", (2, 3, 4), {}), ("bn2d", (1, 3, 4), {}), ("bn3d", (2, 2, 2), {})]
STEPS = 2


def case_data(
    layer: str, sizes: tuple[int, ...], step: int, case: int, bf16: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-rank inputs (shifted and scaled, so mean and variance matter) and output gradients; in bf16 as a conv
    under autocast would hand them over."""
    gen = torch.Generator().manual_seed(1000 * case + step)
    dtype = torch.bfloat16 if bf16 else torch.float32
    xs = [(torch.randn(n, C, *SHAPES[layer], generator=gen, dtype=torch.float64) * 2.5 + 1.5).to(dtype) for n in sizes]
    gs = [torch.randn(n, C, *SHAPES[layer], generator=gen).to(dtype) for n in sizes]
    return xs, gs


def init_affine(bn: nn.Module) -> None:
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, C))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, C))


def _biased_in_wrong_place(counts, means, variances):
    """A deliberately wrong sync BN: normalises with the unbiased variance."""
    total, mean, var = _correct_combine(counts, means, variances)
    return total, mean, var * total / (total - 1)


_correct_combine = syncbn_math.combine_statistics


def _reduced_in_bf16(counts, means, variances):
    """A deliberately wrong sync BN under autocast: combines the statistics (NumPy rows) in bf16."""
    bf16 = [torch.from_numpy(np.ascontiguousarray(a)).bfloat16() for a in (counts, means, variances)]
    return tuple(t.float().numpy() for t in _correct_combine(*bf16))


MUTATIONS = {"unbiased-normaliser": _biased_in_wrong_place, "bf16-statistics": _reduced_in_bf16}


def _run_cases(
    rank: int,
    world_size: int,
    cases: list,
    out: str,
    mutate: str | None,
    transport: str = "auto",
    bf16: bool = False,
    kernels: str = "auto",
) -> None:
    os.environ[TRANSPORT_ENV] = transport
    os.environ[KERNELS_ENV] = kernels
    if mutate:  # a mutation of the reference arithmetic, which the compiled kernels do not call
        os.environ[KERNELS_ENV] = "python"
        syncbn_math.combine_statistics = MUTATIONS[mutate]
    results = []
    for index, (layer, sizes, options) in enumerate(cases):
        bn = SyncBatchNorm(C, **options)
        init_affine(bn)
        model = DistributedDataParallel(bn, broadcast_buffers=False) if bn.affine else bn
        steps = []
        for step in range(STEPS):
            xs, gs = case_data(layer, sizes, step, index, bf16)
            x = xs[rank].clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = model(x)
            if bn.affine:
                bn.weight.grad = bn.bias.grad = None
            (y * gs[rank]).sum().backward()
            steps.append(
                {
                    "y": y.detach(),
                    "dx": x.grad,
                    "dw": None if not bn.affine else bn.weight.grad * world_size,  # DDP averaged: undo the mean
                    "db": None if not bn.affine else bn.bias.grad * world_size,
                }
            )
        state = {k: v.clone() for k, v in bn.state_dict().items()}
        results.append({"steps": steps, "state": state})
    torch.save(results, f"{out}/rank{rank}.pt")
    (Path(out) / f"transport{rank}.txt").write_text(select_transport(world_group_for_syncbn()))
    (Path(out) / f"kernels{rank}.txt").write_text(cpu_kernels().name)


def _reference(layer: str, sizes: tuple[int, ...], options: dict, index: int, bf16: bool = False) -> dict:
    bn = PLAIN[layer](C, **options)
    init_affine(bn)
    steps = []
    for step in range(STEPS):
        xs, gs = case_data(layer, sizes, step, index, bf16)
        x = torch.cat(xs).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = bn(x)
        if bn.affine:
            bn.weight.grad = bn.bias.grad = None
        (y * torch.cat(gs)).sum().backward()
        steps.append(
            {
                "y": y.detach(),
                "dx": x.grad,
                "dw": bn.weight.grad if bn.affine else None,
                "db": bn.bias.grad if bn.affine else None,
            }
        )
    return {"steps": steps, "state": bn.state_dict()}


# bf16 keeps 8 significant bits: outputs and input gradients (bf16) may differ by a couple of units in the last
# place (2^-8 relative), since sync BN sums in another order and rounds dx once more; weight and bias gradients are
# fp32 sums of bf16 products; running statistics are fp32 on both sides and must agree to fp32 rounding.
BF16_ULP = 2.0**-8


def _close(a: torch.Tensor, b: torch.Tensor, bf16: bool = False) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if bf16 and a.dtype == torch.bfloat16:
        return torch.allclose(a.float(), b.float(), rtol=2 * BF16_ULP, atol=4 * BF16_ULP)
    tol = 1e-3 if bf16 else 1e-5
    return torch.allclose(a, b, rtol=tol, atol=tol)


def compare(cases: list, world_size: int, out, bf16: bool = False) -> list[str]:
    """Every mismatch between the ranks' results and the single-process reference, as readable strings."""
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    problems = []
    for index, (layer, sizes, options) in enumerate(cases):
        ref = _reference(layer, sizes, options, index, bf16)
        name = f"{layer} sizes={sizes} {options}"
        for step in range(STEPS):
            for key in ("y", "dx"):
                got = torch.cat([ranks[r][index]["steps"][step][key] for r in range(world_size)])
                if not _close(got, ref["steps"][step][key], bf16):
                    problems.append(f"{name} step {step}: {key} differs")
            for key in ("dw", "db"):
                if ref["steps"][step][key] is not None:
                    for r in range(world_size):
                        if not _close(ranks[r][index]["steps"][step][key], ref["steps"][step][key], bf16):
                            problems.append(f"{name} step {step}: {key} differs on rank {r}")
        for key, value in ref["state"].items():
            for r in range(world_size):
                if not torch.allclose(ranks[r][index]["state"][key].double(), value.double(), rtol=1e-5, atol=1e-6):
                    problems.append(f"{name}: {key} differs on rank {r}")
    return problems


@pytest.mark.parametrize("kernels", KERNELS_HERE)
@pytest.mark.parametrize("transport", TRANSPORTS_HERE)
@pytest.mark.parametrize("world_size,cases", [(2, CASES_2), (3, CASES_3)], ids=["2-ranks", "3-ranks"])
def test_sync_bn_equals_bn_on_concatenated_batch(world_size, cases, transport, kernels, tmp_path):
    spawn_gloo(_run_cases, world_size, cases, str(tmp_path), None, transport, False, kernels)
    assert compare(cases, world_size, tmp_path) == []
    assert {(tmp_path / f"transport{r}.txt").read_text() for r in range(world_size)} == {transport}
    assert {(tmp_path / f"kernels{r}.txt").read_text() for r in range(world_size)} == {kernels}


@pytest.mark.parametrize("transport", TRANSPORTS_HERE)
def test_equivalence_check_catches_unbiased_variance_in_normaliser(transport, tmp_path):
    cases = [("bn2d", (3, 5), {})]
    spawn_gloo(_run_cases, 2, cases, str(tmp_path), "unbiased-normaliser", transport)
    problems = compare(cases, 2, tmp_path)
    assert any(": y differs" in p for p in problems)
    assert any("running_var" in p for p in problems)


BF16_CASES_2 = [
    ("bn2d", (3, 5), {}),
    ("bn1d-2d", (4, 4), {}),
    ("bn2d", (3, 5), {"affine": False}),
    ("bn2d", (0, 5), {}),
]
BF16_CASES_3 = [("bn2d", (2, 3, 4), {}), ("bn3d", (1, 2, 2), {})]


@pytest.mark.parametrize("kernels", KERNELS_HERE)
@pytest.mark.parametrize("transport", TRANSPORTS_HERE)
@pytest.mark.parametrize("world_size,cases", [(2, BF16_CASES_2), (3, BF16_CASES_3)], ids=["2-ranks", "3-ranks"])
def test_sync_bn_under_bf16_autocast_equals_bn_under_autocast(world_size, cases, transport, kernels, tmp_path):
    spawn_gloo(_run_cases, world_size, cases, str(tmp_path), None, transport, True, kernels)
    assert compare(cases, world_size, tmp_path, bf16=True) == []
    y = torch.load(tmp_path / "rank0.pt", weights_only=True)[0]["steps"][0]["y"]
    assert y.dtype == torch.bfloat16  # the output dtype nn.BatchNorm gives under CPU autocast


def test_bf16_check_catches_statistics_reduced_in_bf16(tmp_path):
    cases = [("bn2d", (3, 5), {})]
    spawn_gloo(_run_cases, 2, cases, str(tmp_path), "bf16-statistics", "auto", True)
    assert any("running_mean" in p or "running_var" in p for p in compare(cases, 2, tmp_path, bf16=True))


def _autograd_cases(rank: int, world_size: int, out: str, kernels: str) -> None:
    os.environ[KERNELS_ENV] = kernels
    bn = SyncBatchNorm(C)
    init_affine(bn)
    x = torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(rank)) * 2 + 1
    with torch.no_grad():  # as bn_statistics_report probes in train mode: statistics synced, no graph
        probe = bn(x)
    # Forward-mode AD is refused by both builds; on a layer of its own, since the reference refuses after forward.
    with forward_ad.dual_level():
        try:
            SyncBatchNorm(C)(forward_ad.make_dual(x, torch.ones_like(x)))
            forward_mode = "no error"
        except RuntimeError as exc:
            forward_mode = str(exc)
    y = bn(x)  # an input that needs no gradient (the first layer's), parameters that do
    y.pow(2).sum().backward(retain_graph=True)
    first = (bn.weight.grad.clone(), bn.bias.grad.clone())
    bn.weight.grad = bn.bias.grad = None
    y.pow(2).sum().backward()  # through the retained graph: its exchange again on every rank, the same gradients
    torch.save(
        {
            "probe_has_graph": probe.grad_fn is not None,
            "forward_mode": forward_mode,
            "node": y.grad_fn.name(),
            "dw": first[0],
            "db": first[1],
            "again": torch.equal(first[0], bn.weight.grad) and torch.equal(first[1], bn.bias.grad),
            "running_mean": bn.running_mean,
        },
        f"{out}/autograd{rank}.pt",
    )


@pytest.mark.parametrize("kernels", KERNELS_HERE)
def test_no_grad_forward_parameter_only_gradients_and_a_retained_graph(kernels, tmp_path):
    spawn_gloo(_autograd_cases, 2, str(tmp_path), kernels)
    ranks = [torch.load(tmp_path / f"autograd{r}.pt", weights_only=True) for r in range(2)]
    bn = nn.BatchNorm2d(C)
    init_affine(bn)
    x = torch.cat([torch.randn(4, C, 3, 3, generator=torch.Generator().manual_seed(r)) * 2 + 1 for r in range(2)])
    bn(x)
    bn(x).pow(2).sum().backward()
    for result in ranks:
        assert not result["probe_has_graph"] and result["again"]
        assert "jvp" in result["forward_mode"]
        assert result["node"] == (
            "SyncBatchNormBackward" if kernels == "compiled" else "_CpuSyncBatchNormFunctionBackward"
        )
        torch.testing.assert_close(result["running_mean"], bn.running_mean)
    # Each rank's parameter gradients cover its own images; DDP would average them.
    torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad)
    torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad)


def _rank_1_skips_backward(rank: int, world_size: int, out: str, kernels: str) -> None:
    os.environ.update({TRANSPORT_ENV: "shm", KERNELS_ENV: kernels, TIMEOUT_ENV: "1"})
    x = torch.randn(4, C, 3, 3, requires_grad=True)
    y = SyncBatchNorm(C)(x)
    if rank == 1:
        return
    try:
        y.sum().backward()
    except PeerLostError as exc:  # the exchange's own error type, out of autograd's engine
        Path(out, "error.txt").write_text(str(exc))


@pytest.mark.skipif(not fast_path_supported(), reason="shared memory needs x86-64")
@pytest.mark.parametrize("kernels", KERNELS_HERE)
def test_a_peer_lost_in_backward_is_named_by_the_exchange(kernels, tmp_path):
    spawn_gloo(_rank_1_skips_backward, 2, str(tmp_path), kernels)
    assert (tmp_path / "error.txt").read_text().startswith("shared-memory all-reduce: rank 1 did not arrive within 1 s")


def _train_converted(rank: int, world_size: int, out: str) -> None:
    torch.manual_seed(0)
    model = convert_sync_batchnorm(seed_cnn("bn", width=8))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(16, 3, 8, 8, generator=gen)
    y = (x.mean((1, 2, 3)) > 0).long()  # learnable from the input
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    stats = torch.cat([m.running_var for m in model.modules() if isinstance(m, SyncBatchNorm)])
    gathered = [torch.zeros_like(stats) for _ in range(world_size)]
    dist.all_gather(gathered, stats)
    torch.save({"losses": losses, "stats": gathered}, f"{out}/train{rank}.pt")


def test_ddp_trains_converted_model_on_cpu(tmp_path):
    spawn_gloo(_train_converted, 2, str(tmp_path))
    result = torch.load(tmp_path / "train0.pt", weights_only=True)
    assert result["losses"][-1] < 0.7 * result["losses"][0]
    torch.testing.assert_close(result["stats"][0], result["stats"][1], rtol=0, atol=0)


def _layer_outlives_its_group(rank: int, world_size: int, out: str, transport: str) -> None:
    """One layer's training forward on the default group, then on a default group made after that one was
    destroyed, then on a group of this rank alone (plain BN)."""
    os.environ[TRANSPORT_ENV] = transport
    layer = SyncBatchNorm(C)
    init_affine(layer)
    xs, _ = case_data("bn2d", (3, 5), 0, 0)
    outputs = [layer(xs[rank]).detach()]
    shutdown()
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world_size)
    outputs.append(layer(xs[rank]).detach())
    alone = [dist.new_group([r]) for r in range(world_size)]  # every rank takes part in making every group
    layer.process_group = alone[rank]
    outputs.append(layer(xs[rank]).detach())
    torch.save(outputs, f"{out}/outputs{rank}.pt")


@pytest.mark.parametrize("transport", TRANSPORTS_HERE)
def test_a_layer_syncs_over_the_group_of_the_moment(transport, tmp_path):
    """Sync BN looks its group's exchange up once and keeps it: a layer must still sync, exactly, over a default
    group made again after the first was destroyed (whose exchange is closed), and not sync in a group of one."""
    spawn_gloo(_layer_outlives_its_group, 2, str(tmp_path), transport)
    outputs = [torch.load(tmp_path / f"outputs{r}.pt", weights_only=True) for r in range(2)]
    xs, _ = case_data("bn2d", (3, 5), 0, 0)
    synced = nn.BatchNorm2d(C)
    init_affine(synced)
    expected = synced(torch.cat(xs)).detach()
    for run in (0, 1):
        torch.testing.assert_close(torch.cat([outputs[r][run] for r in range(2)]), expected)
    for r in range(2):
        alone = nn.BatchNorm2d(C)
        init_affine(alone)
        torch.testing.assert_close(outputs[r][2], alone(xs[r]).detach(), rtol=0, atol=0)


def test_without_process_group_it_is_plain_batchnorm():
    torch.manual_seed(0)
    plain, sync = nn.BatchNorm2d(4), SyncBatchNorm(4)
    x = torch.randn(6, 4, 5, 5) * 3 + 1
    for mode in ("train", "eval"):
        getattr(plain, mode)()
        getattr(sync, mode)()
        torch.testing.assert_close(sync(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(sync.state_dict(), plain.state_dict(), rtol=0, atol=0)


def test_convert_and_revert_keep_parameters_buffers_and_flags():
    model = seed_cnn("bn", width=4)
    model[0][1].weight.requires_grad_(False)
    model[0][1].num_batches_tracked.fill_(7)
    model(torch.randn(4, 3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == 2
    assert not converted[0][1].weight.requires_grad
    reverted = revert_sync_batchnorm(converted)
    assert [type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        nn.BatchNorm2d,
        nn.BatchNorm2d,
    ]
    torch.testing.assert_close(reverted.state_dict(), before, rtol=0, atol=0)
    assert not reverted[0][1].weight.requires_grad


def test_rejects_wrong_input_rank():
    with pytest.raises(ValueError, match="2D to 5D"):
        SyncBatchNorm(3)(torch.randn(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_running_statistics_update_matches_batchnorm_formula(dtype):
    """The running-statistics update (NumPy in place for float buffers, torch otherwise) is BN's EMA."""
    running = torch.linspace(-1.0, 2.0, 6, dtype=dtype)
    batch = np.linspace(0.5, 3.0, 6, dtype=np.float64 if dtype == torch.float64 else np.float32)
    expected = (0.9 * running.double() + 0.1 * torch.from_numpy(batch).double()).to(dtype)
    syncbn_math.update_running(running, batch, 0.1)
    torch.testing.assert_close(running, expected)
