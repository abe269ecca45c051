"""The device-side tools in ``deploy/`` (the latency harness, onnxruntime's static quantisation), loaded from the
source tree beside the package: they cannot import bnstudy (they run on the device without it), and bnstudy reuses
them rather than keep copies."""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

from bnstudy.errors import UserError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@cache
def deploy_module(name: str) -> ModuleType:
    """``deploy/<name>.py``, loaded once; a one-line UserError outside a bnstudy source checkout."""
    path = DEPLOY / f"{name}.py"
    if not path.is_file():
        raise UserError(f"{path} is missing; run this from a bnstudy source checkout")
    spec = importlib.util.spec_from_file_location(f"bnstudy_deploy_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
