"""ONNX export with BN folded by bnstudy (not by the exporter), and a parity check onnxruntime cannot fool.

Both ONNX exporters and onnxruntime fuse Conv + BN on their own, so a check against a default session cannot
tell whether our fold is right. :func:`export_onnx` therefore turns the exporter's fusion off (the dynamo
exporter with ``optimize=False``, then constant folding without the BN-fusion rewrite rules), and
:func:`verify_onnx` runs onnxruntime with graph optimisations disabled as well as at the default level.

Deployment metadata lives in the model's ``metadata_props`` (string values, JSON where structured):

- ``bnstudy.version``: the bnstudy version that wrote the file
- ``bnstudy.fold_bn``: ``"true"`` or ``"false"``
- ``bnstudy.fold_report``: JSON :class:`bnstudy.edge.fold.FoldReport` (``null`` without folding)
- ``bnstudy.config``: JSON model config (model, norm, num_classes, input_shape, mean, std, classes, dataset...)
- ``bnstudy.preprocess``: JSON ``{"input_name", "output_names", "input_shape" (per sample, no batch), "layout"
  ("NCHW" or "NC"), "dtype" ("float32"), and when known "pixel_scale" (1/255: uint8 → [0, 1]), "mean", "std"
  (per channel: x = (pixels·pixel_scale − mean) / std), "source_layout" ("HWC" uint8 RGB images)}``
- ``bnstudy.classes``: JSON list of class names (only when known)
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer
import torch
from torch import Tensor, nn

from bnstudy import __version__
from bnstudy.edge.fold import fold_inference_copy, inference_copy
from bnstudy.errors import UserError, first_line
from bnstudy.io import atomic_write

METADATA_PREFIX = "bnstudy."
INPUT_NAME = "input"
BATCH_SIZES = (1, 2, 7, 64)
ATOL = 1e-5
RTOL = 1e-4
ORT_LEVELS = ("disabled", "default")
# The opsets torch.onnx's dynamo exporter writes itself: 18 is the lowest it implements (for a lower one it runs a
# version converter that fails for most models, prints its tracebacks and keeps opset 18) and 23 the highest torch
# supports (torch.onnx._constants.ONNX_MAX_OPSET).
OPSETS = range(18, 24)


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter cannot produce, instead of writing another one (None: the exporter's default)."""
    if opset is not None and opset not in OPSETS:
        raise UserError(f"--opset {opset} cannot be exported; choose one of {OPSETS.start}..{OPSETS.stop - 1}")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: graph statistics, how it was exported and the fold report."""

    path: str
    fold_bn: bool
    opset: int
    exporter: str
    dynamic_batch: bool
    input_name: str
    output_names: list[str]
    node_counts: dict[str, int]
    node_counts_unfolded: dict[str, int] | None
    fold: dict | None  # FoldReport.to_dict(), as stored in the model's metadata
    metadata: dict[str, str]
    export_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyReport:
    """Parity of an ONNX file with the torch model, per onnxruntime setting, input set, batch size and output."""

    path: str
    atol: float
    rtol: float
    passed: bool
    rows: list[dict[str, Any]]
    node_counts: dict[str, int]
    dynamic_batch: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> list[dict[str, Any]]:
        """Worst case per (input set, setting, output) over batch sizes."""
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for row in self.rows:
            groups.setdefault((row["inputs"], row["setting"], row["output"]), []).append(row)
        return [
            {
                "inputs": inputs,
                "setting": setting,
                "output": output,
                "batches": [row["batch"] for row in rows],
                "max_abs": max(row["max_abs"] for row in rows),
                "max_rel": max(row["max_rel"] for row in rows),
                "tolerance_used": max(row["tolerance_used"] for row in rows),
                "passed": all(row["passed"] for row in rows),
            }
            for (inputs, setting, output), rows in groups.items()
        ]


def relative_error(output: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference over the largest reference magnitude: robust to reference values near zero."""
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    diff = float(np.abs(output - reference).max()) if reference.size else 0.0
    return diff / scale if scale > 0 else diff


def tolerance_used(output: np.ndarray, reference: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> float:
    """max |output − reference| / (atol + rtol·|reference|): at most 1 means within tolerance everywhere."""
    if not reference.size:
        return 0.0
    return float((np.abs(output - reference) / (atol + rtol * np.abs(reference))).max())


def count_nodes(model: Any) -> dict[str, int]:
    """Node count by op type (top-level graph) of an ``onnx.ModelProto`` or a path to one."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return dict(sorted(Counter(node.op_type for node in proto.graph.node).items()))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``bnstudy.*`` metadata of an ONNX file, JSON values decoded (what deploy code reads)."""
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for prop in proto.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            key = prop.key[len(METADATA_PREFIX) :]
            out[key] = prop.value if key == "version" else json.loads(prop.value)
    return out


def deployment_metadata(
    config: Mapping[str, Any] | None,
    fold_report: dict | None,
    input_shape: Sequence[int],
    output_names: list[str],
) -> dict[str, str]:
    """The ``metadata_props`` entries described in the module docstring."""
    config = dict(config or {})
    preprocess: dict[str, Any] = {
        "input_name": INPUT_NAME,
        "output_names": output_names,
        "input_shape": list(input_shape),
        "layout": "NCHW" if len(input_shape) == 3 else "NC" if len(input_shape) == 1 else f"N+{len(input_shape)}D",
        "dtype": "float32",
    }
    if config.get("mean") is not None and config.get("std") is not None:
        preprocess |= {"pixel_scale": 1 / 255, "mean": list(config["mean"]), "std": list(config["std"])}
        if len(input_shape) == 3:
            preprocess["source_layout"] = "HWC"
    meta = {
        "version": __version__,
        "fold_bn": "true" if fold_report is not None else "false",
        "fold_report": json.dumps(fold_report),
        "config": json.dumps(config, default=str),
        "preprocess": json.dumps(preprocess),
    }
    if config.get("classes"):
        meta["classes"] = json.dumps(list(config["classes"]))
    return {METADATA_PREFIX + key: value for key, value in meta.items()}


def _onnx_program(model: nn.Module, example: Tensor, dynamic_batch: bool, opset: int | None):
    """Export with the dynamo exporter and fold constants, but apply none of the exporter's rewrite rules
    (among them Conv/ConvTranspose/Gemm + BatchNormalization fusion)."""
    output = model(example)
    output_names = ["output"] if isinstance(output, Tensor) else None
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            optimize=False,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=[INPUT_NAME],
            output_names=output_names,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many error types; the user needs one line, not its traceback
        raise UserError(
            f"torch.onnx cannot export {type(model).__name__}: {first_line(exc)}; check the model runs in eval mode "
            "on the given input shape"
        ) from None
    onnxscript.optimizer.fold_constants(program.model)
    onnxscript.optimizer.remove_unused_nodes(program.model)
    return program.model_proto


def _is_dynamic_batch(proto) -> bool:
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return bool(dim.dim_param) and not dim.HasField("dim_value")


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    *,
    fold_bn: bool = True,
    dynamic_batch: bool = True,
    opset: int | None = None,
    config: Mapping[str, Any] | None = None,
    affine_fallback: bool = True,
    count_unfolded: bool = True,
) -> ExportReport:
    """Write ``model`` (eval mode) as ONNX to ``path``, BN folded by :func:`bnstudy.edge.fold.fold_batchnorm` or kept.

    The graph input is named ``input`` with a dynamic batch axis (the example is traced at batch ≥ 2, since an
    example batch of 1 can pin it); ``config`` goes into the metadata (see the module docstring). The file is
    checked with ``onnx.checker`` before it is written atomically. With ``fold_bn`` and ``count_unfolded`` the
    unfolded graph is exported in memory too, so the report gives node counts before and after folding.
    """
    check_opset(opset)
    start = time.perf_counter()
    example = example_input.detach().float()
    if dynamic_batch and example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    exported = inference_copy(model)
    fold_report = counts_unfolded = None
    with torch.no_grad():
        if fold_bn and count_unfolded:
            counts_unfolded = count_nodes(_onnx_program(exported, example, dynamic_batch, opset))
        if fold_bn:
            result = fold_inference_copy(exported, example, affine_fallback=affine_fallback)
            exported, fold_report = result.model, result.report.to_dict()
        proto = _onnx_program(exported, example, dynamic_batch, opset)
    output_names = [out.name for out in proto.graph.output]
    metadata = deployment_metadata(config, fold_report, example.shape[1:], output_names)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the exported ONNX graph is invalid ({first_line(exc)}); try another --opset") from None
    opset_used = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_used != opset:  # never hand back another opset than the one asked for
        raise UserError(f"torch.onnx wrote opset {opset_used}, not the requested {opset}; try another --opset")
    atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))
    return ExportReport(
        path=str(path),
        fold_bn=fold_bn,
        opset=opset_used,
        exporter=f"torch.onnx dynamo (torch {torch.__version__}), optimize=False + constant folding",
        dynamic_batch=_is_dynamic_batch(proto),
        input_name=INPUT_NAME,
        output_names=output_names,
        node_counts=count_nodes(proto),
        node_counts_unfolded=counts_unfolded,
        fold=fold_report,
        metadata=metadata,
        export_seconds=time.perf_counter() - start,
    )


def ort_session(
    path: str | os.PathLike,
    level: str = "default",
    threads: int = 2,
    optimized_model_path: str | os.PathLike | None = None,
):
    """An onnxruntime CPU session; ``level`` "disabled" turns all graph optimisations (Conv+BN fusion too) off.
    ``optimized_model_path``: where onnxruntime saves the graph it runs, after its optimisations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == "disabled" else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _as_outputs(value: Any) -> list[np.ndarray]:
    values = value if isinstance(value, (tuple, list)) else [value]
    return [v.detach().float().numpy() for v in values]


_MISMATCH = {"max_abs": float("inf"), "max_rel": float("inf"), "tolerance_used": float("inf"), "passed": False}


def _compare(output: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    if output.shape != reference.shape:
        return dict(_MISMATCH)
    used = tolerance_used(output, reference, atol, rtol)
    return {
        "max_abs": float(np.abs(output - reference).max()) if reference.size else 0.0,
        "max_rel": relative_error(output, reference),
        "tolerance_used": used,
        "passed": used <= 1.0,
    }


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    inputs: Tensor | Mapping[str, Tensor],
    *,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    atol: float = ATOL,
    rtol: float = RTOL,
    threads: int = 2,
) -> VerifyReport:
    """Compare onnxruntime (optimisations disabled, then default) with ``model`` in eval mode, in float32.

    ``inputs`` is a tensor or named tensors (e.g. {"random": ..., "cifar10-test": ...}); each batch size ``b``
    uses its first ``b`` rows (sizes larger than an input set are skipped, with a note). An element passes when
    |ort − torch| ≤ atol + rtol·|torch|.
    """
    was_training = model.training
    model.eval()
    try:
        input_sets = {"random": inputs} if isinstance(inputs, Tensor) else dict(inputs)
        sessions = {level: ort_session(path, level, threads) for level in ORT_LEVELS}
        rows, notes = [], []
        for set_name, data in input_sets.items():
            for batch in batch_sizes:
                if batch > len(data):
                    notes.append(f"{set_name}: only {len(data)} samples, batch {batch} skipped")
                    continue
                x = data[:batch].float()
                with torch.no_grad():
                    expected = _as_outputs(model(x))
                for level, session in sessions.items():
                    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
                    if len(got) != len(expected):
                        mismatch = {"output": f"{len(got)} outputs, torch has {len(expected)}"}
                        rows.append({"setting": level, "inputs": set_name, "batch": batch} | mismatch | _MISMATCH)
                    for meta, out, ref in zip(session.get_outputs(), got, expected):
                        row = {"setting": level, "inputs": set_name, "batch": batch, "output": meta.name}
                        rows.append(row | _compare(out, ref, atol, rtol))
    finally:
        model.train(was_training)
    proto = onnx.load(str(path), load_external_data=False)
    return VerifyReport(
        path=str(path),
        atol=atol,
        rtol=rtol,
        passed=bool(rows) and all(row["passed"] for row in rows),
        rows=rows,
        node_counts=count_nodes(proto),
        dynamic_batch=_is_dynamic_batch(proto),
        notes=notes,
    )
