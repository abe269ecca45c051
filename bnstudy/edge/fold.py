"""Folding BatchNorm into the neighbouring conv or linear layer, exactly and with a report: module-level folds
over the math of :mod:`bnstudy.edge.fold_math`, and the graph pass that finds the pairs by dataflow (torch.fx) and
rewrites the graph. :func:`fold_batchnorm` is the entry point.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from bnstudy.distributed.syncbn import revert_sync_batchnorm
from bnstudy.edge.fold_math import bn_scale_shift, fold_into_input, fold_into_output
from bnstudy.errors import UserError, first_line

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
OUTPUT_FOLDABLE = (*CONVS, *TRANSPOSED_CONVS, nn.Linear)
INPUT_FOLDABLE = (*CONVS, nn.Linear)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


# ------------------------------------------------------------------------------------------------ module level


class ChannelAffine(nn.Module):
    """``x·scale + shift`` along dim 1: an eval-mode BN that has no neighbour to fold into, exported as Mul + Add
    (no BatchNormalization node)."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def batchnorm_problem(bn: _BatchNorm) -> str | None:
    """Why ``bn`` cannot be expressed as a fixed affine map at inference, or None."""
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "track_running_stats=False: it normalises with batch statistics at inference"
    return None


def _scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    return bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)


def _pads_with_zeros(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros" or conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in conv.padding)


def output_fold_problem(layer: nn.Module, bn: _BatchNorm) -> str | None:
    """Why ``bn(layer(x))`` cannot be folded into ``layer``, or None (module attributes only, not dataflow)."""
    if not isinstance(layer, OUTPUT_FOLDABLE):
        return f"its input comes from {type(layer).__name__}, not a conv or linear layer"
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if channels != bn.num_features:
        return f"{type(layer).__name__} has {channels} output channels, BN has {bn.num_features}"
    if parametrize.is_parametrized(layer):
        return f"{type(layer).__name__} has a parametrized weight"
    return None


def input_fold_problem(bn: _BatchNorm, layer: nn.Module) -> str | None:
    """Why ``layer(bn(x))`` cannot be folded into ``layer``, or None (module attributes only, not dataflow)."""
    if isinstance(layer, TRANSPOSED_CONVS):
        return "a transposed conv after it gives border outputs fewer taps, so its shift does not fold exactly"
    if not isinstance(layer, INPUT_FOLDABLE):
        return f"it feeds {type(layer).__name__}, not a conv or linear layer"
    channels = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    if channels != bn.num_features:
        return f"{type(layer).__name__} after it has {channels} input channels, BN has {bn.num_features}"
    if isinstance(layer, CONVS) and _pads_with_zeros(layer):
        return "the conv after it pads with zeros, which BN's shift would have changed"
    if parametrize.is_parametrized(layer):
        return f"{type(layer).__name__} after it has a parametrized weight"
    return None


def _with_weights(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    folded = copy.deepcopy(layer)
    folded.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
    folded.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
    return folded


def fold_layer_bn(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of conv / transposed conv / linear ``layer`` that computes ``bn(layer(x))`` (eval-mode BN)."""
    scale, shift = _scale_shift(bn)
    groups = getattr(layer, "groups", 1)
    transposed = isinstance(layer, TRANSPOSED_CONVS)
    weight, bias = fold_into_output(layer.weight, layer.bias, scale, shift, groups=groups, transposed=transposed)
    return _with_weights(layer, weight, bias)


def fold_bn_layer(bn: _BatchNorm, layer: nn.Module) -> nn.Module:
    """A copy of conv / linear ``layer`` that computes ``layer(bn(x))`` (eval-mode BN; conv without zero padding)."""
    scale, shift = _scale_shift(bn)
    weight, bias = fold_into_input(layer.weight, layer.bias, scale, shift, groups=getattr(layer, "groups", 1))
    return _with_weights(layer, weight, bias)


def batchnorm_to_affine(bn: _BatchNorm) -> ChannelAffine:
    """The eval-mode BN as a :class:`ChannelAffine` in the BN's dtype."""
    scale, shift = _scale_shift(bn)
    return ChannelAffine(scale.to(bn.running_var.dtype), shift.to(bn.running_var.dtype))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters, in place: a freshly built BN is the
    identity in eval mode, which hides any fold bug. Returns the model."""
    with torch.no_grad():
        for bn in model.modules():
            if not isinstance(bn, _BatchNorm) or batchnorm_problem(bn) is not None:
                continue
            c = bn.num_features
            bn.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            if bn.affine:
                bn.weight.copy_(0.5 + torch.rand(c, generator=generator))
                bn.bias.copy_(0.2 * torch.randn(c, generator=generator))
    return model


# ------------------------------------------------------------------------------------------------ graph rewrite


def fold_report_lines(report: Mapping[str, Any]) -> list[str]:
    """A human-readable account of a fold report (:meth:`FoldReport.to_dict` form, as stored in exports), one line
    per BN."""
    sides = Counter(entry["side"] for entry in report["folded"])
    out = [
        f"fold ({report['method']}): {len(report['folded'])} BN folded ({sides['output']} into the layer before, "
        f"{sides['input']} into the layer after), {len(report['affine'])} turned into affine, "
        f"{len(report['kept'])} kept"
    ]
    for entry in report["folded"]:
        if entry["side"] == "input":
            out.append(f"  folded  {entry['bn']} → {entry['layer']}")
        else:
            through = f" (through {entry['through']})" if "through" in entry else ""
            out.append(f"  folded  {entry['layer']} ← {entry['bn']}{through}")
    out += [f"  affine  {entry['bn']}: {entry['reason']}" for entry in report["affine"]]
    out += [f"  kept    {entry['bn']}: {entry['reason']}" for entry in report["kept"]]
    out += [f"  warning {message}" for message in report["warnings"]]
    return out


@dataclass
class FoldReport:
    """What :func:`fold_batchnorm` did with each BN call: folded into a layer, turned into an affine, or kept."""

    method: str = "fx"
    folded: list[dict[str, str]] = field(default_factory=list)
    affine: list[dict[str, str]] = field(default_factory=list)
    kept: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        """A human-readable account, one line per BN."""
        return fold_report_lines(self.to_dict())


@dataclass
class FoldResult:
    """The folded eval-mode module and the report of what was folded."""

    model: nn.Module
    report: FoldReport


class _Tracer(fx.Tracer):
    """Keeps BN subclasses outside ``torch.nn`` (bnstudy's BatchNormXd) and ChannelAffine as single nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (_BatchNorm, ChannelAffine)) or super().is_leaf_module(m, module_qualified_name)


def inference_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with sync BN reverted to plain BN and its BN statistics checked (see
    :func:`check_statistics`); the caller's model is untouched."""
    copy_ = revert_sync_batchnorm(copy.deepcopy(model)).eval()
    check_statistics(copy_)
    return copy_


def check_statistics(model: nn.Module) -> None:
    """Raise a one-line UserError when a BN's running statistics would make folding (or inference) produce NaN."""
    for name, bn in model.named_modules():
        if isinstance(bn, _BatchNorm) and batchnorm_problem(bn) is None:
            if not (torch.isfinite(bn.running_mean).all() and torch.isfinite(bn.running_var).all()):
                raise UserError(f"BatchNorm {name!r} has non-finite running statistics; retrain or recompute them")
            if (bn.running_var + bn.eps <= 0).any():
                raise UserError(f"BatchNorm {name!r} has running_var + eps <= 0; retrain or recompute its statistics")


def _set_module(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


def _node_name(node: object, modules: dict[str, nn.Module]) -> str:
    if not isinstance(node, fx.Node):
        return f"a constant ({type(node).__name__})"
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op in ("placeholder", "output"):
        return f"the model {'input' if node.op == 'placeholder' else 'output'}"
    return getattr(node.target, "__name__", str(node.target))


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _GraphFolder:
    """One pass over an fx graph: output-side folds first, then input-side folds, then the rest become affine."""

    def __init__(self, gm: fx.GraphModule, report: FoldReport, affine_fallback: bool) -> None:
        self.gm = gm
        self.report = report
        self.affine_fallback = affine_fallback
        self.modules = dict(gm.named_modules())
        self.calls: Counter[str] = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self.attribute_reads: Counter[str] = Counter()  # get_attr nodes reading a module's parameters or buffers
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                parts = node.target.split(".")
                self.attribute_reads.update(".".join(parts[:i]) for i in range(1, len(parts)))

    def run(self) -> None:
        pending = []
        for node in list(self.gm.graph.nodes):
            if node.op != "call_module" or not isinstance(self.modules[node.target], _BatchNorm):
                continue
            problem = batchnorm_problem(self.modules[node.target])
            if problem is not None:
                self.report.kept.append({"bn": node.target, "reason": problem})
                continue
            layer, pool, reason = self._output_side(node)
            if reason is None:
                self._fold(node, layer, "output", pool)
            else:
                pending.append((node, reason))
        leftover = []
        for node, reason in pending:
            input_reason = self._input_problem(node)
            if input_reason is None:
                self._fold(node, next(iter(node.users)), "input")
            else:
                leftover.append((node, f"{reason}; {input_reason}"))
        for node, reason in leftover:
            self._keep_or_affine(node, reason)

    def _shared(self, target: str) -> str | None:
        uses = self.calls[target] + self.attribute_reads[target]
        return f"{target!r} is used {uses} times (shared weights)" if uses > 1 else None

    def _output_side(self, node: fx.Node) -> tuple[fx.Node | None, fx.Node | None, str | None]:
        """(layer node, max-pool node between it and the BN or None, why BN cannot fold into it or None).

        Max-pooling commutes with a per-channel affine whose scale is positive, so conv → max-pool → BN folds too.
        """
        src = node.args[0] if node.args else None
        pool = None
        if self._is_call_of(src, MAX_POOLS) and not self.modules[src.target].return_indices and len(src.users) == 1:
            pool, src = src, src.args[0]
        if not self._is_call_of(src, OUTPUT_FOLDABLE):
            return (
                None,
                None,
                f"its input comes from {_node_name(pool or src, self.modules)}, not a conv or linear layer",
            )
        layer, bn = self.modules[src.target], self.modules[node.target]
        problem = output_fold_problem(layer, bn)
        if problem is None and len(src.users) > 1:
            problem = f"the output of {src.target!r} has {len(src.users)} users"
        if problem is None and isinstance(layer, nn.Linear) and _rank(src) not in (None, 2):
            problem = f"{src.target!r} outputs rank-{_rank(src)} tensors, so BN's channel dim is not its feature dim"
        if problem is None and pool is not None and (_scale_shift(bn)[0] <= 0).any():
            problem = f"its scale is not positive in every channel, so it does not commute with {pool.target!r}"
        return src, pool, problem or self._shared(src.target)

    def _is_call_of(self, node: object, kinds: tuple[type, ...]) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(self.modules[node.target], kinds)

    def _input_problem(self, node: fx.Node) -> str | None:
        users = list(node.users)
        if len(users) != 1:
            return f"its output has {len(users)} users"
        user = users[0]
        if user.op != "call_module" or user.args[:1] != (node,) or node in user.args[1:] or user.kwargs:
            return f"it feeds {_node_name(user, self.modules)}, not a conv or linear layer"
        layer, bn = self.modules[user.target], self.modules[node.target]
        problem = input_fold_problem(bn, layer)
        if problem is not None:
            return problem
        if isinstance(layer, nn.Linear) and _rank(node) not in (None, 2):
            return f"it outputs rank-{_rank(node)} tensors, so its channel dim is not {user.target!r}'s feature dim"
        return self._shared(user.target)

    def _fold(self, bn_node: fx.Node, layer_node: fx.Node, side: str, pool: fx.Node | None = None) -> None:
        bn, layer = self.modules[bn_node.target], self.modules[layer_node.target]
        folded = fold_layer_bn(layer, bn) if side == "output" else fold_bn_layer(bn, layer)
        _set_module(self.gm, layer_node.target, folded)
        self.modules[layer_node.target] = folded
        bn_node.replace_all_uses_with(bn_node.args[0])
        self.gm.graph.erase_node(bn_node)
        entry = {"bn": bn_node.target, "layer": layer_node.target, "side": side}
        self.report.folded.append(entry | ({"through": pool.target} if pool is not None else {}))

    def _keep_or_affine(self, node: fx.Node, reason: str) -> None:
        if not self.affine_fallback:
            self.report.kept.append({"bn": node.target, "reason": f"{reason} (kept as BatchNorm on request)"})
            return
        if self.attribute_reads[node.target]:
            self.report.kept.append({"bn": node.target, "reason": f"{reason}; its buffers are read elsewhere"})
            return
        module = self.modules[node.target]
        if isinstance(module, _BatchNorm):  # a BN called at several places is replaced once
            self.modules[node.target] = batchnorm_to_affine(module)
            _set_module(self.gm, node.target, self.modules[node.target])
        self.report.affine.append({"bn": node.target, "reason": reason})


def _fold_graph(
    gm: fx.GraphModule, example_input: Tensor | None, report: FoldReport, affine_fallback: bool
) -> fx.GraphModule:
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    _GraphFolder(gm, report, affine_fallback).run()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fold_sequential(model: nn.Module, report: FoldReport, affine_fallback: bool) -> nn.Module:
    """Adjacent children of nn.Sequential only: inside a Sequential, one child's output is the next one's input."""
    occurrences = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for prefix, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            first, second = seq._modules[a], seq._modules[b]
            if isinstance(second, _BatchNorm) and batchnorm_problem(second) is None and occurrences[id(first)] == 1:
                if output_fold_problem(first, second) is None:
                    seq._modules[a], seq._modules[b] = fold_layer_bn(first, second), nn.Identity()
                    report.folded.append({"bn": _join(prefix, b), "layer": _join(prefix, a), "side": "output"})
                    continue
            if isinstance(first, _BatchNorm) and batchnorm_problem(first) is None and occurrences[id(second)] == 1:
                if input_fold_problem(first, second) is None:
                    seq._modules[a], seq._modules[b] = nn.Identity(), fold_bn_layer(first, second)
                    report.folded.append({"bn": _join(prefix, a), "layer": _join(prefix, b), "side": "input"})
    for prefix, parent in list(model.named_modules()):
        for name, child in parent.named_children():
            if not isinstance(child, _BatchNorm):
                continue
            qualname = _join(prefix, name)
            reason = "not next to a foldable layer inside an nn.Sequential"
            problem = batchnorm_problem(child)
            if problem is not None or not affine_fallback:
                report.kept.append({"bn": qualname, "reason": problem or f"{reason} (kept as BatchNorm on request)"})
            else:
                setattr(parent, name, batchnorm_to_affine(child))
                report.affine.append({"bn": qualname, "reason": reason})
    return model


def fold_batchnorm_with_report(
    model: nn.Module, example_input: Tensor | None = None, *, affine_fallback: bool = True
) -> FoldResult:
    """Fold every foldable BN of ``model`` into its neighbouring conv / linear layer; see :func:`fold_batchnorm`."""
    return fold_inference_copy(inference_copy(model), example_input, affine_fallback=affine_fallback)


def fold_inference_copy(
    copy_: nn.Module, example_input: Tensor | None = None, *, affine_fallback: bool = True
) -> FoldResult:
    """:func:`fold_batchnorm_with_report` on a model :func:`inference_copy` prepared, which it may modify."""
    try:
        graph = _Tracer().trace(copy_)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...) on dynamic code
        message = (
            f"torch.fx cannot trace {type(copy_).__name__} ({type(exc).__name__}: {first_line(exc)}); folded only "
            "adjacent children of nn.Sequential, so dataflow between other modules was not checked"
        )
        warnings.warn(message, stacklevel=2)
        report = FoldReport(method="sequential", warnings=[message])
        return FoldResult(_fold_sequential(copy_, report, affine_fallback).eval(), report)
    report = FoldReport()
    folded = _fold_graph(fx.GraphModule(copy_, graph, type(copy_).__name__), example_input, report, affine_fallback)
    return FoldResult(folded.eval(), report)


def fold_batchnorm(model: nn.Module, example_input: Tensor | None = None, *, affine_fallback: bool = True) -> nn.Module:
    """A new eval-mode module computing the same as ``model.eval()`` with BN folded into conv / linear layers.

    Pairs are found by dataflow (torch.fx). A BN folds into the layer before it when that layer is a conv,
    transposed conv or linear whose output only this BN reads and which is called once; otherwise into the conv
    (without zero padding) or linear after it under the same conditions. The rest become a per-channel affine
    (``affine_fallback=False`` keeps them as BN); BNs with ``track_running_stats=False`` stay. ``example_input``
    lets the rewrite check tensor ranks, so Linear ↔ BatchNorm1d pairs are only folded on (N, C) tensors; without
    it they are assumed to be (N, C). Models torch.fx cannot trace fall back to adjacent nn.Sequential children,
    with a warning. The input model is not modified.
    """
    return fold_batchnorm_with_report(model, example_input, affine_fallback=affine_fallback).model
