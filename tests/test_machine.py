"""The machine a measurement names: CPU model, usable CPUs and SIMD flags, read from /proc/cpuinfo."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import pytest

from bnstudy.machine import SIMD_FLAGS, cpu_flags, cpu_model, describe_machine, machine_line

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 sse4_2 avx2 fma avx avx512f avx512_bf16 ssse3

processor\t: 1
model name\t: Another CPU
flags\t\t: fpu amx_tile amx_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve bf16 i8mm
CPU implementer\t: 0x41
"""


def _write(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_x86_cpuinfo_gives_the_first_processors_model_and_flags_in_a_fixed_order(tmp_path):
    machine = describe_machine(_write(tmp_path, X86))
    assert machine["cpu_model"] == "AMD EPYC 9R14 96-Core Processor"
    assert machine["simd_flags"] == ["sse4_2", "avx", "fma", "avx2", "avx512f", "avx512_bf16"]
    assert machine["architecture"] == platform.machine()
    assert 1 <= machine["usable_cpus"] <= machine["logical_cpus"] == os.cpu_count()
    line = machine_line(machine)
    assert line.startswith(f"machine: AMD EPYC 9R14 96-Core Processor ({platform.machine()}), ")
    assert line.endswith(f"of {os.cpu_count()} CPUs, sse4_2 avx fma avx2 avx512f avx512_bf16")


def test_arm_cpuinfo_names_features_and_falls_back_for_the_model(tmp_path):
    path = _write(tmp_path, ARM)
    assert cpu_flags(path) >= {"asimd", "sve", "bf16"}
    assert describe_machine(path)["simd_flags"] == ["asimd", "sve", "bf16"]
    assert cpu_model(path) == (platform.processor() or platform.machine())  # Arm's cpuinfo has no model name


def test_no_cpuinfo_assumes_no_flags(tmp_path):
    machine = describe_machine(tmp_path / "missing")
    assert machine["simd_flags"] == [] and machine["cpu_model"]
    assert machine_line(machine).endswith("CPUs, no SIMD flags known")


@pytest.mark.skipif(not shutil.which("lscpu"), reason="needs lscpu")
def test_this_machine_is_named_as_lscpu_names_it():
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    machine = describe_machine()
    if "Model name" in fields:
        assert machine["cpu_model"] == fields["Model name"].strip()
    lscpu_flags = set(fields.get("Flags", "").split())
    if lscpu_flags:
        assert machine["simd_flags"] == [flag for flag in SIMD_FLAGS if flag in lscpu_flags]
    assert machine["usable_cpus"] == len(os.sched_getaffinity(0))
