"""The INT8 ONNX model a QAT model ships as, and its parity with the torch fake-quant model.

:func:`export_qat_onnx` writes the QDQ form onnxruntime fuses into its integer kernels (QLinearConv, the same kind
of file deploy/quantize.py writes): each folded conv's weights as an int8 initializer with per-output-channel
DequantizeLinear, its bias as int32 at scale s_input·s_weight, and a QuantizeLinear → DequantizeLinear pair wherever
the model fake-quantises an activation. The graph is written from the modules :func:`bnstudy.edge.qat.prepare_qat`
produces rather than by torch.onnx, since both of its exporters refuse the 7-bit weight range (see
:mod:`bnstudy.edge.qat`); the quantisation parameters are therefore the torch model's own, bit for bit.

:func:`qat_parity` runs the file in onnxruntime (default optimisations, i.e. the INT8 kernels) against the torch
model in eval mode.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from bnstudy.edge.fold import FoldReport
from bnstudy.edge.onnx_export import INPUT_NAME, METADATA_PREFIX, count_nodes, deployment_metadata, ort_session
from bnstudy.edge.qat import ActivationFakeQuant, FoldedConvBn, prepare_qat
from bnstudy.errors import UserError, first_line
from bnstudy.io import atomic_write
from bnstudy.models import CifarResNet, Residual
from bnstudy.training.checkpoint import load_checkpoint, model_from_checkpoint

OPSET = 20  # the first with Gelu (CifarResNet's activation)
OUTPUT_NAME = "output"
PARITY_BATCH = 250


class _GraphWriter:
    """Emits ONNX nodes for a QAT module tree, tracking the activation scale of the tensor being built (known right
    after a QuantizeLinear → DequantizeLinear pair, needed for the int32 bias of the conv that reads it)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.names: Counter[str] = Counter()
        self.report = FoldReport(method="qat")

    def fresh(self, prefix: str) -> str:
        self.names[prefix] += 1
        return f"{prefix}_{self.names[prefix]}"

    def constant(self, prefix: str, value: np.ndarray) -> str:
        name = self.fresh(prefix)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        output = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def emit(self, module: nn.Module, x: str, scale: float | None, name: str) -> tuple[str, float | None]:
        """The output of ``module`` applied to tensor ``x`` and that output's activation scale (None: not on a grid)."""
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            quantised_pools = [
                i
                for i, (_, child) in enumerate(children[:-1])
                if isinstance(child, FoldedConvBn) and isinstance(children[i + 1][1], ActivationFakeQuant)
            ]
            for i, (child_name, child) in enumerate(children):
                path = f"{name}.{child_name}" if name else child_name
                if i in quantised_pools:
                    x, scale = self.conv_quantised_before_pool(child, children[i + 1][1], x, scale, path)
                elif i - 1 not in quantised_pools:
                    x, scale = self.emit(child, x, scale, path)
            return x, scale
        if isinstance(module, nn.Identity):
            return x, scale
        if isinstance(module, ActivationFakeQuant):
            return self.activation(module, x)
        if isinstance(module, FoldedConvBn):
            return self.emit(module.pool, self.conv(module, x, scale, name), None, f"{name}.pool")
        if isinstance(module, Residual):
            return self.node("Add", [x, self.emit(module.body, x, scale, f"{name}.body")[0]]), None
        if isinstance(module, CifarResNet):
            x, _ = self.emit(nn.Sequential(module.stem, module.stages, module.pool), x, scale, name)
            return self.emit(module.head, self.node("Flatten", [x], axis=1), None, f"{name}.head")
        return self.plain(module, x, name), None

    def conv_quantised_before_pool(
        self, module: FoldedConvBn, quantiser: ActivationFakeQuant, x: str, scale: float | None, name: str
    ) -> tuple[str, float]:
        """``quantiser(module(x))`` with the quantiser applied to the conv output and again after the pool, which
        changes nothing (max-pooling commutes with rounding, a monotone map) but lets onnxruntime fuse Conv → Q into
        QLinearConv and run the max-pool on uint8."""
        x, out_scale = self.activation(quantiser, self.conv(module, x, scale, name))
        if isinstance(module.pool, nn.Identity):
            return x, out_scale
        return self.activation(quantiser, self.emit(module.pool, x, out_scale, f"{name}.pool")[0])

    def activation(self, module: ActivationFakeQuant, x: str) -> tuple[str, float]:
        scale, zero_point = module.qparams()
        scale_name = self.constant("act_scale", scale.numpy().astype(np.float32))
        zero_name = self.constant("act_zero_point", zero_point.numpy().astype(np.uint8))
        quantised = self.node("QuantizeLinear", [x, scale_name, zero_name])
        return self.node("DequantizeLinear", [quantised, scale_name, zero_name]), float(scale)

    def conv(self, module: FoldedConvBn, x: str, input_scale: float | None, name: str) -> str:
        conv = module.conv
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UserError(f"conv {name!r}: only numeric zero padding can be written to ONNX QDQ")
        weight, bias = (t.detach().float() for t in module.quantized_weight_bias())
        scale = module.weight_scale(weight)
        levels = torch.round(weight / scale.view(-1, 1, 1, 1)).to(torch.int8)
        channels = len(scale)
        weight_q = self.constant("weight_int8", levels.numpy())
        weight_scale = self.constant("weight_scale", scale.numpy())
        weight_zero = self.constant("weight_zero_point", np.zeros(channels, np.int8))
        inputs = [x, self.node("DequantizeLinear", [weight_q, weight_scale, weight_zero], axis=0)]
        if input_scale is None:
            inputs.append(self.constant("bias", bias.numpy()))
        else:  # what onnxruntime's QLinearConv takes: int32 at the accumulator's scale
            bias_scale = scale.double() * input_scale
            bias_levels = torch.round(bias.double() / bias_scale)
            if bias_levels.abs().max() > torch.iinfo(torch.int32).max:  # a cast would wrap it silently
                raise UserError(
                    f"conv {name!r}: its folded bias is over 2^31 steps of s_input·s_weight, beyond int32; "
                    "its BN shift is far larger than what the layer's input and weights can express"
                )
            bias_levels = bias_levels.to(torch.int32).numpy()
            dequantised = [
                self.constant("bias_int32", bias_levels),
                self.constant("bias_scale", bias_scale.float().numpy()),
                self.constant("bias_zero_point", np.zeros(channels, np.int32)),
            ]
            inputs.append(self.node("DequantizeLinear", dequantised, axis=0))
        pads = list(conv.padding) * 2
        entry = {"bn": f"{name}.bn", "layer": f"{name}.conv", "side": "output"}
        if isinstance(module.pool, nn.MaxPool2d):
            entry["through"] = f"{name}.pool"
        self.report.folded.append(entry)
        return self.node(
            "Conv",
            inputs,
            kernel_shape=list(conv.kernel_size),
            strides=list(conv.stride),
            pads=pads,
            dilations=list(conv.dilation),
            group=conv.groups,
        )

    def plain(self, module: nn.Module, x: str, name: str) -> str:
        """A float op: activation, pooling, flatten, linear head."""
        if isinstance(module, nn.ReLU):
            return self.node("Relu", [x])
        if isinstance(module, nn.GELU):
            return self.node("Gelu", [x], approximate=module.approximate)
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            kernel, stride, padding, dilation = (
                list(v) if isinstance(v, tuple) else [v, v]
                for v in (module.kernel_size, module.stride, module.padding, module.dilation)
            )
            return self.node(
                "MaxPool",
                [x],
                kernel_shape=kernel,
                strides=stride,
                pads=padding * 2,
                dilations=dilation,
                ceil_mode=int(module.ceil_mode),
            )
        global_pools = {nn.AdaptiveAvgPool2d: "GlobalAveragePool", nn.AdaptiveMaxPool2d: "GlobalMaxPool"}
        if type(module) in global_pools and module.output_size in (1, (1, 1)):
            return self.node(global_pools[type(module)], [x])
        if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
            return self.node("Flatten", [x], axis=1)
        if isinstance(module, nn.Linear):
            weight = self.constant("linear_weight", module.weight.detach().float().numpy())
            inputs = [x, weight]
            if module.bias is not None:
                inputs.append(self.constant("linear_bias", module.bias.detach().float().numpy()))
            return self.node("Gemm", inputs, transB=1)
        raise UserError(
            f"{type(module).__name__} {name!r} cannot be written to ONNX QDQ; prepare the model with "
            "prepare_qat from a bnstudy image model (seed-cnn, resnet)"
        )


def qat_onnx_model(
    model: nn.Module, input_shape: tuple[int, ...], config: Mapping[str, Any] | None = None
) -> onnx.ModelProto:
    """The QDQ ONNX model of ``model`` (a :func:`~bnstudy.edge.qat.prepare_qat` result, used in eval mode) for
    inputs of shape (batch, *input_shape), with bnstudy's deployment metadata plus ``bnstudy.quantization``."""
    writer = _GraphWriter()
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            output, _ = writer.emit(model, INPUT_NAME, None, "")
            classes = model(torch.zeros(2, *input_shape)).shape[1]
        finally:
            model.train(was_training)
    writer.nodes.append(helper.make_node("Identity", [output], [OUTPUT_NAME], name="output_identity"))
    graph = helper.make_graph(
        writer.nodes,
        "bnstudy_qat",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
        writer.initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bnstudy")
    metadata = deployment_metadata(config, writer.report.to_dict(), input_shape, [OUTPUT_NAME])
    weight_ranges = {tuple(m.weight_range) for m in model.modules() if isinstance(m, FoldedConvBn)}
    metadata[METADATA_PREFIX + "quantization"] = json.dumps(
        {
            "format": "QDQ",
            "method": "quantisation-aware training, BN folded",
            "weights": f"int8 symmetric per output channel, levels {sorted(weight_ranges)}",
            "activations": "uint8 asymmetric, per tensor (EMA min/max)",
        }
    )
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    return proto


def export_qat_onnx(
    model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], config: Mapping[str, Any] | None = None
) -> Path:
    """Write :func:`qat_onnx_model` to ``path`` after ``onnx.checker``'s full check; returns the path."""
    proto = qat_onnx_model(model, tuple(input_shape), config)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the QDQ ONNX graph is invalid ({first_line(exc)})") from None
    return atomic_write(path, lambda tmp: onnx.save(proto, str(tmp)))


def qat_model_from_checkpoint(source: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The eval-mode QAT model of a run trained with ``--qat-from`` (a run directory or checkpoint), and its config."""
    if not load_checkpoint(source)["config"].get("qat_from"):
        raise UserError(f"{source}: not a QAT run (trained without --qat-from); deploy/quantize.py quantises it")
    return model_from_checkpoint(source, prepare=prepare_qat)


def runtime_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """Node counts of the graph onnxruntime runs after its default optimisations (QDQ → QLinearConv fusion)."""
    with tempfile.TemporaryDirectory(prefix="bnstudy-qat-opt.") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        ort_session(path, "default", optimized_model_path=optimized)
        return count_nodes(optimized)


@dataclass
class QatParity:
    """onnxruntime INT8 against the torch fake-quant model on the same images."""

    images: int
    top1_agreement: float
    max_logit_error: float
    logit_error_bound: float
    runtime_ops: dict[str, int]

    def to_dict(self) -> dict:
        return asdict(self)


def logit_error_bound(model: nn.Module) -> float:
    """One quantisation step of the last activation quantiser, carried to the logits through the linear head:
    step·max_k ‖W_k‖₁.

    onnxruntime requantises each conv's int32 accumulator to uint8 with its own rounding, so an activation can land
    one level away from the torch fake-quant value; if every input of the head moved by one step in the worst
    direction, logit k would move by step·‖W_k‖₁. Global pooling averages the last activations, so it does not
    enlarge the step. A larger error means more than rounding differs.
    """
    quantisers = [m for m in model.modules() if isinstance(m, ActivationFakeQuant)]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not quantisers or len(heads) != 1:
        raise UserError("the logit-error bound needs a QAT model with activation quantisers and one linear head")
    step = float(quantisers[-1].qparams()[0])
    return step * float(heads[0].weight.detach().abs().sum(1).max())


def qat_parity(path: str | os.PathLike, model: nn.Module, images: Tensor, threads: int = 2) -> QatParity:
    """Run the ONNX file in onnxruntime (default optimisations: the INT8 kernels) and ``model`` in eval mode on
    ``images`` (model input, float32): top-1 agreement, largest logit difference, its bound and the ops
    onnxruntime runs."""
    session = ort_session(path, "default", threads)
    was_training = model.training
    model.eval()
    got, expected = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(images), PARITY_BATCH):
                batch = images[start : start + PARITY_BATCH].float()
                expected.append(model(batch).numpy())
                got.append(session.run(None, {INPUT_NAME: batch.numpy()})[0])
    finally:
        model.train(was_training)
    ort_logits, torch_logits = np.concatenate(got), np.concatenate(expected)
    return QatParity(
        images=len(images),
        top1_agreement=float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean()),
        max_logit_error=float(np.abs(ort_logits - torch_logits).max()),
        logit_error_bound=logit_error_bound(model),
        runtime_ops=runtime_op_counts(path),
    )
