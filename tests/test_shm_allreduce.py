"""The shared-memory all-reduce on real gloo process groups: exact rank-ordered sums, a stress run, size checks,
the process-group fallback, a rank killed mid-run, two jobs at once, and same-host detection."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnstudy.distributed.collectives import SYNCBN_ALL_REDUCE
from bnstudy.distributed.shm_allreduce import (
    SHM_NAME_PREFIX,
    WAIT_LABEL,
    ShmAllReduce,
    fast_path_supported,
    ranks_share_host,
)
from bnstudy.distributed.syncbn_kernels import KERNELS_ENV, cpu_kernels

pytestmark = pytest.mark.skipif(not fast_path_supported(), reason="the shared-memory path needs x86-64")


# ------------------------------------------------------------------------------------- a local process launcher
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, fn, args, env, teardown, queue) -> None:
    os.environ.update(env.get(rank, {}))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = fn(rank, world, *args)
    except BaseException as exc:  # reported to the test, which fails with it
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    queue.put((rank, "ok", result))
    if teardown:
        dist.barrier()
        dist.destroy_process_group()


class _Job:
    """``fn(rank, world, *args)`` in ``world`` fresh processes joined in a gloo group on loopback. Unlike
    ``mp.spawn`` it does not kill the survivors when one rank dies, so they can report what they saw."""

    def __init__(self, fn, world: int, *args, env: dict[int, dict[str, str]] | None = None, teardown: bool = True):
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, fn, args, env or {}, teardown, self.queue))
            for r in range(world)
        ]
        for proc in self.procs:
            proc.start()

    def results(self, timeout: float = 120, expect: int | None = None) -> dict[int, object]:
        """Each reporting rank's return value; raises with the first rank's error."""
        expect = len(self.procs) if expect is None else expect
        deadline = time.monotonic() + timeout
        got: dict[int, tuple[str, object]] = {}
        try:
            while len(got) < expect:
                rank, status, value = self.queue.get(timeout=max(1.0, deadline - time.monotonic()))
                got[rank] = (status, value)
            for proc in self.procs:
                proc.join(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            for proc in self.procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        errors = {r: v for r, (s, v) in sorted(got.items()) if s == "error"}
        summary = "; ".join(f"rank {r}: {v.splitlines()[0]}" for r, v in errors.items())
        assert not errors, summary + "\n\n" + "\n".join(errors.values())
        return {r: v for r, (_, v) in got.items()}


def run_ranks(fn, world: int, *args, **kwargs) -> dict[int, object]:
    return _Job(fn, world, *args, **kwargs).results()


# The exchange's builds (BNSTUDY_SYNCBN_KERNELS picks one per process): its Python protocol, the compiled one where
# it builds, and both in one job (even ranks Python, odd ranks compiled), which speak the same protocol.
BUILDS = ["python", "compiled", "mixed"] if cpu_kernels().name == "compiled" else ["python"]


def build_env(build: str, world: int) -> dict[int, dict[str, str]]:
    choice = {"python": ("python", "python"), "compiled": ("compiled", "compiled"), "mixed": ("python", "compiled")}
    return {rank: {KERNELS_ENV: choice[build][rank % 2]} for rank in range(world)}


def builds_used(results: dict[int, dict]) -> str:
    used = {r["build"] for r in results.values()}
    return used.pop() if len(used) == 1 else "mixed"


def shm_entries() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_NAME_PREFIX)}


# ------------------------------------------------------------------------------------------------ the workers
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SHAPES = [(2, 385), (7,), (), (0,), (3, 4, 5), (256,)]
MAX_NUMEL = 1024
WAIT_LAG_S = 0.2  # how late rank 1 comes to the exchange whose wait is profiled


def rank_input(rank: int, case: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Values spread over many magnitudes, so the order of additions shows in the rounding."""
    gen = torch.Generator().manual_seed(7919 * case + rank)
    scale = 10.0 ** torch.randint(-6, 7, shape, generator=gen, dtype=torch.float64)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def _exact_worker(rank: int, world: int) -> dict:
    ar = ShmAllReduce(max_numel=MAX_NUMEL, timeout_s=30)
    assert ar.uses_shared_memory
    dist.barrier()  # rank 0 unlinks the name once every rank attached
    assert ar.name is not None and ar.name.lstrip("/") not in os.listdir("/dev/shm"), "name not unlinked"
    out: dict = {"share_host": ranks_share_host(), "order_matters": False, "sums": [], "build": ar.build}
    for dtype_name, dtype in DTYPES.items():
        for case, shape in enumerate(SHAPES):
            inputs = [rank_input(r, case, shape, dtype) for r in range(world)]
            expected = inputs[0].clone()
            for other in inputs[1:]:
                expected = expected + other
            if world > 2 and bits(inputs[0] + (inputs[1] + inputs[2])) != bits(expected):
                out["order_matters"] = True
            mine = inputs[rank].clone()
            assert ar.all_reduce(mine) is mine
            assert bits(mine) == bits(expected), f"{dtype_name}{list(shape)}: not the rank-ordered sum"
            out["sums"].append(bits(mine))
    # The fast path also serves non-contiguous tensors and ones that require grad.
    base = rank_input(rank, 99, (6, 8), torch.float64)
    strided = base.t()
    ar.all_reduce(strided)
    expected = sum(
        (rank_input(r, 99, (6, 8), torch.float64) for r in range(1, world)), rank_input(0, 99, (6, 8), torch.float64)
    )
    assert bits(base) == bits(expected)
    leaf = torch.ones(5, requires_grad=True)
    ar.all_reduce(leaf)
    assert torch.equal(leaf.detach(), torch.full((5,), float(world)))
    ar.close()
    with pytest.raises(RuntimeError, match="after close"):
        ar.all_reduce(leaf)
    return out


def _fallback_worker(rank: int, world: int) -> dict:
    ar = ShmAllReduce(max_numel=64, timeout_s=30, label=SYNCBN_ALL_REDUCE)
    cases = [
        torch.arange(10, dtype=torch.int64) * (rank + 1),  # other dtype
        torch.full((65,), 0.1 * (rank + 1), dtype=torch.float32),  # over the limit
        torch.full((3, 40), 0.3 * (rank + 1), dtype=torch.float64),  # over the limit
        torch.full((9,), 1.5 * (rank + 1), dtype=torch.float16),  # other dtype
    ]
    expected = [sum(c * (r + 1) / (rank + 1) for r in range(world)) for c in cases]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for tensor in cases:
            ar.all_reduce(tensor)
        small = torch.ones(64)  # the fast path still works between fallbacks
        ar.all_reduce(small)
    for tensor, want in zip(cases, expected):
        assert torch.allclose(tensor.double(), want.double(), rtol=1e-3), (tensor, want)
    assert torch.equal(small, torch.full((64,), float(world)))
    counts = {e.key: e.count for e in prof.key_averages()}
    return {"labels": counts.get(SYNCBN_ALL_REDUCE, 0), "gloo": sum(c for k, c in counts.items() if "gloo" in k)}


def _wait_label_worker(rank: int, world: int) -> dict:
    """Rank 1 arrives late: rank 0's time waiting for it is labelled apart from the exchange in its profile."""
    ar = ShmAllReduce(max_numel=64, timeout_s=30, label=SYNCBN_ALL_REDUCE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        if rank == 1:
            time.sleep(WAIT_LAG_S)
        ar.all_reduce(torch.ones(8))
    waits = [e for e in prof.events() if e.name == WAIT_LABEL]
    (exchange,) = [e for e in prof.events() if e.name == SYNCBN_ALL_REDUCE]
    return {
        "wait_s": sum(e.time_range.elapsed_us() for e in waits) / 1e6,
        "inside": all(exchange.time_range.start <= e.time_range.start <= exchange.time_range.end for e in waits),
    }


def _stress_worker(rank: int, world: int, iterations: int, seed: int, max_numel: int) -> dict:
    ar = ShmAllReduce(max_numel=max_numel, timeout_s=20)
    shared = np.random.default_rng(seed)  # the same stream on every rank: sizes, dtypes, everybody's inputs
    own = np.random.default_rng(seed * 1000 + rank)  # rank-local jitter, so ranks drift in and out of lockstep
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    for it in range(iterations):
        n = int(shared.integers(1, max_numel + 1))
        dtype = np.float32 if shared.random() < 0.5 else np.float64
        rows = [shared.standard_normal(n).astype(dtype) * dtype(10.0 ** shared.integers(-3, 4)) for _ in range(world)]
        expected = rows[0] + rows[1]
        for row in rows[2:]:
            expected = expected + row
        if own.random() < 0.03:
            time.sleep(own.random() * 2e-4)
        elif own.random() < 0.1:
            os.sched_yield()
        mine = torch.from_numpy(rows[rank].copy())
        ar.all_reduce(mine)
        got = mine.numpy()
        if got.tobytes() != expected.tobytes():
            bad = int(np.flatnonzero(got != expected)[0]) if np.any(got != expected) else -1
            raise AssertionError(f"iteration {it}: n={n} {dtype.__name__}, first wrong element {bad}")
        digest.update(got.tobytes())
    return {"digest": digest.hexdigest(), "seconds": time.perf_counter() - t0, "name": ar.name, "build": ar.build}


def _mismatch_worker(rank: int, world: int) -> list[str]:
    ar = ShmAllReduce(max_numel=64, timeout_s=30, label=SYNCBN_ALL_REDUCE)
    messages = []
    for tensor in (
        torch.zeros(10 + rank),  # numel differs
        torch.zeros(10, dtype=torch.float32 if rank == 0 else torch.float64),  # dtype differs
        torch.zeros(64 + rank),  # one rank would take the fast path, the other gloo
    ):
        try:
            ar.all_reduce(tensor)
        except RuntimeError as exc:
            messages.append(str(exc))
        else:
            messages.append("no error")
    # A mismatch leaves the protocol in step: the next exchange works.
    ok = torch.ones(3)
    ar.all_reduce(ok)
    assert torch.equal(ok, torch.full((3,), float(world)))
    return messages


def _dies_worker(rank: int, world: int, timeout_s: float, die_at: int) -> dict:
    ar = ShmAllReduce(max_numel=256, timeout_s=timeout_s)
    t = torch.ones(200)
    last = time.monotonic()
    for it in range(die_at * 100):
        if rank == 1 and it == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        t.fill_(1.0)
        try:
            ar.all_reduce(t)
        except RuntimeError as exc:
            waited = time.monotonic() - last
            try:
                ar.all_reduce(t)
            except RuntimeError as again:
                repeated = str(again)
            return {"error": str(exc), "waited": waited, "iteration": it, "repeated": repeated, "build": ar.build}
        last = time.monotonic()
    return {"error": None, "build": ar.build}


def _checks_worker(rank: int, world: int) -> dict:
    """Several short checks in one job, since starting processes dominates the run time."""
    out = {"fallback": _fallback_worker(rank, world), "mismatch": _mismatch_worker(rank, world)}
    out["wait"] = _wait_label_worker(rank, world)
    out["build"] = ShmAllReduce(max_numel=64).build
    try:
        ShmAllReduce(max_numel=64 + rank)
    except RuntimeError as exc:
        out["setup_error"] = str(exc)
    out["share_host"] = ranks_share_host()
    os.environ["BNSTUDY_HOST_ID"] = f"box{rank}"
    out["share_host_apart"] = ranks_share_host()
    os.environ["BNSTUDY_HOST_ID"] = "box"
    out["share_host_same_override"] = ranks_share_host()
    return out


# ------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("world", [2, 3])
def test_sums_are_exact_rank_ordered_and_identical(world, build):
    before = shm_entries()
    results = run_ranks(_exact_worker, world, env=build_env(build, world))
    assert builds_used(results) == build
    assert all(r["share_host"] for r in results.values())
    assert len({tuple(r["sums"]) for r in results.values()}) == 1, "ranks got different bits"
    if world == 3:
        assert results[0]["order_matters"], "inputs too tame to tell a rank-ordered sum from another order"
    assert shm_entries() <= before


@pytest.fixture(scope="module", params=[b for b in BUILDS if b != "mixed"])
def checks(request) -> dict[int, dict]:
    results = run_ranks(_checks_worker, 2, env=build_env(request.param, 2))
    assert builds_used(results) == request.param
    return results


def test_fallback_goes_through_the_process_group(checks):
    # Five labelled exchanges, four through gloo: the fallbacks, and one small tensor through shared memory.
    assert all(r["fallback"] == {"labels": 5, "gloo": 4} for r in checks.values()), checks


def test_waiting_for_a_late_rank_is_labelled_apart_from_the_exchange(checks):
    early, late = checks[0]["wait"], checks[1]["wait"]
    assert early["inside"] and early["wait_s"] > 0.5 * WAIT_LAG_S, checks
    assert late["wait_s"] < 0.25 * WAIT_LAG_S, checks


def test_size_mismatch_is_a_one_line_error_on_every_rank(checks):
    for rank, result in checks.items():
        messages = result["mismatch"]
        assert len(messages) == 3
        for message in messages:
            assert "different tensors" in message and "\n" not in message, (rank, message)
        assert "float32[10]" in messages[0] and "float32[11]" in messages[0]
        assert "float32[10]" in messages[1] and "float64[10]" in messages[1]
        assert "float32[64]" in messages[2] and "float32[65]" in messages[2]


def test_setup_disagreement_fails_on_every_rank(checks):
    for result in checks.values():
        assert result.get("setup_error", "").startswith("shared-memory all-reduce setup failed: rank 1: max_numel 65")


def test_ranks_share_host_unless_their_identities_differ(checks):
    for result in checks.values():
        assert result["share_host"] and result["share_host_same_override"]
        assert not result["share_host_apart"]


@pytest.mark.parametrize("build", BUILDS)
def test_stress_three_ranks(build):
    results = run_ranks(_stress_worker, 3, 3000, 1237, 512, env=build_env(build, 3))
    assert builds_used(results) == build
    assert len({r["digest"] for r in results.values()}) == 1


def test_stress_two_jobs_of_two_ranks_at_once():
    """Two independent jobs on one host, each a 2-rank stress run: no collision, every sum exact."""
    jobs = [_Job(_stress_worker, 2, 3000, seed, 512) for seed in (5, 6)]
    results = [job.results() for job in jobs]
    for result in results:
        assert len({r["digest"] for r in result.values()}) == 1
    assert results[0][0]["digest"] != results[1][0]["digest"]
    assert results[0][0]["name"] != results[1][0]["name"]


@pytest.mark.parametrize("build", [b for b in BUILDS if b != "mixed"])
def test_a_killed_rank_is_named_within_the_timeout_and_nothing_leaks(build):
    before = shm_entries()
    job = _Job(_dies_worker, 2, 2.0, 50, env=build_env(build, 2), teardown=False)
    results = job.results(expect=1)
    assert job.procs[1].exitcode == -signal.SIGKILL
    seen = results[0]
    assert seen["build"] == build
    assert seen["error"] is not None and "\n" not in seen["error"]
    assert "rank 1 did not arrive within 2 s" in seen["error"]
    assert 1.9 < seen["waited"] < 10
    assert seen["iteration"] == 50
    assert seen["repeated"] == seen["error"]  # unusable afterwards, saying why
    assert shm_entries() <= before
