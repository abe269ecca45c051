"""Profiler traces recorded here (2 gloo ranks, tiny CNN, DDP) and read back: BN attribution, step
accounting, summary/compare commands, folded vs unfolded inference, and one-line errors on bad input."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.profiler import record_function

from bnstudy.commands import main
from bnstudy.distributed.process_group import all_reduce_sum, spawn_gloo
from bnstudy.distributed.shm_allreduce import fast_path_supported
from bnstudy.models import seed_cnn
from bnstudy.traces.attribution import (
    BN_BACKWARD,
    BN_FORWARD,
    BN_SYNC,
    CATEGORY_LABELS,
    CONV_LINEAR,
    DATA,
    DDP_ALLREDUCE,
    OPTIMIZER,
    RANK_WAIT,
    classify,
    find_traces,
    summarize,
)
from bnstudy.traces.record import BACKWARD, FORWARD, OPTIMIZER_STEP, profile_inference, training_profiler
from bnstudy.training.run_directory import trace_dir

NORMS = ("bn", "syncbn")
LAG_S = 0.05  # rank 1 starts every step this late, so rank 0 waits for it inside a collective
PROFILED_STEPS = 3


def _profiled_training(rank: int, world_size: int, run_dir: str) -> None:
    torch.manual_seed(rank)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    for norm in NORMS:
        model = DistributedDataParallel(seed_cnn(norm, width=8), broadcast_buffers=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        with training_profiler(run_dir, rank, enabled=True, active=PROFILED_STEPS, label=norm) as profiler:
            for _ in range(2 + PROFILED_STEPS):
                if rank == 1:
                    time.sleep(LAG_S)
                with record_function(FORWARD):
                    loss = nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                with record_function(BACKWARD):
                    loss.backward()
                with record_function(OPTIMIZER_STEP):
                    optimizer.step()
                all_reduce_sum([loss.item()])  # a metric all-reduce, as the training loop does: not DDP's
                profiler.step()


def recorded_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with 2-rank training traces under tb/bn and tb/syncbn, recorded once per session."""
    root = tmp_path_factory.getbasetemp() / "profiled-run"
    done = root / "recorded"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        spawn_gloo(_profiled_training, 2, str(root))
        done.touch()
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return recorded_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def summaries(run_dir) -> dict[str, dict]:
    return {norm: summarize(trace_dir(run_dir, norm), top=None) for norm in NORMS}


def _ms(summary: dict, worker: str, category: str) -> float:
    return summary["workers"][worker]["categories"][category]["ms"]


def test_each_rank_writes_one_gzipped_worker_trace(run_dir):
    for norm in NORMS:
        run, workers = find_traces(trace_dir(run_dir, norm))
        assert run == trace_dir(run_dir, norm)
        assert list(workers) == ["rank0", "rank1"]
        for (file,) in workers.values():
            assert re.fullmatch(r"rank\d\.\d+\.pt\.trace\.json\.gz", file.name)
            assert json.loads(gzip.decompress(file.read_bytes()))["traceEvents"]


def test_syncbn_trace_has_bn_sync_time_and_bn_trace_has_none(summaries):
    for worker in ("rank0", "rank1"):
        assert summaries["syncbn"]["workers"][worker]["steps"] == PROFILED_STEPS
        assert _ms(summaries["syncbn"], worker, "bn_sync") > 0
        assert _ms(summaries["bn"], worker, "bn_sync") == 0
        for norm in NORMS:
            assert _ms(summaries[norm], worker, "bn_forward") > 0
            assert _ms(summaries[norm], worker, "bn_backward") > 0
            assert _ms(summaries[norm], worker, "conv_linear") > 0
            assert _ms(summaries[norm], worker, "optimizer") > 0


def test_waiting_for_a_late_rank_is_booked_where_it_waits(summaries):
    # Rank 0 waits LAG_S per step: in sync BN's first forward exchange, or in DDP's gradient all-reduce (DDP's own
    # gloo hook here). Through shared memory (sync BN's, on x86-64) the wait is labelled apart from the exchange;
    # through gloo it is the collective's.
    for norm, exchange, shm in (("syncbn", "bn_sync", fast_path_supported()), ("bn", "ddp_allreduce", False)):
        waited_in = "rank_wait" if shm else exchange
        assert _ms(summaries[norm], "rank0", waited_in) > 0.6 * LAG_S * 1e3, norm
        for category in {exchange, "rank_wait", "bn_forward", "other"} - {waited_in}:
            assert _ms(summaries[norm], "rank0", category) < 0.3 * LAG_S * 1e3, (norm, category)


def test_categories_add_up_to_the_step_time(summaries):
    for summary in summaries.values():
        for worker in [*summary["workers"].values(), summary["mean"]]:
            categories = worker["categories"]
            assert set(categories) == set(CATEGORY_LABELS)
            assert sum(c["ms"] for c in categories.values()) == pytest.approx(worker["step_ms"], rel=0.03)
            assert sum(c["share"] for c in categories.values()) == pytest.approx(1.0, rel=0.03)


def test_summary_command_prints_tables_and_json(run_dir, capsys):
    assert main(["trace", "summary", str(trace_dir(run_dir, "syncbn")), "--top", "3"]) == 0
    text = capsys.readouterr().out
    for needle in ("rank0", "rank1", "mean", "BN synchronisation", "DDP gradient all-reduce", "top 3 operators"):
        assert needle in text
    (trace,) = find_traces(trace_dir(run_dir, "syncbn"))[1]["rank1"]
    assert main(["trace", "summary", str(trace), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["workers"]) == ["rank1"]
    assert len(summary["mean"]["top_ops"]) == 10
    self_ms = [op["self_ms"] for op in summary["mean"]["top_ops"]]
    assert self_ms == sorted(self_ms, reverse=True)


def test_compare_command_gives_deltas_per_category_and_operator(run_dir, summaries, capsys):
    bn, syncbn = (str(trace_dir(run_dir, norm)) for norm in NORMS)
    assert main(["trace", "compare", bn, syncbn, "--json", "--top", "5"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    sync = comparison["categories"]["bn_sync"]
    assert sync["a_ms"] == 0 and sync["delta_ms"] == sync["b_ms"] > 0 and sync["delta_pct"] is None
    for key, row in comparison["categories"].items():
        assert row["a_ms"] == pytest.approx(summaries["bn"]["mean"]["categories"][key]["ms"])
        assert row["delta_ms"] == pytest.approx(row["b_ms"] - row["a_ms"])
    step = comparison["step"]
    assert step["delta_pct"] == pytest.approx((step["b_ms"] - step["a_ms"]) / step["a_ms"] * 100)
    # The operators are the union of each run's top 5 by self time, with what A lacks at 0 there.
    ops = {op["name"]: op for op in comparison["ops"]}
    tops = {norm: [op["name"] for op in summaries[norm]["mean"]["top_ops"]] for norm in NORMS}
    assert set(ops) == set(tops["bn"][:5]) | set(tops["syncbn"][:5])
    only_syncbn = set(ops) - set(tops["bn"])
    assert only_syncbn and all(ops[name]["a_ms"] == 0 < ops[name]["delta_ms"] for name in only_syncbn)
    assert main(["trace", "compare", bn, syncbn]) == 0
    assert "BN synchronisation" in capsys.readouterr().out


def _fold_seed_cnn(model: nn.Sequential) -> nn.Sequential:
    folded = copy.deepcopy(model)
    for block in folded[:2]:
        block[0], block[1] = fuse_conv_bn_eval(block[0], block[1]), nn.Identity()
    return folded


def test_folded_inference_trace_has_no_bn_operators(tmp_path, capsys):
    torch.manual_seed(0)
    model = seed_cnn("bn", width=8)
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(torch.randn(16, 3, 16, 16) * 2 + 1)
    model.eval()
    folded = _fold_seed_cnn(model)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    for label, net in (("unfolded", model), ("folded", folded)):
        assert profile_inference(net, x, tmp_path, label, steps=3, warmup=1) == trace_dir(tmp_path, label)
    unfolded, folded_summary = (summarize(trace_dir(tmp_path, label), top=None) for label in ("unfolded", "folded"))
    assert unfolded["mean"]["steps"] == 3
    assert unfolded["mean"]["categories"]["bn_forward"]["ms"] > 0
    assert any("batch_norm" in op["name"] for op in unfolded["mean"]["top_ops"])
    assert folded_summary["mean"]["categories"]["bn_forward"]["ms"] == 0
    assert not any("batch_norm" in op["name"] for op in folded_summary["mean"]["top_ops"])
    assert main(["trace", "compare", str(trace_dir(tmp_path, "unfolded")), str(trace_dir(tmp_path, "folded"))]) == 0
    assert re.search(r"BN forward\s+\d+\.\d+\s+\d+\.\d%\s+0\.000", capsys.readouterr().out)


@pytest.mark.parametrize(
    ("name", "enclosing", "in_ddp_scope", "expected"),
    [
        ("aten::batch_norm", None, False, BN_FORWARD),
        ("aten::cudnn_batch_norm", None, False, BN_FORWARD),
        ("aten::_native_batch_norm_legit_no_training", None, False, BN_FORWARD),
        ("SyncBatchNorm", None, False, BN_FORWARD),
        ("_CpuSyncBatchNormFunction", None, False, BN_FORWARD),
        ("autograd::engine::evaluate_function: NativeBatchNormBackward0", None, False, BN_BACKWARD),
        ("autograd::engine::evaluate_function: CudnnBatchNormBackward0", None, False, BN_BACKWARD),
        ("SyncBatchNormBackward", None, False, BN_BACKWARD),
        ("aten::native_batch_norm", BN_FORWARD, False, BN_FORWARD),  # nested: counted once, by the outermost
        ("c10d::allreduce_", BN_FORWARD, False, BN_SYNC),
        ("nccl:all_gather", BN_BACKWARD, True, BN_SYNC),
        ("bnstudy.syncbn.all_reduce", BN_FORWARD, False, BN_SYNC),
        ("bnstudy.shm.wait_for_ranks", BN_SYNC, False, RANK_WAIT),
        ("bnstudy.shm.wait_for_ranks", DDP_ALLREDUCE, True, RANK_WAIT),
        ("bnstudy.shm.wait_for_ranks", None, False, RANK_WAIT),
        ("c10d::allreduce_", None, True, DDP_ALLREDUCE),
        ("torch.distributed.ddp.reducer::copy_bucket_to_grad", None, False, DDP_ALLREDUCE),
        ("c10d::allreduce_", None, False, None),  # a metric all-reduce or barrier outside DDP
        ("aten::mkldnn_convolution", None, False, CONV_LINEAR),
        ("autograd::engine::evaluate_function: ConvolutionBackward0", None, False, CONV_LINEAR),
        ("autograd::engine::evaluate_function: AddmmBackward0", None, False, CONV_LINEAR),
        ("aten::mm", CONV_LINEAR, False, CONV_LINEAR),
        ("Optimizer.step#SGD.step", None, False, OPTIMIZER),
        ("Optimizer.zero_grad#SGD.zero_grad", None, False, OPTIMIZER),
        ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", None, False, DATA),
        ("aten::relu", None, True, None),
        ("aten::_convert_indices_from_coo_to_csr", None, False, None),
    ],
)
def test_event_categories(name, enclosing, in_ddp_scope, expected):
    assert classify(name, enclosing, in_ddp_scope) == expected


def test_stopping_mid_schedule_keeps_only_steps_that_ran(tmp_path):
    model, x = seed_cnn("bn", width=8), torch.randn(4, 3, 16, 16)
    profiler = training_profiler(tmp_path, 0, enabled=True, wait=1, warmup=1, active=3)
    profiler.start()
    for _ in range(3):  # wait, warmup, one of three active steps
        model(x).sum().backward()
        profiler.step()
    profiler.stop()
    (worker,) = summarize(tmp_path)["workers"].values()
    assert worker["steps"] == 1 and worker["categories"]["bn_backward"]["ms"] > 0


def test_disabled_profiler_is_a_no_op(tmp_path):
    with training_profiler(tmp_path, 0, enabled=False) as profiler:
        for _ in range(6):
            profiler.step()
    profiler.start()
    profiler.stop()
    assert not any(tmp_path.iterdir())


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnstudy: error: "), captured.err
    return lines[0]


def test_bad_input_gets_one_line_errors(run_dir, tmp_path, capsys):
    malformed = tmp_path / "malformed" / "rank0.1.pt.trace.json"
    malformed.parent.mkdir()
    malformed.write_text('{"traceEvents": [{"ph": "X", ')
    assert "malformed JSON" in _one_line_error(["trace", "summary", str(malformed)], capsys)

    (trace,) = find_traces(trace_dir(run_dir, "bn"))[1]["rank0"]
    truncated = tmp_path / "truncated" / trace.name
    truncated.parent.mkdir()
    truncated.write_bytes(trace.read_bytes()[: trace.stat().st_size // 2])
    assert "truncated" in _one_line_error(["trace", "summary", str(truncated.parent)], capsys)

    not_a_trace = tmp_path / "list.pt.trace.json"
    not_a_trace.write_text("[1, 2]")
    assert "no traceEvents" in _one_line_error(["trace", "summary", str(not_a_trace)], capsys)

    (tmp_path / "empty").mkdir()
    assert "no profiler traces" in _one_line_error(["trace", "summary", str(tmp_path / "empty")], capsys)
    assert "no profiler traces" in _one_line_error(["trace", "view", str(tmp_path / "empty")], capsys)
    assert "does not exist" in _one_line_error(["trace", "compare", str(trace), str(tmp_path / "nope")], capsys)
    assert "holds 2 trace runs" in _one_line_error(["trace", "summary", str(run_dir)], capsys)
    assert "--top" in _one_line_error(["trace", "summary", str(trace), "--top", "0"], capsys)


def test_bench_export_profile_traces_show_bn_only_before_folding(tmp_path):
    from bnstudy.benchmarks.export import profile_folding

    unfolded, folded = profile_folding(tmp_path, threads=1)
    before, after = summarize(unfolded), summarize(folded)
    assert before["mean"]["categories"]["bn_forward"]["ms"] > 0
    assert after["mean"]["categories"]["bn_forward"]["ms"] == 0
