"""Bad input never costs a traceback, a stale result or a half-written file: one table per command family, each row
a command line and the files it finds, run in-process. Every row must exit 2 with exactly one line on stderr (the
expected fragment in it), no traceback, and leave the directory it ran in exactly as it was. The launcher's rows
start from a tiny valid run, so a check that goes missing shows as a run that starts (and writes files), not as a
long one. A few real processes check the launch script and torchrun (the error printed once)."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from bnstudy.commands import main as bnstudy_main
from bnstudy.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, synthetic_images
from bnstudy.edge.onnx_export import export_onnx
from bnstudy.models import seed_cnn
from bnstudy.training.launcher import main as train_main
from deploy import bench as deploy_bench
from deploy import infer, quantize
from tests.conftest import ROOT, run_cli, torchrun

# A valid run of a few seconds; each launcher row adds the options it gets wrong (argparse: the last one wins).
SMALL = "--data synthetic --synthetic-size 512 --model seed-cnn --width 4 --batch-size 32 --epochs 1 --test-subset 200"
CONFIG = {
    "model": "seed-cnn",
    "norm": "bn",
    "num_classes": 10,
    "model_kwargs": {"width": 4},
    "input_shape": [3, 32, 32],
    "mean": list(CIFAR10_MEAN),
    "std": list(CIFAR10_STD),
    "classes": list(CIFAR10_CLASSES),
    "dataset": "cifar10",
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """What rows copy into their directory: a finished tiny run, and folded/unfolded ONNX exports with images."""
    base = tmp_path_factory.mktemp("shared")
    run = base / "run"
    assert train_main([*shlex.split(SMALL), "--out", str(run)]) == 0
    models = base / "models"
    torch.manual_seed(0)
    model, example = seed_cnn("bn", width=4).eval(), torch.randn(2, 3, 32, 32)
    export_onnx(model, example, models / "model.onnx", config=CONFIG, count_unfolded=False)
    export_onnx(model, example, models / "unfolded.onnx", fold_bn=False, config=CONFIG)
    images = synthetic_images("cifar10", n=96, seed=1)
    np.savez(models / "images.npz", x=images.x.numpy(), y=images.y.numpy())
    np.savez(models / "badlabels.npz", x=images.x.numpy(), y=images.y.numpy() + 10)  # labels of another dataset
    return {"run": run, "models": models}


def _train_only(tmp: Path) -> None:
    images = synthetic_images("cifar10", n=64, seed=0)
    (tmp / "cifar").mkdir()
    np.savez(tmp / "cifar" / "train.npz", x=images.x.numpy(), y=images.y.numpy())


def _half_run(tmp: Path) -> None:
    (tmp / "half").mkdir()
    (tmp / "half" / "config.json").write_text('{"norm": "bn"}\n')


def _corrupt(tmp: Path) -> None:
    (tmp / "bad").mkdir()
    (tmp / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")


FIXTURES: dict[str, Callable[[Path, dict[str, Path]], None]] = {
    "file": lambda tmp, shared: (tmp / "file").write_text("x\n"),
    "dir": lambda tmp, shared: (tmp / "dir").mkdir(),
    "run": lambda tmp, shared: shutil.copytree(shared["run"], tmp / "run"),
    "half": lambda tmp, shared: _half_run(tmp),
    "corrupt": lambda tmp, shared: _corrupt(tmp),
    "train-only": lambda tmp, shared: _train_only(tmp),
    "sweep-point": lambda tmp, shared: shutil.copytree(shared["run"], tmp / "sw" / "bn-b4"),
    "models": lambda tmp, shared: shutil.copytree(shared["models"], tmp, dirs_exist_ok=True),
}


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its size and modification time."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
    }


def assert_refused(main: Callable, argv: str, fixtures: str, expected: str, shared, tmp_path, capsys, monkeypatch):
    """Run ``main(argv)`` in ``tmp_path`` holding ``fixtures``: exit 2, one line naming ``expected``, nothing new."""
    monkeypatch.chdir(tmp_path)
    for name in fixtures.split():
        FIXTURES[name](tmp_path, shared)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(shlex.split(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert expected in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "the command left files behind or changed them"


def rows(table: list[tuple[str, str, str]]):
    """pytest parameters (argv, fixtures, expected fragment), named by the command line."""
    return [pytest.param(*row, id=row[0][:60]) for row in table]


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

TRAIN = [
    ("--lr -0.1", "", "--lr must be a number above 0"),
    ("--lr 0", "", "--lr must be a number above 0"),
    ("--lr nan", "", "--lr must be a number above 0"),
    ("--model foo", "", "invalid choice: 'foo' (choose from 'resnet', 'seed-cnn')"),
    ("--model mnist-mlp", "", "invalid choice: 'mnist-mlp'"),
    ("--width 0", "", "--width must be at least 1, got 0"),
    ("--model resnet --width 1", "", "--width must be at least 2, got 1"),
    ("--norm batchnorm", "", "invalid choice: 'batchnorm' (choose from 'bn', 'syncbn', 'gn', 'none')"),
    ("--eval-bn median", "", "invalid choice: 'median'"),
    ("--device tpu", "", "invalid choice: 'tpu'"),
    ("--epochs 0", "", "--epochs must be at least 1, got 0"),
    ("--epochs two", "", "invalid int value: 'two'"),
    ("--batch-size 0", "", "--batch-size must be at least 1, got 0"),
    ("--batch-size 1", "", "--batch-size 1 leaves bn one value per channel"),
    ("--batch-size 1 --norm syncbn", "", "--batch-size 1 leaves syncbn one value per channel over 1 process"),
    ("--eval-bn precise --precise-bn-batches 0", "", "--precise-bn-batches must be at least 1, got 0"),
    ("--train-subset 0", "", "--train-subset must be at least 1, got 0"),
    ("--test-subset 0", "", "--test-subset must be at least 1, got 0"),
    ("--train-subset 5000", "", "--train-subset 5000 is more than the 512 images"),
    ("--test-subset 5000", "", "--test-subset 5000 is more than the 1000 images"),
    ("--synthetic-size 0", "", "--synthetic-size must be at least 1, got 0"),
    ("--weight-decay -1", "", "--weight-decay must be 0 or more"),
    ("--label-smoothing 1", "", "--label-smoothing must lie in [0, 1)"),
    ("--warmup-epochs 2", "", "--warmup-epochs must lie in 0..--epochs (1)"),
    ("--seed -1", "", "--seed must lie in 0..4294967295"),
    ("--batch-size 600", "", "less than one batch of 600; lower --batch-size"),
    ("--profile --batch-size 128", "", "--profile records 5 steps of the first epoch (1 skipped, 1 warm-up, 3 "),
    (
        "--profile --profile-steps 7 --batch-size 64",
        "",
        "records 9 steps of the first epoch (1 skipped, 1 warm-up, 7 "
        "recorded), but an epoch has only 8; use more data, a smaller --batch-size or fewer --profile-steps",
    ),
    ("--profile --profile-steps 0", "", "--profile-steps must be at least 1, got 0"),
    ("--profile-steps 4", "", "--profile-steps sets how many steps --profile records; add --profile"),
    ("--data nowhere", "", "nowhere: directory not found"),
    ("--data cifar", "train-only", "cifar: has train.npz but no test.npz; add test.npz"),
    ("--data ''", "", "--data is empty"),
    ("--out file", "file", "--out file is a file; give a directory"),
    ("--out file/run", "file", "file is a file, not a directory"),
    ("--out run", "run", "run already holds a run; pass --resume"),
    ("--out half", "half", "half already holds a run; pass --resume"),
    ("--out .", "file", "--out . holds other files, not a run"),
    ("--out ''", "", "--out is empty"),
    ("--no-such-option", "", "unrecognized arguments: --no-such-option"),
    pytest.param("--device cuda", "", "--device cuda: CUDA is not available here", marks=NO_CUDA, id="--device cuda"),
]
RESUME = [
    ("--resume --out dir", "dir", "dir: nothing to resume (no checkpoint.pt); drop --resume"),
    ("--resume --out bad", "corrupt", "bad/checkpoint.pt: corrupt or not a bnstudy checkpoint"),
    ("--resume --out run --batch-size 64", "run", "was trained with batch_size=32, not 64; --resume takes the run's"),
    ("--resume --out run --norm gn", "run", "was trained with norm='bn', not 'gn'"),
    ("--resume --out run --width 8", "run", "was trained with width=4, not 8"),
    ("--resume --out run --no-channels-last", "run", "was trained with channels_last=True, not False"),
    ("--resume --out run --epochs 0", "run", "--epochs must be at least 1, got 0"),
    ("--resume --out run --lr -1", "run", "--lr must be a number above 0"),
]


@pytest.mark.parametrize("argv, fixtures, expected", [*rows(TRAIN[:-1]), TRAIN[-1]])
def test_train_refuses_bad_options_before_creating_anything(
    argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch
):
    assert_refused(train_main, f"{SMALL} {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, fixtures, expected", rows(RESUME))
def test_resume_refuses_other_options_and_non_runs(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(train_main, argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch)


SWEEP = [
    ("--quick --norms bn foo", "", "unknown --norm 'foo'; choose one of bn, syncbn, gn, none"),
    ("--quick --batches 0", "", "--batch-size must be at least 1, got 0"),
    ("--quick --norms bn --batches 1", "", "--batch-size 1 leaves bn one value per channel over 2 process(es)"),
    ("--quick --nproc 0", "", "--nproc must be at least 1, got 0"),
    ("--quick --precision fp16", "", "--precision fp16 needs a CUDA device"),
    ("--quick --epochs 0", "", "--epochs must be at least 1, got 0"),
    ("--quick --width 0", "", "--width must be at least 2, got 0"),
    ("--quick --train-subset 0", "", "--train-subset must be at least 1, got 0"),
    ("--quick --train-subset 99999", "", "--train-subset 99999 is more than the 2000 images"),
    ("--quick --batches 600", "", "less than one batch of 600"),
    ("--quick --data nowhere", "", "nowhere: directory not found"),
    ("--quick --out file", "file", "file is a file, not a directory"),
    ("--quick --norms bn --batches 4 --out sw", "sweep-point", "sw/bn-b4 holds a run with"),
    ("--quick --norms", "", "expected at least one argument"),
]
STUDY = [
    ("modes --seeds 0", "", "--seeds must be at least 1, got 0"),
    ("all --data /some/dir", "", "--data names one dataset"),
    ("gradients --data synthetic", "", "uses no image data"),
    ("mnist --quick --data nowhere", "", "nowhere: not found"),
    ("no-such-study", "", "invalid choice: 'no-such-study'"),
    ("modes --quick --out file", "file", "file is a file, not a directory"),
    ("manual-bn --precision bf16", "", "study manual-bn takes no --precision; drop it"),
    ("modes --precision fp16", "", "--precision fp16 needs a CUDA device"),
    ("modes --precision half", "", "unknown --precision 'half'"),
]
COMPARE = [
    ("dir", "dir", "dir: not a run directory (no config.json)"),
    ("nowhere", "", "nowhere: not a run directory"),
    ("half", "half", "half: no completed epoch in metrics.jsonl"),
    ("run --out file", "run file", "file is a file, not a directory"),
    ("", "", "the following arguments are required: runs"),
]
EXPORT = [
    ("run --out m.onnx --opset 5", "run", "--opset 5 cannot be exported; choose one of 18..23"),
    ("run --out m.onnx --opset 99", "run", "--opset 99 cannot be exported"),
    ("run --out m.onnx --threads 0", "run", "--threads must be at least 1, got 0"),
    ("run --out m.onnx --seed -1", "run", "--seed must lie in 0..4294967295"),
    ("run --out m.onnx --input-shape 0 32 32", "run", "--input-shape must be at least 1, got 0"),
    ("run --out m.onnx --input-shape 5 32 32", "run", "input shape 5 32 32 does not fit run"),
    ("run --out dir", "run dir", "dir is a directory; give a file name"),
    ("run --out file/m.onnx", "run file", "file is a file, not a directory"),
    ("run --out m.onnx --report m.onnx", "run", "--report m.onnx is the --out file"),
    ("nowhere --out m.onnx", "", "nowhere: no checkpoint found"),
    ("bad --out m.onnx", "corrupt", "corrupt or not a bnstudy checkpoint (not a complete torch zip archive)"),
    ("torchvision:nonet --out m.onnx", "", "unknown torchvision model 'nonet'"),
    ("run", "run", "the following arguments are required: --out"),
]
BENCH = [
    ("syncbn --model foo --out b.json", "", "unknown --model 'foo'; choose one of resnet, seed-cnn"),
    ("syncbn --model mnist-mlp --out b.json", "", "--model mnist-mlp does not take CIFAR images"),
    ("syncbn --batches 1 --out b.json", "", "--batches 1 leaves bn one value per channel"),
    ("syncbn --width 1 --out b.json", "", "--width must be at least 2, got 1"),
    ("syncbn --batches 0 --out b.json", "", "--batches must be at least 1, got 0"),
    ("syncbn --steps 0 --out b.json", "", "--steps must be at least 1, got 0"),
    ("syncbn --rounds 0 --out b.json", "", "--rounds must be at least 1, got 0"),
    ("syncbn --out file/b.json", "file", "file is a file, not a directory"),
    ("ddp --model foo --out b.json", "", "unknown --model 'foo'; choose one of resnet, seed-cnn"),
    ("ddp --norm foo --out b.json", "", "unknown --norm 'foo'; choose one of bn, syncbn, gn, none"),
    ("ddp --global-batch 3 --out b.json", "", "--global-batch must be a positive multiple of 2"),
    ("ddp --global-batch 2 --out b.json", "", "images per process (--global-batch / 2) 1 leaves bn one value"),
    ("ddp --steps 0 --out b.json", "", "--steps must be at least 1, got 0"),
    ("ddp --out dir", "dir", "dir is a directory; give a file name"),
    ("syncbn --precision fp16 --out b.json", "", "--precision fp16 needs a CUDA device"),
    ("ddp --precision half --out b.json", "", "unknown --precision 'half'; choose one of auto, fp32, bf16, fp16"),
    ("train --precisions fp32 fp16 --out b.json", "", "--precisions fp16 needs a CUDA device"),
    ("train --rounds 0 --out b.json", "", "--rounds must be at least 1, got 0"),
    ("train --global-batch 3 --out b.json", "", "--global-batch must be a positive multiple of 2"),
    ("export --threads 0 --out b.json", "", "--threads must be at least 1, got 0"),
    ("export --out b.png", "", "--out b.png: the JSON result needs a name of its own"),
    ("nothing", "", "invalid choice: 'nothing'"),
]
TRACE = [
    ("summary dir", "dir", "no profiler traces"),
    ("summary nowhere", "", "does not exist"),
    ("summary dir --top 0", "dir", "--top must be at least 1, got 0"),
    ("view dir --port 70000", "dir", "--port must lie in 0..65535"),
    ("compare nowhere dir", "dir", "does not exist"),
]


@pytest.mark.parametrize("argv, fixtures, expected", rows(SWEEP))
def test_sweep_refuses_before_any_job_starts(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(bnstudy_main, f"sweep {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, fixtures, expected", rows(STUDY))
def test_study_refuses(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(bnstudy_main, f"study {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, fixtures, expected", rows(COMPARE))
def test_compare_refuses(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(bnstudy_main, f"compare {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, fixtures, expected", rows(EXPORT))
def test_export_refuses(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(bnstudy_main, f"export {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, fixtures, expected", rows(BENCH))
def test_bench_refuses_before_spawning_workers(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(bnstudy_main, f"bench {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("argv, fixtures, expected", rows(TRACE))
def test_trace_refuses(argv, fixtures, expected, shared, tmp_path, capsys, monkeypatch):
    assert_refused(bnstudy_main, f"trace {argv}", fixtures, expected, shared, tmp_path, capsys, monkeypatch)


INFER = [
    ("model.onnx badlabels.npz", "labels y lie in 10..19, the model has classes 0..9"),
    ("model.onnx images.npz --top-k 0", "--top-k must be at least 1, got 0"),
    ("model.onnx images.npz --batch-size 0", "--batch-size must be at least 1, got 0"),
    ("model.onnx images.npz --limit 0", "--limit must be at least 1, got 0"),
    ("model.onnx images.npz --threads -1", "--threads must be 0 (one per core) or more"),
    ("model.onnx images.npz --out sub", "--out sub is a directory"),
    ("model.onnx images.npz --out images.npz", "--out images.npz would overwrite an input"),
    ("model.onnx images.npz --format xml", "invalid choice: 'xml'"),
    ("absent.onnx images.npz", "absent.onnx: model file not found"),
    ("model.onnx", "the following arguments are required: input"),
]
QUANTIZE = [
    ("--unfolded absent.onnx", "absent.onnx: model file not found"),
    ("--unfolded model.onnx", "--unfolded model.onnx is not the --no-fold-bn export"),
    ("--calib-size 0", "--calib-size must be at least 1, got 0"),
    ("--calib-size 500", "96 images, fewer than --calib-size 500"),
    ("--threads -1", "--threads must be 0 (one per core) or more"),
    ("--out model.onnx", "--out model.onnx would overwrite an input"),
    ("--report int8.onnx", "--report int8.onnx is the --out file"),
    ("--report sub", "--report sub is a directory"),
    ("--test badlabels.npz", "labels y lie in 10..19"),
    ("--test absent.npz", "absent.npz: not found"),
    ("--method median", "invalid choice: 'median'"),
]
DEPLOY_BENCH = [
    ("--threads 0", "--threads must be at least 1, got 0"),
    ("--calls 0 5", "--calls and --rounds must be at least 1"),
    ("--rounds 0", "--calls and --rounds must be at least 1"),
    ("--out b.png", "--out b.png: the JSON result needs a name of its own"),
    ("--out model.onnx", "--out model.onnx would overwrite an input"),
    ("--out sub", "--out sub is a directory"),
    ("--int8 absent.onnx", "absent.onnx: model file not found"),
    ("--torch-source nowhere", "nowhere: no checkpoint found"),
]


def _deploy_rows(table: list[tuple[str, str]]):
    return [pytest.param(argv, expected, id=argv[:60]) for argv, expected in table]


@pytest.fixture
def deploy_dir(shared, tmp_path):
    """The exported models and image files, and an existing folder ``sub``."""
    (tmp_path / "sub").mkdir()
    return tmp_path


@pytest.mark.parametrize("argv, expected", _deploy_rows(INFER))
def test_infer_refuses(argv, expected, shared, deploy_dir, capsys, monkeypatch):
    assert_refused(infer.main, argv, "models", expected, shared, deploy_dir, capsys, monkeypatch)


@pytest.mark.parametrize("argv, expected", _deploy_rows(QUANTIZE))
def test_quantize_refuses_before_writing_the_int8_model(argv, expected, shared, deploy_dir, capsys, monkeypatch):
    base = "model.onnx --calib images.npz --calib-size 32 --out int8.onnx"
    assert_refused(quantize.main, f"{base} {argv}", "models", expected, shared, deploy_dir, capsys, monkeypatch)


@pytest.mark.parametrize("argv, expected", _deploy_rows(DEPLOY_BENCH))
def test_deploy_bench_refuses(argv, expected, shared, deploy_dir, capsys, monkeypatch):
    base = "model.onnx --quick --out bench.json"
    assert_refused(deploy_bench.main, f"{base} {argv}", "models", expected, shared, deploy_dir, capsys, monkeypatch)


def test_the_launch_script_refuses_in_one_line(tmp_path):
    done = run_cli(sys.executable, str(ROOT / "launch" / "train_cifar.py"), "--width", "0", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "train_cifar: error: --width must be at least 2, got 0"
    ], done.stderr
    assert not list(tmp_path.iterdir())


def test_under_torchrun_the_error_is_printed_once_and_every_rank_exits_2(tmp_path):
    done = torchrun("--lr", "-0.1", "--out", str(tmp_path / "run"), cwd=tmp_path)
    message = "train_cifar: error: --lr must be a number above 0, got -0.1"
    assert done.returncode != 0 and done.stderr.count(message) == 1, done.stderr[-3000:]
    assert "error on rank" not in done.stderr and "exitcode  : 2" in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_bad_syncbn_transport_is_refused_before_the_process_group(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNSTUDY_SYNCBN_TRANSPORT", "carrier-pigeon")
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group: none is created
    expected = "BNSTUDY_SYNCBN_TRANSPORT='carrier-pigeon' is not a transport"
    assert_refused(train_main, f"{SMALL} --norm syncbn", "", expected, shared, tmp_path, capsys, monkeypatch)


def test_a_bad_ddp_transport_is_refused_before_the_process_group(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNSTUDY_DDP_TRANSPORT", "smoke-signals")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = "BNSTUDY_DDP_TRANSPORT='smoke-signals' is not a transport; use one of auto, shm, gloo"
    assert_refused(train_main, f"{SMALL} --norm bn", "", expected, shared, tmp_path, capsys, monkeypatch)


def test_a_bad_malloc_setting_is_refused_before_the_process_group(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNSTUDY_MALLOC", "hoard")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = "BNSTUDY_MALLOC='hoard' is not an allocator setting; use one of retain, system"
    assert_refused(train_main, f"{SMALL} --norm bn", "", expected, shared, tmp_path, capsys, monkeypatch)


def test_a_bad_syncbn_kernels_choice_is_refused_before_the_process_group(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNSTUDY_SYNCBN_KERNELS", "fortran")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = "BNSTUDY_SYNCBN_KERNELS='fortran' is not a choice; use one of auto, compiled, python"
    assert_refused(train_main, f"{SMALL} --norm syncbn", "", expected, shared, tmp_path, capsys, monkeypatch)


def test_a_bad_exchange_timeout_is_refused_before_the_process_group(shared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BNSTUDY_SYNCBN_TIMEOUT_S", "soon")
    monkeypatch.setenv("WORLD_SIZE", "2")
    expected = "BNSTUDY_SYNCBN_TIMEOUT_S='soon' must be a positive number of seconds"
    assert_refused(train_main, f"{SMALL} --norm bn", "", expected, shared, tmp_path, capsys, monkeypatch)


BENCH_SYNCBN_SETTINGS = [
    ("BNSTUDY_MALLOC=hoard", "BNSTUDY_MALLOC='hoard' is not an allocator setting; use one of retain, system"),
    ("BNSTUDY_SYNCBN_KERNELS=fortran", "BNSTUDY_SYNCBN_KERNELS='fortran' is not a choice"),
    ("BNSTUDY_DDP_TRANSPORT=smoke-signals", "BNSTUDY_DDP_TRANSPORT='smoke-signals' is not a transport"),
    ("BNSTUDY_SYNCBN_TIMEOUT_S=-1", "BNSTUDY_SYNCBN_TIMEOUT_S='-1' must be a positive number of seconds"),
]


@pytest.mark.parametrize("setting, expected", BENCH_SYNCBN_SETTINGS, ids=[row[0] for row in BENCH_SYNCBN_SETTINGS])
def test_bench_syncbn_refuses_a_bad_setting_before_spawning_workers(
    setting, expected, shared, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(*setting.split("=", 1))
    argv = "bench syncbn --batches 2 --steps 1 --rounds 1 --out b.json"
    assert_refused(bnstudy_main, argv, "", expected, shared, tmp_path, capsys, monkeypatch)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
@pytest.mark.parametrize("writer", ["bnstudy.io", "deploy.edge"])
def test_atomic_writes_get_the_permissions_the_umask_gives(writer, umask, mode, tmp_path):
    atomic_write = __import__(writer, fromlist=["atomic_write"]).atomic_write
    old = os.umask(umask)
    try:
        path = atomic_write(tmp_path / "out.txt", lambda tmp: tmp.write_text("x"))
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode == (tmp_path / "plain.txt").stat().st_mode & 0o777
