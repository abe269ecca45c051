import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests never touch the network: --data auto must not try torchvision's download (tests that do set up their own).
os.environ["BNSTUDY_OFFLINE"] = "1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None, env: dict | None = None):
    """Run a command with the test interpreter; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=full_env)


def torchrun(*args: str, nproc: int = 2, **kwargs):
    """``torchrun --standalone --nproc_per_node=N launch/train_cifar.py ARGS``."""
    return run_cli(
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "launch" / "train_cifar.py"),
        *args,
        **kwargs,
    )


# A tiny, quick training configuration on the synthetic set.
TWO_RANK_PROFILED_STEPS = 4  # --profile-steps of two_rank_runs, one more than the default
TINY = ["--data", "synthetic", "--synthetic-size", "1200", "--width", "8", "--batch-size", "32", "--test-subset", "400"]


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory):
    """One 2-process run per norm ("bn", "syncbn"), 2 epochs on synthetic data with profiler traces, shared by
    several tests."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for norm in ("bn", "syncbn"):
        out = base / norm
        # 6000 images: the synthetic set is hard on purpose (issue 15), and these runs must clearly learn something
        args = [*TINY, "--synthetic-size", "6000", "--epochs", "2", "--norm", norm, "--lr", "0.1", "--profile"]
        args += ["--profile-steps", str(TWO_RANK_PROFILED_STEPS)]
        done = torchrun(*args, "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[norm] = out
    return runs
