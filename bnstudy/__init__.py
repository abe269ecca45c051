"""bnstudy: BatchNorm end to end — the math, training behaviour, distributed statistics and edge export.

The public API below is imported lazily, so ``import bnstudy`` stays fast (no torch until a name is used):

    from bnstudy import SyncBatchNorm, convert_sync_batchnorm, fold_batchnorm, export_onnx, ...

Subpackages: ``distributed`` (sync BN, process groups, rank statistics), ``training`` (config, loop, launcher,
run directory), ``edge`` (fold BN, ONNX export and verification), ``traces`` (profiler recording and
attribution), ``studies`` (the seed experiments), ``benchmarks``, ``commands`` (the CLI). Shared building blocks
sit at the top: ``data``, ``models``, ``norms``, ``precision``, ``reference``, ``errors``, ``io``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "SyncBatchNorm": "bnstudy.distributed.syncbn",
    "convert_sync_batchnorm": "bnstudy.distributed.syncbn",
    "revert_sync_batchnorm": "bnstudy.distributed.syncbn",
    "make_norm": "bnstudy.norms",
    "create_model": "bnstudy.models",
    "fold_batchnorm": "bnstudy.edge.fold",
    "export_onnx": "bnstudy.edge.onnx_export",
    "verify_onnx": "bnstudy.edge.onnx_export",
    "summarize_trace": "bnstudy.traces.attribution",
    "compare_traces": "bnstudy.traces.attribution",
    "UserError": "bnstudy.errors",
}
_RENAMED = {"summarize_trace": "summarize", "compare_traces": "compare"}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bnstudy' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
