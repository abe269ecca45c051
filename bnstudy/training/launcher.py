"""Train a CIFAR-10 CNN with plain BN, SyncBN, GroupNorm or no norm, in one process or under torchrun (DDP).

    torchrun --nproc_per_node=2 launch/train_cifar.py --norm syncbn --out runs/syncbn
    python launch/train_cifar.py --norm bn --epochs 1 --data synthetic --out runs/quick
    torchrun --nproc_per_node=2 -m bnstudy.training.launcher ...   (the same, without the launch/ script)

gloo on CPU and nccl on CUDA are chosen automatically. Rank 0 prints and writes runs/NAME/.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from bnstudy.training.config import EVAL_BN_MODES, TrainConfig

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_cifar.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--norm",
        default=DEFAULTS.norm,
        choices=["bn", "syncbn", "gn", "none"],
        help="bn: per-process batch statistics; syncbn: statistics over all processes; gn: GroupNorm; "
        "none: no normalisation (default: %(default)s)",
    )
    p.add_argument("--model", default=DEFAULTS.model, help="model from bnstudy.models (default: %(default)s)")
    p.add_argument("--width", type=int, default=DEFAULTS.width, help="base channel width of the model")
    p.add_argument(
        "--data",
        default=DEFAULTS.data,
        help="auto: real CIFAR-10 if found ($BNSTUDY_DATA, ./data/cifar10, ../shared/data/cifar10) or "
        "downloadable with --download, else synthetic with a warning; synthetic; or a PATH to a "
        "directory of train.npz/test.npz or a torchvision root (default: %(default)s)",
    )
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-10 if it is missing")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="epochs (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="images per process per step (default: %(default)s)"
    )
    p.add_argument("--lr", type=float, default=DEFAULTS.lr, help="peak SGD learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay, help="(default: %(default)s)")
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS.label_smoothing, help="(default: %(default)s)")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=DEFAULTS.warmup_epochs,
        help="linear warm-up before linear decay to zero (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed for weights, data order and augmentation")
    p.add_argument("--out", default=DEFAULTS.out, help="run directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete epoch")
    p.add_argument(
        "--eval-bn",
        default=DEFAULTS.eval_bn,
        choices=EVAL_BN_MODES,
        help="how plain-BN running stats are made consistent before each evaluation: local (keep each "
        "rank's), reduce (average over ranks), broadcast (copy rank 0's), precise (PreciseBN: "
        "recompute over --precise-bn-batches batches with frozen weights) (default: %(default)s)",
    )
    p.add_argument("--precise-bn-batches", type=int, default=DEFAULTS.precise_bn_batches, help="(default: %(default)s)")
    p.add_argument("--train-subset", type=int, help="use only the first N training images (quick runs)")
    p.add_argument("--test-subset", type=int, help="use only the first N test images (quick runs)")
    p.add_argument(
        "--synthetic-size",
        type=int,
        default=DEFAULTS.synthetic_size,
        help="training images in the synthetic set (default: %(default)s)",
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
        default=DEFAULTS.tta,
        help="evaluate on each test image and its mirror image, averaged (default: on)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="record a few steps of the first epoch with torch.profiler into OUT/tb/ (one worker per rank)",
    )
    p.add_argument("--device", default=DEFAULTS.device, choices=["auto", "cpu", "cuda"], help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})

    from torch.distributed import DistBackendError

    from bnstudy.distributed.collectives import requested_transport
    from bnstudy.distributed.process_group import init_from_env, shutdown
    from bnstudy.distributed.shm_allreduce import PeerLostError
    from bnstudy.errors import UserError, first_line
    from bnstudy.training.loop import train

    peer_lost = (PeerLostError, DistBackendError)  # another rank died: there is nobody to part with
    try:
        config.validate()
        if config.norm == "syncbn":
            requested_transport()
        env = init_from_env(config.device)
        try:
            train(config, env)
        except peer_lost:
            raise
        except BaseException:
            shutdown()  # every rank raised alike (e.g. a UserError on all ranks): part in order
            raise
        shutdown()
    except UserError as exc:
        print(f"train_cifar: error: {exc}", file=sys.stderr)
        return 2
    except peer_lost as exc:
        print(f"train_cifar: error: another process of the job failed ({first_line(exc)})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
