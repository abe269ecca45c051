"""`bnstudy trace view` starts a real TensorBoard whose profiler plugin lists the run bnstudy recorded, with one
worker per rank and its views; Ctrl-C stops the server."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bnstudy.training.run_directory import trace_dir
from tests.test_traces import recorded_runs

PLUGIN_TIMEOUT_S = 90


def _get_json(base: str, route: str):
    with urllib.request.urlopen(f"{base}/data/plugin/pytorch_profiler/{route}", timeout=10) as response:
        return json.load(response)


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"`bnstudy trace view` printed nothing within {timeout_s} s")


def test_tensorboard_profiler_plugin_lists_run_workers_and_views(tmp_path_factory):
    run = trace_dir(recorded_runs(tmp_path_factory), "syncbn")
    process = subprocess.Popen(
        [sys.executable, "-m", "bnstudy", "trace", "view", str(run)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = _first_line(process, PLUGIN_TIMEOUT_S)
        match = re.search(r"(http://127\.0\.0\.1:(\d+))/#pytorch_profiler", line)
        assert match, line
        base, port = match[1], int(match[2])

        deadline = time.monotonic() + PLUGIN_TIMEOUT_S
        runs = _get_json(base, "runs")
        while ("syncbn" not in runs["runs"] or runs["loading"]) and time.monotonic() < deadline:
            time.sleep(0.5)
            runs = _get_json(base, "runs")
        assert "syncbn" in runs["runs"], runs
        assert {"Overview", "Operator", "Trace"} <= set(_get_json(base, "views?run=syncbn"))
        assert _get_json(base, "workers?run=syncbn&view=Overview") == ["rank0", "rank1"]

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
