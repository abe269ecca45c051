"""Synchronised BatchNorm for any backend.

PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators, and DDP refuses a CPU module that holds one. This
module keeps PyTorch's semantics (count-weighted global statistics, biased variance for normalising, unbiased
for ``running_var``, local weight/bias gradients that DDP averages) and runs them on every device: on CUDA it
calls PyTorch's own sync kernels, elsewhere an autograd Function with one collective in forward and one in
backward, doing the elementwise work with the native batch-norm kernels.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules._functions import SyncBatchNorm as _CudaSyncBatchNormFunction

from bnstudy.distributed.collectives import syncbn_all_reduce, world_group_for_syncbn

__all__ = ["SyncBatchNorm", "BatchNormXd", "convert_sync_batchnorm", "revert_sync_batchnorm"]

_ACCELERATORS = ("cuda", "xpu", "hpu")
_Array = TypeVar("_Array", np.ndarray, Tensor)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def combine_statistics(counts: _Array, means: _Array, variances: _Array) -> tuple[_Array, _Array, _Array]:
    """Merge per-rank (count, mean, biased variance) rows into global ones (Chan et al.'s parallel formula).

    ``counts`` has shape (K,), ``means`` and ``variances`` (K, C); NumPy arrays or tensors alike. Returns the global
    count, mean and biased variance. Combining centred moments avoids the cancellation of E[x²] − E[x]².
    """
    total = counts.sum()
    weights = counts / max(total, 1)
    mean = weights @ means
    deviations = means - mean
    var = weights @ (variances + deviations * deviations)
    return total, mean, var


# The per-channel arithmetic between the big passes runs in NumPy: a few hundred floats, where each torch op's
# dispatch (5-10 µs here) costs more than its work and, summed over ~40 ops a layer, more than the exchanges.
class _CpuSyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        channels = x.shape[1]
        count = x.numel() // channels if channels else 0
        stats_dtype = _statistics_dtype(x)
        # Each rank fills its own row and one all-reduce assembles the table (an all-gather on every backend).
        rows = np.zeros((world_size, 1 + 2 * channels), dtype=_NUMPY_DTYPES[stats_dtype])
        if count > 0:
            row = rows[dist.get_rank(process_group)]
            row[0] = count
            local_mean, local_var = _local_statistics(x, stats_dtype)
            row[1 : 1 + channels] = local_mean.numpy()
            row[1 + channels :] = local_var.numpy()
        syncbn_all_reduce(torch.from_numpy(rows), process_group)
        total, mean, var = combine_statistics(rows[:, 0], rows[:, 1 : 1 + channels], rows[:, 1 + channels :])
        total = int(total)
        if total <= 1:
            raise ValueError(
                f"SyncBatchNorm needs more than 1 value per channel across all ranks when training, got {total}"
            )
        if running_mean is not None:
            _update_running(running_mean, mean, momentum)
            _update_running(running_var, var * (total / (total - 1)), momentum)
        mean_t = torch.from_numpy(mean)
        # Eval-mode native batch norm normalises with given statistics in one elementwise pass.
        out = torch.batch_norm(x, weight, bias, mean_t, torch.from_numpy(var), False, 0.0, eps, False)
        ctx.save_for_backward(x, weight)
        ctx.mean, ctx.invstd = mean, 1 / np.sqrt(var + eps)
        ctx.mean_t = mean_t
        ctx.total = total
        ctx.eps = eps
        ctx.process_group = process_group
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mean, invstd, mean_t = ctx.mean, ctx.invstd, ctx.mean_t
        grad_out = grad_out.contiguous(memory_format=_memory_format(x))
        channels = x.shape[1]
        if x.numel() > 0:
            _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, weight, None, None, mean_t, torch.from_numpy(invstd), True, ctx.eps, [False, True, True]
            )
        else:
            grad_weight, grad_bias = torch.zeros_like(mean_t), torch.zeros_like(mean_t)
        # .to(dtype) is the tensor itself unless it is reduced precision (bf16 gradients of an affine=False layer).
        sums = torch.cat([grad_bias, grad_weight]).to(mean_t.dtype)
        syncbn_all_reduce(sums, ctx.process_group)
        sum_dy, sum_dy_xhat = sums.numpy()[:channels], sums.numpy()[channels:]
        scale = invstd if weight is None else weight.detach().to(mean_t.dtype).numpy() * invstd
        # dx = scale * (dy - sum_dy/N - xhat * sum_dy_xhat/N) = scale*dy + k_x*x + k_0, two elementwise passes
        k_x = -scale * invstd * sum_dy_xhat / ctx.total
        k_0 = -scale * sum_dy / ctx.total - k_x * mean
        shape = (1, channels) + (1,) * (x.dim() - 2)
        grad_in = torch.addcmul(torch.from_numpy(k_0.reshape(shape)), x, torch.from_numpy(k_x.reshape(shape)))
        grad_in.addcmul_(grad_out, torch.from_numpy(scale.reshape(shape)))
        grad_in = grad_in.to(x.dtype)  # computed in the statistics dtype, rounded once for bf16 input
        if weight is None:
            return grad_in, None, None, None, None, None, None, None, None
        return grad_in, grad_weight, grad_bias, None, None, None, None, None, None


def _local_statistics(x: Tensor, stats_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """This rank's per-channel mean and biased variance, in ``stats_dtype``, with one statistics-only pass.

    For bf16/fp16 input under autocast the statistics stay fp32, as nn.BatchNorm keeps them: the native kernel
    reduces in the dtype of the running buffers it is handed (momentum 0 leaves those scratch buffers as they are).
    """
    if x.dtype == stats_dtype:
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    channels = x.shape[1]
    return torch.batch_norm_update_stats(
        x, torch.zeros(channels, dtype=stats_dtype), torch.ones(channels, dtype=stats_dtype), 0.0
    )


def _update_running(running: Tensor, batch: np.ndarray, momentum: float) -> None:
    """running ← (1 − momentum)·running + momentum·batch, in NumPy where the buffer is CPU float32/float64."""
    if running.is_cpu and _NUMPY_DTYPES.get(running.dtype) is batch.dtype.type:
        values = running.numpy()
        values *= 1 - momentum
        values += momentum * batch
    else:
        with torch.no_grad():
            running.mul_(1 - momentum).add_(torch.from_numpy(batch).to(running.device), alpha=momentum)


def _statistics_dtype(x: Tensor) -> torch.dtype:
    """float32 for reduced-precision input, else the input's own dtype (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


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

        world_size = self._sync_world_size()
        if world_size <= 1:
            return nn.functional.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, use_batch_stats, factor, self.eps
            )
        group = self.process_group or world_group_for_syncbn()
        function = _CudaSyncBatchNormFunction if input.device.type in _ACCELERATORS else _CpuSyncBatchNormFunction
        return function.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group, world_size
        )

    def _sync_world_size(self) -> int:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)


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
