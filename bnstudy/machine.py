"""What machine a measurement ran on, read from the machine itself.

Absolute times differ between machines of one kind (the same recipe ran at 550 and 310 images/s on two cloud VMs
sold as identical), so every benchmark result and every run's ``config.json`` names the CPU model, how many CPUs
the process may use, and the SIMD flags that decide which kernels PyTorch and onnxruntime pick.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flags that change which CPU kernels run: x86 vector widths, bf16/int8 dot products and AMX tiles,
# then Arm's NEON, SVE and bf16. Results list them in this order.
SIMD_FLAGS = (
    "sse4_2",
    "avx",
    "fma",
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "asimd",
    "sve",
    "bf16",
)


def _first_processor(cpuinfo: Path) -> dict[str, str]:
    """The fields of the first processor's block of /proc/cpuinfo (empty where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _flags(fields: dict[str, str]) -> set[str]:
    return set((fields.get("flags") or fields.get("Features") or "").split())  # x86 and Arm name them differently


def _model(fields: dict[str, str]) -> str:
    return fields.get("model name") or fields.get("Model name") or platform.processor() or platform.machine()


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags as Linux reports them; empty where there is no /proc/cpuinfo."""
    return _flags(_first_processor(cpuinfo))


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's marketing name as lscpu shows it, else what the platform module knows, else the architecture."""
    return _model(_first_processor(cpuinfo))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def describe_machine(cpuinfo: Path = CPUINFO) -> dict:
    """The machine in the fields a reader needs to weigh an absolute time: CPU model, architecture, usable and
    total logical CPUs, and which of :data:`SIMD_FLAGS` it has."""
    fields = _first_processor(cpuinfo)
    flags = _flags(fields)
    return {
        "cpu_model": _model(fields),
        "architecture": platform.machine(),
        "usable_cpus": usable_cpus(),
        "logical_cpus": os.cpu_count() or 1,
        "simd_flags": [flag for flag in SIMD_FLAGS if flag in flags],
    }


def machine_line(machine: dict) -> str:
    """One line for a benchmark's output, e.g. "machine: AMD EPYC (x86_64), 2 of 2 CPUs, sse4_2 avx fma avx2"."""
    flags = " ".join(machine["simd_flags"]) or "no SIMD flags known"
    return (
        f"machine: {machine['cpu_model']} ({machine['architecture']}), "
        f"{machine['usable_cpus']} of {machine['logical_cpus']} CPUs, {flags}"
    )
