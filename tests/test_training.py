"""The launcher under real torchrun (gloo): run directories, per-rank BN statistics, resume, errors, multi-node."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnstudy.machine import describe_machine
from bnstudy.training.checkpoint import load_checkpoint
from bnstudy.training.run_data import augment
from bnstudy.training.run_directory import read_summary
from tests.conftest import ROOT, TINY, TWO_RANK_PROFILED_STEPS, free_port, run_cli, torchrun

RUN_FILES = ("config.json", "metrics.jsonl", "bn_stats.jsonl", "summary.json", "checkpoint.pt")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("norm", ["bn", "syncbn"])
def test_two_process_run_writes_the_run_directory(two_rank_runs, norm):
    out = two_rank_runs[norm]
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert any((out / "tb").glob("events.out.tfevents.*"))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["backend"] == "gloo" and config["norm"] == norm
    assert config["machine"] == describe_machine()  # images_per_s below means something only beside the CPU
    # what the launcher's processes do with freed memory: keep it, where the C library is glibc
    assert config["malloc"] == ("retain" if platform.libc_ver()[0] == "glibc" else "system (not glibc)")
    metrics = _jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "images_per_s"):
        assert key in metrics[-1]
    assert metrics[-1]["test_acc"] > 0.3  # 10 classes: chance is 0.1
    state = load_checkpoint(out)
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "scheduler", "rng", "config"}


def test_sync_bn_statistics_agree_across_ranks_and_plain_bn_statistics_do_not(two_rank_runs):
    plain = _jsonl(two_rank_runs["bn"] / "bn_stats.jsonl")
    sync = _jsonl(two_rank_runs["syncbn"] / "bn_stats.jsonl")
    assert len(plain) == len(sync) > 0
    assert all(r["running_mean_max_abs_diff"] == 0 and r["running_var_max_abs_diff"] == 0 for r in sync)
    assert all(r["batch_mean_spread"] < 1e-5 and r["batch_var_rel_spread"] < 1e-5 for r in sync)
    assert min(r["running_mean_max_abs_diff"] for r in plain) > 1e-4
    assert min(r["batch_mean_spread"] for r in plain) > 1e-3


def test_compare_prints_table_and_writes_plot(two_rank_runs, tmp_path):
    done = run_cli(
        sys.executable,
        "-m",
        "bnstudy",
        "compare",
        str(two_rank_runs["bn"]),
        str(two_rank_runs["syncbn"]),
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert "syncbn" in done.stdout and "final acc" in done.stdout
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert {r["norm"] for r in rows} == {"bn", "syncbn"}
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_profiled_runs_record_the_steps_asked_for_with_bn_sync_only_for_syncbn(two_rank_runs):
    done = run_cli(
        sys.executable,
        "-m",
        "bnstudy",
        "trace",
        "compare",
        str(two_rank_runs["bn"]),
        str(two_rank_runs["syncbn"]),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    comparison = json.loads(done.stdout)
    assert comparison["a"]["steps"] == comparison["b"]["steps"] == TWO_RANK_PROFILED_STEPS
    categories = comparison["categories"]
    assert categories["bn_sync"]["a_ms"] == 0 and categories["bn_sync"]["b_ms"] > 0
    assert (
        "BN synchronisation"
        in run_cli(sys.executable, "-m", "bnstudy", "trace", "summary", str(two_rank_runs["syncbn"])).stdout
    )
    for norm in ("bn", "syncbn"):
        assert sorted(p.name.split(".")[0] for p in (two_rank_runs[norm] / "tb" / norm).iterdir()) == ["rank0", "rank1"]


def test_profile_needs_enough_steps(tmp_path):
    done = run_cli(
        sys.executable,
        str(ROOT / "launch" / "train_cifar.py"),
        *TINY,
        "--train-subset",
        "64",
        "--profile",
        "--out",
        str(tmp_path / "r"),
    )
    assert done.returncode == 2 and "--profile records 5 steps" in done.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_killed_rank_fails_the_job_keeps_checkpoint_and_resume_matches_uninterrupted(tmp_path):
    args = [*TINY, "--synthetic-size", "3000", "--epochs", "2", "--norm", "bn", "--eval-bn", "local"]
    full = torchrun(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "interrupted"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "launch" / "train_cifar.py"),
        *args,
        "--out",
        str(out),
    ]
    agent = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(agent.pid)
    assert workers, "no worker processes found"
    os.kill(max(workers), signal.SIGKILL)
    assert agent.wait(timeout=120) != 0
    assert load_checkpoint(out)["epoch"] == 1, "the kill must land in epoch 2"

    resumed = torchrun(*args, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    expected = [{k: m[k] for k in keys} for m in _jsonl(tmp_path / "full" / "metrics.jsonl")]
    got = [{k: m[k] for k in keys} for m in _jsonl(out / "metrics.jsonl")]
    assert [m["epoch"] for m in _jsonl(out / "metrics.jsonl")] == [1, 2]
    for e, g in zip(expected, got, strict=True):
        for k in keys:
            assert g[k] == pytest.approx(e[k], rel=1e-6, abs=1e-7), k


def _train_one_process(*args: str):
    return run_cli(sys.executable, str(ROOT / "launch" / "train_cifar.py"), *args)


def _assert_one_line_error(done, *fragments: str):
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert lines and "Traceback" not in done.stderr, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_bad_data_path_is_a_one_line_error(tmp_path):
    _assert_one_line_error(
        _train_one_process("--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")), "nope", "not found"
    )


def test_unknown_norm_is_rejected(tmp_path):
    done = _train_one_process("--norm", "batchnorm", "--out", str(tmp_path / "r"))
    assert done.returncode == 2 and "invalid choice: 'batchnorm'" in done.stderr


def test_corrupt_and_mismatched_checkpoints_are_one_line_errors(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _assert_one_line_error(_train_one_process(*TINY, "--out", str(out), "--resume"), "corrupt")

    done = _train_one_process(*TINY, "--epochs", "1", "--train-subset", "128", "--out", str(tmp_path / "ok"))
    assert done.returncode == 0, done.stderr[-2000:]
    mismatched = _train_one_process(*TINY, "--norm", "gn", "--out", str(tmp_path / "ok"), "--resume")
    _assert_one_line_error(mismatched, "norm='bn'", "'gn'")


def test_two_nodes_on_one_machine_with_c10d_rendezvous(tmp_path):
    port = free_port()
    out = tmp_path / "two-nodes"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=bnstudy-test",
        str(ROOT / "launch" / "train_cifar.py"),
        *TINY,
        "--epochs",
        "1",
        "--norm",
        "syncbn",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outputs = [a.communicate(timeout=240)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    assert all(r["running_mean_max_abs_diff"] == 0 for r in _jsonl(out / "bn_stats.jsonl"))


def test_sweep_quick_writes_accuracy_by_norm_and_batch_and_reuses_only_equal_points(tmp_path, capsys):
    from bnstudy.commands import main

    argv = ["sweep", "--quick", "--norms", "bn", "gn", "--batches", "4", "--out", str(tmp_path)]
    done = run_cli(sys.executable, "-m", "bnstudy", *argv, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert set(result["test_acc"]) == {"bn", "gn"}
    assert all(0.0 <= acc["4"] <= 1.0 for acc in result["test_acc"].values())
    seconds = result["train_time_s"]
    assert seconds["bn"]["4"] == read_summary(tmp_path / "bn-b4")["train_time_s"] > 0
    assert result["train_time_over_bn"] == {"gn": {"4": seconds["gn"]["4"] / seconds["bn"]["4"]}}
    assert f"{result['train_time_over_bn']['gn']['4']:>9.2f}" in done.stdout.splitlines()[-2]
    assert (tmp_path / "sweep.png").is_file()

    runs = {name: (tmp_path / name / "checkpoint.pt").stat().st_mtime_ns for name in ("bn-b4", "gn-b4")}
    assert main(argv) == 0  # the same settings: both points reused, not rerun
    assert "reusing finished points with the same settings: bn-b4, gn-b4" in capsys.readouterr().out
    assert main([*argv, "--epochs", "2"]) == 2  # other settings: refused, never reported as this sweep's
    assert "bn-b4 holds a run with epochs=1, this sweep asks for 2" in capsys.readouterr().err
    assert runs == {name: (tmp_path / name / "checkpoint.pt").stat().st_mtime_ns for name in runs}


def test_sweep_times_each_norm_against_bn_at_the_same_batch():
    from bnstudy.training.sweep import time_over_bn

    times = {"bn": {2: 10.0, 4: 8.0}, "syncbn": {2: 11.0, 4: 6.0}, "gn": {2: 20.0, 8: 1.0}}
    assert time_over_bn(times) == {"syncbn": {2: 1.1, 4: 0.75}, "gn": {2: 2.0}}
    assert time_over_bn({"syncbn": {2: 11.0}}) == {}  # nothing to compare against


def test_augment_is_a_shifted_or_flipped_crop_of_the_original():
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.int64).view(2, 8, 8, 3).to(torch.uint8)
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and out.dtype == torch.uint8
    centre_found = 0
    for i in range(2):
        # the centre 4x4 of the original appears somewhere (possibly mirrored) in a padded crop
        for candidate in (out[i], out[i].flip(1)):
            windows = candidate.unfold(0, 4, 1).unfold(1, 4, 1)  # (5, 5, 3, 4, 4)
            target = x[i, 2:6, 2:6].permute(2, 0, 1)
            if (windows == target).all(dim=(2, 3, 4)).any():
                centre_found += 1
                break
    assert centre_found == 2


SMALL = [*TINY, "--model", "seed-cnn", "--width", "4", "--synthetic-size", "512", "--test-subset", "200"]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_takes_the_runs_options_extends_a_finished_run_and_leaves_a_finished_one_alone(tmp_path, capsys):
    from bnstudy.training.launcher import main

    run, reference = tmp_path / "run", tmp_path / "three-epochs"
    assert main([*SMALL, "--epochs", "1", "--out", str(run)]) == 0
    finished = _snapshot(run)
    assert main(["--resume", "--out", str(run)]) == 0  # no other option: the run's own
    assert "already finished its 1 epochs; nothing to do" in capsys.readouterr().out
    assert _snapshot(run) == finished

    assert main(["--resume", "--out", str(run), "--epochs", "3"]) == 0
    assert main([*SMALL, "--epochs", "3", "--out", str(reference)]) == 0
    extended, uninterrupted = _jsonl(run / "metrics.jsonl"), _jsonl(reference / "metrics.jsonl")
    assert [m["epoch"] for m in extended] == [1, 2, 3]
    assert extended[0]["lr"] == 0.0  # the 1-epoch schedule ended at zero...
    # ...and the extension follows the schedule a 3-epoch run has from there on
    assert extended[1]["lr"] == pytest.approx(uninterrupted[1]["lr"]) and uninterrupted[1]["lr"] > 0
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["batch_size"], config["width"]) == (3, 32, 4)
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    assert load_checkpoint(run)["epoch"] == 3


def test_non_finite_loss_before_the_first_checkpoint_stops_and_leaves_nothing(tmp_path):
    done = _train_one_process(*SMALL, "--norm", "none", "--lr", "1e12", "--out", str(tmp_path / "new" / "run"))
    _assert_one_line_error(done, "non-finite loss at epoch 1 step", "no checkpoint was written yet")
    assert not (tmp_path / "new").exists()
