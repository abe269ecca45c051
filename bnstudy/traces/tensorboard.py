"""Running TensorBoard with the profiler plugin on 127.0.0.1 for a trace run (``bnstudy trace view``)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bnstudy.errors import UserError
from bnstudy.traces.record import TRACE_FILE


def tensorboard_logdir(path: str | Path) -> Path:
    """The TensorBoard log directory that shows the traces at ``path``: for a trace file or a run folder, the
    folder above the run (so the run is named by its label); for a run directory, its ``tb/``."""
    path = Path(path)
    if path.is_file():
        return path.parent.parent
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass a trace file, a run directory or a TensorBoard run folder")
    if any(TRACE_FILE.match(p.name) for p in path.iterdir() if p.is_file()):
        return path.parent
    if not any(TRACE_FILE.match(p.name) for p in path.rglob("*")):
        raise UserError(f"{path}: no profiler traces (*.pt.trace.json[.gz]) found; record some with --profile")
    return path / "tb" if (path / "tb").is_dir() else path


_ABSL_ERROR = re.compile(r"^[EF]\d{4} \S+ \d+ \S+\] (?P<message>.+)$")


@dataclass
class TensorBoardServer:
    """A running TensorBoard process on 127.0.0.1."""

    url: str
    process: subprocess.Popen
    log: Path

    def wait(self) -> int:
        """Block until TensorBoard exits; its exit code."""
        return self.process.wait()

    def log_error(self) -> str:
        """TensorBoard's own error message from the log (the plugin's dying workers print tracebacks after it),
        else the log's last line."""
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        for line in lines:
            match = _ABSL_ERROR.match(line)
            if match and "TensorBoard" in match["message"]:
                return match["message"]
        return lines[-1] if lines else "no output"


def _wait_until_serving(server: TensorBoardServer, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            raise UserError(f"TensorBoard exited with code {code}: {server.log_error()} (log: {server.log})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugins_listing", timeout=2) as response:
                if "pytorch_profiler" in json.load(response):
                    return
                raise UserError("TensorBoard runs without the profiler plugin; pip install torch-tb-profiler")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    raise UserError(f"TensorBoard did not answer on port {port} within {timeout_s:.0f} s (log: {server.log})")


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def tensorboard_server(path: str | Path, port: int = 0, timeout_s: float = 60.0) -> Iterator[TensorBoardServer]:
    """Run TensorBoard with the profiler plugin on 127.0.0.1 (a free port unless ``port``) for the traces at
    ``path`` until the block ends. Its output goes to a log file (the plugin's messages are noise here), kept
    only when it fails to start, since the error message names it."""
    if importlib.util.find_spec("torch_tb_profiler") is None:
        raise UserError("torch-tb-profiler is not installed; pip install torch-tb-profiler")
    logdir = tensorboard_logdir(path)
    if not port:
        from bnstudy.distributed.process_group import free_port

        port = free_port()
    with tempfile.NamedTemporaryFile(prefix="bnstudy-tensorboard-", suffix=".log", delete=False) as log_file:
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
        process = subprocess.Popen([*command, "--port", str(port)], stdout=log_file, stderr=subprocess.STDOUT)
    server = TensorBoardServer(f"http://127.0.0.1:{port}/#pytorch_profiler", process, Path(log_file.name))
    try:
        _wait_until_serving(server, port, timeout_s)
    except BaseException:
        _stop(process)
        raise
    try:
        yield server
    finally:
        _stop(process)
        server.log.unlink(missing_ok=True)
