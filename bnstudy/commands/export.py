"""``bnstudy export``: fold BN, export to ONNX, verify parity in onnxruntime. A run trained with ``--qat-from``
is written as the INT8 QDQ model its fake-quant modules simulate, and checked against them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnstudy.errors import UserError, check_at_least, check_seed
from bnstudy.io import check_writable


def register(registry) -> None:
    p = registry.command("export", "fold BN into conv/linear weights, export to ONNX and verify it in onnxruntime")
    p.add_argument("source", help="run directory, checkpoint file, or torchvision:<model> (random weights)")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True, help="fold BN (default: on)")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.add_argument("--report", type=Path, help="also write the export and parity report as JSON")
    p.add_argument("--opset", type=int, help="ONNX opset, 18..23 (default: the exporter's)")
    p.add_argument(
        "--input-shape", type=int, nargs="+", metavar="N", help="one sample's shape, e.g. 3 32 32 (default: config)"
    )
    p.add_argument("--keep-bn", action="store_true", help="keep BNs that cannot be folded instead of an affine")
    p.add_argument("--seed", type=int, default=0, help="seed for torchvision weights, BN statistics and inputs")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default: 2)")
    p.set_defaults(func=run)


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


def check_options(args: argparse.Namespace) -> None:
    """Refuse, before the model is loaded, options that cannot be right."""
    for path in filter(None, (args.out, args.report)):
        check_writable(path)
    if args.report is not None and args.report.resolve() == args.out.resolve():
        raise UserError(f"--report {args.report} is the --out file; give the report a name of its own")
    check_at_least("--threads", args.threads, 1)
    check_seed(args.seed)
    for size in args.input_shape or ():
        check_at_least("--input-shape", size, 1)


def run(args: argparse.Namespace) -> int:
    import torch

    from bnstudy.edge.sources import TORCHVISION_PREFIX
    from bnstudy.training.checkpoint import load_checkpoint

    check_options(args)
    if not args.source.startswith(TORCHVISION_PREFIX) and load_checkpoint(args.source)["config"].get("qat_from"):
        return run_qat(args)

    from bnstudy.edge.fold import fold_report_lines
    from bnstudy.edge.onnx_export import check_opset, export_onnx, verify_onnx
    from bnstudy.edge.sources import check_input, load_source, real_test_images
    from bnstudy.io import write_json

    check_opset(args.opset)
    torch.set_num_threads(args.threads)
    model, config = load_source(args.source, args.seed)
    shape = args.input_shape or config.get("input_shape")
    if not shape:
        raise UserError(f"{args.source}: the config has no input_shape; pass --input-shape (e.g. 3 32 32)")
    shape = [int(s) for s in shape]
    output = check_input(model.eval(), shape, args.source)
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
        print("\n".join(fold_report_lines(report.fold)))
    else:
        print("fold: off (--no-fold-bn): BatchNormalization nodes kept")
    print(f"wrote {args.out} (opset {report.opset}, dynamic batch: {'yes' if report.dynamic_batch else 'NO'})")
    _print_counts(report.node_counts_unfolded, report.node_counts)

    inputs = {"random": torch.randn(64, *shape, generator=generator)}
    real_name, real = real_test_images(config, shape)
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
            f"bnstudy: parity FAILED for {args.out} (kept for inspection): onnxruntime differs from torch beyond "
            "tolerance",
            file=sys.stderr,
        )
        return 1
    return 0


QAT_MIN_AGREEMENT = 0.995  # top-1 agreement onnxruntime INT8 vs torch fake-quant that parity requires


def check_qat_options(args: argparse.Namespace, config: dict) -> None:
    """Refuse the fp32 export's options that have no meaning for a QAT run, whose BN is always folded into the
    fake-quantised convs and whose graph bnstudy writes itself (opset fixed)."""
    from bnstudy.edge.qat_export import OPSET

    if not args.fold_bn:
        raise UserError(f"{args.source} is a QAT run: its BN is folded into the INT8 convs; drop --no-fold-bn")
    if args.keep_bn:
        raise UserError(f"{args.source} is a QAT run: every BN is folded, none is kept; drop --keep-bn")
    if args.opset is not None:
        raise UserError(f"{args.source} is a QAT run: its QDQ graph is written at opset {OPSET}; drop --opset")
    if args.input_shape and list(args.input_shape) != list(config["input_shape"]):
        shape = " ".join(map(str, config["input_shape"]))
        raise UserError(f"{args.source} is a QAT run trained on inputs {shape}; drop --input-shape")


def run_qat(args: argparse.Namespace) -> int:
    """Write the INT8 QDQ model of a QAT run and check it against the torch fake-quant model on the run's test
    images (real CIFAR-10 when the run trained on it and it is here); exit 1 when parity fails."""
    import torch

    from bnstudy.data import to_model_input
    from bnstudy.edge.qat_export import OPSET, export_qat_onnx, qat_model_from_checkpoint, qat_parity
    from bnstudy.io import write_json
    from bnstudy.training.run_data import run_test_images

    model, config = qat_model_from_checkpoint(args.source)
    check_qat_options(args, config)
    torch.set_num_threads(args.threads)
    test, note = run_test_images(config)
    images = to_model_input(test.x, tuple(config["mean"]), tuple(config["std"]))
    export_qat_onnx(model, args.out, tuple(config["input_shape"]), config)
    parity = qat_parity(args.out, model, images, threads=args.threads)
    passed = parity.top1_agreement >= QAT_MIN_AGREEMENT and parity.max_logit_error <= parity.logit_error_bound
    ops = parity.runtime_ops
    print(
        f"wrote {args.out} (INT8 QDQ, BN folded; onnxruntime runs {ops.get('QLinearConv', 0)} QLinearConv, "
        f"{ops.get('Conv', 0)} float Conv)"
    )
    if note:
        print(f"note: {note}")
    print(
        f"parity on {parity.images} images of {test.source}: top-1 agreement {parity.top1_agreement:.2%} "
        f"(needs ≥ {QAT_MIN_AGREEMENT:.1%}), max logit error {parity.max_logit_error:.4f} "
        f"(bound {parity.logit_error_bound:.4f}): {'ok' if passed else 'FAILED'}"
    )
    if args.report:
        report = {
            "source": args.source,
            "export": {"out": str(args.out), "format": "QDQ INT8", "opset": OPSET, "qat_from": config["qat_from"]},
            "verify": parity.to_dict() | {"test_source": test.source, "note": note, "passed": passed},
        }
        write_json(args.report, report)
        print(f"wrote {args.report}")
    if not passed:
        print(
            f"bnstudy: parity FAILED for {args.out} (kept for inspection): onnxruntime INT8 differs from the "
            "fake-quant model",
            file=sys.stderr,
        )
        return 1
    return 0
