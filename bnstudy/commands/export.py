"""``bnstudy export`` (fold BN, export to ONNX, verify parity) and ``bnstudy bench export``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TORCHVISION_PREFIX = "torchvision:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REAL_IMAGES = 64


def register(registry) -> None:
    p = registry.command("export", "fold BN into conv/linear weights, export to ONNX and verify it in onnxruntime")
    p.add_argument("source", help="run directory, checkpoint file, or torchvision:<model> (random weights)")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True, help="fold BN (default: on)")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--report", type=Path, help="also write the export and parity report as JSON")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--input-shape", type=int, nargs="+", metavar="N", help="one sample's shape, e.g. 3 32 32 (default: config)"
    )
    p.add_argument("--keep-bn", action="store_true", help="keep BNs that cannot be folded instead of an affine")
    p.add_argument("--seed", type=int, default=0, help="seed for torchvision weights, BN statistics and inputs")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: 2)")
    p.set_defaults(func=run)

    b = registry.bench("export", "latency and throughput: torch eager/folded vs onnxruntime unfolded/folded")
    b.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    b.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: 2)")
    b.add_argument("--out", type=Path, default=Path("runs/bench/export.json"), help="JSON result (PNG beside it)")
    b.add_argument(
        "--profile",
        action="store_true",
        help="also record profiler traces of eager inference, unfolded and folded, beside the JSON",
    )
    b.set_defaults(func=run_bench)


def _write_problem(path: Path) -> str | None:
    """Why ``path`` cannot be written, checked before the slow work starts, or None."""
    if path.is_dir():
        return f"{path} is a directory; give a file name"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{path}: {parent} is a file, not a directory; choose another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: {parent} is not writable; choose a writable location"
    return None


def load_source(source: str, seed: int):
    """(model, config) from a run directory, checkpoint or ``torchvision:<name>`` (random weights, BN statistics
    randomised so BN is not the identity)."""
    import torch

    from bnstudy.checkpoint import model_from_checkpoint
    from bnstudy.errors import UserError
    from bnstudy.fold import randomize_batchnorm

    if not source.startswith(TORCHVISION_PREFIX):
        try:
            return model_from_checkpoint(source)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"{source}: its config cannot rebuild a model ({type(exc).__name__}: {exc})") from None
    import torchvision

    name = source[len(TORCHVISION_PREFIX) :]
    if name not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown torchvision model {name!r}; see torchvision.models.list_models() (e.g. resnet18)")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    config = {
        "model": source,
        "norm": "bn",
        "num_classes": None,  # read from the output once the input shape is known
        "input_shape": [3, 32, 32],
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "classes": None,
        "dataset": None,
        "weights": f"random (seed {seed}, BN statistics randomised)",
    }
    return model.eval(), config


def _check_input(model, shape: list[int], source: str):
    """The model's output on zeros of ``shape``, or a one-line UserError naming the shape."""
    import torch

    from bnstudy.errors import UserError

    try:
        with torch.no_grad():
            return model(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(
            f"input shape {' '.join(map(str, shape))} does not fit {source} ({first}); pass --input-shape C H W"
        ) from None


def _real_images(config: dict, shape: list[int]):
    """(name, tensor) of CIFAR-10 test images when the config names cifar10 and the data is here, else (note, None)."""
    from bnstudy.data import find_real_data, load_images, to_model_input

    dataset = config.get("dataset")
    if dataset != "cifar10":
        named = "the source names no dataset" if dataset is None else f"dataset {dataset!r} is not cifar10"
        return f"real images: none ({named}); verified on random inputs only", None
    if list(shape) != [3, 32, 32]:
        return f"real images: none (input shape {shape} is not CIFAR-10's); verified on random inputs only", None
    root = find_real_data("cifar10")
    if root is None:
        return "real images: CIFAR-10 data not found here; verified on random inputs only", None
    images = load_images("cifar10", root, "test").subset(REAL_IMAGES)
    mean, std = config.get("mean") or images.mean, config.get("std") or images.std
    return "cifar10-test", to_model_input(images.x, tuple(mean), tuple(std))


def _print_counts(unfolded: dict | None, exported: dict) -> None:
    ops = sorted(set(exported) | set(unfolded or {}))
    if unfolded is None:
        print(f"{'op type':<22}{'nodes':>8}")
        for op in ops:
            print(f"{op:<22}{exported.get(op, 0):>8}")
        return
    print(f"{'op type':<22}{'unfolded':>9}{'exported':>9}")
    for op in ops:
        print(f"{op:<22}{unfolded.get(op, 0):>9}{exported.get(op, 0):>9}")


def _print_parity(verify) -> None:
    print(f"parity: |onnxruntime − torch| ≤ {verify.atol:g} + {verify.rtol:g}·|torch| (float32)")
    print(
        f"{'inputs':<14}{'ort opt':<10}{'output':<10}{'batches':<12}{'max abs':>10}{'max rel':>10}{'tol used':>10}  ok"
    )
    for row in verify.summary():
        batches = ",".join(map(str, row["batches"]))
        print(
            f"{row['inputs']:<14}{row['setting']:<10}{row['output']:<10}{batches:<12}{row['max_abs']:>10.2e}"
            f"{row['max_rel']:>10.2e}{row['tolerance_used']:>10.3f}  {'yes' if row['passed'] else 'NO'}"
        )
    for note in verify.notes:
        print(f"note: {note}")


def run(args: argparse.Namespace) -> int:
    import torch

    from bnstudy.errors import UserError
    from bnstudy.export import export_onnx, verify_onnx
    from bnstudy.io import write_json

    for path in filter(None, (args.out, args.report)):
        problem = _write_problem(path)
        if problem:
            raise UserError(problem)
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    model, config = load_source(args.source, args.seed)
    shape = args.input_shape or config.get("input_shape")
    if not shape:
        raise UserError(f"{args.source}: the config has no input_shape; pass --input-shape (e.g. 3 32 32)")
    shape = [int(s) for s in shape]
    output = _check_input(model.eval(), shape, args.source)
    if config.get("num_classes") is None and isinstance(output, torch.Tensor):
        config["num_classes"] = output.shape[-1]

    generator = torch.Generator().manual_seed(args.seed)
    example = torch.randn(2, *shape, generator=generator)
    report = export_onnx(
        model,
        example,
        args.out,
        fold_bn=args.fold_bn,
        opset=args.opset,
        config=config | {"input_shape": shape},
        affine_fallback=not args.keep_bn,
    )
    if report.fold is not None:
        from bnstudy.fold import FoldReport

        print("\n".join(FoldReport(**report.fold).lines()))
    else:
        print("fold: off (--no-fold-bn): BatchNormalization nodes kept")
    print(f"wrote {args.out} (opset {report.opset}, dynamic batch: {'yes' if report.dynamic_batch else 'NO'})")
    _print_counts(report.node_counts_unfolded, report.node_counts)

    inputs = {"random": torch.randn(64, *shape, generator=generator)}
    real_name, real = _real_images(config, shape)
    if real is None:
        print(real_name)
    else:
        inputs[real_name] = real
    verify = verify_onnx(args.out, model, inputs, threads=args.threads)
    _print_parity(verify)
    if args.report:
        write_json(args.report, {"source": args.source, "export": report.to_dict(), "verify": verify.to_dict()})
        print(f"wrote {args.report}")
    if not verify.passed:
        print(
            f"bnstudy: parity FAILED for {args.out}: onnxruntime differs from torch beyond tolerance", file=sys.stderr
        )
        return 1
    return 0


def run_bench(args: argparse.Namespace) -> int:
    from bnstudy.benchmarks.export import (
        benchmark_export,
        plot_export_benchmark,
        print_export_benchmark,
        profile_folding,
    )
    from bnstudy.errors import UserError
    from bnstudy.io import write_json

    problem = _write_problem(args.out)
    if problem:
        raise UserError(problem)
    result = benchmark_export(threads=args.threads, quick=args.quick)
    print_export_benchmark(result)
    write_json(args.out, result)
    png = plot_export_benchmark(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {png}")
    if args.profile:
        unfolded, folded = profile_folding(args.out.parent / "export-traces", threads=args.threads)
        print(f"traces: {unfolded} and {folded}; compare with: bnstudy trace compare {unfolded} {folded}")
    return 0
