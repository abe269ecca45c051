"""CPU sync BN's two builds of its per-layer arithmetic: the compiled extension builds wherever a compiler is,
computes what the NumPy reference computes, and a failed build falls back (auto) or is a one-line error
(compiled)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from bnstudy.distributed import syncbn_math
from bnstudy.distributed.syncbn_kernels import KERNELS_ENV, cpu_kernels

HAVE_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None
needs_compiled = pytest.mark.skipif(not HAVE_TOOLCHAIN, reason="needs a C++ compiler and ninja")

# (input shape, memory format (None: a strided view, dense in none), dtype, affine, track running statistics)
CASES = [
    ((6, 5), torch.contiguous_format, torch.float32, True, True),
    ((4, 3, 7), torch.contiguous_format, torch.float64, True, False),
    ((3, 4, 5, 6), torch.contiguous_format, torch.float32, False, True),
    ((3, 4, 5, 6), torch.channels_last, torch.float32, True, True),
    ((3, 4, 5, 6), torch.channels_last, torch.bfloat16, True, True),
    ((2, 3, 2, 3, 4), torch.channels_last_3d, torch.float32, True, True),
    ((0, 4, 5, 6), torch.contiguous_format, torch.float32, True, True),  # a rank with no samples
    ((3, 4, 5, 6), torch.contiguous_format, torch.bfloat16, True, True),
    ((2, 8, 48, 48), torch.channels_last, torch.float64, True, True),
    ((2, 3, 4, 5), None, torch.float32, True, True),  # a strided view
]


@needs_compiled
def test_the_extension_builds_where_a_compiler_is(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "auto")
    kernels = cpu_kernels()
    assert (kernels.name, kernels.fallback_reason) == ("compiled", "")


def _layer_step(functions, case, seed: int) -> dict[str, torch.Tensor]:
    """One training step of a layer through ``functions``, as rank 1 of 3 whose peers' table rows are given."""
    shape, memory_format, dtype, affine, track = case
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    if memory_format is None:
        x, dy = (torch.stack([t, t], dim=-1)[..., 1] for t in (x, dy))
        assert not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
    else:
        x, dy = (t.contiguous(memory_format=memory_format) for t in (x, dy))
    stats_dtype = torch.promote_types(dtype, torch.float32)  # also the parameters' dtype (fp32 under autocast)
    weight = torch.linspace(0.5, 2.0, channels, dtype=stats_dtype) if affine else None
    bias = torch.linspace(-1.0, 1.0, channels, dtype=stats_dtype) if affine else None
    running = (torch.zeros(channels, dtype=stats_dtype), torch.ones(channels, dtype=stats_dtype)) if track else None
    rows = functions.statistics_table(x, 1, 3)
    peers = torch.rand(3, rows.shape[1], generator=gen, dtype=torch.float64).to(rows.dtype)
    peers[:, 0] = torch.tensor([5.0, 0.0, 7.0])
    peers[1] = 0
    summed = rows + peers
    out, mean, invstd, total = functions.normalise(summed, x, weight, bias, *(running or (None, None)), 1e-5, 0.1)
    sums, grad_weight, grad_bias, dy_x = functions.gradient_sums(dy, x, weight, mean, invstd, 1e-5)
    peer_sums = torch.randn(sums.shape, generator=gen, dtype=torch.float64).to(sums.dtype)
    grad_in = functions.input_gradient(dy_x, x, weight, mean, invstd, sums + peer_sums, total)
    result = {"rows": rows, "out": out, "mean": mean, "invstd": invstd, "total": torch.tensor(total)}
    result |= {"sums": sums, "grad_weight": grad_weight, "grad_bias": grad_bias, "grad_in": grad_in}
    if running:
        result |= {"running_mean": running[0], "running_var": running[1]}
    return result


@needs_compiled
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}d-{str(c[2])[6:]}-{str(c[1])[6:]}")
def test_compiled_kernels_compute_what_the_reference_computes(case, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "compiled")
    compiled = _layer_step(cpu_kernels().functions, case, seed=7)
    reference = _layer_step(syncbn_math, case, seed=7)
    assert compiled.keys() == reference.keys()
    for key, value in reference.items():
        got = compiled[key]
        assert (got.dtype, got.shape) == (value.dtype, value.shape), key
        # Same formulas in the same order; the reference's two small matmuls may round differently in the last place.
        torch.testing.assert_close(got, value, msg=key)
    if case[1] not in (torch.contiguous_format, None) and case[0][0] > 0:
        assert compiled["grad_in"].is_contiguous(memory_format=case[1])


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_fused_input_gradient_rounds_as_atens_two_passes(dtype, memory_format, monkeypatch):
    """One pass over a dense input gives the bits ATen's two ``addcmul`` passes give (the compiled build's fallback
    for a strided input): SyncBN's chaotic small-batch training must not change with the layout or the build."""
    monkeypatch.setenv(KERNELS_ENV, "compiled")
    functions = cpu_kernels().functions
    gen = torch.Generator().manual_seed(3)
    shape = (16, 8, 12, 12)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    x, dy = (t.contiguous(memory_format=memory_format) for t in (x, dy))
    stats = torch.promote_types(dtype, torch.float32)
    weight = torch.linspace(0.5, 2.0, 8, dtype=stats)
    rows = functions.statistics_table(x, 0, 1)
    _, mean, invstd, total = functions.normalise(rows, x, weight, None, None, None, 1e-5, 0.1)
    sums = torch.randn(16, generator=gen, dtype=torch.float64).to(stats) * total
    fused = functions.input_gradient(dy, x, weight, mean, invstd, sums, total)
    strided_x, strided_dy = (torch.stack([t, t], dim=-1)[..., 0] for t in (x, dy))
    two_pass = functions.input_gradient(strided_dy, strided_x, weight, mean, invstd, sums, total)
    assert torch.equal(fused, two_pass)


@needs_compiled
def test_compiled_kernels_refuse_a_single_value_per_channel(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "compiled")
    functions = cpu_kernels().functions
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel across all ranks when training, got 1"):
        functions.normalise(functions.statistics_table(x, 0, 2), x, None, None, None, None, 1e-5, 0.1)


BUILD_WITH = """
from bnstudy.distributed.syncbn_kernels import cpu_kernels
from bnstudy.errors import UserError
try:
    kernels = cpu_kernels()
except UserError as exc:
    print("error:", exc)
else:
    print("using:", kernels.name)
"""


@pytest.mark.parametrize("requested", ["auto", "compiled", "python"])
def test_a_failed_build_falls_back_under_auto_and_is_a_one_line_error_when_compiled_is_asked(requested, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env |= {"CXX": str(tmp_path / "no-such-compiler"), KERNELS_ENV: requested}
    done = subprocess.run([sys.executable, "-c", BUILD_WITH], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    if requested == "compiled":
        assert done.stdout.startswith(f"error: {KERNELS_ENV}=compiled but building syncbn_cpu.cpp failed: ")
        assert done.stdout.rstrip().endswith("install a C++ compiler and ninja, or use auto")
        assert done.stdout.count("\n") == 1
    else:
        assert done.stdout == "using: python\n"
    fallback = "sync BN and the shared-memory exchange use their Python builds"
    warned = [line for line in done.stderr.splitlines() if fallback in line]
    assert len(warned) == (requested == "auto"), done.stderr[-2000:]
    if requested != "python":  # the reason is the line that names the problem, not the builder's command line
        assert "no-such-compiler: not found" in (done.stdout + done.stderr)
