"""Synchronised BatchNorm for any backend.

PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators, and DDP refuses a CPU module that holds one. This
module keeps PyTorch's semantics (count-weighted global statistics, biased variance for normalising, unbiased
for ``running_var``, local weight/bias gradients that DDP averages) and runs them on every device: on CUDA it
calls PyTorch's own sync kernels, elsewhere one autograd op (compiled, or an autograd Function over the reference
arithmetic) with one collective in forward and one in backward, doing the elementwise work with the native
batch-norm kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules._functions import SyncBatchNorm as _CudaSyncBatchNormFunction

from bnstudy.distributed import syncbn_math
from bnstudy.distributed.collectives import syncbn_exchange, world_group_for_syncbn
from bnstudy.distributed.process_group import at_shutdown
from bnstudy.distributed.syncbn_kernels import cpu_kernels

__all__ = ["SyncBatchNorm", "BatchNormXd", "convert_sync_batchnorm", "revert_sync_batchnorm"]

_ACCELERATORS = ("cuda", "xpu", "hpu")


class _CpuSyncBatchNormFunction(torch.autograd.Function):
    """Sync BN on CPU from Python, for the reference build: :mod:`bnstudy.distributed.syncbn_math`'s functions with
    one exchange in forward (the statistics table) and one in backward (the gradient sums). The compiled build does
    the same as one autograd op (``sync_batch_norm`` in ``csrc/syncbn_cpu.cpp``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, rank, world_size, exchange):
        rows = syncbn_math.statistics_table(x, rank, world_size)
        exchange(rows)
        out, mean, invstd, total = syncbn_math.normalise(
            rows, x, weight, bias, running_mean, running_var, eps, momentum
        )
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.total, ctx.eps, ctx.exchange = total, eps, exchange
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd = ctx.saved_tensors
        sums, grad_weight, grad_bias, dy = syncbn_math.gradient_sums(grad_out, x, weight, mean, invstd, ctx.eps)
        ctx.exchange(sums)
        grad_in = syncbn_math.input_gradient(dy, x, weight, mean, invstd, sums, ctx.total)
        if weight is None:
            return grad_in, None, None, None, None, None, None, None, None, None
        return grad_in, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks of ``process_group``, on CPU (gloo) and CUDA (nccl).

    Without an initialised process group, with world size 1, or in eval mode it is exactly ``nn.BatchNorm*d``
    and issues no collective. ``dim`` (1, 2 or 3) only records which plain BN class ``revert_sync_batchnorm``
    should restore.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        *,
        dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.dim = dim

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in (2, 3, 4, 5):
            raise ValueError(f"SyncBatchNorm expects 2D to 5D input (N, C, ...), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None

        if self.training and dist.is_available() and dist.is_initialized():
            if input.is_cpu or input.device.type not in _ACCELERATORS:
                sync = _cpu_sync(self.process_group)
                if sync.world_size > 1:
                    return sync.apply(
                        input,
                        self.weight,
                        self.bias,
                        running_mean,
                        running_var,
                        self.eps,
                        factor,
                        sync.rank,
                        sync.world_size,
                        sync.exchange,
                    )
            elif (world_size := dist.get_world_size(self.process_group)) > 1:
                group = self.process_group or world_group_for_syncbn()
                return _CudaSyncBatchNormFunction.apply(
                    input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, world_size
                )
        return nn.functional.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
        )


class _CpuSync(NamedTuple):
    """How a CPU sync BN layer syncs over one group: the layer op of the chosen build, this rank, the group's size
    and its exchange (op and exchange None in a group of one, where the layer is plain BN)."""

    apply: Callable[..., Tensor] | None
    rank: int
    world_size: int
    exchange: Callable[[Tensor], object] | None


_cpu_syncs: dict[dist.ProcessGroup, _CpuSync] = {}
at_shutdown(_cpu_syncs.clear)


def _cpu_sync(process_group: dist.ProcessGroup | None) -> _CpuSync:
    """:class:`_CpuSync` for ``process_group`` (None: all ranks), looked up on the group's first training step and
    kept: looked up on every call, it cost about 10 µs of a layer's forward (61 µs against plain BN's 43 at
    (2, 16, 32, 32)). Keyed by the group object, so a default group made again after the first was destroyed gets
    its own."""
    key = process_group or dist.group.WORLD
    sync = _cpu_syncs.get(key)
    if sync is None:
        world_size = dist.get_world_size(process_group)
        if world_size <= 1:
            sync = _CpuSync(None, 0, world_size, None)
        else:
            group = process_group or world_group_for_syncbn()
            kernels = cpu_kernels()
            apply = kernels.functions.sync_batch_norm if kernels.name == "compiled" else _CpuSyncBatchNormFunction.apply
            sync = _CpuSync(apply, dist.get_rank(group), world_size, syncbn_exchange(group))
        _cpu_syncs[key] = sync
    return sync


class BatchNormXd(nn.modules.batchnorm._BatchNorm):
    """Plain BatchNorm for any input rank: what a ``SyncBatchNorm`` of unknown dimensionality reverts to."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNorm expects at least 2D input (N, C, ...), got {input.dim()}D")


_PLAIN_BY_DIM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DIM_OF_PLAIN = {cls: dim for dim, cls in _PLAIN_BY_DIM.items()}


def _copy_state(source: nn.modules.batchnorm._BatchNorm, target: nn.modules.batchnorm._BatchNorm) -> None:
    if source.affine:
        target.weight = source.weight
        target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.train(source.training)


def _replace(module: nn.Module, convert) -> nn.Module:
    replacement = convert(module)
    if replacement is not None:
        return replacement
    for name, child in module.named_children():
        new_child = _replace(child, convert)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by :class:`SyncBatchNorm`, sharing its parameters
    and buffers (so ``requires_grad`` and ``num_batches_tracked`` carry over). Returns the module."""

    def convert(child: nn.Module) -> nn.Module | None:
        if type(child) not in _DIM_OF_PLAIN and not isinstance(child, nn.SyncBatchNorm):
            return None
        sync = SyncBatchNorm(
            child.num_features,
            child.eps,
            child.momentum,
            child.affine,
            child.track_running_stats,
            process_group,
            dim=_DIM_OF_PLAIN.get(type(child)),
        )
        _copy_state(child, sync)
        return sync

    return _replace(module, convert)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`SyncBatchNorm` (ours or PyTorch's) back into plain BatchNorm, e.g. before export.
    Returns the module."""

    def convert(child: nn.Module) -> nn.Module | None:
        if not isinstance(child, (SyncBatchNorm, nn.SyncBatchNorm)):
            return None
        cls = _PLAIN_BY_DIM.get(getattr(child, "dim", None), BatchNormXd)
        plain = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
        _copy_state(child, plain)
        return plain

    return _replace(module, convert)
