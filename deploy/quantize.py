"""Static INT8 quantisation of an exported model with onnxruntime's tools, and a report of what it costs and buys.

    python deploy/quantize.py model.onnx --calib /work/shared/data/cifar10/train.npz \\
        --test /work/shared/data/cifar10/test_lossless_first1000.npz \\
        --unfolded model-unfolded.onnx --out model.int8.onnx --report quantize.json

QDQ format; weights int8, symmetric, one scale per output channel, in a 7-bit range (``reduce_range``, see below);
activations uint8, asymmetric, one scale per tensor, calibrated (min/max by default) on --calib-size images drawn at
random from --calib. The INT8 model keeps the source's bnstudy metadata (so deploy/infer.py runs it unchanged) plus
``bnstudy.quantization``. The report compares fp32 and INT8 on --test (or on held-out --calib images): top-1
accuracy, top-1 agreement with fp32, logit error, model size, BatchNormalization nodes in the file and after
onnxruntime's load-time fusion, and latency.

Why fold first: with --unfolded (the same model exported with ``--no-fold-bn``) the report also quantises the
unfolded model twice. "ORT pre-opt" runs onnxruntime's recommended pre-processing (``quant_pre_process``), whose
graph optimisation fuses a BatchNormalization into the Conv right before it, but not one behind a MaxPool (bnstudy's
fold handles conv → max-pool → BN). "no pre-opt" skips that optimisation, so every BN reaches the quantiser. A BN
that survives is quantised as its own node: the conv output is rounded to 8 bits with one scale for all channels
before BN multiplies each channel by γ/σ, so channels with a large γ/σ amplify the rounding error, and the float BN
sits between an int8 conv and the next int8 op at run time.

Why 7-bit weights: onnxruntime runs the QDQ model with uint8 × int8 kernels (QLinearConv, QGemm). On x86 CPUs without
VNNI (AVX2, AVX-512 without VNNI) these add pairs of products in int16 with saturation (vpmaddubsw), so full-range
weights against large activations overflow and the int8 model silently drifts from the QDQ arithmetic; on such a
CPU the test suite's tiny CNN agreed with fp32 on 77% of images with full-range weights and 99% with 7-bit ones.
onnxruntime's quantize_static docstring recommends ``reduce_range=True`` for these CPUs. The INT8 file is made here
but runs on the edge device, whose CPU we do not know, so the default is the range that is safe everywhere;
--full-range-weights gives the 8-bit range for a target known to have VNNI (or an ARM dot-product unit).

Needs onnxruntime, numpy and onnx (onnxruntime's quantiser imports it); not torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `deploy` importable from the folder holding it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from deploy.edge import (
    METADATA_PREFIX,
    ArgumentParser,
    DeployError,
    Inputs,
    ModelSpec,
    SessionConfig,
    atomic_write,
    check_writable,
    first_line,
    load_inputs,
    load_model,
    preprocess,
    run_batched,
    session_options,
    write_json,
)
from deploy.latency import latency_summary, measure_interleaved

PROG = "quantize.py"
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
UNFOLDED_VARIANTS = {"int8 unfolded, ORT pre-opt": True, "int8 unfolded, no pre-opt": False}  # name: pre-opt on
HELD_OUT = 1000  # evaluation images taken from --calib when no --test is given
EVAL_BATCH = 250
LATENCY_CALLS = {1: 300, 64: 30}  # timed calls per batch size for the report's latency columns


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed float32 images to onnxruntime's calibrator, ``batch_size`` at a time."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 32) -> None:
        self.batches = [{input_name: x[i : i + batch_size]} for i in range(0, len(x), batch_size)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes by op type in the top-level graph."""
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def runtime_op_counts(path: Path) -> dict[str, int]:
    """Nodes by op type in the graph onnxruntime actually runs (default level: Conv+BN and QDQ fusions applied)."""
    with tempfile.TemporaryDirectory(prefix="bnstudy-opt.") as tmp:
        options = session_options(SessionConfig())
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return op_counts(onnx.load(options.optimized_model_filepath))


def quantize_model(
    source: Path,
    out: Path,
    calibration: np.ndarray,
    input_name: str,
    *,
    ort_preprocess_optimization: bool = True,
    method: str = "minmax",
    reduce_range: bool = True,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the static INT8 (QDQ, per-channel weights) version of ``source`` to ``out``.

    ``calibration`` is preprocessed float32 input; ``ort_preprocess_optimization`` False keeps onnxruntime's
    quantisation pre-processing from fusing Conv + BatchNormalization, so an unfolded model's BNs reach the
    quantiser. ``reduce_range`` keeps weights in 7 bits so that uint8 × int8 kernels without VNNI do not saturate
    (see the module docstring). The source's metadata is copied, plus ``bnstudy.quantization`` (``info`` and the
    settings).
    """
    with tempfile.TemporaryDirectory(prefix="bnstudy-quant.") as tmp:
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(
                str(source), str(prepared), skip_optimization=not ort_preprocess_optimization, skip_symbolic_shape=True
            )
            quantize_static(
                str(prepared),
                str(quantized),
                ArrayCalibrationReader(input_name, calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CALIBRATION_METHODS[method],
            )
        except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
            raise DeployError(f"{source}: onnxruntime's quantiser failed ({first_line(exc)})") from None
        model = onnx.load(str(quantized))
    settings = {
        "format": "QDQ",
        "weights": f"int8 symmetric, {'7-bit range' if reduce_range else 'full range'}, per output channel",
        "reduce_range": reduce_range,
        "activations": "uint8 asymmetric, per tensor",
        "calibration_method": method,
        "ort_preprocess_optimization": ort_preprocess_optimization,
        "source_model": source.name,
    }
    metadata = {prop.key: prop.value for prop in onnx.load(str(source), load_external_data=False).metadata_props}
    metadata[METADATA_PREFIX + "quantization"] = json.dumps(settings | (info or {}))
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    return atomic_write(out, lambda path: onnx.save(model, str(path)))


def calibration_split(inputs: Inputs, n: int, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n`` calibration images and of up to ``held_out`` other images, drawn at random."""
    if len(inputs) < n:
        raise DeployError(f"{inputs.source}: {len(inputs)} images, fewer than --calib-size {n}; lower --calib-size")
    order = np.random.default_rng(seed).permutation(len(inputs))
    return np.sort(order[:n]), np.sort(order[n : n + held_out])


@dataclass
class Evaluation:
    """The images every variant is scored on."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str


def variant_row(
    name: str, path: Path, evaluation: Evaluation, reference: np.ndarray | None
) -> tuple[dict[str, Any], np.ndarray]:
    """One model's accuracy, agreement with the fp32 reference, logit error, size and graph statistics; and its
    logits."""
    session, spec = load_model(path)
    logits = run_batched(session, spec, evaluation.images, EVAL_BATCH).logits
    file_ops, runtime_ops = op_counts(onnx.load(str(path))), runtime_op_counts(path)
    row: dict[str, Any] = {
        "variant": name,
        "size_bytes": path.stat().st_size,
        "bn_nodes": file_ops.get("BatchNormalization", 0),
        "bn_nodes_at_runtime": runtime_ops.get("BatchNormalization", 0),
        "nodes_at_runtime": sum(runtime_ops.values()),
        "qdq_nodes": file_ops.get("QuantizeLinear", 0) + file_ops.get("DequantizeLinear", 0),
        "top1": float((logits.argmax(1) == evaluation.labels).mean()) if evaluation.labels is not None else None,
    }
    if reference is not None:
        row["agreement_with_fp32"] = float((logits.argmax(1) == reference.argmax(1)).mean())
        row["logit_rel_rmse"] = float(np.sqrt(np.mean((logits - reference) ** 2) / np.mean(reference**2)))
    return row, logits


def latency_columns(paths: dict[str, Path], images: np.ndarray, threads: int) -> dict[str, dict[str, float]]:
    """Per variant: batch-1 p50 latency and batch-64 throughput with the default session options, the variants
    alternating round by round (bench.py measures longer and searches the session options)."""
    _, spec = load_model(next(iter(paths.values())))
    feeds = {batch: preprocess(np.resize(images, (batch, *images.shape[1:])), spec) for batch in LATENCY_CALLS}
    sessions = {name: load_model(path, SessionConfig(threads=threads))[0] for name, path in paths.items()}

    def call(session: ort.InferenceSession, x: np.ndarray) -> Callable[[], object]:
        return lambda: session.run([spec.output_name], {spec.input_name: x})

    times = measure_interleaved(
        {(name, batch): call(session, feeds[batch]) for name, session in sessions.items() for batch in LATENCY_CALLS},
        rounds=3,
        per_round={(name, batch): n // 3 for name in sessions for batch, n in LATENCY_CALLS.items()},
    )
    out: dict[str, dict[str, float]] = {name: {} for name in paths}
    for (name, batch), seconds in times.items():
        summary = latency_summary(seconds, batch)
        out[name] |= {f"b{batch}_p50_ms": summary["p50_ms"], f"b{batch}_images_per_s": summary["images_per_s"]}
    return out


def summarise(rows: dict[str, dict]) -> dict[str, Any]:
    """The numbers the report is for: INT8's accuracy cost and speed-up, and folding's effect on both."""
    fp32, int8 = rows["fp32 folded"], rows["int8 folded"]
    summary: dict[str, Any] = {"int8_speedup_b64": int8["b64_images_per_s"] / fp32["b64_images_per_s"]}
    if fp32["top1"] is not None:
        summary["int8_top1_drop_points"] = 100 * (fp32["top1"] - int8["top1"])
    for name in UNFOLDED_VARIANTS:
        if name in rows:
            row = rows[name]
            summary[name] = {
                "agreement_with_fp32": row["agreement_with_fp32"],
                "logit_rel_rmse_vs_folded_int8": row["logit_rel_rmse"] / max(int8["logit_rel_rmse"], 1e-12),
                "b64_throughput_vs_folded_int8": row["b64_images_per_s"] / int8["b64_images_per_s"],
            }
            if row["top1"] is not None:
                summary[name]["top1_drop_points"] = 100 * (fp32["top1"] - row["top1"])
    return summary


def print_report(report: dict[str, Any]) -> None:
    print(f"evaluated on {report['evaluation']['images']} images of {report['evaluation']['source']}")
    print(
        f"{'variant':<28}{'BN':>4}{'BN@rt':>6}{'ops@rt':>7}{'size KB':>9}{'top-1':>8}{'agree':>8}{'logit err':>10}"
        f"{'b1 ms':>8}{'b64 img/s':>11}"
    )
    for row in report["variants"]:
        top1 = f"{row['top1']:.2%}" if row["top1"] is not None else "-"
        agree = f"{row['agreement_with_fp32']:.1%}" if "agreement_with_fp32" in row else "-"
        err = f"{row['logit_rel_rmse']:.4f}" if "logit_rel_rmse" in row else "-"
        print(
            f"{row['variant']:<28}{row['bn_nodes']:>4}{row['bn_nodes_at_runtime']:>6}{row['nodes_at_runtime']:>7}"
            f"{row['size_bytes'] / 1024:>9.0f}"
            f"{top1:>8}{agree:>8}{err:>10}{row['b1_p50_ms']:>8.3f}{row['b64_images_per_s']:>11.0f}"
        )
    summary = report["summary"]
    line = f"INT8 (folded) vs fp32: {summary['int8_speedup_b64']:.2f}× throughput at batch 64"
    if "int8_top1_drop_points" in summary:
        line += f", top-1 drop {summary['int8_top1_drop_points']:+.2f} points"
    print(line)
    print(
        "agree: top-1 agreement with fp32 folded; logit err: RMS(logits − fp32) / RMS(fp32); BN@rt, ops@rt: BN and all"
    )
    print("nodes left after onnxruntime's load-time optimisation (default level; it may turn a BN into a 1×1 conv)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="fp32 ONNX model exported with `bnstudy export --fold-bn`")
    p.add_argument("--calib", type=Path, required=True, help="calibration images: training .npz, image folder")
    p.add_argument("--out", type=Path, required=True, help="INT8 ONNX file to write")
    p.add_argument("--calib-size", type=int, default=512, help="calibration images (default: 512)")
    p.add_argument("--test", type=Path, help="labelled .npz or image folder to compare on (default: held-out --calib)")
    p.add_argument("--unfolded", type=Path, help="the same model exported with --no-fold-bn: quantise it to compare")
    p.add_argument("--report", type=Path, help="JSON report (default: OUT with .json)")
    p.add_argument("--method", choices=tuple(CALIBRATION_METHODS), default="minmax", help="calibration (minmax)")
    p.add_argument(
        "--full-range-weights",
        action="store_true",
        help="8-bit instead of 7-bit weight range: only for a target CPU with VNNI (or ARM); without VNNI, x86 int8 "
        "kernels can saturate",
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default: one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing calibration images")
    return p.parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Refuse, before anything is loaded or written, options that cannot be right."""
    if args.calib_size < 1:
        raise DeployError(f"--calib-size must be at least 1, got {args.calib_size}")
    if args.threads < 0:
        raise DeployError(f"--threads must be 0 (one per core) or more, got {args.threads}")
    report = report_path(args)
    for option, path in (("--out", args.out), ("--report", report)):
        if path.resolve() in {p.resolve() for p in (args.model, args.calib, args.test, args.unfolded) if p}:
            raise DeployError(f"{option} {path} would overwrite an input; choose another file name")
        check_writable(path, option)
    if report.resolve() == args.out.resolve():
        raise DeployError(f"--report {report} is the --out file; give the report a name of its own")


def report_path(args: argparse.Namespace) -> Path:
    return args.report or args.out.with_suffix(".json")


def check_model(args: argparse.Namespace) -> ModelSpec:
    """The fp32 model's spec; the model must be a folded, not yet quantised export, and --unfolded its twin."""
    _, spec = load_model(args.model)
    if spec.metadata.get("quantization"):
        raise DeployError(f"{args.model} is already quantised; pass the fp32 model exported by `bnstudy export`")
    if spec.metadata.get("fold_bn") is not True:
        raise DeployError(
            f"{args.model} was exported without --fold-bn; quantise the folded export (this one can be --unfolded)"
        )
    if args.unfolded:
        _, unfolded = load_model(args.unfolded)
        if unfolded.metadata.get("fold_bn") is not False or unfolded.shape != spec.shape:
            raise DeployError(f"--unfolded {args.unfolded} is not the --no-fold-bn export of a model like {args.model}")
    return spec


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Check every input, quantise into ``workdir/int8.onnx``, evaluate every variant and return the report; the
    caller writes the INT8 model and the report only once all of this has succeeded."""
    check_options(args)
    spec = check_model(args)
    calib_inputs = load_inputs(args.calib, spec)
    calib_index, held_out = calibration_split(calib_inputs, args.calib_size, 0 if args.test else HELD_OUT, args.seed)
    calibration = preprocess(calib_inputs.x[calib_index], spec)
    if args.test:
        test = load_inputs(args.test, spec)
        evaluation = Evaluation(test.x, test.labels, test.source)
    else:
        labels = calib_inputs.labels[held_out] if calib_inputs.labels is not None else None
        evaluation = Evaluation(calib_inputs.x[held_out], labels, f"{calib_inputs.source} (held out)")
        if not len(held_out):
            raise DeployError(f"{args.calib}: no images left after calibration; pass --test or lower --calib-size")
    info = {"calibration_images": args.calib_size, "calibration_source": calib_inputs.source, "seed": args.seed}
    reduce_range = not args.full_range_weights
    print(f"calibrating on {args.calib_size} images of {calib_inputs.source} ({args.method})", file=sys.stderr)
    int8 = workdir / "int8.onnx"
    quantize_model(
        args.model, int8, calibration, spec.input_name, method=args.method, reduce_range=reduce_range, info=info
    )
    variants = {"fp32 folded": args.model, "int8 folded": int8}
    if args.unfolded:
        variants["fp32 unfolded"] = args.unfolded
        for name, optimize in UNFOLDED_VARIANTS.items():
            variants[name] = workdir / f"{'pre-opt' if optimize else 'no-pre-opt'}.onnx"
            quantize_model(
                args.unfolded,
                variants[name],
                calibration,
                spec.input_name,
                ort_preprocess_optimization=optimize,
                reduce_range=reduce_range,
                info=info,
            )
    rows: dict[str, dict] = {}
    reference = None
    for name, path in variants.items():
        print(f"evaluating {name}", file=sys.stderr)
        rows[name], logits = variant_row(name, path, evaluation, reference)
        reference = logits if reference is None else reference
    print("timing", file=sys.stderr)
    for name, columns in latency_columns(variants, evaluation.images, args.threads).items():
        rows[name] |= columns
    return {
        "model": str(args.model),
        "unfolded": str(args.unfolded) if args.unfolded else None,
        "out": str(args.out),
        "calibration": info | {"method": args.method},
        "evaluation": {"source": evaluation.source, "images": len(evaluation.images)},
        "threads": args.threads or "onnxruntime default",
        "variants": list(rows.values()),
        "summary": summarise(rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantiser logs advice on the root logger
    try:
        args = parse_args(argv)
        with tempfile.TemporaryDirectory(prefix="bnstudy-quantize.") as tmp:
            report = run(args, Path(tmp))
            atomic_write(args.out, lambda target: shutil.copyfile(Path(tmp) / "int8.onnx", target))
        path = write_json(report_path(args), report)
    except DeployError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print_report(report)
    print(f"wrote {args.out} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
