"""Issue 12: --precision {auto,fp32,bf16,fp16}: detected capability, autocast in training with float32 master weights,
and everything downstream of a bf16 run (resume, export)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from bnstudy.commands import main as bnstudy_main
from bnstudy.distributed.process_group import DistEnv
from bnstudy.errors import UserError
from bnstudy.machine import cpu_flags
from bnstudy.precision import bf16_capability, resolve_precision
from bnstudy.training.checkpoint import load_checkpoint
from bnstudy.training.config import TrainConfig
from bnstudy.training.launcher import plan_run
from bnstudy.training.loop import train
from tests.conftest import ROOT, run_cli

CPU = torch.device("cpu")
TINY_RUN = {
    "data": "synthetic", "synthetic_size": 512, "test_subset": 256, "width": 8, "batch_size": 32, "lr": 0.05,
    "seed": 0, "tta": True,
}  # fmt: skip


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    return path


def test_auto_is_bf16_only_where_the_cpu_has_native_bf16(tmp_path):
    native = _cpuinfo(tmp_path, "avx512f avx512_bf16")
    assert "avx512_bf16" in cpu_flags(native)
    assert bf16_capability(CPU, native).startswith("native")
    assert resolve_precision("auto", CPU, cpuinfo=native).name == "bf16"

    amx = _cpuinfo(tmp_path, "amx_tile amx_bf16")
    assert resolve_precision("auto", CPU, cpuinfo=amx).name == "bf16"

    plain = _cpuinfo(tmp_path, "avx512f avx512_vnni")
    assert bf16_capability(CPU, plain).startswith("emulated")
    chosen = resolve_precision("auto", CPU, cpuinfo=plain)
    assert chosen.name == "fp32" and chosen.dtype is None and "fp32 (auto: emulated" in chosen.describe()
    assert cpu_flags(tmp_path / "missing") == set()  # no /proc/cpuinfo (macOS, Windows): nothing is assumed


def test_explicit_choices_and_what_they_mean():
    bf16 = resolve_precision("bf16", CPU)
    assert bf16.dtype == torch.bfloat16 and not bf16.needs_grad_scaler and not bf16.grad_scaler().is_enabled()
    with bf16.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    assert resolve_precision("fp32", CPU).record()["precision_used"] == "fp32"
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(UserError, match="--precision"):
        resolve_precision("fp8", CPU)


def test_fp16_on_cpu_is_a_one_line_error_before_anything_starts(tmp_path):
    done = run_cli(
        sys.executable, str(ROOT / "launch" / "train_cifar.py"), "--precision", "fp16", "--device", "cpu",
        "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("train_cifar: error: --precision fp16 needs a CUDA")
    assert not (tmp_path / "r").exists()


def _metrics(out) -> list[dict]:
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keys} for line in lines]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A 2-epoch bf16 run, trained in this process."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    train(TrainConfig(out=str(out), epochs=2, precision="bf16", **TINY_RUN), DistEnv())
    return out


def test_bf16_run_records_its_precision_and_keeps_fp32_master_weights(bf16_run, tmp_path, capsys):
    config = json.loads((bf16_run / "config.json").read_text())
    assert config["precision"] == "bf16" and config["precision_used"] == "bf16"
    assert config["bf16_capability"] == bf16_capability(CPU)
    state = load_checkpoint(bf16_run / "checkpoint.pt")
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    momenta = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momenta and all(m.dtype == torch.float32 for m in momenta)

    fp32 = tmp_path / "fp32"
    train(TrainConfig(out=str(fp32), epochs=2, precision="fp32", **TINY_RUN), DistEnv())
    out = capsys.readouterr().out
    assert "precision fp32" in out
    # same seed, data and schedule: only the arithmetic differs, so the losses differ a little, not a lot
    bf16_loss, fp32_loss = _metrics(bf16_run)[0]["train_loss"], _metrics(fp32)[0]["train_loss"]
    assert bf16_loss != fp32_loss and abs(bf16_loss - fp32_loss) < 0.1


def test_bf16_resume_continues_exactly_and_may_change_precision(bf16_run, tmp_path):
    out = tmp_path / "resumed"
    train(TrainConfig(out=str(out), epochs=1, precision="bf16", **TINY_RUN), DistEnv())
    config, checkpoint = plan_run({"out": str(out), "resume": True, "epochs": 2}, 1)
    assert config.precision == "bf16"
    train(config, DistEnv(), checkpoint)
    got, expected = _metrics(out), _metrics(bf16_run)
    del got[0]["lr"], expected[0]["lr"]  # the 1-epoch run logged its own schedule's end; the steps were the same
    for got_epoch, expected_epoch in zip(got, expected, strict=True):
        assert got_epoch == pytest.approx(expected_epoch, rel=1e-6, abs=1e-7)

    config, checkpoint = plan_run({"out": str(out), "resume": True, "epochs": 3, "precision": "fp32"}, 1)
    train(config, DistEnv(), checkpoint)
    assert json.loads((out / "config.json").read_text())["precision_used"] == "fp32"
    assert len(_metrics(out)) == 3


def test_export_of_a_bf16_run_is_an_fp32_model_matching_torch(bf16_run, tmp_path):
    import onnx

    out, report = tmp_path / "model.onnx", tmp_path / "report.json"
    assert bnstudy_main(["export", str(bf16_run), "--fold-bn", "--out", str(out), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["verify"]["passed"]
    graph = onnx.load(out).graph
    assert {init.data_type for init in graph.initializer} == {onnx.TensorProto.FLOAT}


def test_cast_rules():
    from bnstudy.traces.cpu_attribution import BN_FORWARD, CAST, CONV_LINEAR, DATA, classify

    assert classify("aten::_to_copy", CONV_LINEAR) == CAST  # autocast casting a conv's input: mixed precision's cost
    assert classify("aten::to", None) == CAST and classify("ToCopyBackward0", None) == CAST
    assert classify("autograd::engine::evaluate_function: ToCopyBackward0", None) == CAST
    assert classify("aten::to", DATA) == DATA  # uint8 images to float: data loading, as before
    assert classify("aten::_to_copy", BN_FORWARD) == BN_FORWARD
    assert classify("aten::copy_", None) is None  # too generic to call a cast


def test_trace_of_a_bf16_run_counts_autocast_casts_as_casts(tmp_path):
    """Autocast's conversions (``aten::_to_copy`` of the input and weight of each of the 7 convs, per step) count as
    casts, on top of the conversions an fp32 step makes too (scalars, layouts in conv backward). Calls are counted,
    not timed: times move with the machine's load."""
    from bnstudy.traces.attribution import summarize
    from bnstudy.training.run_directory import trace_dir

    casts, conversions = {}, {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        config = TrainConfig(out=str(out), epochs=1, precision=precision, profile=True, **TINY_RUN)
        train(config, DistEnv())
        summary = summarize(trace_dir(out, "bn"), top=None)["mean"]
        casts[precision] = summary["categories"]["cast"]["ms"]
        ops = {op["name"]: op for op in summary["top_ops"]}
        copy = ops.get("aten::_to_copy")
        conversions[precision] = copy["calls"] if copy and copy["category"] == "cast" else 0
        assert all(op["category"] == "conv_linear" for name, op in ops.items() if "conv" in name.lower()), ops
    assert conversions["bf16"] - conversions["fp32"] >= 14, conversions
    assert casts["bf16"] > casts["fp32"], casts
