"""Datasets as in-memory tensors: CIFAR-10 and MNIST (torchvision root or .npz directory), a learnable
synthetic CIFAR-shaped set for offline runs, and seed 000's ``make_classification`` problem.

Images stay uint8 (N, H, W, C) in memory; :func:`to_model_input` turns a batch into normalised float NCHW, so
decoding happens once and augmentation can be batched tensor ops.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bnstudy.errors import UserError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class DataError(UserError, ValueError):
    """A dataset could not be loaded; the message is one line naming the file and what was expected."""


@dataclass
class ImageDataset:
    """Images ``x`` uint8 (N, H, W, C), labels ``y`` int64 (N,), and how to normalise them."""

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> ImageDataset:
        """The first ``n`` samples."""
        return ImageDataset(self.x[:n], self.y[:n], self.classes, self.mean, self.std, self.source)


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


_SPECS = {
    "cifar10": _Spec("cifar10", (32, 32, 3), CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD),
    "mnist": _Spec("mnist", (28, 28, 1), MNIST_CLASSES, MNIST_MEAN, MNIST_STD),
}


def to_model_input(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, H, W, C) → float32 (N, C, H, W) normalised per channel; the one training transform."""
    out = x.permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return out.sub_(m).div_(s)


def _validate(spec: _Spec, x: np.ndarray, y: np.ndarray, origin: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 3 and spec.shape[2] == 1:
        x = x[..., None]
    if x.ndim != 4 or tuple(x.shape[1:]) != spec.shape:
        raise DataError(f"{origin}: expected images of shape (N, {', '.join(map(str, spec.shape))}), got {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{origin}: expected uint8 images, got {x.dtype}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{origin}: expected {len(x)} labels of shape (N,), got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= len(spec.classes)):
        raise DataError(f"{origin}: labels must lie in 0..{len(spec.classes) - 1}, found {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


def _load_npz(spec: _Spec, file: Path) -> ImageDataset:
    try:
        with np.load(file) as arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(
                    f"{file}: expected arrays 'x' (uint8 images) and 'y' (int64 labels), found {sorted(arrays.files)}"
                )
            x, y = arrays["x"], arrays["y"]
    except DataError:
        raise
    except Exception as exc:  # zip/pickle errors name nothing useful
        raise DataError(
            f"{file}: not a readable .npz file ({type(exc).__name__}); re-create it with "
            "np.savez_compressed(path, x=..., y=...)"
        ) from None
    x, y = _validate(spec, x, y, str(file))
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), spec.classes, spec.mean, spec.std, str(file))


def _load_torchvision(spec: _Spec, root: Path, train: bool, download: bool) -> ImageDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if spec.name == "cifar10" else datasets.MNIST
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError:
        hint = "pass --download to fetch it" if not download else "check the network or use an .npz directory"
        raise DataError(f"{root}: no torchvision {cls.__name__} data found, or it is corrupt; {hint}") from None
    x = np.asarray(ds.data)
    y = np.asarray(ds.targets)
    x, y = _validate(spec, x, y, str(root))
    return ImageDataset(torch.from_numpy(x), torch.from_numpy(y), spec.classes, spec.mean, spec.std, str(root))


def load_images(name: str, path: str | os.PathLike, split: str = "train", download: bool = False) -> ImageDataset:
    """Load ``name`` ("cifar10" or "mnist") split "train" or "test" from ``path``.

    ``path`` is a directory with ``train.npz``/``test.npz`` (``x`` uint8, ``y`` int64), a single ``.npz`` file,
    or a torchvision root (``download=True`` fetches into it).
    """
    spec = _SPECS[name]
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: file not found; expected an .npz with arrays x (uint8) and y (int64)")
        return _load_npz(spec, path)
    if (path / f"{split}.npz").is_file():
        return _load_npz(spec, path / f"{split}.npz")
    if path.is_dir() and any(path.glob("*.npz")):  # an .npz directory missing one split: downloading cannot help
        found = ", ".join(sorted(p.name for p in path.glob("*.npz")))
        raise DataError(f"{path}: has {found} but no {split}.npz; add {split}.npz with arrays x (uint8) and y (int64)")
    if not path.exists() and not download:
        raise DataError(
            f"{path}: directory not found; expected {split}.npz or a torchvision {name} root "
            "(add --download to fetch it)"
        )
    return _load_torchvision(spec, path, split == "train", download)


EXACT_TEST_FILE = "test_lossless_first1000.npz"


def load_test_images(name: str, path: str | os.PathLike, download: bool = False) -> ImageDataset:
    """The test split of ``path``, preferring ``test_lossless_first1000.npz`` when the directory holds it: the rest
    of that CIFAR-10 ``test.npz`` was decoded from JPEG copies, so accuracy on it is lower."""
    exact = Path(path) / EXACT_TEST_FILE
    return load_images(name, exact if exact.is_file() else path, "test", download=download)


# What a complete torchvision root holds, per dataset: (folder, files); its checksums are torchvision's to check.
_TORCHVISION_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        ("batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))),
    ),
    "mnist": (
        "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ),
}
OFFLINE_ENV = "BNSTUDY_OFFLINE"
DOWNLOAD_ROOT = Path("data")
PROBE_TIMEOUT_S = 3.0
DOWNLOAD_STALL_TIMEOUT_S = 60.0


def _is_real_data(name: str, candidate: Path) -> bool:
    if (candidate / "train.npz").is_file() and (candidate / "test.npz").is_file():
        return True
    folder, files = _TORCHVISION_FILES[name]
    return all((candidate / folder / f).is_file() for f in files)


def find_real_data(name: str) -> Path | None:
    """Where real ``name`` data lies on this machine ($BNSTUDY_DATA/<name>, ./data/<name>, ../shared/data/<name>),
    as train.npz/test.npz or a complete torchvision root (what :func:`download_cifar10` leaves in ./data/cifar10)."""
    candidates = [Path(os.environ["BNSTUDY_DATA"]) / name] if "BNSTUDY_DATA" in os.environ else []
    candidates += [DOWNLOAD_ROOT / name, SHARED_DATA / name]
    for candidate in candidates:
        if _is_real_data(name, candidate):
            return candidate
    return None


def offline_requested() -> bool:
    """Whether $BNSTUDY_OFFLINE asks for no network access (any value but empty, 0, false, no)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TCP connection towards ``url`` (its host, or the proxy urllib would use) cannot be opened within
    ``timeout`` seconds, name lookup included; None when it can. A quick probe, so that an offline machine falls
    back at once instead of waiting on urllib, which has no timeout of its own."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname or "", proxy_parts.port or 80
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"cannot connect to {host}:{port} ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=probe, daemon=True)  # name lookup ignores socket timeouts; don't wait on it
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {host}:{port} within {timeout:g} s"


def download_cifar10(target: Path = DOWNLOAD_ROOT / "cifar10", timeout: float = PROBE_TIMEOUT_S) -> Path:
    """Fetch CIFAR-10 with torchvision into ``target`` (a torchvision root) and return it; DataError says why not.

    The archive is downloaded and extracted in a temporary directory beside ``target``, and the checked batches are
    moved into place only when everything succeeded: a failed or interrupted download leaves no partial files that
    a later run would take for data.
    """
    from torchvision import datasets

    cls = datasets.CIFAR10
    why = unreachable(cls.url, timeout)
    if why is not None:
        raise DataError(f"cannot download CIFAR-10: {why}")
    print(
        f"CIFAR-10 not found locally: downloading it with torchvision into {target} (about 170 MB; "
        f"--no-download or {OFFLINE_ENV}=1 stays offline)",
        file=sys.stderr,
        flush=True,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-download-", dir=target.parent))
    stall = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(DOWNLOAD_STALL_TIMEOUT_S)  # urllib's reads then fail on a stalled connection
        cls(str(staging), train=True, download=True)  # download, check the archive's md5, extract, check batches
        target.mkdir(exist_ok=True)
        os.replace(staging / cls.base_folder, target / cls.base_folder)
    except Exception as exc:  # urllib, tarfile, checksum and file-system errors alike
        first_line = (str(exc).splitlines() or [""])[0]
        raise DataError(f"CIFAR-10 download from {cls.url} failed ({type(exc).__name__}: {first_line})") from None
    finally:
        socket.setdefaulttimeout(stall)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_or_download_cifar10(download: bool | None = None) -> tuple[Path | None, str]:
    """CIFAR-10's root for ``--data auto``, or (None, why not): found locally, else downloaded by torchvision
    unless ``download`` is False (None: unless $BNSTUDY_OFFLINE is set).

    Under torchrun only rank 0 looks and downloads; every rank gets its answer, so all train on the same data.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        answer: list = [None]
        if dist.get_rank() == 0:
            answer = [_find_or_download_cifar10(download)]
        dist.broadcast_object_list(answer, src=0)
        return answer[0]
    return _find_or_download_cifar10(download)


def _find_or_download_cifar10(download: bool | None) -> tuple[Path | None, str]:
    root = find_real_data("cifar10")
    if root is not None:
        return root, ""
    missing = "no CIFAR-10 found ($BNSTUDY_DATA, ./data/cifar10, ../shared/data/cifar10)"
    if download is False or (download is None and offline_requested()):
        return None, f"{missing}; downloads are off (--no-download or {OFFLINE_ENV}=1)"
    try:
        return download_cifar10(), ""
    except DataError as exc:
        return None, f"{missing}; {exc}"


@dataclass(frozen=True)
class SyntheticRecipe:
    """How :func:`synthetic_images` draws an image; the defaults are the calibrated set (README, "The synthetic
    set"). Intensities are in [0, 1] units before clipping and rounding to uint8."""

    prototypes: int = 2  # smooth colour templates per class, fixed by the template seed
    coarse: int = 8  # templates are random coarse x coarse fields, upsampled bicubically
    shift: int = 3  # each image shows its template shifted by up to this many pixels
    lookalike: float = 0.25  # share of images showing a random class's template: no classifier beats ~1 - 0.9 * this
    signal: tuple[float, float] = (0.4, 1.0)  # weight of the image's own class template, uniform in this range
    distractor: float = 0.3  # weight of a random other class's template, uniform in [0, distractor]
    clutter: float = 0.2  # weight of a per-image random low-frequency background
    contrast: tuple[float, float] = (0.08, 0.4)  # per-image pattern std around mid-grey, log-uniform in this range
    brightness: float = 0.2  # per-image offset, uniform in [-brightness, brightness]
    colour_cast: float = 0.1  # per-image, per-channel offset, normal with this standard deviation
    noise: float = 0.05  # per-pixel noise standard deviation


SYNTHETIC_RECIPE = SyntheticRecipe()
_SYNTHETIC_CHUNK = 256  # images per independently seeded draw


def _smooth_fields(gen: torch.Generator, count: int, channels: int, coarse: int, size: int) -> Tensor:
    """``count`` random low-frequency fields (count, channels, size, size), each channel zero-mean, unit-std."""
    fields = torch.randn(count, channels, coarse, coarse, generator=gen)
    fields = torch.nn.functional.interpolate(fields, size=(size, size), mode="bicubic", align_corners=False)
    fields = fields - fields.mean((2, 3), keepdim=True)
    return fields / fields.std((2, 3), keepdim=True).clamp_min(1e-6)


def synthetic_images(
    name: str = "cifar10",
    n: int = 5000,
    seed: int = 0,
    recipe: SyntheticRecipe = SYNTHETIC_RECIPE,
    template_seed: int = 1234,
) -> ImageDataset:
    """A stand-in for ``name`` when no real data is at hand, hard enough that the choice of normalisation shows.

    Each class has ``recipe.prototypes`` smooth colour templates. An image is one of its class's templates,
    shifted, blended with a weaker template of a random other class and a random background, plus noise; then a
    per-image colour cast (and optional brightness shift) that carries no class information, as lighting does in
    photographs. Overlap and clutter keep a small CNN well below 100% on the main job's schedule; the per-image
    offsets make statistics over 1-2 images noisy, which costs plain BN at tiny per-process batches more than
    SyncBN (more images) or GroupNorm (per image).

    Templates depend only on ``template_seed``, so train and test sets drawn with different ``seed`` share the
    classes. Images are drawn in chunks seeded by (seed, chunk), so the first ``m`` images do not depend on ``n``.
    """
    spec = _SPECS[name]
    h, w, c = spec.shape
    k, r = len(spec.classes), recipe
    tgen = torch.Generator().manual_seed(template_seed)
    size = max(h, w) + 2 * r.shift
    templates = _smooth_fields(tgen, k * r.prototypes, c, r.coarse, size).view(k, r.prototypes, c, size, size)
    xs, ys = [], []
    for chunk, start in enumerate(range(0, n, _SYNTHETIC_CHUNK)):
        state = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        x, y = _synthetic_chunk(templates, _SYNTHETIC_CHUNK, h, w, r, gen)  # a whole chunk: the same draws for any n
        xs.append(x[: n - start])
        ys.append(y[: n - start])
    x = torch.cat(xs) if xs else torch.zeros(0, h, w, c, dtype=torch.uint8)
    y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
    return ImageDataset(x, y, spec.classes, spec.mean, spec.std, f"synthetic-{name}(seed={seed})")


def _synthetic_chunk(
    templates: Tensor, m: int, h: int, w: int, r: SyntheticRecipe, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    k, _, c, size = templates.shape[:4]
    y = torch.randint(0, k, (m,), generator=gen)
    lookalike = torch.rand(m, generator=gen) < r.lookalike
    own = torch.where(lookalike, torch.randint(0, k, (m,), generator=gen), y)
    other = (y + torch.randint(1, k, (m,), generator=gen)) % k

    def shown(labels: Tensor) -> Tensor:  # a random prototype of each label, shifted by up to ±shift pixels
        proto = torch.randint(0, r.prototypes, (m,), generator=gen)
        dy, dx = torch.randint(0, 2 * r.shift + 1, (2, m), generator=gen)
        planes = ((labels * r.prototypes + proto) * c).view(m, 1, 1, 1) + torch.arange(c).view(1, c, 1, 1)
        rows = (dy.view(m, 1) + torch.arange(h)).view(m, 1, h, 1)
        cols = (dx.view(m, 1) + torch.arange(w)).view(m, 1, 1, w)
        return templates.reshape(-1)[(planes * size + rows) * size + cols]  # one flat gather: cheaper than 5 indices

    def uniform(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(m, *shape, generator=gen)

    pattern = uniform(*r.signal, 1, 1, 1) * shown(own) + uniform(0.0, r.distractor, 1, 1, 1) * shown(other)
    pattern = pattern + r.clutter * _smooth_fields(gen, m, c, max(2, r.coarse // 2), max(h, w))[..., :h, :w]
    pattern = pattern / pattern.std((1, 2, 3), keepdim=True).clamp_min(1e-6)
    offset = r.brightness * uniform(-1.0, 1.0, 1, 1, 1) + r.colour_cast * torch.randn(m, c, 1, 1, generator=gen)
    contrast = torch.exp(uniform(math.log(r.contrast[0]), math.log(r.contrast[1]), 1, 1, 1))
    images = 0.5 + contrast * pattern + offset + r.noise * torch.randn(m, c, h, w, generator=gen)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return x, y


@dataclass
class TabularSplit:
    """Standardised features and float labels, split into train and test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def toy_classification(
    n_samples: int = 1000, n_features: int = 20, n_informative: int = 15, seed: int = 42, test_size: float = 0.2
) -> TabularSplit:
    """Seed 000's binary problem: sklearn's ``make_classification``, standardised on the training split, 80/20."""
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = make_classification(
        n_samples=n_samples, n_features=n_features, n_informative=n_informative, random_state=seed
    )
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    as_tensor = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return TabularSplit(
        as_tensor(scaler.transform(x_tr)), as_tensor(y_tr), as_tensor(scaler.transform(x_te)), as_tensor(y_te)
    )
