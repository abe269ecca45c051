"""Study ``qat-fold``: INT8 by post-training quantisation or by quantisation-aware training, and why QAT simulates
the BN fold. From one trained fp32 CifarResNet per seed it builds six models and scores the file onnxruntime runs:

- ``fp32``: the trained model (its BN-folded fp32 ONNX export);
- ``fp32_tuned``: the control: the fp32 model fine-tuned as long and at the same rate as the QAT variants, since
  their fine-tuning is extra training too, which on an undertrained model counts for more than the rounding;
- ``ptq``: post-training static INT8 of that export (deploy/quantize.py's ``quantize_model``: QDQ, per-channel 7-bit
  weights, min/max calibration on training images);
- ``qat_frozen``: QAT with the fold simulated, BN statistics frozen from the first step, so fine-tuning trains the
  very network that ships;
- ``qat_learning``: QAT with the fold simulated and BN learning throughout (batch statistics with Krishnamoorthi's
  correction); never frozen, so the shipped fold uses running statistics the fine-tuning never ran with;
- ``qat_unfolded``: QAT without folding: the conv's own weights rounded per output channel, BN after it as its own
  layer, folded only at export (:class:`bnstudy.edge.qat.FoldedConvBn` with ``simulate_fold`` False).

Each is scored on the test images: top-1, agreement with fp32, max and mean |logit − fp32 logit|, and onnxruntime
images/s at batch 64 (deploy/latency.py's harness, the variants interleaved). With per-channel symmetric weights
rounding commutes with the fold's per-channel scale k (the grid scales with |k|): the unfolded variant trains the
same rounded weights as ``qat_learning`` and ships the same levels, so it differs from it only through float
rounding, and from ``qat_frozen`` through the BN statistics it trains with; the study measures both.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnstudy.edge.deploy_scripts import deploy_module
from bnstudy.edge.onnx_export import INPUT_NAME, export_onnx, ort_session
from bnstudy.edge.qat import FoldedConvBn, freeze_bn_statistics, prepare_qat
from bnstudy.edge.qat_export import export_qat_onnx, qat_parity, runtime_op_counts
from bnstudy.edge.qat_math import fold_rounding_agreement
from bnstudy.errors import UserError, first_line
from bnstudy.models import CifarResNet
from bnstudy.studies.fitting import fit, seeded_model, torch_threads
from bnstudy.studies.images import as_split, load_train_test
from bnstudy.studies.result import DEFAULT_SEEDS, Check, StudyResult, choose_params, mean_std

NAME = "qat-fold"
SYNTHETIC_SIZES = (5000, 1000)
VARIANTS = {
    "fp32": "fp32",
    "fp32_tuned": "fp32 fine-tuned like QAT",
    "ptq": "INT8 post-training",
    "qat_frozen": "QAT folded, BN frozen",
    "qat_learning": "QAT folded, BN learning",
    "qat_unfolded": "QAT unfolded",
}
QAT_VARIANTS = ("qat_frozen", "qat_learning", "qat_unfolded")
INT8_VARIANTS = ("ptq", *QAT_VARIANTS)
LATENCY_BATCH = 64
EVAL_BATCH = 250
MIN_PARITY_AGREEMENT = 0.995  # as `bnstudy export` requires of a QAT run
MAX_FP32_GAP_POINTS = 0.3  # the target: QAT INT8 within 0.3 points of fp32 top-1
MIN_INT8_SPEEDUP = 2.0  # the target: at least 2× fp32 images/s


@dataclass(frozen=True)
class Params:
    epochs: int = 3
    qat_epochs: int = 1
    batch_size: int = 128
    lr: float = 2e-3
    qat_lr: float = 1e-4
    train_size: int | None = None  # all of them
    test_size: int | None = None
    width: int = 16
    calibration_size: int = 512
    threads: int = 1  # torch and onnxruntime: on 2 busy cores a width-16 step is 4× faster on 1 thread than on 2
    latency_calls: int = 30  # timed batch-64 calls per variant, over 3 interleaved rounds


QUICK = {
    "epochs": 2,
    "lr": 1e-2,
    "qat_lr": 1e-3,
    "train_size": 1024,
    "test_size": 256,
    "width": 8,
    "calibration_size": 64,
    "latency_calls": 6,
}


def logits_of(session, x: np.ndarray) -> np.ndarray:
    """onnxruntime logits of normalised float32 inputs."""
    return np.concatenate(
        [session.run(None, {INPUT_NAME: x[i : i + EVAL_BATCH]})[0] for i in range(0, len(x), EVAL_BATCH)]
    )


def scores(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1, top-1 agreement with the reference (fp32) and the max and mean absolute logit error against it."""
    error = np.abs(logits - reference)
    return {
        "top1": float((logits.argmax(1) == labels).mean()),
        "agreement_with_fp32": float((logits.argmax(1) == reference.argmax(1)).mean()),
        "max_logit_error": float(error.max()),
        "mean_logit_error": float(error.mean()),
    }


def images_per_second(paths: dict[str, Path], x: np.ndarray, calls: int, threads: int) -> dict[str, float]:
    """Batch-64 onnxruntime throughput (images/s at the median call) of each file, the files alternating round by
    round so drift in machine load hits them alike."""
    harness = deploy_module("latency")
    batch = np.resize(x, (LATENCY_BATCH, *x.shape[1:]))
    sessions = {name: ort_session(path, "default", threads) for name, path in paths.items()}

    def call(session) -> Callable[[], object]:
        return lambda: session.run(None, {INPUT_NAME: batch})

    times = harness.measure_interleaved(
        {name: call(s) for name, s in sessions.items()}, rounds=3, per_round=max(1, calls // 3)
    )
    return {name: harness.latency_summary(t, LATENCY_BATCH)["images_per_s"] for name, t in times.items()}


def post_training_int8(fp32_path: Path, out: Path, calibration: np.ndarray) -> Path:
    """deploy/quantize.py's static INT8 of the folded fp32 export (its defaults: 7-bit weights, min/max)."""
    quantize = deploy_module("quantize")
    try:
        return quantize.quantize_model(fp32_path, out, calibration.astype(np.float32), INPUT_NAME)
    except quantize.DeployError as exc:
        raise UserError(first_line(exc)) from None


def qat_model(trained: nn.Module, variant: str) -> nn.Module:
    """The QAT form of ``trained`` for a QAT variant, BN frozen where the variant says so."""
    model = prepare_qat(trained, simulate_fold=variant != "qat_unfolded")
    return freeze_bn_statistics(model) if variant == "qat_frozen" else model


def folded_convs(model: nn.Module) -> list[FoldedConvBn]:
    return [m for m in model.modules() if isinstance(m, FoldedConvBn)]


def rounding_agreement(model: nn.Module) -> float:
    """The smallest, over the model's folded convs, fraction of weights rounded to the same level before and after
    the fold's per-channel scale (:func:`bnstudy.edge.qat_math.fold_rounding_agreement`)."""
    fractions = []
    for module in folded_convs(model):
        bn = module.bn
        k = bn.weight.detach().double() * torch.rsqrt(bn.running_var.double() + bn.eps)
        fractions.append(fold_rounding_agreement(module.conv.weight, k, *module.weight_range))
    return min(fractions)


def same_training_forward(trained: nn.Module, seed: int) -> float:
    """Largest difference between the training-mode outputs of each folded conv of QAT folded (BN learning) and of
    QAT unfolded, built from the same weights and fed the same random input, relative to the output's largest
    |value|: float rounding only, since rounding commutes with the per-channel fold. (Compared per conv: in the
    whole model an activation on a rounding boundary may move one step, which says nothing about the fold.)"""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for folded, unfolded in zip(*(folded_convs(qat_model(trained, v)) for v in ("qat_learning", "qat_unfolded"))):
        x = torch.randn(8, folded.conv.in_channels, 16, 16, generator=generator)
        with torch.no_grad():
            a, b = folded(x), unfolded(x)
        worst = max(worst, float((a - b).abs().max() / a.abs().max()))
    return worst


def run_seed(seed: int, p: Params, split, workdir: Path) -> dict:
    """The six variants of one seed: their scores, throughput, the INT8 files' runtime ops, and QAT parity."""
    test_x, labels = split.x_test, split.y_test.numpy()
    test_np = test_x.numpy().astype(np.float32)
    train = {"batch_size": p.batch_size, "seed": seed, "evaluate_train": False}
    model = seeded_model(lambda: CifarResNet("bn", width=p.width), seed)
    fit(model, split, epochs=p.epochs, lr=p.lr, desc=f"{NAME} fp32 seed {seed}", **train)
    tuned = copy.deepcopy(model)
    torch.manual_seed(seed)
    fit(tuned, split, epochs=p.qat_epochs, lr=p.qat_lr, desc=f"{NAME} fp32_tuned seed {seed}", **train)
    paths = {name: workdir / f"{name}.onnx" for name in ("fp32", "fp32_tuned", "ptq")}
    for name, fp32 in (("fp32", model), ("fp32_tuned", tuned)):
        export_onnx(fp32.eval(), test_x[:2], paths[name], fold_bn=True, count_unfolded=False)
    post_training_int8(paths["fp32"], paths["ptq"], split.x_train[: p.calibration_size].numpy())
    forward_difference = same_training_forward(model, seed)
    rows: dict[str, dict] = {}
    parity: dict[str, dict] = {}
    qat_models: dict[str, nn.Module] = {}
    for variant in QAT_VARIANTS:
        qat = qat_model(model, variant)
        torch.manual_seed(seed)
        fit(qat, split, epochs=p.qat_epochs, lr=p.qat_lr, desc=f"{NAME} {variant} seed {seed}", **train)
        paths[variant] = export_qat_onnx(qat.eval(), workdir / f"{variant}.onnx", tuple(test_x.shape[1:]))
        parity[variant] = qat_parity(paths[variant], qat, test_x, threads=p.threads).to_dict()
        qat_models[variant] = qat
    logits = {name: logits_of(ort_session(path, "default", p.threads), test_np) for name, path in paths.items()}
    speed = images_per_second(paths, test_np, p.latency_calls, p.threads)
    for name, path in paths.items():
        ops = runtime_op_counts(path)
        rows[name] = scores(logits[name], logits["fp32"], labels) | {
            "images_per_s": speed[name],
            "runtime_qlinearconv": ops.get("QLinearConv", 0),
            "runtime_float_conv": ops.get("Conv", 0),
        }
    learning, unfolded = logits["qat_learning"], logits["qat_unfolded"]
    return {
        "rows": rows,
        "parity": parity,
        "convs": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
        "fold_rounding_agreement": rounding_agreement(qat_models["qat_unfolded"]),
        "training_forward_difference": forward_difference,
        "unfolded_vs_learning": {
            "agreement": float((learning.argmax(1) == unfolded.argmax(1)).mean()),
            "max_logit_difference": float(np.abs(learning - unfolded).max()),
            "bn_running_var_max_difference": max(
                float((a.bn.running_var - b.bn.running_var).abs().max())
                for a, b in zip(*(folded_convs(qat_models[v]) for v in ("qat_learning", "qat_unfolded")))
            ),
        },
    }


def points(top1_a: float, top1_b: float) -> float:
    """``top1_a − top1_b`` in percentage points, rounded to 1e-6: top-1 is a count over the test images, so any
    real gap is at least 100/N points, and unrounded float gaps such as 0.30000000000000027 fail a 0.3 target."""
    return round(100 * (top1_a - top1_b), 6)


def summarise(seeds: list[dict]) -> dict:
    """Mean ± std across seeds of every variant's metrics, and the top-1 gaps the findings rest on."""
    metrics = seeds[0]["rows"]["fp32"].keys()
    variants = {v: {m: mean_std([s["rows"][v][m] for s in seeds]) for m in metrics} for v in VARIANTS}
    gaps = {
        v: mean_std([points(s["rows"]["fp32"]["top1"], s["rows"][v]["top1"]) for s in seeds])
        for v in VARIANTS
        if v != "fp32"
    }
    speedups = {
        v: mean_std([s["rows"][v]["images_per_s"] / s["rows"]["fp32"]["images_per_s"] for s in seeds])
        for v in VARIANTS
        if v != "fp32"
    }
    return {"variants": variants, "top1_drop_points": gaps, "speedup_vs_fp32": speedups}


def run(
    seeds: Sequence[int] = DEFAULT_SEEDS,
    quick: bool | None = None,
    data: str | os.PathLike | None = None,
    **overrides,
) -> StudyResult:
    """Train one fp32 model per seed, derive the INT8 variants, score them. ``data``: a CIFAR-10 directory or
    torchvision root, "synthetic", or None for real data when found."""
    p = choose_params(Params(), QUICK, quick, overrides)
    train, test = load_train_test("cifar10", data, p.train_size, p.test_size, SYNTHETIC_SIZES)
    split = as_split(train, test)
    per_seed = []
    with torch_threads(p.threads), tempfile.TemporaryDirectory(prefix="bnstudy-qat-fold.") as tmp:
        for seed in seeds:
            workdir = Path(tmp) / f"seed{seed}"
            workdir.mkdir()
            per_seed.append(run_seed(seed, p, split, workdir))
    summary = summarise(per_seed) | {
        "data_source": train.source,
        "test_source": test.source,
        "train_samples": len(train),
        "test_samples": len(test),
    }
    return StudyResult(
        NAME, asdict(p), list(seeds), summary, checks(per_seed), findings(per_seed, summary), {"seeds": per_seed}
    )


def checks(per_seed: list[dict]) -> dict[str, Check]:
    """Rules that must hold whatever the accuracy: a broken one is a bug."""
    int8 = INT8_VARIANTS
    parity = [s["parity"][v] for s in per_seed for v in QAT_VARIANTS]
    return {
        "int8_runs_qlinearconv": Check(
            "onnxruntime runs every INT8 model's convs as QLinearConv: all of them for the QAT exports, no float Conv",
            all(s["rows"][v]["runtime_qlinearconv"] > 0 for s in per_seed for v in int8)
            and all(
                s["rows"][v]["runtime_qlinearconv"] == s["convs"] and s["rows"][v]["runtime_float_conv"] == 0
                for s in per_seed
                for v in QAT_VARIANTS
            ),
            {v: [s["rows"][v]["runtime_qlinearconv"] for s in per_seed] for v in int8},
        ),
        "qat_export_within_bound": Check(
            "each QAT export's logits stay within the rounding bound of its torch fake-quant model's (onnxruntime "
            "rounds no differently than one activation step)",
            all(r["max_logit_error"] <= r["logit_error_bound"] for r in parity),
            max(r["max_logit_error"] / r["logit_error_bound"] for r in parity),
        ),
        "unfolded_trains_the_same_forward": Check(
            "from the same weights and input, each conv of QAT unfolded and of QAT folded with BN learning computes "
            "the same training-mode output (≤ 1e-4 of its largest value apart): rounding commutes with the fold",
            max(s["training_forward_difference"] for s in per_seed) <= 1e-4,
            [s["training_forward_difference"] for s in per_seed],
        ),
        "rounding_commutes_with_fold": Check(
            "per-channel symmetric rounding commutes with the fold's per-channel scale: ≥ 99.9% of weights get the "
            "same level rounded before or after folding (the rest are float ties)",
            min(s["fold_rounding_agreement"] for s in per_seed) >= 0.999,
            min(s["fold_rounding_agreement"] for s in per_seed),
        ),
    }


def findings(per_seed: list[dict], summary: dict) -> dict[str, Check]:
    """The issue's targets and the study's claims, reported true or false as the numbers came out."""
    drop, speed = summary["top1_drop_points"], summary["speedup_vs_fp32"]
    top1 = {v: summary["variants"][v]["top1"]["mean"] for v in VARIANTS}
    unfolded = [s["unfolded_vs_learning"] for s in per_seed]
    parity = [s["parity"][v]["top1_agreement"] for s in per_seed for v in QAT_VARIANTS]
    return {
        "qat_export_agreement": Check(
            f"each QAT export agrees with its torch fake-quant model on ≥ {MIN_PARITY_AGREEMENT:.1%} of the test "
            "images, as `bnstudy export` requires (near-tied logits of a barely trained model can flip)",
            min(parity) >= MIN_PARITY_AGREEMENT,
            min(parity),
        ),
        "qat_frozen_within_target": Check(
            f"QAT folded with BN frozen is within {MAX_FP32_GAP_POINTS} points of fp32 top-1",
            drop["qat_frozen"]["mean"] <= MAX_FP32_GAP_POINTS,
            {v: d["mean"] for v, d in drop.items()},
        ),
        "qat_frozen_within_target_of_fp32_tuned": Check(
            f"QAT folded with BN frozen is within {MAX_FP32_GAP_POINTS} points of the fp32 model fine-tuned the same "
            "way (the fair comparison: QAT's fine-tuning is extra training too)",
            points(top1["fp32_tuned"], top1["qat_frozen"]) <= MAX_FP32_GAP_POINTS,
            {v: points(top1["fp32_tuned"], top1[v]) for v in INT8_VARIANTS},
        ),
        "qat_at_least_ptq": Check(
            "QAT folded with BN frozen has at least post-training INT8's top-1",
            top1["qat_frozen"] >= top1["ptq"],
            {"qat_frozen": top1["qat_frozen"], "ptq": top1["ptq"]},
        ),
        "freezing_at_least_learning": Check(
            "freezing BN from the start of fine-tuning gives at least the top-1 of letting it learn",
            top1["qat_frozen"] >= top1["qat_learning"],
            {"qat_frozen": top1["qat_frozen"], "qat_learning": top1["qat_learning"]},
        ),
        "unfolded_is_learning_folded": Check(
            "after fine-tuning, QAT without folding predicts what QAT folded with BN learning predicts on ≥ 99% "
            "of the test images (same forward; only float rounding differs along the way)",
            min(u["agreement"] for u in unfolded) >= 0.99,
            {
                "agreement": [u["agreement"] for u in unfolded],
                "max_logit_difference": [u["max_logit_difference"] for u in unfolded],
                "bn_running_var_max_difference": [u["bn_running_var_max_difference"] for u in unfolded],
                "top1_unfolded_minus_learning_points": points(top1["qat_unfolded"], top1["qat_learning"]),
            },
        ),
        "qat_int8_speed": Check(
            f"QAT INT8 runs at ≥ {MIN_INT8_SPEEDUP:g}× fp32 images/s at batch {LATENCY_BATCH}, like post-training INT8",
            speed["qat_frozen"]["mean"] >= MIN_INT8_SPEEDUP,
            {v: speed[v]["mean"] for v in INT8_VARIANTS},
        ),
    }
