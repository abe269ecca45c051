"""A training run's configuration as plain data: stored as ``config.json`` and inside checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from bnstudy.errors import UserError
from bnstudy.norms import NORM_KINDS

EVAL_BN_MODES = ("local", "reduce", "broadcast", "precise")


@dataclass
class TrainConfig:
    """Everything that defines a run; stored as ``config.json`` and inside checkpoints."""

    out: str = "runs/cifar"
    model: str = "resnet"
    width: int | None = None
    norm: str = "bn"
    data: str = "auto"
    download: bool = False
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
    device: str = "auto"

    def validate(self) -> None:
        if self.norm not in NORM_KINDS:
            raise UserError(f"unknown --norm {self.norm!r}; choose one of {', '.join(NORM_KINDS)}")
        if self.eval_bn not in EVAL_BN_MODES:
            raise UserError(f"unknown --eval-bn {self.eval_bn!r}; choose one of {', '.join(EVAL_BN_MODES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.batch_size < 2 and self.norm == "bn":
            raise UserError("--batch-size 1 leaves BatchNorm one value per channel; use at least 2")

    def model_kwargs(self) -> dict:
        return {} if self.width is None else {"width": self.width}
