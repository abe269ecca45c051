"""Which build of CPU sync BN's per-layer arithmetic runs: the compiled extension or the NumPy reference.

Both provide :mod:`bnstudy.distributed.syncbn_math`'s four functions. The compiled one (``csrc/syncbn_cpu.cpp``)
also provides the whole layer as one autograd op (``sync_batch_norm``), turning a layer's ~25 small Python-level
calls into one in forward and none in backward but the exchange, which is most of what sync BN costs over plain BN
in a small model on a small CPU; and the compiled build of the shared-memory exchange (``ShmExchange``). PyTorch's
JIT extension builder compiles it on first use (about a minute, once; it needs a C++ compiler and ninja) and caches
it under its extensions directory (``TORCH_EXTENSIONS_DIR``), one build per source, torch and Python version.
``BNSTUDY_SYNCBN_KERNELS`` chooses: ``auto`` (default) uses the compiled build when it
builds and otherwise the reference, saying why once on stderr; ``compiled`` makes a failed build a one-line error;
``python`` never builds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

from bnstudy.distributed import syncbn_math
from bnstudy.errors import UserError, env_choice, first_line

__all__ = ["KERNELS_ENV", "KERNEL_CHOICES", "CpuKernels", "cpu_kernels", "requested_kernels"]

KERNELS_ENV = "BNSTUDY_SYNCBN_KERNELS"
KERNEL_CHOICES = ("auto", "compiled", "python")
SOURCE = Path(__file__).with_name("csrc") / "syncbn_cpu.cpp"


@dataclass(frozen=True)
class CpuKernels:
    """The functions CPU sync BN calls, which build they are ("compiled" or "python"), and, when ``auto`` fell
    back to the reference, why."""

    name: str
    functions: ModuleType
    fallback_reason: str = ""


_chosen: dict[str, CpuKernels] = {}


def requested_kernels() -> str:
    """The build ``BNSTUDY_SYNCBN_KERNELS`` asks for (default auto); a one-line error for anything else."""
    return env_choice(KERNELS_ENV, KERNEL_CHOICES, "a choice")


def cpu_kernels() -> CpuKernels:
    """The kernels for this process, chosen (and built, if need be) on the first call for the requested build."""
    requested = requested_kernels()
    kernels = _chosen.get(requested)
    if kernels is None:
        kernels = _chosen[requested] = _choose(requested)
    return kernels


def _choose(requested: str) -> CpuKernels:
    python = CpuKernels("python", syncbn_math)
    if requested == "python":
        return python
    try:
        return CpuKernels("compiled", _build())
    except Exception as exc:  # a compiler, ninja or header problem, reported whichever it is
        reason = f"building {SOURCE.name} failed: {_build_error(exc)}"
        if requested == "compiled":
            fix = "install a C++ compiler and ninja, or use auto"
            raise UserError(f"{KERNELS_ENV}=compiled but {reason}; {fix}") from exc
        print(f"bnstudy: sync BN and the shared-memory exchange use their Python builds ({reason})", file=sys.stderr)
        return CpuKernels("python", syncbn_math, reason)


def _build_directory() -> Path:
    """Where this source, torch and Python ABI's build lives: one per combination, so a shared home directory never
    loads a stale or foreign build. Its last component is the extension's module name."""
    # Importing the builder on a machine without CUDA logs a warning about a guessed CUDA_HOME: irrelevant here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import get_default_build_root

    key = SOURCE.read_bytes() + f"{torch.__version__} {sys.implementation.cache_tag} {platform.machine()}".encode()
    key += " ".join(_cflags()).encode()
    name = f"bnstudy_syncbn_cpu_{hashlib.sha256(key).hexdigest()[:12]}"
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "bnstudy" / name


def _build() -> ModuleType:
    directory = _build_directory()
    from torch.utils.cpp_extension import load

    # Concurrent builds (torchrun's ranks) wait on the builder's advisory file lock, which dies with its holder.
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{directory.name}.so").exists() and _is_main_process():
        print(
            "bnstudy: building the CPU kernels of sync BN and the shared-memory exchange (once, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(
            name=directory.name,
            sources=[str(SOURCE)],
            extra_cflags=_cflags(),
            build_directory=str(directory),
            with_cuda=False,
            verbose=False,
        )


def _cflags() -> list[str]:
    """-O3, and the multiply-adds rounded as ATen's own kernels round them, so the fused passes give the bits the
    reference's ATen calls give: once (FMA) where ATen runs its AVX2/AVX-512 kernels, which are built with FMA and
    contract, and nowhere else (``-ffp-contract=off`` keeps the compiler from fusing any other expression)."""
    fma = torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))
    return ["-O3", "-ffp-contract=off"] + (["-mfma"] if fma else [])


def _build_error(exc: Exception) -> str:
    """The line of a build failure that says what went wrong (the builder's message leads with command lines)."""
    lines = str(exc).splitlines()
    for line in lines[1:]:
        if re.search(r"error|not found|no such file", line, re.IGNORECASE):
            return first_line(Exception(line))
    return first_line(exc)


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
