"""The pretraining run: build everything from a config, train, checkpoint, export the teacher."""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from lightly.loss import DINOLoss
from lightly.models.utils import get_weight_decay_parameters, update_momentum
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from unsupdistill import distributed
from unsupdistill.augment import MultiCropAugmentation
from unsupdistill.config import Config, ConfigError, LossConfig
from unsupdistill.data import DataError, FolderScan, build_dataset, num_workers, write_skipped
from unsupdistill.evaluate.features import extract_features
from unsupdistill.evaluate.knn import knn_accuracy
from unsupdistill.evaluate.labeled import align_labels, load_labeled
from unsupdistill.models import build_student_teacher
from unsupdistill.models.backbone import describe_backbone
from unsupdistill.storage import remove_stale_temp_files, save_backbone, save_checkpoint
from unsupdistill.train.faults import (
    StopRequest,
    TrainingError,
    TrainingStopped,
    first_non_finite,
    ignore_stop_signals,
)
from unsupdistill.train.health import collapse_warnings, health_signals
from unsupdistill.train.metrics import MetricsLogger
from unsupdistill.train.precision import avoid_cpu_bf16_faults, resolve_precision
from unsupdistill.train.schedules import ScheduleValues, TimeBudget, scaled_lr, schedule_at
from unsupdistill.train.status import resume_command

logger = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (it has no such option), for exact resumes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", distributed.local_rank())


def build_loss(cfg: LossConfig, output_dim: int) -> DINOLoss:
    """lightly's DINO loss: centre and sharpen the teacher, cross-entropy over all pairs but same views,
    centre all-reduced across processes. The teacher temperature is passed per call (a schedule)."""
    return DINOLoss(output_dim=output_dim, teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                    center_momentum=cfg.center_momentum)


class Pretrainer:
    """One DINO pretraining run (Caron et al. 2021, Algorithm 1) in one process of possibly many."""

    def __init__(self, config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
                 scan: FolderScan | None = None, config_notes: str = ""):
        self.config, self.run_dir, self.dry_run, self.config_notes = config, run_dir, dry_run, config_notes
        train = config.train
        self.device = resolve_device(train.device)
        distributed.init_distributed(self.device)
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

        # ---- data: decoding in workers, augmentation batched on the device --------------------
        a = config.augment
        # a file that fails after the start-up scan is replaced in its batch, counted and listed (not a crash)
        self.dataset = build_dataset(config.data, a.global_1.size, scan=scan, substitute=True)
        self.files_failed = 0
        per_process = len(self.dataset) // self.world
        if per_process < self.local_batch:
            raise DataError(
                f"{len(self.dataset)} readable images are fewer than one batch (train.batch_size="
                f"{train.batch_size}); lower train.batch_size to at most {per_process * self.world}"
            )
        self.sampler = ResumableSampler(self.dataset, num_replicas=self.world, rank=distributed.rank(),
                                        shuffle=True, seed=train.seed, drop_last=True)
        workers = num_workers(config.data)
        self.loader = DataLoader(
            self.dataset, batch_size=self.local_batch, sampler=self.sampler, drop_last=True,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(train.seed),  # keeps the global RNG for augmentation
            worker_init_fn=ignore_stop_signals,
        )
        self.steps_per_epoch = per_process // self.local_batch
        self.total_steps = self.steps_per_epoch * train.epochs
        self.augment = MultiCropAugmentation(a).to(self.device)
        self.num_local = a.num_local_crops

        # ---- student, EMA teacher, loss, optimizer ----------------------------------------------
        crop_sizes = (a.global_1.size,) + ((a.local.size,) if a.num_local_crops else ())
        student, self.teacher, self.backbone_spec = build_student_teacher(config.model, crop_sizes)
        avoid_cpu_bf16_faults(student.backbone, crop_sizes, self.autocast_dtype, self.device)  # a oneDNN bf16 fault
        # channels-last: the convolution kernels' preferred layout (student forward + backward ~17 % faster)
        student.to(self.device, memory_format=torch.channels_last)
        self.teacher.to(self.device, memory_format=torch.channels_last)
        if train.compile:  # in place: parameter names (checkpoints, exports) stay as they are
            student.backbone.compile(dynamic=False)
            self.teacher.backbone.compile(dynamic=False)
        self.student_module = student
        if self.world > 1:
            if self.device.type == "cuda":
                student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
                self.student_module = student
            student = DistributedDataParallel(student, device_ids=[self.device.index] if self.device.index is not None
                                              else None)
        self.student = student
        self.loss_fn = build_loss(config.loss, config.model.head_output_dim).to(self.device)
        decay, no_decay = get_weight_decay_parameters([self.student_module])
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        o = config.optim
        if o.name == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.sgd_momentum, weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.params = [p for p in self.student_module.parameters() if p.requires_grad]

        # labeled probe set for k-NN during pretraining, read now so a bad spec fails before training
        self.probe = None
        if config.eval.train and self.is_main and not dry_run:
            train_set = load_labeled(config.eval.train, a.global_1.size, "train")
            test_set = load_labeled(config.eval.test, a.global_1.size, "test")
            self.probe = (train_set, test_set, align_labels(train_set, test_set))

        self.step = 0
        self.budget = TimeBudget(train.time_budget_s, self.total_steps) if train.time_budget_s else None
        self.saved_step: int | None = None  # step of the last checkpoint written or resumed from
        self.stop_request = StopRequest()
        if checkpoint is not None:
            self._restore(checkpoint)
        else:
            torch.manual_seed(train.seed + distributed.rank())  # per-process augmentation randomness

    # ---- one step, in the order of the algorithm -------------------------------------------------

    def train_step(self, images: Tensor, sched: ScheduleValues, with_signals: bool) -> dict:
        """One DINO step on a batch of uint8 images (B, 3, H, W).

        Returns:
            The loss; health signals and the gradient norm when ``with_signals``; ``stop``: whether any
            process was asked to stop (SIGTERM, SIGINT), the same answer in every process.

        Raises:
            TrainingError: the loss, or the gradients (except with fp16's GradScaler, which skips such
                steps), are not finite in some process. Nothing of this step reached the optimizer or the
                teacher.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = sched.lr
        self.optimizer.param_groups[0]["weight_decay"] = sched.weight_decay

        global_views, local_views = self.augment(images.to(self.device, non_blocking=True))
        global_views = global_views.contiguous(memory_format=torch.channels_last)  # (2B, 3, S, S)
        if local_views is not None:
            local_views = local_views.contiguous(memory_format=torch.channels_last)  # (N*B, 3, s, s)
        views = [global_views] if local_views is None else [global_views, local_views]
        with self._autocast():
            # teacher on global crops
            with torch.no_grad():
                _, teacher_out = self.teacher([global_views])  # (2B, K)
            # student on all crops
            student_features, student_out = self.student(views)  # (V*B, D), (V*B, K)

        # loss (in float32, outside autocast): every teacher-global x student-view pair but same views
        teacher_chunks = teacher_out.float().chunk(2)
        student_chunks = student_out.float().chunk(2 + self.num_local)
        signals = (health_signals(teacher_out, self.loss_fn.center, sched.teacher_temp, student_features)
                   if with_signals else {})
        loss = self.loss_fn(list(teacher_chunks), list(student_chunks), teacher_temp=sched.teacher_temp)

        # backward, total gradient norm (for clipping, and to catch non-finite gradients)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

        # stop before a non-finite value reaches the optimizer or the teacher; agree on stop signals
        loss_bad, grads_bad, stop = self._agree(loss, grad_norm)
        if loss_bad or (grads_bad and self.scaler is None):  # fp16: the GradScaler skips inf gradients
            signals = signals or health_signals(teacher_out, self.loss_fn.center, sched.teacher_temp,
                                                student_features)
            raise self._non_finite_error("loss" if loss_bad else "gradients", loss, grad_norm, sched, signals)

        # clip, freeze last layer, optimizer step
        if self.config.optim.clip_grad > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.optim.clip_grad, grad_norm)
        if sched.freeze_last_layer:
            for p in self.student_module.head.last_layer.parameters():
                p.grad = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        # EMA update of the teacher
        update_momentum(self.student_module, self.teacher, m=sched.teacher_momentum)
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
        """The diagnosis of a non-finite loss or gradient: where, the settings and health then, what to try."""
        step = self.step + 1
        where = f" in at least one of {self.world} processes" if self.world > 1 else ""
        scale = f"{self.scaler.get_scale():.4g}" if self.scaler is not None else "n/a (no GradScaler)"
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]
        lines = [
            f"non-finite {what}{where} at step {step} (epoch {step / self.steps_per_epoch:.2f}): loss "
            f"{loss.item():.4g}, total gradient norm {grad_norm.item():.4g}, lr {sched.lr:.3g}, teacher "
            f"temperature {sched.teacher_temp:.3g}, loss scale {scale}, precision {precision} on {self.device.type}",
        ]
        if what == "gradients":
            names = [name for name, p in self.student_module.named_parameters()
                     if p.grad is not None and not torch.isfinite(p.grad).all()]
            lines.append(f"{len(names)} parameter(s) with non-finite gradients, first: {', '.join(names[:4])}")
        lines.append("health at this step: " + ", ".join(f"{key} {value:.4g}" for key, value in signals.items()))
        lines += collapse_warnings(signals, self.config.model.head_output_dim, self.backbone_spec.feature_dim).values()
        kept = ("no checkpoint was written yet" if self.saved_step is None else
                f"the last good checkpoint (step {self.saved_step}) is kept")
        lines.append(f"nothing of this step was applied (no optimizer step, no teacher update); {kept}")
        o = self.config.optim
        advice = [f"lower optim.lr (now {o.lr:g})", f"raise optim.warmup_epochs (now {o.warmup_epochs:g})"]
        if o.clip_grad <= 0:
            advice.append("clip gradients (optim.clip_grad=3)")
        if self.autocast_dtype == torch.bfloat16 and self.device.type == "cpu":
            advice.insert(0, "use train.precision=fp32 (bf16 autocast on CPU can give non-finite gradients in "
                             "oneDNN kernels; unsupdistill.train.precision works around the one known)")
        elif self.autocast_dtype is not None:
            advice.append("use train.precision=fp32")
        lines.append(f"try: {'; '.join(advice)}; then resume with: unsupdistill pretrain --resume {self.run_dir} "
                     "KEY=VALUE")
        return TrainingError("\n  ".join(lines))

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ---- the run ---------------------------------------------------------------------------------

    def fit(self) -> Path | None:
        """Train to the end (or ``train.max_steps``), then export the teacher backbone.

        Raises:
            TrainingStopped: SIGTERM or SIGINT arrived; every process stopped after the same step and a
                checkpoint of that step was written.
            TrainingError: a non-finite loss or gradient, or a checkpoint that could not be written.
        """
        cfg = self.config.train
        cap = self.total_steps if cfg.max_steps is None else min(cfg.max_steps, self.total_steps)
        if self.budget is not None:
            self.budget.start(self.step)
        planned = self.planned_steps()
        last_step = min(cap, planned)
        metrics = None
        if self.is_main:
            self._write_run_files()
            metrics = MetricsLogger(self.run_dir, resume_step=self.step if self.step else None)
            logger.info(
                "training %s on %d images: %d epochs x %d steps, global batch %d over %d process(es), "
                "lr %.3g (scaled), precision %s, device %s", self.backbone_spec.name, len(self.dataset),
                cfg.epochs, self.steps_per_epoch, self.global_batch, self.world,
                scaled_lr(self.config.optim, self.global_batch), self.autocast_dtype or "fp32", self.device)
            if self.budget is not None:
                logger.info("time budget %.0f s (%.0f s used): the schedules end with it, at most %d epochs",
                            cfg.time_budget_s, self.budget.spent(), cfg.epochs)
        collapse_active: set[str] = set()
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
                bar = tqdm(total=steps_left, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                           disable=not self.is_main, mininterval=1.0, file=sys.stderr)
                for batch in itertools.islice(self.loader, steps_left):
                    images = self.batch_images(batch)
                    sched = schedule_at(self.step, planned, self.steps_per_epoch, self.global_batch,
                                        self.config.optim, self.config.loss)
                    log_now = (self.step + 1) % cfg.log_every_steps == 0 or self.step + 1 == last_step
                    out = self.train_step(images, sched, with_signals=log_now)
                    stop = out.pop("stop")
                    self.step += 1
                    images_since += self.global_batch
                    bar.update()
                    if self.budget is not None:
                        planned = self.planned_steps()
                        last_step = min(cap, planned)
                    if log_now:
                        loss = distributed.all_reduce_mean(out.pop("loss")).item()
                        elapsed = time.perf_counter() - tic
                        record = {"epoch": self.step / self.steps_per_epoch, "loss": loss, "lr": sched.lr,
                                  "weight_decay": sched.weight_decay, "teacher_momentum": sched.teacher_momentum,
                                  "teacher_temp": sched.teacher_temp, **out,
                                  "images_per_s": images_since / elapsed}
                        if self.config.data.path is not None:  # an image folder: count late failures
                            failed = torch.tensor(float(self.files_failed), device=self.device)
                            record["files_failed"] = round(distributed.all_reduce_mean(failed).item() * self.world)
                        if self.budget is not None:
                            record.update(planned_steps=planned, budget_left_s=cfg.time_budget_s - self.budget.spent())
                        tic, images_since = time.perf_counter(), 0
                        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{record['images_per_s']:.0f}")
                        if metrics is not None:
                            metrics.log(self.step, record)
                            self._warn_collapse(out, collapse_active)
                    end_of_epoch = self.step % self.steps_per_epoch == 0
                    epochs_done = self.step // self.steps_per_epoch
                    probe_now = self.step == last_step or (
                        end_of_epoch and epochs_done % self.config.eval.every_epochs == 0)
                    if metrics is not None and self.probe is not None and probe_now and not stop:
                        metrics.log(self.step, {"epoch": self.step / self.steps_per_epoch, **self.probe_knn()},
                                    prefix="eval")
                    if stop or self.step % cfg.save_every_steps == 0 or end_of_epoch or self.step == last_step:
                        self.save(keep=end_of_epoch and cfg.keep_every_epochs > 0
                                  and epochs_done % cfg.keep_every_epochs == 0)
                    if stop or self.step >= last_step:
                        break
                bar.close()
        if stop and self.step < last_step:
            raise TrainingStopped(
                f"stopped by {self.stop_request.received or 'a signal to another process'} after step {self.step} "
                f"of {last_step} (epoch {self.step / self.steps_per_epoch:.2f}); checkpoint "
                f"{self.run_dir / 'checkpoints' / 'last.pt'} written. Resume with: {resume_command(self.run_dir)}",
                step=self.step)
        if self.is_main:
            return self.export_backbone()
        return None

    def planned_steps(self) -> int:
        """Steps the schedules span: all epochs, or as many as fit in ``train.time_budget_s`` (process 0's plan)."""
        if self.budget is None:
            return self.total_steps
        return distributed.broadcast_int(self.budget.plan(self.step))

    def batch_images(self, batch: Tensor | list[Tensor]) -> Tensor:
        """The batch's images; files that failed after the scan (replaced in the batch) are counted and listed."""
        if not isinstance(batch, (list, tuple)):
            return batch
        images, failed = batch
        failed = [int(i) for i in failed if i >= 0]
        if failed:
            self.files_failed += len(failed)
            lines = "".join(f"{self.dataset.files[i]}\tfailed after the start-up scan (data.verify="
                            f"{self.dataset.verify}); replaced by another image\n" for i in failed)
            with open(self.run_dir / "skipped.txt", "a", encoding="utf-8", errors="surrogateescape") as f:
                f.write(lines)
        return images

    def probe_knn(self) -> dict:
        """k-NN top-1 of the teacher backbone on the labeled probe set (main process only)."""
        train_set, test_set, test_labels = self.probe
        a, e = self.config.augment, self.config.eval
        backbone = self.teacher.backbone
        # fp32, as `unsupdistill eval` (bf16 features moved results by more than 0.2 points)
        features = [extract_features(backbone, ds, a.global_1.size, a.mean, a.std, device=self.device,
                                     progress=False) for ds in (train_set, test_set)]
        backbone.train()  # the teacher runs in train mode during pretraining, as in DINO
        top1 = knn_accuracy(features[0], train_set.labels, features[1], test_labels, e.k, e.temperature)
        logger.info("step %d: k-NN top-1 (k=%d) on %s: %.2f %%", self.step, e.k, e.test, top1)
        return {"knn_top1": top1, "knn_k": e.k}

    def dry_run_step(self) -> dict:
        """Run one step on a tiny batch and report what a full run would do; writes nothing."""
        batch = next(iter(self.loader))
        images = batch[0] if isinstance(batch, (list, tuple)) else batch  # (images, failed files) from a folder
        sched = schedule_at(0, self.total_steps, self.steps_per_epoch, self.config.train.batch_size,
                            self.config.optim, self.config.loss)
        tic = time.perf_counter()
        out = self.train_step(images, sched, with_signals=True)
        n_params = sum(p.numel() for p in self.student_module.parameters())
        return {"loss": out["loss"].item(), "step_seconds": time.perf_counter() - tic,
                "batch_used": self.global_batch, "student_parameters": n_params,
                "feature_dim": self.backbone_spec.feature_dim, "images": len(self.dataset)}

    def _warn_collapse(self, signals: dict, active: set[str]) -> None:
        """Warn when a kind of collapse appears (not again while it lasts)."""
        messages = collapse_warnings(signals, self.config.model.head_output_dim, self.backbone_spec.feature_dim)
        for kind in messages.keys() - active:
            logger.warning("step %d: %s", self.step, messages[kind])
        active.clear()
        active.update(messages)

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
        last = self.run_dir / "checkpoints" / "last.pt"
        kept = ("no checkpoint exists yet" if self.saved_step is None else
                f"the last good checkpoint (step {self.saved_step}) is kept")
        for name, module in (("student", self.student_module), ("teacher", self.teacher)):
            if bad := first_non_finite(module.state_dict()):
                return f"refusing to write {last}: {name} tensor {bad} is not finite; {kept}"
        state = {
            "config": self.config.to_dict(), "backbone": self.backbone_spec.to_dict(), "step": self.step,
            "world_size": self.world, "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {}, "center": self.loss_fn.center, "rng": rngs,
            "train_seconds": self.budget.spent() if self.budget is not None else None,
        }
        paths = [last] + ([last.with_name(f"epoch_{self.step // self.steps_per_epoch:04d}.pt")] if keep else [])
        for path in paths:
            try:
                save_checkpoint(state, path)
            except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
                newest = f"{last.name} holds step {self.step}" if path != last else kept
                return (f"could not write checkpoint {path}: {str(err).splitlines()[0]}. The file is as it was "
                        f"(written atomically) and {newest}. Fix the cause (e.g. free disk space), then resume "
                        f"with: unsupdistill pretrain --resume {self.run_dir}")
        return None

    def _restore(self, state: dict) -> None:
        self.student_module.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.loss_fn.center.copy_(state["center"])
        self.step = self.saved_step = int(state["step"])
        if self.budget is not None:
            self.budget.spent_before = state.get("train_seconds") or 0.0
        rngs = state["rng"]
        if len(rngs) == self.world:
            rng = rngs[distributed.rank()]
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            logger.warning("checkpoint was written by %d process(es), now %d: augmentation randomness is "
                           "reseeded, so the run continues but not bit-for-bit", len(rngs), self.world)
            torch.manual_seed(self.config.train.seed + self.step + distributed.rank())
        logger.info("resumed at step %d (epoch %.2f)", self.step, self.step / self.steps_per_epoch)

    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.run_dir, self.run_dir / "checkpoints"):
            for tmp in remove_stale_temp_files(folder):
                logger.info("removed %s, left by a process killed while writing", tmp)
        notes = "".join(f"# {line}\n" for line in self.config_notes.splitlines())
        (self.run_dir / "config.yaml").write_text(notes + yaml.safe_dump(self.config.to_dict(), sort_keys=False,
                                                                         allow_unicode=True), encoding="utf-8")
        skipped = write_skipped(self.dataset, self.run_dir / "skipped.txt")
        if skipped:
            logger.info("%d unreadable files listed in %s", skipped, self.run_dir / "skipped.txt")

    def export_backbone(self) -> Path:
        state_dict = self.teacher.backbone.state_dict()
        if bad := first_non_finite(state_dict):
            raise TrainingError(f"refusing to export the teacher backbone: tensor {bad} is not finite")
        metadata = describe_backbone(self.backbone_spec, self.config, self.step, "teacher")
        return save_backbone(state_dict, metadata, self.run_dir)


def pretrain(config: Config, run_dir: Path, checkpoint: dict | None = None, dry_run: bool = False,
             scan: FolderScan | None = None, config_notes: str = "") -> Path | dict:
    """Run pretraining (or one dry-run step) and return the exported backbone's path (or the dry-run report).

    Args:
        config: the run's config.
        run_dir: where the run's files go.
        checkpoint: a loaded checkpoint to resume from.
        dry_run: build everything, run one step on a tiny batch, write nothing.
        scan: the image folder's scan, if made already (``scan_for_run``); else the folder is scanned here.
        config_notes: comment lines for the top of ``config.yaml`` (the automatic settings and why).
    """
    try:
        trainer = Pretrainer(config, run_dir, checkpoint, dry_run, scan, config_notes)
        if dry_run:
            return trainer.dry_run_step()
        return trainer.fit()
    finally:
        distributed.cleanup()
