"""Classify images with an exported bnstudy model on a device that has onnxruntime and numpy (Pillow for image
files) but no PyTorch.

    python deploy/infer.py model.onnx images/ --top-k 3 --out predictions.json
    python deploy/infer.py model.int8.onnx test.npz --format csv

INPUT is a folder of PNG/JPEG files, one image file, or an .npz with ``x`` (uint8 N×H×W×C) and optionally ``y``
(labels: the summary then gives top-1 accuracy). Preprocessing (size, channels, mean/std, layout) comes from the
model's metadata. Predictions go to --out or stdout (JSON or CSV); the latency summary goes to stderr.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `deploy` importable from the folder holding it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.edge import (
    ArgumentParser,
    DeployError,
    Inputs,
    ModelSpec,
    SessionConfig,
    atomic_write,
    check_writable,
    load_inputs,
    load_model,
    run_batched,
    softmax,
    top_k,
)
from deploy.latency import latency_summary

PROG = "infer.py"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="ONNX model written by `bnstudy export` (fp32 or INT8)")
    p.add_argument("input", type=Path, help="folder of PNG/JPEG images, one image, or an .npz with x (and y)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (default: 3)")
    p.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call (default: 64)")
    p.add_argument("--format", choices=("json", "csv"), help="output format (default: from --out's suffix, else json)")
    p.add_argument("--out", type=Path, help="file for the predictions (default: stdout)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (default: one per core)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("top_k", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise DeployError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.threads < 0:
        raise DeployError(f"--threads must be 0 (one per core) or more, got {args.threads}")
    if args.out is not None:
        if args.out.resolve() in (args.model.resolve(), args.input.resolve()):
            raise DeployError(f"--out {args.out} would overwrite an input; choose another file name")
        check_writable(args.out)


def predictions(logits, inputs: Inputs, spec: ModelSpec, k: int) -> list[dict[str, Any]]:
    """Per image: its name, top-1 class and probability, the top-k list, and its label when known."""
    probs = softmax(logits.astype("float64"))
    index, prob = top_k(probs, min(k, probs.shape[1]))
    rows = []
    for i, name in enumerate(inputs.names):
        best = [
            {"class": int(c), "name": spec.class_name(int(c)), "probability": float(p)}
            for c, p in zip(index[i], prob[i])
        ]
        row = {"source": name, **best[0], "top_k": best}
        if inputs.labels is not None:
            row["label"] = int(inputs.labels[i])
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """One line per image: source, label (if known), then class/name/probability for each of the top k."""
    k = len(rows[0]["top_k"])
    header = ["source", *(["label"] if "label" in rows[0] else [])]
    header += [f"{field}_{rank}" for rank in range(1, k + 1) for field in ("class", "name", "probability")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        cells = [row["source"], *([row["label"]] if "label" in row else [])]
        cells += [
            value for best in row["top_k"] for value in (best["class"], best["name"], f"{best['probability']:.6f}")
        ]
        writer.writerow(cells)
    return buffer.getvalue()


def infer(args: argparse.Namespace) -> dict[str, Any]:
    """Run the model on the input and return the JSON document (predictions, accuracy, latency)."""
    session, spec = load_model(args.model, SessionConfig(threads=args.threads))
    inputs = load_inputs(args.input, spec, args.limit)
    result = run_batched(session, spec, inputs.x, args.batch_size)
    rows = predictions(result.logits, inputs, spec, args.top_k)
    latency = latency_summary(result.run_seconds, min(args.batch_size, len(inputs)))
    document: dict[str, Any] = {
        "model": str(args.model),
        "input": inputs.source,
        "images": len(inputs),
        "quantization": spec.metadata.get("quantization"),
        "latency": {
            "batch_size": args.batch_size,
            "batches": latency["calls"],
            "batch_p50_ms": latency["p50_ms"],
            "batch_p95_ms": latency["p95_ms"],
            "images_per_s": len(inputs) / sum(result.run_seconds),
            "preprocess_ms": result.preprocess_seconds * 1e3,
            "threads": args.threads or "onnxruntime default",
        },
        "predictions": rows,
    }
    if inputs.labels is not None:
        document["accuracy"] = float((result.logits.argmax(axis=1) == inputs.labels).mean())
    return document


def summary_line(document: dict[str, Any]) -> str:
    lat = document["latency"]
    text = (
        f"{document['images']} images in {lat['batches']} batch(es) of ≤{lat['batch_size']}: "
        f"{lat['batch_p50_ms']:.2f} ms/batch p50, {lat['batch_p95_ms']:.2f} ms p95, {lat['images_per_s']:.0f} images/s "
        f"(model only; preprocessing {lat['preprocess_ms']:.1f} ms in all)"
    )
    if "accuracy" in document:
        text += f"; top-1 accuracy {document['accuracy']:.2%}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        check_args(args)
        document = infer(args)
        fmt = args.format or ("csv" if args.out is not None and args.out.suffix.lower() == ".csv" else "json")
        text = to_csv(document["predictions"]) if fmt == "csv" else json.dumps(document, indent=2) + "\n"
        if args.out is None:
            sys.stdout.write(text)
        else:
            atomic_write(args.out, lambda tmp: tmp.write_text(text))
            print(f"wrote {args.out}", file=sys.stderr)
        print(summary_line(document), file=sys.stderr)
    except DeployError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
