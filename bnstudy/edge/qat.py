"""Quantisation-aware training modules with BN folded: :class:`FoldedConvBn` (conv → BN as one fake-quantised
conv), :class:`ActivationFakeQuant` (EMA min/max observer, then uint8 fake quantisation), :func:`prepare_qat` (rewrites
a trained bnstudy image model into that form) and :func:`freeze_bn_statistics`. The math is
:mod:`bnstudy.edge.qat_math`'s.

Why bnstudy's own modules rather than torch.ao's ``prepare_qat_fx`` / ``torch.ao.nn.intrinsic.qat.ConvBn2d``:

- the shipped INT8 model must be written by bnstudy anyway: both ONNX exporters of torch 2.14 refuse a 7-bit fake
  quantisation range ("ONNX allows only (0, 127), (0, 255) and (-128, 127)"), and 7 bits are what onnxruntime needs
  on CPUs without VNNI (see :mod:`bnstudy.edge.qat_math`);
- the fold must be the one export uses (:mod:`bnstudy.edge.fold_math`), and the BN inside any ``_BatchNorm``: here
  the module calls its BN for the batch statistics, so bnstudy's CPU :class:`~bnstudy.distributed.syncbn
  .SyncBatchNorm` synchronises them under DDP with no further code (``ConvBn2d`` builds its own ``nn.BatchNorm2d``);
- torch.ao.quantization is deprecated in favour of torchao's PT2E flow, a package bnstudy does not depend on.

The rewrite works on modules, not on a torch.fx graph: bnstudy's image models build every conv → BN (→ activation)
inside ``nn.Sequential``, and a module tree keeps what training needs (DDP, SyncBN conversion, state dicts).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnstudy.edge.fold_math import bn_scale_shift, fold_into_output
from bnstudy.edge.qat_math import (
    ACTIVATION_RANGE,
    WEIGHT_RANGE,
    affine_activation_qparams,
    fake_quantize_activation,
    fake_quantize_weight,
    fold_conv_bn,
    symmetric_weight_scale,
    training_fold_scale,
)
from bnstudy.errors import UserError
from bnstudy.models import Residual

QUANTISED_OUTPUTS = (nn.ReLU, nn.GELU, Residual)  # modules whose output is fake-quantised (inputs of the next conv)
OBSERVER_MOMENTUM = 0.01  # EMA weight of a new batch's min/max (torch.ao's MovingAverageMinMaxObserver default)


class FoldedConvBn(nn.Module):
    """``BN(pool(conv(x)))`` as the conv that ships: fake-quantised folded weights and the folded bias.

    Eval mode, or training after :func:`freeze_bn_statistics`: ``pool(conv(x, q(W·γ/σ_r)) + b_r)``, the running
    statistics folded exactly as :func:`bnstudy.edge.fold.fold_layer_bn` folds them. Training: the BN normalises
    ``conv(x, q(W·γ/σ_r)) / (γ/σ_r)`` (k = γ/σ_r taken as 1 where γ = 0: :func:`bnstudy.edge.qat_math
    .training_fold_scale`) with its batch statistics (updating its running statistics; a SyncBatchNorm
    synchronises them across ranks), which is Krishnamoorthi's ``conv(x, q(W·γ/σ_r))·σ_r/σ_B + β − γ·μ_B/σ_B``
    (:func:`bnstudy.edge.qat_math.batch_corrected_output`) with the batch statistics of the rounded conv, so one conv
    serves both. ``pool`` is an optional max-pool between conv and BN; it commutes with the fold only where γ/σ > 0,
    which :func:`prepare_qat` checks. ``fake_quant`` False leaves the folded weights unrounded.

    ``simulate_fold`` False is QAT *without* folding, the variant the qat-fold study compares: training rounds the
    conv's own weights per output channel and runs the BN after it as a separate layer (batch statistics, no
    correction); eval and export fold first, as above, so it ships the same way.
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: _BatchNorm,
        pool: nn.Module | None = None,
        weight_range: tuple[int, int] = WEIGHT_RANGE,
        simulate_fold: bool = True,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.pool = pool if pool is not None else nn.Identity()
        self.weight_range = weight_range
        self.simulate_fold = simulate_fold
        self.fake_quant = True
        self.register_buffer("frozen", torch.tensor(False))

    def folded_weight_bias(self) -> tuple[Tensor, Tensor]:
        """The running-statistics fold of conv and BN, unrounded (differentiable in W, γ and β)."""
        bn = self.bn
        return fold_conv_bn(
            self.conv.weight, self.conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        )

    def weight_scale(self, folded_weight: Tensor) -> Tensor:
        """The per-output-channel scale of the shipped int8 weights."""
        return symmetric_weight_scale(folded_weight, *self.weight_range)

    def quantized_weight_bias(self) -> tuple[Tensor, Tensor]:
        """The folded weight, fake-quantised unless ``fake_quant`` is off, and the folded bias."""
        weight, bias = self.folded_weight_bias()
        return self.rounded(weight), bias

    def rounded(self, weight: Tensor) -> Tensor:
        """``weight`` on its per-output-channel int8 grid (as is when ``fake_quant`` is off)."""
        if not self.fake_quant:
            return weight
        return fake_quantize_weight(weight, self.weight_scale(weight), *self.weight_range)

    def forward(self, x: Tensor) -> Tensor:
        if not self.simulate_fold and self.training and not self.frozen:
            return self.bn(self.pool(self.conv._conv_forward(x, self.rounded(self.conv.weight), self.conv.bias)))
        if not self.training or self.frozen:
            weight, bias = self.quantized_weight_bias()
            return self.pool(self.conv._conv_forward(x, weight, bias))
        bn = self.bn
        running_scale, _ = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, None, bn.eps)
        scale = training_fold_scale(running_scale)
        weight, _ = fold_into_output(self.conv.weight, None, scale, torch.zeros_like(scale))
        shape = (1, -1, 1, 1)
        y = self.conv._conv_forward(x, self.rounded(weight), None) / scale.to(x.dtype).view(shape)
        if self.conv.bias is not None:
            y = y + self.conv.bias.view(shape)
        return self.bn(self.pool(y))


def _all_reduce_max(value: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, dist.ReduceOp.MAX)
    return value


class ActivationFakeQuant(nn.Module):
    """Per-tensor uint8 fake quantisation with an EMA min/max observer (in training mode, across all ranks of the
    default process group, so every rank holds the same quantisation parameters)."""

    def __init__(self, momentum: float = OBSERVER_MOMENTUM) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("min_val", torch.tensor(0.0))
        self.register_buffer("max_val", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(0, dtype=torch.long))

    def qparams(self) -> tuple[Tensor, Tensor]:
        """(scale, zero point) of the current range."""
        return affine_activation_qparams(self.min_val, self.max_val, *ACTIVATION_RANGE)

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        low, high = x.detach().aminmax()
        negated_low, high = _all_reduce_max(torch.stack([-low, high]).float())  # min and max in one collective
        weight = 1.0 if self.observed == 0 else self.momentum
        self.min_val.lerp_(-negated_low, weight)
        self.max_val.lerp_(high, weight)
        self.observed += 1

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._observe(x)
        elif self.observed == 0:
            raise UserError("an activation quantiser has observed no data; run the QAT model in training mode first")
        return fake_quantize_activation(x, *self.qparams(), *ACTIVATION_RANGE)


def freeze_bn_statistics(model: nn.Module) -> nn.Module:
    """Stop every :class:`FoldedConvBn` of ``model`` from updating its BN's running statistics: from now on it
    normalises with them in training too, as the shipped model does (Jacob et al. §3.2). Returns the model."""
    for module in model.modules():
        if isinstance(module, FoldedConvBn):
            module.frozen.fill_(True)
    return model


def _positive_scale(bn: _BatchNorm) -> bool:
    scale, _ = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, None, bn.eps)
    return bool((scale > 0).all())


def _fold_run(children: list[nn.Module], start: int, options: dict) -> tuple[nn.Module, int] | None:
    """(FoldedConvBn, children consumed) for conv → BN or conv → max-pool → BN at ``start``, or None; ``options``
    go to FoldedConvBn."""
    conv = children[start]
    if type(conv) is not nn.Conv2d:
        return None
    rest = children[start + 1 : start + 3]
    if rest and isinstance(rest[0], _BatchNorm) and rest[0].num_features == conv.out_channels:
        return FoldedConvBn(conv, rest[0], **options), 2
    if len(rest) == 2 and isinstance(rest[0], nn.MaxPool2d) and isinstance(rest[1], _BatchNorm):
        pool, bn = rest
        if bn.num_features == conv.out_channels and not pool.return_indices:
            if not _positive_scale(bn):
                raise UserError("a BatchNorm after conv → max-pool has γ/σ ≤ 0 in some channel, so it cannot be folded")
            return FoldedConvBn(conv, bn, pool, **options), 3
    return None


def _rewrite(module: nn.Module, options: dict) -> int:
    """Rewrite ``module``'s Sequential descendants in place; returns the number of folded pairs."""
    folded = 0
    for child in module.children():
        folded += _rewrite(child, options)
    if not isinstance(module, nn.Sequential):
        return folded
    children, out, i = list(module), [], 0
    while i < len(children):
        run = _fold_run(children, i, options)
        if run is not None:
            out.append(run[0])
            folded += 1
            i += run[1]
            if i == len(children) or not isinstance(children[i], nn.ReLU):
                out.append(ActivationFakeQuant())  # onnxruntime runs an INT8 conv only when its output is quantised
            continue
        out.append(children[i])
        if isinstance(children[i], QUANTISED_OUTPUTS):
            out.append(ActivationFakeQuant())
        i += 1
    module._modules = OrderedDict((str(k), m) for k, m in enumerate(out))
    return folded


def prepare_qat(
    model: nn.Module, weight_range: tuple[int, int] = WEIGHT_RANGE, simulate_fold: bool = True
) -> nn.Sequential:
    """A QAT copy of a trained fp32 image model: every conv → BN (or conv → max-pool → BN) inside an nn.Sequential
    becomes a :class:`FoldedConvBn`; the model input, the output of every ReLU, GELU and residual block, and that of
    every folded conv not followed by a ReLU (whose quantiser covers it: its zero point is 0) get an
    :class:`ActivationFakeQuant`, so every conv reads and writes quantised tensors, as onnxruntime's QLinearConv
    does. ``simulate_fold`` False trains without the fold (see :class:`FoldedConvBn`). Returns
    ``Sequential(input_quant, model)`` in training mode; ``model`` is untouched. Raises a one-line
    UserError when there is no BN to fold or a BN is left unfolded.
    """
    copy_ = copy.deepcopy(model)
    folded = _rewrite(copy_, {"weight_range": weight_range, "simulate_fold": simulate_fold})
    inside = {id(m.bn) for m in copy_.modules() if isinstance(m, FoldedConvBn)}
    left = [name for name, m in copy_.named_modules() if isinstance(m, _BatchNorm) and id(m) not in inside]
    if folded == 0:
        raise UserError(f"{type(model).__name__} has no conv → BatchNorm to fold; QAT needs a model with BN or SyncBN")
    if left:
        raise UserError(f"BatchNorm {left[0]!r} does not follow a Conv2d in an nn.Sequential, so it cannot be folded")
    return nn.Sequential(OrderedDict(input_quant=ActivationFakeQuant(), model=copy_)).train()
