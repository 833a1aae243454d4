"""The engine: one training run of any method, from a config to a checkpointed, exported backbone.

It owns data, precision, schedules, the time budget, checkpoints, resume, stop signals, torchrun,
metrics and health logging; the method (``unsupdistill.methods``) supplies networks, views, the loss
and the export through the hooks of :class:`~unsupdistill.train.method.Method`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from unsupdistill import distributed
from unsupdistill import run_dir as layout
from unsupdistill.config import Config, ConfigError
from unsupdistill.data import DataError, FolderScan, build_dataset, list_late_failures, num_workers
from unsupdistill.data.decoded import keep_decoded
from unsupdistill.data.labeled import training_labels
from unsupdistill.models.backbone import describe_backbone
from unsupdistill.storage import save_backbone, save_checkpoint, save_classifier
from unsupdistill.train.checkpoint import restore_rng
from unsupdistill.train.faults import (
    StopRequest,
    TrainingError,
    TrainingStopped,
    first_non_finite,
    non_finite_advice,
    non_finite_report,
)
from unsupdistill.train.method import Batch, Method, Runtime
from unsupdistill.train.metrics import MetricsLogger
from unsupdistill.train.optimizer import build_optimizer, clip_gradients
from unsupdistill.train.precision import precision_name, resolve_precision
from unsupdistill.train.sampler import build_loader
from unsupdistill.train.schedules import ScheduleValues, TimeBudget, budget_clock, scaled_lr, schedule_at
from unsupdistill.train.status import resume_command, write_run_files
from unsupdistill.train.timing import TimeShares

logger = logging.getLogger(__name__)

Probe = Callable[[nn.Module], dict[str, Any]]
"""Measures a backbone during training (k-NN on a labeled set); returns metrics to log under ``eval/``."""


class Trainer:
    """One training run in one process of possibly many.

    Args:
        config: the run's config.
        run_dir: where the run's files go.
        method: builds the method from the config and the runtime (a class from ``unsupdistill.methods``).
        device: this process's device; under torchrun the caller has joined the process group
            (``distributed.session``).
        checkpoint: a loaded checkpoint to resume from.
        dry_run: a batch of 2 per process; nothing is written.
        scan: the image folder's scan, if made already.
        config_notes: comment lines for the top of ``config.yaml``.
        probe: measures the method's probe backbone at epoch ends (main process only).
    """

    def __init__(self, config: Config, run_dir: Path, method: Callable[[Config, Runtime], Method],
                 device: torch.device, checkpoint: dict | None = None, dry_run: bool = False,
                 scan: FolderScan | None = None, config_notes: str = "", probe: Probe | None = None):
        self.config, self.run_dir, self.dry_run, self.config_notes = config, run_dir, dry_run, config_notes
        self.probe = probe
        train = config.train
        self.device = device
        self.is_main = distributed.is_main_process()
        self.world = distributed.world_size()
        if train.batch_size % self.world:
            raise ConfigError(f"train.batch_size={train.batch_size} must divide evenly over {self.world} processes")
        self.global_batch = train.batch_size if not dry_run else 2 * self.world
        self.local_batch = self.global_batch // self.world
        if train.threads:
            torch.set_num_threads(train.threads)
        self.autocast_dtype = resolve_precision(train.precision, self.device)
        torch.manual_seed(train.seed)  # identical initial weights in every process

        # ---- the method's networks, then data decoded at the size it asks for ------------------
        self.timer = TimeShares()  # where the wall time goes, from here (the method's setup counts)
        self.timer.start()
        self.method = method(config, Runtime(self.device, self.autocast_dtype, self.world,
                                             None if dry_run else run_dir, self.timer))
        # a file that fails after the start-up scan is replaced in its batch, counted and listed (not a crash)
        self.dataset = build_dataset(config.data, self.method.image_size, scan=scan, substitute=True,
                                     audio=config.audio)
        self.files_failed = 0
        per_process = len(self.dataset) // self.world
        if per_process < self.local_batch:
            raise DataError(
                f"{len(self.dataset)} readable images are fewer than one batch (train.batch_size="
                f"{train.batch_size}); lower train.batch_size to at most {per_process * self.world}"
            )
        self.dataset = keep_decoded(self.dataset, config.data, None if dry_run else run_dir)  # no decode after epoch 1
        self.loader, self.sampler = build_loader(self.dataset, self.local_batch, self.world, distributed.rank(),
                                                 train.seed, num_workers(config.data), self.device.type == "cuda")
        self.steps_per_epoch = per_process // self.local_batch
        self.total_steps = self.steps_per_epoch * train.epochs
        self.labels = training_labels(config.data.labels, self.dataset)  # None without data.labels
        if self.labels is not None and self.is_main:
            logger.info("%d of %d images labeled (%d classes, %s)", self.labels.labeled, len(self.dataset),
                        len(self.labels.classes), self.labels.source)
        tic = budget_clock()
        self.method.setup(self.dataset, self.labels)  # may pass over the images (a teacher's): inside the budget
        self.setup_seconds = budget_clock() - tic

        # ---- the trained module under DDP, optimizer ----------------------------------------------
        if self.world > 1 and self.device.type == "cuda":
            self.method.sync_batch_norm()  # batch statistics over all processes' images
        student = self.method.student
        if self.world > 1:
            self.method.wrap_student(DistributedDataParallel(
                student, device_ids=[self.device.index] if self.device.index is not None else None))
        self.optimizer = build_optimizer(config.optim, student)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.params = [p for p in student.parameters() if p.requires_grad]

        self.step = 0
        self.budget = TimeBudget(train.time_budget_s, self.total_steps) if train.time_budget_s else None
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed from
        self.stop_request = StopRequest()
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            torch.manual_seed(train.seed + distributed.rank())  # per-process augmentation randomness

    # ---- one step, in the order of the algorithm -------------------------------------------------

    def train_step(self, batch: Batch, sched: ScheduleValues, with_signals: bool) -> dict:
        """One step on a batch (uint8 images (B, 3, H, W) and their dataset indices).

        Returns:
            The loss; health signals and the gradient norm when ``with_signals``; ``stop``: whether any
            process was asked to stop (SIGTERM, SIGINT), the same answer in every process.

        Raises:
            TrainingError: the loss, or the gradients (except with fp16's GradScaler, which skips such
                steps), are not finite in some process. Nothing of this step reached the optimizer or the
                method's EMA networks.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = sched.lr
        self.optimizer.param_groups[0]["weight_decay"] = sched.weight_decay

        # views, forward passes and loss (the method's)
        with self.timer.measure("views"):
            views = self.method.views(batch, sched)
        tic, teacher_before = time.perf_counter(), self.timer.seconds["teacher"]
        loss = self.method.loss(views, sched)
        signals = self.method.signals(sched) if with_signals else {}

        # backward, total gradient norm (for clipping, and to catch non-finite gradients)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

        # stop before a non-finite value reaches the optimizer or an EMA network; agree on stop signals
        loss_bad, grads_bad, stop = self._agree(loss, grad_norm)
        if loss_bad or (grads_bad and self.scaler is None):  # fp16: the GradScaler skips inf gradients
            raise self._non_finite_error("loss" if loss_bad else "gradients", loss, grad_norm, sched,
                                         signals or self.method.signals(sched))

        # clip, the method's gradient changes (e.g. a frozen last layer), optimizer step
        clip_gradients(self.params, self.config.optim, grad_norm)
        self.method.before_optimizer_step(sched)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        # the method's updates that follow the student (EMA teacher, queue)
        self.method.after_optimizer_step(sched)
        self.timer.add("student", time.perf_counter() - tic - (self.timer.seconds["teacher"] - teacher_before))
        if with_signals:
            signals["grad_norm"] = grad_norm.item()
        return {"loss": loss.detach(), **signals, "stop": stop}

    def _agree(self, loss: Tensor, grad_norm: Tensor) -> tuple[bool, bool, bool]:
        """Whether, in any process, the loss is not finite, the gradients are not finite, a stop was requested.

        One all-reduce of three numbers per step (none in a single process), so that every process takes
        the same branch; its host sync is the one a finiteness check needs anyway.
        """
        stop = torch.tensor(self.stop_request.received is not None, device=loss.device)
        flags = torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm), stop]).float()
        loss_bad, grads_bad, stop_any = (distributed.all_reduce_mean(flags) > 0).tolist()
        return loss_bad, grads_bad, stop_any

    def _non_finite_error(self, what: str, loss: Tensor, grad_norm: Tensor, sched: ScheduleValues,
                          signals: dict) -> TrainingError:
        scale = f"{self.scaler.get_scale():.4g}" if self.scaler is not None else "n/a (no GradScaler)"
        precision = precision_name(self.autocast_dtype)
        bad = [name for name, p in self.method.student.named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        return non_finite_report(
            what, step=self.step + 1, epoch=(self.step + 1) / self.steps_per_epoch, world=self.world,
            loss=loss.item(), grad_norm=grad_norm.item(),
            values={"lr": sched.lr, **self.method.scheduled(sched)},
            setting=f"loss scale {scale}, precision {precision} on {self.device.type}", bad_parameters=bad,
            signals=signals, warnings=list(self.method.warnings(signals).values()), saved_step=self.saved_step,
            advice=non_finite_advice(self.config.optim, self.autocast_dtype, self.device),
            resume=self._resume_command())

    # ---- the run ---------------------------------------------------------------------------------

    def fit(self) -> Path | None:
        """Train to the end (or ``train.max_steps``), then export the method's backbone.

        Raises:
            TrainingStopped: SIGTERM or SIGINT arrived; every process stopped after the same step and a
                checkpoint of that step was written.
            TrainingError: a non-finite loss or gradient, or a checkpoint that could not be written.
        """
        cfg = self.config.train
        cap = self.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.total_steps)
        if self.budget is not None:
            self.budget.start(self.step)
            self.budget.spent_before += self.setup_seconds  # the method's setup (a teacher's pass) is in the budget
            self.setup_seconds = 0.0
        planned = self.planned_steps()
        last_step = min(cap, planned)
        metrics = None
        if self.is_main:
            write_run_files(self.run_dir, self.config, self.config_notes, self.dataset,
                            self.method.unused_keys(self.config))
            metrics = MetricsLogger(self.run_dir, resume_step=self.step if self.step else None)
            logger.info(
                "training %s on %d %s: %d epochs x %d steps, global batch %d over %d process(es), "
                "lr %.3g (scaled), precision %s, device %s", self.method.describe(), len(self.dataset),
                "sounds" if self.config.data.kind == "audio" else "images",
                cfg.epochs, self.steps_per_epoch, self.global_batch, self.world,
                scaled_lr(self.config.optim, self.global_batch), precision_name(self.autocast_dtype), self.device)
            if self.budget is not None:
                logger.info("time budget %.0f s (%.0f s used): the schedules end with it, at most %d epochs",
                            cfg.time_budget_s, self.budget.spent(), cfg.epochs)
        warned: set[str] = set()
        tic, images_since = time.perf_counter(), 0
        stop = False
        with contextlib.ExitStack() as cleanup:
            cleanup.enter_context(self.stop_request)  # SIGTERM and SIGINT now stop at the next step boundary
            if metrics is not None:
                cleanup.callback(metrics.close)
            while self.step < last_step and not stop:
                epoch, offset = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch)
                self.sampler.start = offset * self.local_batch
                steps_left = min(self.steps_per_epoch - offset, cap - self.step)  # a budget may end it sooner
                self.method.start_epoch(epoch)
                bar = tqdm(total=steps_left, desc=self._bar_title(epoch, last_step), unit="step",
                           disable=not self.is_main, mininterval=1.0, file=sys.stderr)
                waited = time.perf_counter()
                for loaded in itertools.islice(self.loader, steps_left):
                    self.timer.add("decode", time.perf_counter() - waited)  # the loader's workers decoding
                    batch = self.batch(loaded)
                    sched = schedule_at(self.step, planned, self.steps_per_epoch, self.global_batch,
                                        self.config.optim)
                    log_now = (self.step + 1) % cfg.log_every_steps == 0 or self.step + 1 == last_step
                    out = self.train_step(batch, sched, with_signals=log_now)
                    stop = out.pop("stop")
                    self.step += 1
                    images_since += self.global_batch
                    bar.update()
                    if self.budget is not None:
                        planned = self.planned_steps()
                        last_step = min(cap, planned)
                        bar.set_description(self._bar_title(epoch, last_step), refresh=False)
                    if log_now:
                        loss = distributed.all_reduce_mean(out.pop("loss")).item()
                        elapsed = time.perf_counter() - tic
                        record = {"epoch": self.step / self.steps_per_epoch, "loss": loss, "lr": sched.lr,
                                  "weight_decay": sched.weight_decay, **self.method.scheduled(sched), **out,
                                  "images_per_s": images_since / elapsed}
                        if self.config.data.path is not None:  # an image folder: count late failures
                            failed = torch.tensor(float(self.files_failed), device=self.device)
                            record["files_failed"] = round(distributed.all_reduce_mean(failed).item() * self.world)
                        if self.budget is not None:
                            record.update(planned_steps=planned, budget_left_s=cfg.time_budget_s - self.budget.spent())
                        if self.step == last_step:  # the last record says where the run's time went
                            record.update(self.timer.record())
                        tic, images_since = time.perf_counter(), 0
                        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{record['images_per_s']:.0f}")
                        if metrics is not None:
                            metrics.log(self.step, record)
                            self._warn(out, warned)
                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    epochs_done = self.step // self.steps_per_epoch
                    every = self.config.eval.every_epochs
                    probe_now = self.step == last_step or (end_of_epoch and every > 0 and epochs_done % every == 0)
                    if metrics is not None and self.probe is not None and probe_now and not stop:
                        measured = self.probe(self.method.probe_backbone())
                        logger.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in measured.items()))
                        metrics.log(self.step, {"epoch": self.step / self.steps_per_epoch, **measured}, prefix="eval")
                    if stop or self.step % cfg.save_every_steps == 0 or end_of_epoch or self.step == last_step:
                        self.save(keep=end_of_epoch and cfg.keep_every_epochs > 0
                                  and epochs_done % cfg.keep_every_epochs == 0)
                    if stop or self.step >= last_step:
                        break
                    waited = time.perf_counter()
                bar.close()
            if metrics is not None:
                logger.info("where the time went: %s (decode: waiting for the loader's images; teacher: its "
                            "forwards, in its pass over the images or in the steps; student: its forward, backward "
                            "and optimizer step)", self.timer.line())
        if stop and self.step < last_step:
            raise TrainingStopped(
                f"stopped by {self.stop_request.received or 'a signal to another process'} after step {self.step} "
                f"of {last_step} (epoch {self.step / self.steps_per_epoch:.2f}); checkpoint "
                f"{layout.last_checkpoint(self.run_dir)} written. Resume with: {self._resume_command()}",
                step=self.step)
        if self.is_main:
            return self.export_backbone()
        return None

    def planned_steps(self) -> int:
        """Steps the schedules span: all epochs, or as many as fit in ``train.time_budget_s`` (process 0's plan)."""
        if self.budget is None:
            return self.total_steps
        return distributed.broadcast_int(self.budget.plan(self.step, self.method.forecast_seconds,
                                                           self.steps_per_epoch))

    def _bar_title(self, epoch: int, last_step: int) -> str:
        """``epoch 3/8 of 1105 steps``: the epochs and steps the run will reach (a time budget's plan)."""
        epochs = -(-last_step // self.steps_per_epoch)  # ceil
        return f"epoch {epoch + 1}/{epochs} of {last_step} steps"

    def batch(self, loaded: list, list_failures: bool = True) -> Batch:
        """The loader's ``(items, indices)`` as a :class:`Batch` on the device; files that failed after the scan
        (replaced in the batch) are counted and listed, with ``list_failures`` (a dry run writes nothing)."""
        items, indices = loaded
        failed = None
        if isinstance(items, (list, tuple)):
            items, failed = items
            if list_failures:
                self.files_failed += list_late_failures(self.dataset, failed, self.run_dir / "skipped.txt")
        labels = None
        if self.labels is not None:
            labels = self.labels.labels[indices]
            if failed is not None:  # a replaced file's slot holds another image: not its label
                labels = torch.where(failed >= 0, -1, labels)
            labels = labels.to(self.device, non_blocking=True)
        return Batch(items.to(self.device, non_blocking=True), indices, labels)

    def dry_run_step(self) -> dict:
        """Run one step on a tiny batch and report what a full run would do; writes nothing."""
        batch = self.batch(next(iter(self.loader)), list_failures=False)
        self.method.start_epoch(0)
        sched = schedule_at(0, self.total_steps, self.steps_per_epoch, self.config.train.batch_size,
                            self.config.optim)
        tic = time.perf_counter()
        out = self.train_step(batch, sched, with_signals=True)
        n_params = sum(p.numel() for p in self.method.student.parameters())
        return {"loss": out["loss"].item(), "step_seconds": time.perf_counter() - tic,
                "batch_used": self.global_batch, "student_parameters": n_params,
                "feature_dim": self.method.spec.feature_dim, "images": len(self.dataset)}

    def _warn(self, signals: dict, active: set[str]) -> None:
        """Warn when a failure mode (e.g. a kind of collapse) appears (not again while it lasts)."""
        messages = self.method.warnings(signals)
        for kind in messages.keys() - active:
            logger.warning("step %d: %s", self.step, messages[kind])
        active.clear()
        active.update(messages)

    def _resume_command(self) -> str:
        return resume_command(self.run_dir, self.method.command)

    # ---- checkpoints and outputs -----------------------------------------------------------------

    def save(self, keep: bool = False) -> None:
        """Write ``checkpoints/last.pt`` (and ``epoch_NNNN.pt`` when ``keep``) from the main process.

        Every process calls it: their RNG states are gathered, and all of them raise TrainingError
        when the main process could not write (the files it failed to replace are as they were).
        """
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = distributed.gather_objects(rng)  # every process's RNG, for an exact resume
        error = self._write_checkpoints(rngs, keep) if self.is_main else None
        failed = torch.tensor(float(error is not None), device=self.device)
        if distributed.all_reduce_mean(failed).item() > 0:
            raise TrainingError(error or "process 0 could not write a checkpoint (see its log)")
        self.saved_step = self.step

    def _write_checkpoints(self, rngs: list[dict], keep: bool) -> str | None:
        """Write the checkpoint files atomically; the reason if one could not be written, else None."""
        last = layout.last_checkpoint(self.run_dir)
        kept = ("no checkpoint exists yet" if self.saved_step is None else
                f"the last good checkpoint (step {self.saved_step}) is kept")
        method_state = self.method.checkpoint_state()
        for name, value in method_state.items():
            if isinstance(value, dict) and (bad := first_non_finite(value)):
                return f"refusing to write {last}: {name} tensor {bad} is not finite; {kept}"
        state = {
            "config": self.config.to_dict(), "backbone": self.method.spec.to_dict(), "step": self.step,
            "world_size": self.world, "method": self.method.name, **method_state,
            "exported": self.method.exported_network(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else {},
            "rng": rngs, "train_seconds": self.budget.spent() if self.budget is not None else None,
            "time_shares": self.timer.state_dict(),
        }
        paths = [last] + ([layout.epoch_checkpoint(self.run_dir, self.step // self.steps_per_epoch)] if keep else [])
        for path in paths:
            try:
                save_checkpoint(state, path)
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                newest = f"{last.name} holds step {self.step}" if path != last else kept
                return (f"could not write checkpoint {path}: {str(err).splitlines()[0]}. The file is as it was "
                        f"(written atomically) and {newest}. Fix the cause (e.g. free disk space), then resume "
                        f"with: {self._resume_command()}")
        return None

    def _restore(self, state: dict) -> None:
        self.method.load_checkpoint_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.step = self.saved_step = int(state["step"])
        if self.budget is not None:
            self.budget.spent_before = state.get("train_seconds") or 0.0
        self.timer.load_state_dict(state.get("time_shares", {}))
        restore_rng(state["rng"], self.world, self.device, self.config.train.seed + self.step)
        logger.info("resumed at step %d (epoch %.2f)", self.step, self.step / self.steps_per_epoch)

    def export_backbone(self) -> Path:
        export = self.method.export()
        if bad := first_non_finite(export.state_dict):
            raise TrainingError(f"refusing to export the {export.source} backbone: tensor {bad} is not finite")
        metadata = describe_backbone(export.spec, self.config, self.step, export.source) | export.extra
        path = save_backbone(export.state_dict, metadata, self.run_dir)
        if export.classifier is not None:
            save_classifier(*export.classifier, self.run_dir)
        return path
