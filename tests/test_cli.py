import platform
import subprocess
import sys

from bnstudy import __version__

# What the benchmarks' processes run with (bnstudy.memory): freed memory kept, where the C library is glibc.
RETAINED = "retain" if platform.libc_ver()[0] == "glibc" else "system (not glibc)"


def test_help_and_version():
    help_out = subprocess.run([sys.executable, "-m", "bnstudy", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "compare" in help_out.stdout and "bench" in help_out.stdout
    version = subprocess.run([sys.executable, "-m", "bnstudy", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"bnstudy {__version__}"


def test_compare_of_a_non_run_is_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bnstudy", "compare", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"bnstudy: error: {tmp_path}: not a run directory (no config.json); pass runs/NAME written by train_cifar.py"
    ]


def test_training_benchmarks_write_ratios(tmp_path):
    """Smoke test of the two DDP benchmarks at toy size: the numbers are meaningless, the plumbing is not."""
    import json

    from bnstudy.distributed.collectives import local_transports
    from bnstudy.machine import describe_machine, machine_line
    from bnstudy.models import seed_cnn

    syncbn = tmp_path / "syncbn.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnstudy",
            "bench",
            "syncbn",
            "--model",
            "seed-cnn",
            "--width",
            "8",
            "--batches",
            "8",
            "--steps",
            "2",
            "--rounds",
            "2",
            "--out",
            str(syncbn),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(syncbn.read_text())
    assert result["model"] == "seed-cnn" and result["width"] == 8
    assert result["malloc"] == RETAINED
    assert result["parameters"] == sum(p.numel() for p in seed_cnn(width=8).parameters())
    assert result["syncbn_kernels"] in ("compiled", "python")
    assert result["ddp_transport"] == local_transports()[-1]  # auto: shared memory where this CPU has it
    kernels_line = f"sync BN's CPU kernels: {result['syncbn_kernels']}; DDP's gradients over {result['ddp_transport']}"
    assert kernels_line + "\n" in done.stdout
    assert result["machine"] == describe_machine()
    assert done.stdout.startswith(machine_line(result["machine"]) + "\n")
    rows = result["results"]
    assert [row["transport"] for row in rows] == list(local_transports())
    for row in rows:
        assert row["images_per_rank"] == 8 and row["ratio"] == row["syncbn_step_s"] / row["bn_step_s"] > 0
        assert len(row["ratio_by_round"]) == 2 and min(row["ratio_by_round"]) > 0 and row["samples"] == 4
        if row["transport"] == "shm":  # the targets are the shared-memory transport's
            assert row["target"] == 1.05 and row["target_met"] == (row["ratio"] <= 1.05)
            assert f"≤ 1.05 {'met' if row['target_met'] else 'NOT met'}" in done.stdout
        else:
            assert row["target"] is None and row["target_met"] is None
    assert rows[0]["bn_step_s"] == rows[-1]["bn_step_s"]  # one plain-BN measurement shared by the transports

    ddp = tmp_path / "ddp.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bnstudy",
            "bench",
            "ddp",
            "--model",
            "seed-cnn",
            "--global-batch",
            "16",
            "--steps",
            "2",
            "--out",
            str(ddp),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(ddp.read_text())
    assert result["machine"] == describe_machine() and machine_line(result["machine"]) in done.stdout
    single = result["single_process_2_threads_images_per_s"]
    by_transport = result["ddp_2x1_images_per_s_by_transport"]
    assert list(by_transport) == list(local_transports()) and result["ddp_transport"] == local_transports()[-1]
    for transport, rate in by_transport.items():
        assert result["ratio_by_transport"][transport] == rate / single > 0
        assert f"(DDP, gradients over {transport}): {rate:.0f} img/s" in done.stdout
    assert result["ratio"] == result["ddp_2x1_images_per_s"] / single
    assert result["ddp_2x1_images_per_s"] == by_transport[result["ddp_transport"]]
    assert result["malloc"] == RETAINED


def test_syncbn_benchmark_steps_each_variant_in_turn_and_rotates_who_goes_first():
    from bnstudy.benchmarks.syncbn import step_order

    names = ["bn", "gloo", "shm"]
    cycles = [step_order(names, i) for i in range(6)]
    assert all(sorted(cycle) == sorted(names) for cycle in cycles)  # every variant once per cycle
    for position in range(len(names)):  # each variant in each position once every len(names) cycles
        assert sorted(cycle[position] for cycle in cycles[:3]) == sorted(names)
    assert cycles[3:] == cycles[:3]


def test_train_benchmark_compares_precisions_in_both_layouts(tmp_path):
    """Smoke test of ``bench train`` at toy size: every (layout, precision) is measured and the ratios are its own."""
    import json

    from bnstudy.distributed.collectives import local_transports
    from bnstudy.machine import describe_machine, machine_line

    out = tmp_path / "train.json"
    argv = ["bench", "train", "--model", "seed-cnn", "--global-batch", "16", "--steps", "1", "--rounds", "1"]
    done = subprocess.run([sys.executable, "-m", "bnstudy", *argv, "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {(row["processes"], row["precision"]): row for row in result["results"]}
    assert set(rows) == {(1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")}
    for processes in (1, 2):
        fp32, bf16 = rows[processes, "fp32"], rows[processes, "bf16"]
        assert fp32["ratio_to_fp32"] == 1.0 and bf16["ratio_to_fp32"] == bf16["images_per_s"] / fp32["images_per_s"]
    assert result["bf16_capability"].split()[0] in ("native", "emulated")
    assert result["ddp_transport"] == local_transports()[-1] and result["malloc"] == RETAINED
    assert result["machine"] == describe_machine() and done.stdout.startswith(machine_line(result["machine"]))


def test_export_benchmark_names_the_machine_and_measures_every_variant(tmp_path):
    """Smoke test of ``bench export --quick``: the numbers are meaningless, the plumbing and the ratios are not."""
    import json

    from bnstudy.benchmarks.export import VARIANTS
    from bnstudy.machine import describe_machine, machine_line

    out = tmp_path / "export.json"
    argv = [sys.executable, "-m", "bnstudy", "bench", "export", "--quick", "--threads", "1", "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"] == describe_machine() and done.stdout.startswith(machine_line(result["machine"]) + "\n")
    assert out.with_suffix(".png").stat().st_size > 0
    assert [model["model"] for model in result["results"]] == ["CifarResNet", "resnet18@32x32"]
    for model in result["results"]:
        rows = {row["variant"]: row for row in model["rows"]}
        assert list(rows) == list(VARIANTS)
        speedup = rows["torch eager"]["latency_b1_ms"] / rows["ort folded default"]["latency_b1_ms"]
        assert model["targets"]["speedup_b1_ort_folded_default_vs_torch_eager"] == speedup > 0
        assert model["targets"]["speedup_target_met"] == (speedup >= result["targets"]["speedup_b1"])
