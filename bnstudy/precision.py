"""Training precision: what ``--precision {auto,fp32,bf16,fp16}`` means on a device, detected rather than assumed.

Mixed precision here is autocast: master weights, optimizer state and checkpoints stay float32, convolutions and
matrix products run in the low-precision type, and BatchNorm keeps float32 statistics. ``auto`` picks bf16 only
where the hardware runs it natively (a CUDA device with bf16 support; a CPU with AVX512-BF16 or AMX), because
elsewhere bf16 is emulated and slower than float32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from bnstudy.errors import UserError, check_choice
from bnstudy.machine import CPUINFO, cpu_flags

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of native bf16 arithmetic on x86 (AVX512-BF16 dot products, AMX tiles)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_capability(device: torch.device, cpuinfo: Path = CPUINFO) -> str:
    """What this device offers for bf16, in words for logs and ``config.json``; starts with "native" when fast."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return f"{'native' if native else 'emulated'} bf16 on {name} (sm_{major}{minor})"
    found = sorted(set(CPU_BF16_FLAGS) & cpu_flags(cpuinfo))
    if found:
        return f"native bf16 on CPU ({', '.join(found)})"
    return f"emulated bf16 on CPU: no {' or '.join(CPU_BF16_FLAGS)} flag"


@dataclass(frozen=True)
class Precision:
    """A resolved ``--precision``: the autocast dtype (None for float32) on ``device_type``, and why."""

    requested: str
    name: str
    device_type: str
    capability: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has float32's exponent range and needs none."""
        return self.name == "fp16"

    def autocast(self) -> AbstractContextManager:
        """The context a forward pass (and its loss) runs under; backward runs outside it."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler that is active only where it is needed (fp16)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_grad_scaler)

    def describe(self) -> str:
        """One phrase for the first log line, e.g. "fp32 (auto: emulated bf16 on CPU ...)"."""
        chosen = f"{self.name} (auto: {self.capability})" if self.requested == "auto" else self.name
        return chosen if self.name == "fp32" or self.requested == "auto" else f"{chosen} ({self.capability})"

    def record(self) -> dict[str, str]:
        """What ``config.json`` keeps beside the requested option."""
        return {"precision_used": self.name, "bf16_capability": self.capability}


def check_precision(requested: str, device_type: str, option: str = "--precision") -> None:
    """Refuse, in one line, a precision that cannot be right on ``device_type`` ("cpu" or "cuda")."""
    check_choice(option, requested, PRECISIONS)
    if requested == "fp16" and device_type != "cuda":
        raise UserError(
            f"{option} fp16 needs a CUDA device (float16 on CPU is emulated and has no gradient scaler); "
            "use bf16 or fp32 on CPU"
        )


def resolve_precision(
    requested: str, device: torch.device, option: str = "--precision", cpuinfo: Path = CPUINFO
) -> Precision:
    """The precision ``requested`` means on ``device``: ``auto`` is bf16 where bf16 is native, else fp32."""
    check_precision(requested, device.type, option)
    capability = bf16_capability(device, cpuinfo)
    name = requested
    if requested == "auto":
        name = "bf16" if capability.startswith("native") else "fp32"
    return Precision(requested, name, device.type, capability)
