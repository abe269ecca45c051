"""Norm-layer factory: a model asks for a norm by name, so one architecture serves BN, SyncBN, GN and none."""

from __future__ import annotations

from torch import nn

from bnstudy.distributed.syncbn import SyncBatchNorm
from bnstudy.errors import UserError, check_at_least

NORM_KINDS = ("bn", "syncbn", "gn", "none")
_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """The largest group count ≤ ``max_groups`` that divides ``num_channels`` (Wu & He use 32)."""
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def make_norm(kind: str, num_features: int, dim: int = 2) -> nn.Module:
    """A normalisation layer for ``num_features`` channels of ``dim``-D spatial data (1 also covers (N, C)).

    kind: "bn" (``nn.BatchNorm{dim}d``), "syncbn" (:class:`bnstudy.distributed.syncbn.SyncBatchNorm`, works on CPU and
    CUDA), "gn" (``nn.GroupNorm`` with up to 32 groups) or "none" (identity).
    """
    if dim not in _BATCH_NORMS:
        raise ValueError(f"norm dim must be 1, 2 or 3, got {dim}")
    if kind == "bn":
        return _BATCH_NORMS[dim](num_features)
    if kind == "syncbn":
        return SyncBatchNorm(num_features, dim=dim)
    if kind == "gn":
        return nn.GroupNorm(group_count(num_features), num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORM_KINDS)}")


def has_norm(kind: str) -> bool:
    """Whether ``kind`` inserts a layer with its own shift, which makes the preceding layer's bias redundant."""
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORM_KINDS)}")
    return kind != "none"


def check_norm_batch(kind: str, batch_per_process: int, world_size: int = 1, option: str = "--batch-size") -> None:
    """Refuse a batch (``option``, images per process) that is empty or leaves BatchNorm in training mode one value
    per channel: ``bn`` normalises over one process's batch, ``syncbn`` over all processes' (torch would fail
    mid-step with a ValueError)."""
    check_at_least(option, batch_per_process, 1)
    normalised_over = {"bn": batch_per_process, "syncbn": batch_per_process * world_size}.get(kind, 2)
    if normalised_over < 2:
        raise UserError(
            f"{option} {batch_per_process} leaves {kind} one value per channel over {world_size} process(es); "
            "use at least 2 images per batch norm"
        )
