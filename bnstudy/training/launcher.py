"""Train a CIFAR-10 CNN with plain BN, SyncBN, GroupNorm or no norm, in one process or under torchrun (DDP).

    torchrun --nproc_per_node=2 launch/train_cifar.py --norm syncbn --out runs/syncbn
    python launch/train_cifar.py --norm bn --epochs 1 --data synthetic --out runs/quick
    python launch/train_cifar.py --resume --out runs/quick --epochs 3   (continue it, or train a finished run further)
    torchrun --nproc_per_node=2 -m bnstudy.training.launcher ...   (the same, without the launch/ script)

gloo on CPU and nccl on CUDA are chosen automatically. Rank 0 prints and writes runs/NAME/. Every option is checked
before a process group, model or file exists; a bad one is a one-line error (printed once) and exit status 2.
--resume takes the run's own options from its checkpoint: options given with it must agree, except --epochs, --lr,
--eval-bn, --precise-bn-batches, --tta, --profile, --profile-steps, --device and --download, which may change (see
README).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnstudy.errors import ArgumentParser, UserError, first_line
from bnstudy.models import IMAGE_MODELS
from bnstudy.norms import NORM_KINDS
from bnstudy.precision import PRECISIONS
from bnstudy.training.config import DEVICES, EVAL_BN_MODES, TrainConfig

DEFAULTS = TrainConfig()
# How long a rank other than 0 waits before it exits after an error. torchrun stops the whole job when the first rank
# exits, so a rank that exits at once can get rank 0 killed before it printed the (same) error; a rank still alive
# after the pause saw an error rank 0 did not, and prints it itself.
OTHER_RANKS_WAIT_S = 10.0


def build_parser() -> ArgumentParser:
    """The launcher's options. Nothing has a parser default (the defaults are :class:`TrainConfig`'s), so the parsed
    namespace holds exactly the options given: a new run fills the rest from the defaults, a resumed run from its
    checkpoint."""
    p = ArgumentParser(
        prog="train_cifar.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    d = DEFAULTS
    p.add_argument(
        "--norm",
        choices=NORM_KINDS,
        help="bn: per-process batch statistics; syncbn: statistics over all processes; gn: GroupNorm; "
        f"none: no normalisation (default: {d.norm})",
    )
    p.add_argument("--model", choices=tuple(IMAGE_MODELS), help=f"model from bnstudy.models (default: {d.model})")
    p.add_argument("--width", type=int, help="base channel width of the model (default: the model's)")
    p.add_argument(
        "--data",
        help="auto: real CIFAR-10 if found ($BNSTUDY_DATA, ./data/cifar10, ../shared/data/cifar10), else downloaded "
        "by torchvision into ./data/cifar10, else synthetic with a warning; synthetic; or a PATH to a "
        f"directory of train.npz/test.npz or a torchvision root (default: {d.data})",
    )
    p.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        help="let torchvision download missing CIFAR-10: by default --data auto does unless BNSTUDY_OFFLINE=1, "
        "a --data PATH only with --download; --no-download keeps the run offline",
    )
    p.add_argument("--epochs", type=int, help=f"epochs; with --resume, the new total (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per process per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak SGD learning rate (default: {d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"(default: {d.weight_decay})")
    p.add_argument("--label-smoothing", type=float, help=f"(default: {d.label_smoothing})")
    p.add_argument(
        "--warmup-epochs", type=float, help=f"linear warm-up before linear decay to zero (default: {d.warmup_epochs})"
    )
    p.add_argument("--seed", type=int, help=f"seed for weights, data order and augmentation (default: {d.seed})")
    p.add_argument("--out", help=f"run directory (default: {d.out})")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last complete epoch, with its own options",
    )
    p.add_argument(
        "--eval-bn",
        choices=EVAL_BN_MODES,
        help="how plain-BN running stats are made consistent before each evaluation: local (keep each "
        "rank's), reduce (average over ranks), broadcast (copy rank 0's), precise (PreciseBN: "
        f"recompute over --precise-bn-batches batches with frozen weights) (default: {d.eval_bn})",
    )
    p.add_argument("--precise-bn-batches", type=int, help=f"(default: {d.precise_bn_batches})")
    p.add_argument("--train-subset", type=int, help="use only the first N training images (quick runs)")
    p.add_argument("--test-subset", type=int, help="use only the first N test images (quick runs)")
    p.add_argument(
        "--synthetic-size", type=int, help=f"training images in the synthetic set (default: {d.synthetic_size})"
    )
    p.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="keep NCHW (channels_last is 1.4-1.5x faster on CPU)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="evaluate on each test image and its mirror image, averaged (default: on)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="record steps of the first epoch with torch.profiler into OUT/tb/ (one worker per rank)",
    )
    p.add_argument(
        "--profile-steps",
        type=int,
        metavar="N",
        help="how many steps --profile records, after one skipped and one warm-up step; more steps give steadier "
        f"shares in `bnstudy trace` (default: {d.profile_steps})",
    )
    p.add_argument("--device", choices=DEVICES, help=f"(default: {d.device})")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="autocast type of forward passes; weights, optimizer and checkpoints stay fp32. auto: bf16 where the "
        "device runs it natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), else fp32; fp16 (CUDA only) adds "
        f"a gradient scaler (default: {d.precision})",
    )
    p.add_argument(
        "--qat-from",
        metavar="RUN",
        help="quantisation-aware fine-tuning of RUN's trained model (a run directory or checkpoint): INT8 weights "
        "and activations simulated, BN folded into the convs; --model and --width are RUN's",
    )
    p.add_argument(
        "--freeze-bn-epoch",
        type=int,
        help="QAT: from this epoch on (0 = from the start) BN's running statistics stop updating and training "
        "normalises with them, as the INT8 model does (default: never)",
    )
    return p


def plan_run(given: dict[str, Any], world_size: int) -> tuple[TrainConfig, dict | None]:
    """The run's config and, for --resume, the checkpoint it continues; every check that needs no data, done
    before any process group, model or file exists (so every rank reaches the same verdict on its own)."""
    if not given.get("resume"):
        config = replace(DEFAULTS, **given)
        if config.qat_from is not None:
            config = _with_source_model(config, given)
        _validate(config, world_size, given)
        from bnstudy.training.run_directory import check_new_run

        check_new_run(Path(config.out))
        return config, None
    from bnstudy.training.checkpoint import load_checkpoint
    from bnstudy.training.run_directory import CHECKPOINT

    out = Path(given.get("out", DEFAULTS.out))
    if not (out / CHECKPOINT).is_file():
        raise UserError(f"{out}: nothing to resume (no {CHECKPOINT}); drop --resume to start a run there")
    checkpoint = load_checkpoint(out / CHECKPOINT)
    config = TrainConfig.from_dict(checkpoint["config"]).resumed_with(given)
    _validate(config, world_size, given)
    if checkpoint["config"].get("world_size") != world_size:
        raise UserError(
            f"{out} was trained by {checkpoint['config'].get('world_size')} process(es), this job has {world_size}; "
            "resume with the same --nproc_per_node"
        )
    if checkpoint["epoch"] > config.epochs:
        raise UserError(
            f"{out} has already trained {checkpoint['epoch']} epochs; --epochs {config.epochs} would undo them "
            f"(pass more than {checkpoint['epoch']} to train it further)"
        )
    return config, checkpoint


def _with_source_model(config: TrainConfig, given: dict[str, Any]) -> TrainConfig:
    """A QAT run's config with the model and width of the run it fine-tunes, which must have BN to fold."""
    from bnstudy.training.checkpoint import load_checkpoint

    try:
        source = load_checkpoint(config.qat_from)["config"]
    except UserError as exc:
        raise UserError(f"--qat-from {exc}") from None
    for name in ("model", "width"):
        if name in given and given[name] != source.get(name):
            raise UserError(
                f"--qat-from {config.qat_from} trained --{name} {source.get(name)}, not {given[name]}; drop --{name}"
            )
    if source.get("norm") not in ("bn", "syncbn"):
        raise UserError(
            f"--qat-from {config.qat_from} was trained with --norm {source.get('norm')}: it has no BN to fold; "
            "fine-tune a run trained with bn or syncbn"
        )
    return replace(config, model=source["model"], width=source.get("width"))


def _validate(config: TrainConfig, world_size: int, given: dict[str, Any]) -> None:
    """The config's checks, the options' that need to know what was given, and the environment's that this run
    depends on (BNSTUDY_MALLOC, BNSTUDY_DDP_TRANSPORT, BNSTUDY_SYNCBN_TIMEOUT_S, BNSTUDY_SYNCBN_TRANSPORT and
    BNSTUDY_SYNCBN_KERNELS)."""
    from bnstudy.memory import requested_malloc

    config.validate(world_size)
    requested_malloc()
    if "profile_steps" in given and not config.profile:
        raise UserError("--profile-steps sets how many steps --profile records; add --profile")
    if world_size > 1:
        from bnstudy.distributed.collectives import requested_timeout_s
        from bnstudy.distributed.ddp_gradients import requested_ddp_transport

        requested_ddp_transport()
        requested_timeout_s()
    if config.norm == "syncbn":
        from bnstudy.distributed.collectives import requested_transport
        from bnstudy.distributed.syncbn_kernels import requested_kernels

        requested_transport()
        requested_kernels()


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _report(exc: UserError, rank: int) -> int:
    """Print the error once, on rank 0 (every rank checks the same options and data and fails alike); see
    :data:`OTHER_RANKS_WAIT_S` for the other ranks."""
    if rank != 0:
        time.sleep(OTHER_RANKS_WAIT_S)
    prefix = "train_cifar: error: " if rank == 0 else f"train_cifar: error on rank {rank}: "
    print(prefix + str(exc), file=sys.stderr, flush=True)
    return 2


def _peer_lost_reason(exc: BaseException) -> str:
    """The gist of a lost-peer error, without gloo's source path and advice."""
    reason = first_line(exc)
    return re.sub(r"^\[[^\]]*\] ", "", reason).split(". This is typically")[0]


def _train(config: TrainConfig, checkpoint: dict | None) -> None:
    from bnstudy.distributed.process_group import init_from_env, is_peer_lost, shutdown
    from bnstudy.memory import retain_freed_memory
    from bnstudy.training.loop import train

    retain_freed_memory()
    env = init_from_env(config.device)
    try:
        train(config, env, checkpoint)
    except BaseException as exc:
        if not is_peer_lost(exc):
            shutdown()  # every rank raised alike (e.g. a UserError on all ranks): part in order
        raise
    shutdown()


def main(argv: list[str] | None = None) -> int:
    rank = _env_int("RANK", 0)
    try:
        config, checkpoint = plan_run(vars(build_parser().parse_args(argv)), _env_int("WORLD_SIZE", 1))
        if checkpoint is not None and checkpoint["epoch"] >= config.epochs:
            if rank == 0:
                print(
                    f"{config.out} already finished its {config.epochs} epochs; nothing to do (pass --epochs N above "
                    f"{config.epochs} to train it further)"
                )
            return 0
        _train(config, checkpoint)
    except UserError as exc:
        return _report(exc, rank)
    except KeyboardInterrupt:
        print("train_cifar: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from bnstudy.distributed.process_group import is_peer_lost

        if not is_peer_lost(exc):
            raise
        print(f"train_cifar: error: another process of the job failed ({_peer_lost_reason(exc)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
