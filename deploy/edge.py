"""The device side of a deployment: the model's bnstudy metadata, loading and checking inputs, the training transform
in numpy, and onnxruntime sessions.

Imports only numpy and onnxruntime (Pillow lazily, for image files), so it runs where PyTorch, onnx and bnstudy are
absent. An exported model carries its preprocessing in ``metadata_props`` (see bnstudy/export.py):
``bnstudy.preprocess`` holds the input name, per-sample shape, layout and x = (pixels·pixel_scale − mean) / std per
channel. onnxruntime exposes these entries as ``InferenceSession.get_modelmeta().custom_metadata_map``, so reading
them needs no onnx package.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

METADATA_PREFIX = "bnstudy."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OPTIMIZATION_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
EXECUTION_MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
EIGHT_BIT_MODES = ("L", "LA", "RGB", "RGBA")  # Pillow modes whose pixels are uint8 channels


class DeployError(Exception):
    """Bad input the user can fix; the scripts print the one-line message and exit with status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are DeployErrors, so the scripts print them as one line (exit status 2) like every
    other error instead of the usage block (``bnstudy.errors.ArgumentParser``, repeated: bnstudy is not here)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise DeployError(f"{message}; see {self.prog} --help")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message (its type name when empty), shortened at a word boundary: the same as
    ``bnstudy.errors.first_line``, repeated here because bnstudy is not installed on the device."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " …"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temp file beside ``path``, then rename it into place: no half-written results, and
    the permissions the user's umask gives a new file (``mkstemp`` would leave it 0600).

    The same contract as ``bnstudy.io.atomic_write``, repeated here because bnstudy is not installed on the device.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DeployError(f"cannot write {path}: {exc.strerror}; choose a writable location") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(path: Path, option: str = "--out") -> None:
    """Refuse, before the slow work starts, an output ``path`` that cannot be written (``bnstudy.io.check_writable``,
    repeated: bnstudy is not here)."""
    if path.is_dir():
        raise DeployError(f"{option} {path} is a directory; give a file name")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DeployError(f"{option} {path}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DeployError(f"{option} {path}: {parent} is not writable; choose a writable location")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented JSON, written atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


@dataclass(frozen=True)
class SessionConfig:
    """The onnxruntime session options that decide CPU speed; threads 0 means onnxruntime's default (one per core)."""

    level: str = "all"
    threads: int = 0
    execution_mode: str = "sequential"

    def label(self) -> str:
        return f"level {self.level}, {self.threads or 'default'} threads, {self.execution_mode}"


def session_options(config: SessionConfig) -> ort.SessionOptions:
    """``SessionOptions`` for ``config``; parallel execution gets as many inter-op threads as intra-op threads."""
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[config.level]
    options.execution_mode = EXECUTION_MODES[config.execution_mode]
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = config.threads if config.execution_mode == "parallel" else 1
    options.log_severity_level = 3
    return options


def open_session(path: str | os.PathLike, config: SessionConfig = SessionConfig()) -> ort.InferenceSession:
    """A CPU session for the ONNX file at ``path``, with a one-line error for a missing or unloadable file."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path}: model file not found; pass an .onnx file written by `bnstudy export`")
    try:
        return ort.InferenceSession(str(path), session_options(config), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / InvalidGraph types
        raise DeployError(
            f"{path}: onnxruntime cannot load it ({first_line(exc)}); pass an .onnx file written by `bnstudy export`"
        ) from None


def read_metadata(session: ort.InferenceSession) -> dict[str, Any]:
    """The ``bnstudy.*`` metadata of a loaded model, JSON values decoded: ``bnstudy.edge.onnx_export.read_metadata``
    without the onnx package."""
    out = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        if not key.startswith(METADATA_PREFIX):
            continue
        name = key[len(METADATA_PREFIX) :]
        try:
            out[name] = value if name == "version" else json.loads(value)
        except json.JSONDecodeError:
            raise DeployError(
                f"metadata {key!r} is not valid JSON; re-export the model with `bnstudy export`"
            ) from None
    return out


@dataclass(frozen=True)
class ModelSpec:
    """What an image model expects, read from its metadata and checked against its graph."""

    path: str
    input_name: str
    output_name: str
    shape: tuple[int, int, int]  # one sample, (C, H, W)
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    metadata: dict[str, Any]
    num_classes: int | None = None  # the output's class axis, when the graph fixes it

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    def class_name(self, index: int) -> str:
        return self.classes[index] if 0 <= index < len(self.classes) else str(index)


def _check_graph_input(session: ort.InferenceSession, name: str, shape: tuple[int, ...], where: str) -> None:
    inputs = {node.name: node for node in session.get_inputs()}
    if name not in inputs:
        raise DeployError(
            f"{where}: the graph has no input {name!r} (it has {', '.join(map(repr, inputs))}); the metadata does not "
            "belong to this graph, re-export the model"
        )
    node = inputs[name]
    if node.type != "tensor(float)":
        raise DeployError(f"{where}: input {name!r} is {node.type}, not float32; re-export the model")
    dims = list(node.shape)
    fixed = [d if isinstance(d, int) else None for d in dims[1:]]
    if len(dims) != len(shape) + 1 or any(d is not None and d != s for d, s in zip(fixed, shape)):
        raise DeployError(
            f"{where}: input {name!r} has shape {dims}, the metadata says [batch, {', '.join(map(str, shape))}]; "
            "re-export the model"
        )


def model_spec(session: ort.InferenceSession, path: str | os.PathLike) -> ModelSpec:
    """The checked :class:`ModelSpec` of an image classifier exported by bnstudy (layout NCHW, mean/std known)."""
    where = str(path)
    meta = read_metadata(session)
    pre = meta.get("preprocess")
    if not isinstance(pre, dict) or "input_name" not in pre or "input_shape" not in pre:
        raise DeployError(
            f"{where}: no bnstudy.preprocess metadata, so its input transform is unknown; export the model with "
            "`bnstudy export RUN --out model.onnx`"
        )
    shape = tuple(int(s) for s in pre["input_shape"])
    if pre.get("layout") != "NCHW" or len(shape) != 3:
        raise DeployError(
            f"{where}: the model takes {pre.get('layout')} input of shape {list(shape)}; these tools handle image "
            "models (layout NCHW)"
        )
    if pre.get("mean") is None or pre.get("std") is None or pre.get("pixel_scale") is None:
        raise DeployError(f"{where}: the metadata has no pixel_scale/mean/std; export the model from a training run")
    if not len(pre["mean"]) == len(pre["std"]) == shape[0]:
        raise DeployError(f"{where}: mean/std have {len(pre['mean'])} values for {shape[0]} channels; re-export it")
    _check_graph_input(session, pre["input_name"], shape, where)
    outputs = [node.name for node in session.get_outputs()]
    wanted = (pre.get("output_names") or outputs)[0]
    classes = meta.get("classes") or (meta.get("config") or {}).get("classes") or ()
    output = wanted if wanted in outputs else outputs[0]
    output_shape = next(node.shape for node in session.get_outputs() if node.name == output)
    class_axis = output_shape[-1] if output_shape else None
    return ModelSpec(
        path=where,
        input_name=pre["input_name"],
        output_name=output,
        shape=shape,  # type: ignore[arg-type]
        pixel_scale=float(pre["pixel_scale"]),
        mean=tuple(float(v) for v in pre["mean"]),
        std=tuple(float(v) for v in pre["std"]),
        classes=tuple(str(c) for c in classes),
        metadata=meta,
        num_classes=class_axis if isinstance(class_axis, int) else len(classes) or None,
    )


def load_model(
    path: str | os.PathLike, config: SessionConfig = SessionConfig()
) -> tuple[ort.InferenceSession, ModelSpec]:
    """(session, spec) for a bnstudy image model."""
    session = open_session(path, config)
    return session, model_spec(session, path)


def preprocess(images: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """uint8 (N, H, W, C) → float32 (N, C, H, W), (pixels·pixel_scale − mean) / std per channel.

    The same float32 operations in the same order as training's ``bnstudy.data.to_model_input`` (divide by 255,
    subtract the mean, divide by the std), so the model sees the same numbers it was trained and exported on.
    """
    divisor = np.float32(1 / spec.pixel_scale)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / divisor
    return np.ascontiguousarray((x - mean) / std)


def check_images(x: np.ndarray, spec: ModelSpec, origin: str) -> np.ndarray:
    """``x`` as uint8 (N, H, W, C) fitting the model, or a one-line error naming ``origin`` and the mismatch."""
    if x.dtype != np.uint8:
        raise DeployError(f"{origin}: pixels are {x.dtype}, expected uint8 0..255 (raw images, not normalised floats)")
    if x.ndim == 3 and spec.channels == 1:
        x = x[..., None]
    if x.ndim != 4:
        raise DeployError(f"{origin}: images of shape {list(x.shape)}, expected (N, H, W, C)")
    height, width = spec.size
    if x.shape[1:3] != (height, width):
        raise DeployError(
            f"{origin}: images are {x.shape[2]}×{x.shape[1]} (W×H), the model takes {width}×{height}; resize them first"
        )
    if x.shape[3] != spec.channels:
        raise DeployError(
            f"{origin}: images have {x.shape[3]} channel(s), the model takes {spec.channels}; convert them "
            f"({'RGB' if spec.channels == 3 else 'grayscale'}) first"
        )
    return x


@dataclass
class Inputs:
    """Images to run: uint8 (N, H, W, C), a name per image, and labels when the source has them."""

    x: np.ndarray
    names: list[str]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.x)


def read_image(file: Path, spec: ModelSpec) -> np.ndarray:
    """One image file as uint8 (H, W, C), checked against the model."""
    try:
        from PIL import Image
    except ImportError:
        raise DeployError("reading image files needs Pillow (pip install pillow); or pass an .npz with x") from None
    try:
        with Image.open(file) as image:
            image.load()
            if image.mode == "P":  # palette images: the palette's colours are the pixels
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            mode, pixels = image.mode, np.asarray(image)
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's UnidentifiedImageError is an OSError
        raise DeployError(f"{file}: unreadable image ({first_line(exc)}); replace or remove the file") from None
    if mode not in EIGHT_BIT_MODES:
        raise DeployError(f"{file}: image mode {mode} is not 8 bits per channel; convert it to 8-bit RGB or grayscale")
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    return check_images(pixels[None], spec, str(file))[0]


def load_npz(path: Path, spec: ModelSpec, limit: int | None = None) -> Inputs:
    """``x`` (uint8 images, N×H×W×C) and, when present, ``y`` (labels) from an .npz file."""
    try:
        with np.load(path) as arrays:
            if "x" not in arrays.files:
                raise DeployError(f"{path}: no array 'x' (found {sorted(arrays.files)}); save images as x=uint8 NHWC")
            x = arrays["x"][:limit]
            y = arrays["y"][:limit] if "y" in arrays.files else None
    except DeployError:
        raise
    except Exception as exc:  # zip, pickle and format errors name nothing useful
        raise DeployError(
            f"{path}: not a readable .npz ({type(exc).__name__}); write it with np.savez(path, x=uint8 NHWC, y=labels)"
        ) from None
    x = check_images(x, spec, str(path))
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise DeployError(f"{path}: y has shape {list(y.shape)} ({y.dtype}), expected {len(x)} integer labels")
    if y is not None and len(y) and spec.num_classes and (y.min() < 0 or y.max() >= spec.num_classes):
        raise DeployError(
            f"{path}: labels y lie in {y.min()}..{y.max()}, the model has classes 0..{spec.num_classes - 1}; "
            "these labels belong to another dataset"
        )
    return Inputs(x, [f"{path.name}[{i}]" for i in range(len(x))], y, str(path))


def load_inputs(path: str | os.PathLike, spec: ModelSpec, limit: int | None = None) -> Inputs:
    """Images from an .npz (x, optional y), a folder of PNG/JPEG files (sorted by name) or one image file."""
    path = Path(path)
    if not path.exists():
        raise DeployError(f"{path}: not found; pass a folder of PNG/JPEG images, an image file or an .npz with x")
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz(path, spec, limit)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise DeployError(f"{path}: no {', '.join(IMAGE_SUFFIXES)} files in this folder; pass images or an .npz")
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        files = [path]
    else:
        raise DeployError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}), an image folder or an .npz file")
    x = np.stack([read_image(file, spec) for file in files])
    return Inputs(x, [file.name for file in files], None, str(path))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(class indices, probabilities) of the ``k`` largest probabilities per row, largest first."""
    index = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return index, np.take_along_axis(probs, index, axis=1)


@dataclass
class BatchedRun:
    """Outputs of a batched run and where its time went."""

    logits: np.ndarray
    run_seconds: list[float]  # one per session.run call
    preprocess_seconds: float


def run_batched(
    session: ort.InferenceSession, spec: ModelSpec, images: np.ndarray, batch_size: int, warmup: bool = True
) -> BatchedRun:
    """The model's output for uint8 images, preprocessed and run ``batch_size`` at a time; with ``warmup`` the first
    batch runs once untimed first, so one-off allocation and kernel selection do not count as latency."""
    outputs, run_seconds, preprocess_seconds = [], [], 0.0
    if warmup and len(images):
        session.run([spec.output_name], {spec.input_name: preprocess(images[:batch_size], spec)})
    for start in range(0, len(images), batch_size):
        t0 = time.perf_counter()
        x = preprocess(images[start : start + batch_size], spec)
        t1 = time.perf_counter()
        outputs.append(session.run([spec.output_name], {spec.input_name: x})[0])
        run_seconds.append(time.perf_counter() - t1)
        preprocess_seconds += t1 - t0
    return BatchedRun(np.concatenate(outputs), run_seconds, preprocess_seconds)
