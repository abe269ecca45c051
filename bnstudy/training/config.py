"""A training run's configuration as plain data: stored as ``config.json`` and inside checkpoints, validated in one
place before anything starts, and merged with the options given when a run is resumed."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from bnstudy.errors import UserError, check_at_least, check_choice, check_positive, check_seed
from bnstudy.models import check_image_model
from bnstudy.norms import NORM_KINDS, check_norm_batch
from bnstudy.precision import check_precision

EVAL_BN_MODES = ("local", "reduce", "broadcast", "precise")
DEVICES = ("auto", "cpu", "cuda")
# What a resumed run may change: how long it trains, its peak learning rate (the way on after a non-finite loss), how
# it is evaluated, profiled, placed or fetched, and its arithmetic precision (master weights stay float32). Everything
# else defines the run and is taken from its checkpoint.
RESUME_MAY_CHANGE = (
    "epochs", "lr", "eval_bn", "precise_bn_batches", "tta", "profile", "profile_steps", "device", "download",
    "precision",
)  # fmt: skip
# Where a run lives and how it was started, not what it is: never compared between runs.
NOT_SETTINGS = ("out", "resume")


def option_name(field: str) -> str:
    """The launcher option that sets ``field``."""
    return {"channels_last": "--no-channels-last", "tta": "--tta/--no-tta"}.get(field, "--" + field.replace("_", "-"))


@dataclass
class TrainConfig:
    """Everything that defines a run; stored as ``config.json`` and inside checkpoints."""

    out: str = "runs/cifar"
    model: str = "resnet"
    width: int | None = None
    norm: str = "bn"
    data: str = "auto"
    download: bool | None = None  # None: --data auto downloads unless $BNSTUDY_OFFLINE; a PATH only with True
    epochs: int = 16
    batch_size: int = 256
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    seed: int = 0
    eval_bn: str = "reduce"
    precise_bn_batches: int = 20
    train_subset: int | None = None
    test_subset: int | None = None
    synthetic_size: int = 20000
    channels_last: bool = True
    resume: bool = False
    tta: bool = True
    profile: bool = False
    profile_steps: int = 3  # steps --profile records, after one skipped and one warm-up step
    device: str = "auto"
    precision: str = "fp32"  # auto: bf16 where the device runs it natively (bnstudy.precision), else fp32
    qat_from: str | None = None  # quantisation-aware fine-tuning of this run's model (BN folded)
    freeze_bn_epoch: int | None = None  # QAT: BN running statistics stop updating from this epoch (0-based) on

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> TrainConfig:
        """The config stored in ``config.json`` or a checkpoint (which hold more keys than these fields)."""
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in stored.items() if key in names})

    def settings(self) -> dict[str, Any]:
        """What defines the run: every field but where it lives and how it was started."""
        return {key: value for key, value in asdict(self).items() if key not in NOT_SETTINGS}

    def validate(self, world_size: int = 1) -> None:
        """Refuse, in one line naming the option, the first value that cannot be right; called before any process
        group, file or model exists. Checks that need the data (subset sizes, steps per epoch) come after it loads
        (:func:`bnstudy.training.run_data.check_run_fits`)."""
        check_choice("--norm", self.norm, NORM_KINDS)
        check_image_model(self.model, self.width)
        check_choice("--eval-bn", self.eval_bn, EVAL_BN_MODES)
        check_choice("--device", self.device, DEVICES)
        for name in ("epochs", "precise_bn_batches", "synthetic_size", "profile_steps"):
            check_at_least(option_name(name), getattr(self, name), 1)
        for name in ("train_subset", "test_subset"):
            if getattr(self, name) is not None:  # None is "all"; 0 is not
                check_at_least(option_name(name), getattr(self, name), 1)
        check_norm_batch(self.norm, self.batch_size, world_size)
        self._check_optimizer()
        check_seed(self.seed)
        if not self.data:
            raise UserError("--data is empty; pass auto, synthetic or a PATH")
        if not self.out:
            raise UserError("--out is empty; name the run directory, e.g. runs/NAME")
        self._check_qat()
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise UserError("--device cuda: CUDA is not available here; use --device cpu (or auto)")
        check_precision(self.precision, self.device_type())

    def device_type(self) -> str:
        """ "cuda" or "cpu": where ``device`` puts the run on this machine."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def _check_qat(self) -> None:
        if self.qat_from is None:
            if self.freeze_bn_epoch is not None:
                raise UserError("--freeze-bn-epoch applies to quantisation-aware training; add --qat-from RUN")
            return
        if self.norm not in ("bn", "syncbn"):
            raise UserError(f"--qat-from folds BN into the convs, so it needs --norm bn or syncbn, not {self.norm}")
        if self.precision != "fp32":  # fake quantisation rounds float32 values to the INT8 grid
            raise UserError(f"--qat-from simulates INT8 in float32, not --precision {self.precision}; pass fp32")
        if self.eval_bn == "precise":  # its forward passes would move the activation quantisers' ranges too
            raise UserError("--eval-bn precise does not apply to QAT runs; use local, reduce or broadcast")
        if self.freeze_bn_epoch is not None and not 0 <= self.freeze_bn_epoch <= self.epochs:
            raise UserError(f"--freeze-bn-epoch must lie in 0..--epochs ({self.epochs}), got {self.freeze_bn_epoch}")

    def _check_optimizer(self) -> None:
        check_positive("--lr", self.lr)
        if not 0 < self.momentum < 1:  # Nesterov momentum needs some momentum
            raise UserError(f"momentum must lie in (0, 1), got {self.momentum:g}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be 0 or more, got {self.weight_decay:g}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing:g}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise UserError(f"--warmup-epochs must lie in 0..--epochs ({self.epochs}), got {self.warmup_epochs:g}")

    def resumed_with(self, given: dict[str, Any]) -> TrainConfig:
        """This stored run's config, continued with the options ``given`` on the resume command line: those in
        :data:`RESUME_MAY_CHANGE` replace the stored values, every other one must agree with what the run used."""
        for name, value in given.items():
            if name in NOT_SETTINGS or name in RESUME_MAY_CHANGE or value == getattr(self, name):
                continue
            raise UserError(
                f"{given.get('out', self.out)} was trained with {name}={getattr(self, name)!r}, not {value!r}; "
                f"--resume takes the run's own options, so drop {option_name(name)} (only "
                f"{', '.join(option_name(n) for n in RESUME_MAY_CHANGE)} may change) or start a new --out"
            )
        changed = {name: value for name, value in given.items() if name in RESUME_MAY_CHANGE}
        return replace(self, **changed, out=given.get("out", self.out), resume=True)

    def model_kwargs(self) -> dict:
        return {} if self.width is None else {"width": self.width}
