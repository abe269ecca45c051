"""Real CIFAR-10 when it can be had: found, else torchvision's download, else the synthetic set, quickly and
without partial files.

No test here touches the network: downloads go to a closed local port or to a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import tarfile
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from torchvision import datasets

from bnstudy import data as data_mod
from bnstudy.data import (
    DataError,
    download_cifar10,
    find_or_download_cifar10,
    find_real_data,
    load_images,
    unreachable,
)
from bnstudy.training.config import TrainConfig
from bnstudy.training.launcher import build_parser
from bnstudy.training.run_data import load_run_data
from tests.conftest import free_port


@pytest.fixture
def no_local_cifar(tmp_path, monkeypatch):
    """A working directory and environment in which no real CIFAR-10 is found, downloads allowed, no proxy."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNSTUDY_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data_mod, "SHARED_DATA", tmp_path / "no-shared")
    monkeypatch.delenv("BNSTUDY_OFFLINE", raising=False)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    assert find_real_data("cifar10") is None
    return tmp_path


def _closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/cifar-10-python.tar.gz"


def _fake_cifar_archive(per_batch: int = 4) -> tuple[bytes, list, list, dict]:
    """A tiny archive laid out like CIFAR-10's python version, with the checksums torchvision will check."""
    rng = np.random.default_rng(0)
    members: dict[str, bytes] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        members[name] = pickle.dumps(batch)
    members["batches.meta"] = pickle.dumps({"label_names": list(data_mod.CIFAR10_CLASSES)})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    train = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    meta = {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]}
    return buffer.getvalue(), train, [["test_batch", md5["test_batch"]]], meta


@pytest.fixture
def local_server(tmp_path):
    """Serves tmp_path/served over HTTP on 127.0.0.1; yields (directory, base URL)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# -- 1. real data when it can be had ------------------------------------------------------------------------------


def test_offline_switches_skip_the_download(no_local_cifar, monkeypatch):
    monkeypatch.setattr(datasets.CIFAR10, "url", "http://192.0.2.1/must-not-be-fetched.tar.gz")
    monkeypatch.setattr(data_mod, "download_cifar10", lambda *a, **k: pytest.fail("download attempted"))
    root, why = find_or_download_cifar10(download=False)
    assert root is None and "downloads are off" in why
    monkeypatch.setenv("BNSTUDY_OFFLINE", "1")
    root, why = find_or_download_cifar10(download=None)
    assert root is None and "BNSTUDY_OFFLINE=1" in why


def test_unreachable_server_falls_back_to_synthetic_quickly_and_leaves_nothing(no_local_cifar, monkeypatch, capsys):
    monkeypatch.setattr(datasets.CIFAR10, "url", _closed_port_url())
    start = time.perf_counter()
    data = load_run_data(TrainConfig(data="auto", synthetic_size=200))
    assert time.perf_counter() - start < 10
    assert data.synthetic and "cannot connect to 127.0.0.1" in data.notes[0] and "WARNING" in data.notes[0]
    assert "\n" not in data.notes[0]
    assert not (no_local_cifar / "data").exists()
    assert "downloading" not in capsys.readouterr().err


def test_probe_gives_up_within_its_timeout(monkeypatch):
    def hang(*args, **kwargs):  # a name lookup that never answers in time; then fails as a socket would
        time.sleep(30)
        raise TimeoutError("timed out")

    monkeypatch.setattr(data_mod.socket, "create_connection", hang)
    start = time.perf_counter()
    why = unreachable("https://example.invalid/x", timeout=0.2)
    assert time.perf_counter() - start < 2 and "no answer from example.invalid:443" in why


def test_failed_download_leaves_no_partial_files(no_local_cifar, local_server, monkeypatch, capsys):
    served, base = local_server
    (served / "cifar-10-python.tar.gz").write_bytes(b"not the archive" * 1000)  # wrong md5: torchvision refuses it
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{base}/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="CIFAR-10 download from .* failed") as info:
        download_cifar10(Path("data/cifar10"))
    assert "\n" not in str(info.value)
    assert "downloading it with torchvision into data/cifar10" in capsys.readouterr().err
    assert list((no_local_cifar / "data").iterdir()) == []  # no staging directory, no half-written target
    assert find_real_data("cifar10") is None


def test_download_moves_checked_batches_into_place_and_auto_uses_them(no_local_cifar, local_server, monkeypatch):
    served, base = local_server
    archive, train_list, test_list, meta = _fake_cifar_archive()
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    for attr, value in {
        "url": f"{base}/cifar-10-python.tar.gz",
        "tgz_md5": hashlib.md5(archive).hexdigest(),
        "train_list": train_list,
        "test_list": test_list,
        "meta": meta,
    }.items():
        monkeypatch.setattr(datasets.CIFAR10, attr, value)
    data = load_run_data(TrainConfig(data="auto"))
    assert not data.synthetic and data.description.startswith("CIFAR-10 from data/cifar10")
    assert len(data.train) == 20 and len(data.test) == 4
    assert sorted(p.name for p in (no_local_cifar / "data").iterdir()) == ["cifar10"]  # staging removed
    assert sorted(p.name for p in (no_local_cifar / "data" / "cifar10").iterdir()) == ["cifar-10-batches-py"]
    assert find_real_data("cifar10") == Path("data/cifar10")  # the next run finds it without the network
    assert load_images("cifar10", "data/cifar10", "test").x.shape == (4, 32, 32, 3)


def test_launcher_download_flag_is_three_way():
    parse = build_parser().parse_args
    assert "download" not in vars(parse([])) and TrainConfig().download is None  # not given: the config's None
    assert parse(["--download"]).download is True
    assert parse(["--no-download"]).download is False
