"""Sync BN's transport in real training runs: shared memory on one host, gloo across (simulated) hosts, a rank
killed mid-training, and two jobs at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnstudy.distributed.shm_allreduce import SHM_NAME_PREFIX, fast_path_supported
from bnstudy.distributed.syncbn_kernels import cpu_kernels
from tests.conftest import ROOT, TINY, free_port, torchrun

pytestmark = pytest.mark.skipif(not fast_path_supported(), reason="the shared-memory transport needs x86-64")
SHM = Path("/dev/shm")


def _segments() -> set[str]:
    return {p.name for p in SHM.glob(SHM_NAME_PREFIX + "*")} if SHM.is_dir() else set()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_one_host_runs_sync_bn_over_shared_memory(two_rank_runs):
    config = json.loads((two_rank_runs["syncbn"] / "config.json").read_text())
    assert config["syncbn_transport"] == "shm"
    assert config["syncbn_kernels"] == cpu_kernels().name  # the build this machine gives, recorded
    bn_config = json.loads((two_rank_runs["bn"] / "config.json").read_text())
    assert bn_config["syncbn_transport"] is None and bn_config["syncbn_kernels"] is None
    # DDP's gradients go through shared memory too, whatever the norm
    assert config["ddp_transport"] == bn_config["ddp_transport"] == "shm"


def test_two_jobs_at_once_and_forced_gloo_agree_with_shared_memory(tmp_path):
    """Sync BN's exchanges, DDP's gradients and the per-step metrics all through shared memory (twice at once), or
    all through gloo: the same training."""
    before = _segments()
    args = [*TINY, "--epochs", "1", "--norm", "syncbn", "--eval-bn", "local"]
    env = {"OMP_NUM_THREADS": "1"}

    def start(name: str, transport: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd += [str(ROOT / "launch" / "train_cifar.py"), *args, "--out", str(tmp_path / name)]
        job_env = {**os.environ, **env, "BNSTUDY_SYNCBN_TRANSPORT": transport, "BNSTUDY_DDP_TRANSPORT": transport}
        return subprocess.Popen(cmd, cwd=ROOT, env=job_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    jobs = {"shm-a": start("shm-a", "shm"), "shm-b": start("shm-b", "shm"), "gloo": start("gloo", "gloo")}
    outputs = {name: job.communicate(timeout=600)[0] for name, job in jobs.items()}
    for name, job in jobs.items():
        assert job.returncode == 0, outputs[name][-3000:]
        assert f"sync BN over {name.split('-')[0]}" in outputs[name]
        assert f"gradients over {name.split('-')[0]}" in outputs[name]
    metrics = {name: _jsonl(tmp_path / name / "metrics.jsonl")[0] for name in jobs}
    for key in ("train_loss", "test_loss", "test_acc"):  # same sums in another order: equal to rounding
        assert metrics["shm-a"][key] == metrics["shm-b"][key]
        assert metrics["gloo"][key] == pytest.approx(metrics["shm-a"][key], rel=1e-4)
    assert _segments() <= before


def test_ranks_on_different_hosts_fall_back_to_gloo_and_stay_exact(tmp_path):
    port = free_port()
    out = tmp_path / "two-hosts"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d"]
    cmd += [f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=bnstudy-hosts", str(ROOT / "launch" / "train_cifar.py")]
    cmd += [*TINY, "--epochs", "1", "--norm", "syncbn", "--out", str(out)]
    agents = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "BNSTUDY_HOST_ID": f"host-{i}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [a.communicate(timeout=300)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["syncbn_transport"], config["ddp_transport"]) == ("gloo", "gloo")
    assert all(r["running_mean_max_abs_diff"] == 0 for r in _jsonl(out / "bn_stats.jsonl"))


def test_forcing_shared_memory_across_hosts_is_a_one_line_error(tmp_path):
    done = torchrun(*TINY, "--epochs", "1", "--norm", "syncbn", "--out", str(tmp_path / "r"),
                    env={"BNSTUDY_SYNCBN_TRANSPORT": "shm", "BNSTUDY_HOST_ID": "same"}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]  # one host id for both ranks: allowed
    bad = torchrun(*TINY, "--epochs", "1", "--norm", "syncbn", "--out", str(tmp_path / "b"),
                   env={"BNSTUDY_SYNCBN_TRANSPORT": "carrier-pigeon"}, timeout=300)  # fmt: skip
    assert bad.returncode != 0
    assert "train_cifar: error: BNSTUDY_SYNCBN_TRANSPORT='carrier-pigeon' is not a transport" in bad.stderr
    assert "bnstudy/" not in bad.stderr  # no traceback through bnstudy (torchrun prints its own report)


@pytest.mark.parametrize("norm, ddp_transport", [("syncbn", "auto"), ("bn", "auto"), ("bn", "gloo")])
def test_a_killed_rank_stops_its_peer_with_a_one_line_error_and_leaves_no_segment(tmp_path, norm, ddp_transport):
    """Two launcher processes joined by hand (no torchrun agent to kill the survivor): rank 1 is SIGKILLed after the
    first epoch, and rank 0 must stop within the shared-memory timeout, saying so in one line. The survivor learns
    of it in a shared-memory exchange (sync BN's or DDP's gradient hook's) or in gloo's (DDP's own hook)."""
    before = _segments()
    out = tmp_path / "killed"
    port = free_port()
    cmd = [sys.executable, str(ROOT / "launch" / "train_cifar.py"), *TINY, "--synthetic-size", "3000"]
    cmd += ["--epochs", "3", "--norm", norm, "--out", str(out)]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    base |= {"WORLD_SIZE": "2", "BNSTUDY_SYNCBN_TIMEOUT_S": "5", "BNSTUDY_DDP_TRANSPORT": ddp_transport}
    ranks = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and ranks[0].poll() is None:
        time.sleep(0.05)
    assert (out / "checkpoint.pt").exists(), ranks[0].communicate()[1][-2000:]
    ranks[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    stderr = ranks[0].communicate(timeout=120)[1]
    ranks[1].wait()
    assert ranks[0].returncode not in (0, None)
    assert time.time() - killed_at < 60
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("train_cifar: error:") and len(lines[-1]) < 400, lines[-3:]
    assert _segments() <= before
