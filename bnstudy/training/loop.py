"""The CIFAR training loop, single process or DDP: data in memory with batched augmentation, evaluation on the
unwrapped model, per-rank BN statistics, checkpoints and resume. ``launch/train_cifar.py`` is a thin CLI over
:func:`train`.
"""

from __future__ import annotations

import math
import platform
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from bnstudy import __version__
from bnstudy.data import to_model_input
from bnstudy.distributed.bn_statistics import bn_layers, bn_statistics_report, sync_bn_buffers
from bnstudy.distributed.collectives import select_transport, world_group_for_syncbn
from bnstudy.distributed.ddp_gradients import metrics_exchange, wrap_ddp
from bnstudy.distributed.process_group import DistEnv, all_reduce_sum, main_print
from bnstudy.distributed.syncbn_kernels import cpu_kernels
from bnstudy.edge.qat import freeze_bn_statistics, prepare_qat
from bnstudy.errors import UserError, first_line
from bnstudy.machine import describe_machine
from bnstudy.memory import malloc_setting
from bnstudy.models import create_model
from bnstudy.precision import Precision, resolve_precision
from bnstudy.traces.record import BACKWARD, DATA_LOADING, FORWARD, OPTIMIZER_STEP, training_profiler
from bnstudy.training.checkpoint import load_checkpoint, save_checkpoint
from bnstudy.training.config import TrainConfig
from bnstudy.training.run_data import RunData, augment, check_run_fits, load_run_data
from bnstudy.training.run_directory import CHECKPOINT, RunWriter, read_summary, removed_unless_checkpointed


class Trainer:
    """One rank's view of a run. Every rank runs the same number of steps: sync BN and DDP issue collectives."""

    def __init__(self, config: TrainConfig, env: DistEnv, resuming: bool = False) -> None:
        config.validate(env.world_size)
        self.config, self.env = config, env
        self.out = Path(config.out)
        self.data = load_run_data(config)
        self.steps_per_epoch = check_run_fits(config, self.data, env.world_size)
        torch.manual_seed(config.seed)
        model = create_model(
            config.model, config.norm, num_classes=len(self.data.train.classes), **config.model_kwargs()
        )
        if config.qat_from is not None:
            model = qat_model(model, config.qat_from, load_weights=not resuming)
        self.precision = resolve_precision(config.precision, env.device)
        self.grad_scaler = self.precision.grad_scaler()
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(env.device, memory_format=self.memory_format)
        self.ddp, self.ddp_transport = wrap_ddp(self.model, env.device) if env.distributed else (self.model, None)
        self.metrics_exchange = metrics_exchange() if self.ddp_transport == "shm" else None
        self.sampler = DistributedSampler(
            range(len(self.data.train)),
            num_replicas=env.world_size,
            rank=env.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self.lr_factor(step))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.start_epoch = 0
        self.best_acc = 0.0

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of the peak: linear warm-up over ``warmup_epochs``, then
        linear decay to zero at the last step of ``epochs``. A pure function of the step and the config, so a resumed
        run whose ``epochs`` (or peak ``lr``) changed continues on the schedule such a run would have had."""
        total = self.config.epochs * self.steps_per_epoch
        warmup = max(1, int(self.config.warmup_epochs * self.steps_per_epoch))
        return min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))

    # -- data ---------------------------------------------------------------------------------------------------
    def _inputs(self, x: Tensor) -> Tensor:
        d = self.data.train
        return to_model_input(x, d.mean, d.std).to(self.env.device).contiguous(memory_format=self.memory_format)

    def _train_batches(self, epoch: int):
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler))
        gen = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch * 1009 + self.env.rank)
        for step in range(self.steps_per_epoch):
            idx = order[step * self.config.batch_size : (step + 1) * self.config.batch_size]
            yield self._inputs(augment(self.data.train.x[idx], gen)), self.data.train.y[idx].to(self.env.device)

    # -- one epoch ----------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, profiler) -> dict:
        self.ddp.train()
        if self.config.freeze_bn_epoch is not None and epoch >= self.config.freeze_bn_epoch:
            freeze_bn_statistics(self.model)
        totals = torch.zeros(3, dtype=torch.float64)
        start = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch,
            mininterval=2.0,
            desc=f"epoch {epoch + 1}/{self.config.epochs}",
            disable=not (self.env.is_main and sys.stderr.isatty()),  # logs get the epoch line below instead
            leave=False,
            dynamic_ncols=True,
        )
        batches = self._train_batches(epoch)
        for step in range(self.steps_per_epoch):
            with record_function(DATA_LOADING):
                x, y = next(batches)
            with record_function(FORWARD), self.precision.autocast():
                logits = self.ddp(x)
                loss = self.criterion(logits, y)
            with record_function(BACKWARD):
                self.optimizer.zero_grad(set_to_none=True)
                self.grad_scaler.scale(loss).backward()
            with record_function(OPTIMIZER_STEP):
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
                self.scheduler.step()
            batch_stats = [loss.item() * len(y), (logits.argmax(1) == y).sum().item(), len(y)]
            stats = all_reduce_sum(batch_stats, self.env.device, self.metrics_exchange).cpu()
            if not math.isfinite(stats[0].item()):
                raise UserError(f"non-finite loss at epoch {epoch + 1} step {step + 1}; {self._last_checkpoint()}")
            totals += stats
            profiler.step()
            elapsed = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{totals[0] / totals[2]:.3f}",
                acc=f"{totals[1] / totals[2]:.3f}",
                img_s=f"{totals[2] / elapsed:.0f}",
            )
            bar.update()
        bar.close()
        elapsed = time.perf_counter() - start
        return {
            "train_loss": (totals[0] / totals[2]).item(),
            "train_acc": (totals[1] / totals[2]).item(),
            "epoch_time_s": elapsed,
            "images_per_s": totals[2].item() / elapsed,
        }

    def _last_checkpoint(self) -> str:
        path = self.out / CHECKPOINT
        if path.exists():
            return f"last good checkpoint: {path} (resume it with --resume and a lower --lr)"
        return "no checkpoint was written yet (start again with a lower --lr)"

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and accuracy of the unwrapped model in eval mode (with ``tta``, averaged over the image and its
        mirror); each rank scores a disjoint shard."""
        model = self.model.eval()
        test = self.data.test
        totals = torch.zeros(3, dtype=torch.float64)
        shard = torch.arange(self.env.rank, len(test), self.env.world_size)
        for chunk in shard.split(512):
            x, y = self._inputs(test.x[chunk]), test.y[chunk].to(self.env.device)
            with self.precision.autocast():
                logits = model(x).float()
                if self.config.tta:  # average with the mirrored image, the one augmentation that is free to undo
                    logits = (logits + model(x.flip(3)).float()) / 2
            totals += torch.tensor(
                [
                    nn.functional.cross_entropy(logits, y, reduction="sum").item(),
                    (logits.argmax(1) == y).sum().item(),
                    len(y),
                ],
                dtype=torch.float64,
            )
        totals = all_reduce_sum(totals, self.env.device).cpu()
        return {"test_loss": (totals[0] / totals[2]).item(), "test_acc": (totals[1] / totals[2]).item()}

    def probe_batch(self) -> Tensor:
        """A fixed training batch per rank, used to observe the statistics BN normalises with."""
        order = torch.arange(self.env.rank, len(self.data.train), self.env.world_size)[: self.config.batch_size]
        return self._inputs(self.data.train.x[order])

    def precise_batches(self):
        gen = torch.Generator().manual_seed(self.config.seed + 77 + self.env.rank)
        for _ in range(self.config.precise_bn_batches):
            idx = torch.randint(0, len(self.data.train), (self.config.batch_size,), generator=gen)
            yield self._inputs(augment(self.data.train.x[idx], gen))

    # -- checkpoints --------------------------------------------------------------------------------------------
    def _bn_buffers(self) -> dict[str, Tensor]:
        return {
            f"{name}.{b}": getattr(m, b).detach().cpu().clone()
            for name, m in bn_layers(self.model)
            for b in ("running_mean", "running_var")
        }

    def checkpoint_state(self, epoch: int) -> dict:
        """Rank 0's model plus every rank's BN buffers (plain BN keeps them per rank)."""
        mine = self._bn_buffers()
        per_rank = [mine]
        if self.env.distributed:
            per_rank = [None] * self.env.world_size
            dist.all_gather_object(per_rank, mine)
        return {
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict(),
            "epoch": epoch,
            "best_acc": self.best_acc,
            "rank_bn_buffers": per_rank,
            "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])},
            "config": checkpoint_config(self.config, self.data, self.env.world_size),
        }

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of this run (its options merged by :meth:`TrainConfig.resumed_with`): weights,
        optimizer, step count, every rank's BN buffers and the RNG; the learning rate then follows this config's
        schedule from the checkpoint's step on."""
        if state["config"].get("world_size") != self.env.world_size:
            raise UserError(
                f"{self.out / CHECKPOINT}: checkpoint was written by {state['config'].get('world_size')} "
                f"processes, this run has {self.env.world_size}; resume with the same --nproc_per_node"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("grad_scaler"):  # fp16 runs only; a run resumed in another precision starts a new scale
                self.grad_scaler.load_state_dict(state["grad_scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"{self.out / CHECKPOINT}: does not match this model ({first_line(exc)}); start a new --out"
            ) from None
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * self.lr_factor(self.scheduler.last_epoch)
        buffers = state["rank_bn_buffers"][self.env.rank]
        with torch.no_grad():
            for name, value in buffers.items():
                self.model.get_buffer(name).copy_(value)
        torch.set_rng_state(state["rng"]["torch"])
        self.start_epoch = state["epoch"]
        self.best_acc = state.get("best_acc", 0.0)


def qat_model(model: nn.Module, source: str, load_weights: bool) -> nn.Module:
    """``model`` in QAT form (:func:`bnstudy.edge.qat.prepare_qat`), with the trained weights of run ``source``
    unless a checkpoint of the QAT run itself is restored into it afterwards."""
    if load_weights:
        try:
            model.load_state_dict(load_checkpoint(source)["model"])
        except RuntimeError as exc:
            raise UserError(f"--qat-from {source}: weights do not match the model ({first_line(exc)})") from None
    return prepare_qat(model)


def checkpoint_config(config: TrainConfig, data: RunData, world_size: int) -> dict:
    """The plain-data description a checkpoint carries, enough to rebuild and deploy the model."""
    d = data.train
    return {
        **asdict(config),
        "num_classes": len(d.classes),
        "model_kwargs": config.model_kwargs(),
        "dataset": "cifar10",
        "data_source": data.description,
        "synthetic": data.synthetic,
        "input_shape": [d.x.shape[3], d.x.shape[1], d.x.shape[2]],
        "mean": list(d.mean),
        "std": list(d.std),
        "classes": list(d.classes),
        "layout": "NCHW",
        "world_size": world_size,
    }


def syncbn_transport(config: TrainConfig, env: DistEnv) -> str | None:
    """How sync BN's all-reduces travel in this run (chosen here, on every rank, before training), or None when
    the run has no sync BN across processes."""
    if config.norm != "syncbn" or not env.distributed:
        return None
    return select_transport(world_group_for_syncbn())


def syncbn_kernels(config: TrainConfig, env: DistEnv) -> str | None:
    """Which build of CPU sync BN's arithmetic this run uses, "compiled" or "python" (chosen, and built on first
    use, here before training rather than in the first step), or None without CPU sync BN across processes."""
    if config.norm != "syncbn" or not env.distributed or env.device.type != "cpu":
        return None
    return cpu_kernels().name


def environment_info(
    env: DistEnv, transport: str | None, kernels: str | None, ddp_transport: str | None, precision: Precision
) -> dict:
    return {
        **precision.record(),
        "bnstudy": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": describe_machine(),
        "world_size": env.world_size,
        "backend": env.backend,
        "device": str(env.device),
        "threads_per_process": torch.get_num_threads(),
        "malloc": malloc_setting(),
        "cuda": torch.cuda.is_available(),
        "syncbn_transport": transport,
        "syncbn_kernels": kernels,
        "ddp_transport": ddp_transport,
    }


def train(config: TrainConfig, env: DistEnv, resume_from: dict | None = None) -> dict:
    """Run a new run, or continue the checkpoint ``resume_from``; returns the summary. Rank 0 writes the run
    directory, from the end of the first epoch on; a run that fails before its first checkpoint leaves none."""
    trainer = Trainer(config, env, resuming=resume_from is not None)
    if resume_from is not None:
        trainer.restore(resume_from)
    out = trainer.out
    if trainer.start_epoch >= config.epochs:  # nothing to train: leave the finished run as it is
        return read_summary(out) or {}
    for note in trainer.data.notes:
        main_print(f"\n{'!' * 100}\n{note}\n{'!' * 100}\n")
    if resume_from is not None:
        main_print(f"resuming {out} after epoch {trainer.start_epoch} of {config.epochs}")
    transport = syncbn_transport(config, env)
    kernels = syncbn_kernels(config, env)
    run_config = checkpoint_config(config, trainer.data, env.world_size)
    run_config |= environment_info(env, transport, kernels, trainer.ddp_transport, trainer.precision)
    writer = RunWriter(out, trainer.start_epoch, run_config) if env.is_main else None
    main_print(
        f"{config.model}/{config.norm} on {trainer.data.description}; {env.world_size} process(es), "
        f"{config.batch_size}/process, backend {env.backend or 'none'}, device {env.device}, "
        f"precision {trainer.precision.describe()}"
        + (f", gradients over {trainer.ddp_transport}" if trainer.ddp_transport else "")
        + (f", sync BN over {transport}" if transport else "")
        + (f" with {kernels} kernels" if kernels else "")
    )
    with removed_unless_checkpointed(out) if env.is_main else nullcontext():
        try:
            return _train_epochs(trainer, writer)
        finally:
            if writer:
                writer.close()


def _train_epochs(trainer: Trainer, writer: RunWriter | None) -> dict:
    """The epochs from ``trainer.start_epoch`` on: train, observe BN statistics, evaluate, record and checkpoint."""
    config, out = trainer.config, trainer.out
    profiler = training_profiler(
        out, trainer.env.rank, enabled=config.profile, active=config.profile_steps, label=config.norm
    )
    profiler.start()
    run_start = time.perf_counter()
    for epoch in range(trainer.start_epoch, config.epochs):
        metrics = trainer.train_epoch(epoch, profiler)
        if epoch == trainer.start_epoch:
            profiler.stop()  # the profiled steps are in the first epoch
        # in float32 whatever the training precision: an exact observation of the ranks' statistics, and PreciseBN's
        # recount at full precision. The report's probe forward pass in training mode would move a QAT model's
        # activation quantiser ranges, so QAT runs have none.
        bn_records = [] if config.qat_from else bn_statistics_report(trainer.model, trainer.probe_batch())
        sync_bn_buffers(trainer.model, config.eval_bn, trainer.precise_batches)
        metrics.update(trainer.evaluate())
        trainer.best_acc = max(trainer.best_acc, metrics["test_acc"])
        metrics = {"epoch": epoch + 1, **metrics, "lr": trainer.scheduler.get_last_lr()[0]}
        state = trainer.checkpoint_state(epoch + 1)
        if writer:
            writer.epoch(metrics, bn_records)
            save_checkpoint(out / CHECKPOINT, state)
            main_print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_acc']:.4f} | test loss {metrics['test_loss']:.4f} "
                f"acc {metrics['test_acc']:.4f} | {metrics['images_per_s']:.0f} img/s"
            )
    return writer.summary({"wall_time_s_this_session": time.perf_counter() - run_start}) if writer else {}
