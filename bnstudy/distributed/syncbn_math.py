"""CPU sync BN's per-layer arithmetic around its two exchanges: the reference implementation.

Four functions make one training step of a layer, with an all-reduce (sum over ranks) after the first of each pair:

- forward: :func:`statistics_table`, then :func:`normalise` on the summed table;
- backward: :func:`gradient_sums`, then :func:`input_gradient` on the summed sums.

``csrc/syncbn_cpu.cpp`` compiles the same four functions, formulas and order of operations
(:mod:`bnstudy.distributed.syncbn_kernels` chooses between the two). The big passes over the activations are
PyTorch's native batch-norm kernels in both; the per-channel arithmetic in between runs in NumPy here, since a torch
op's dispatch costs more than its work on a few hundred floats. Statistics are float32 for reduced-precision input
(as nn.BatchNorm keeps them under autocast), else the input's own dtype.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["combine_statistics", "gradient_sums", "input_gradient", "normalise", "statistics_table"]

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


def statistics_table(x: Tensor, rank: int, world_size: int) -> Tensor:
    """A (world_size, 1 + 2C) table, zero but for this rank's row: its count, per-channel mean and biased
    variance. Summed over ranks it holds every rank's row (an all-gather through an all-reduce)."""
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    stats_dtype = torch.promote_types(x.dtype, torch.float32)
    rows = np.zeros((world_size, 1 + 2 * channels), dtype=_NUMPY_DTYPES[stats_dtype])
    if count > 0:
        # The native kernel reduces in the dtype of the running buffers it is handed; momentum 0 leaves them as
        # they are, so for bf16 input scratch fp32 buffers give fp32 statistics.
        scratch = (None, None)
        if x.dtype != stats_dtype:
            scratch = (torch.zeros(channels, dtype=stats_dtype), torch.ones(channels, dtype=stats_dtype))
        local_mean, local_var = torch.batch_norm_update_stats(x, *scratch, 0.0)
        row = rows[rank]
        row[0] = count
        row[1 : 1 + channels] = local_mean.numpy()
        row[1 + channels :] = local_var.numpy()
    return torch.from_numpy(rows)


def normalise(
    rows: Tensor,
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """From the summed table: the global mean and 1/std, the running statistics updated in place (unbiased
    variance), and ``x`` normalised. Returns (output, mean, invstd, total count)."""
    table = rows.numpy()
    channels = x.shape[1]
    total, mean, var = combine_statistics(table[:, 0], table[:, 1 : 1 + channels], table[:, 1 + channels :])
    total = int(total)
    if total <= 1:
        raise ValueError(
            f"SyncBatchNorm needs more than 1 value per channel across all ranks when training, got {total}"
        )
    if running_mean is not None:
        update_running(running_mean, mean, momentum)
        update_running(running_var, var * (total / (total - 1)), momentum)
    mean_t = torch.from_numpy(mean)
    # Eval-mode native batch norm normalises with given statistics in one elementwise pass.
    out = torch.batch_norm(x, weight, bias, mean_t, torch.from_numpy(var), False, 0.0, eps, False)
    return out, mean_t, torch.from_numpy(1 / np.sqrt(var + eps)), total


def gradient_sums(
    grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """This rank's per-channel Σdy and Σdy·x̂ as one (2C,) tensor to sum over ranks, the same two as the local
    bias and weight gradients, and ``grad_out`` in ``x``'s memory format."""
    dy = grad_out.contiguous(memory_format=_memory_format(x))
    if x.numel() > 0:
        _, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, eps, [False, True, True]
        )
    else:
        grad_weight, grad_bias = torch.zeros_like(mean), torch.zeros_like(mean)
    # The cast is a no-op unless these are bf16 (the gradients of an affine=False layer under autocast).
    return torch.cat([grad_bias, grad_weight]).to(mean.dtype), grad_weight, grad_bias, dy


def input_gradient(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor, sums: Tensor, total: int
) -> Tensor:
    """dx from the summed Σdy and Σdy·x̂: scale·(dy − Σdy/N − x̂·Σdy·x̂/N), as scale·dy + k_x·x + k_0 in two
    elementwise passes, rounded once to ``x``'s dtype."""
    channels = x.shape[1]
    mean_np, invstd_np = mean.numpy(), invstd.numpy()
    sum_dy, sum_dy_xhat = sums.numpy()[:channels], sums.numpy()[channels:]
    scale = invstd_np if weight is None else weight.detach().to(mean.dtype).numpy() * invstd_np
    k_x = -scale * invstd_np * sum_dy_xhat / total
    k_0 = -scale * sum_dy / total - k_x * mean_np
    shape = (1, channels) + (1,) * (x.dim() - 2)
    grad_in = torch.addcmul(torch.from_numpy(k_0.reshape(shape)), x, torch.from_numpy(k_x.reshape(shape)))
    grad_in.addcmul_(dy, torch.from_numpy(scale.reshape(shape)))
    return grad_in.to(x.dtype)


def update_running(running: Tensor, batch: np.ndarray, momentum: float) -> None:
    """running ← (1 − momentum)·running + momentum·batch, in NumPy where the buffer is CPU float32/float64."""
    if running.is_cpu and _NUMPY_DTYPES.get(running.dtype) is batch.dtype.type:
        values = running.numpy()
        values *= 1 - momentum
        values += momentum * batch
    else:
        with torch.no_grad():
            running.mul_(1 - momentum).add_(torch.from_numpy(batch).to(running.device), alpha=momentum)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format
