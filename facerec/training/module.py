"""The LightningModule: backbone -> embedding -> margin head -> cross-entropy, plus verification."""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facerec import distributed
from facerec.evaluation import VerificationMetric, embed, log_to_wandb
from facerec.evaluation.embeddings import begin_cudagraph_step
from facerec.heads import MarginHead

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


def total_grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class FaceRecognitionModule(L.LightningModule):
    """Trains `backbone` and `head` with the head's loss (`head.loss`: margin cross-entropy, dense or
    class-sharded; the module never asks which).

    optimizer: a factory `params -> Optimizer` (Hydra `_partial_`); scheduler: an
    optional factory `(optimizer, total_steps) -> LRScheduler`, stepped per optimizer step.
    flip: the flip-test mode for verification embeddings ("sum", "concat", "none").
    config: the resolved run config, saved in checkpoints so eval/export can
    rebuild the model without the original command line.
    max_consecutive_nonfinite: a step whose loss or gradient is not finite on any rank is skipped
    on every rank and leaves the model exactly as it was (parameters, optimizer state and buffers:
    BatchNorm statistics, the dynamic s, the margins' EMAs; with callbacks=ema, the weight average); it is counted and logged, and this many
    in a row stop the run.

    Gradient accumulation (trainer.accumulate_grad_batches = k): an optimizer step sums the gradients
    of k micro-batches of B = dataset.batch_size samples, and Lightning divides each micro-batch's loss
    by k, so a step's gradient is that of the mean loss over its k B samples, as one batch of k B gives
    (the epoch's last step, when the epoch's batch count is not a multiple of k, has m < k
    micro-batches: their losses are scaled by k / m here, so that step too is a mean). The LR schedule
    counts optimizer steps. The head's state (the dynamic s, AdaFace's norm mean and std, CurricularFace's
    t) and BatchNorm's statistics advance at every micro-batch, from that micro-batch's samples, as a
    run with batches of B samples would: a micro-batch's loss needs the s and the margin inputs of
    its step, and statistics of the whole accumulated batch exist only after the last micro-batch's
    forward, so the earlier micro-batches would need a second forward, or all k graphs held at once
    (the memory accumulation is there to save). An EMA of rate a thus moves k times per optimizer step, about one move
    of rate k a from the whole batch: a / k keeps its horizon in optimizer steps. The non-finite guard
    takes its copy of the buffers before a step's first micro-batch and tests every micro-batch's
    loss, so a skipped step undoes all k updates. The training diagnostics are computed and logged
    once per optimizer step, from its last micro-batch; train/loss is the mean over its micro-batches.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: MarginHead,
        optimizer: Callable,
        scheduler: Callable | None = None,
        flip: str = "sum",
        config: dict | None = None,
        max_consecutive_nonfinite: int = 20,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.flip = flip
        self.config = config
        self.val_metrics = nn.ModuleDict()
        self.last_validation_step = -1
        if max_consecutive_nonfinite < 1:
            raise ValueError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive_nonfinite}")
        self.max_consecutive_nonfinite = int(max_consecutive_nonfinite)
        # buffers: saved in checkpoints, so the counts survive a resume
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("consecutive_nonfinite", torch.zeros((), dtype=torch.long))
        self._step_losses: list[torch.Tensor] = []  # the detached losses of this optimizer step's micro-batches
        self.last_step_taken = True  # whether the last optimizer step changed the model (WeightEMA averages only those)
        self._buffers_before_step: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    # ----------------------------------------------------------------- training
    def _should_log(self) -> bool:
        # Lightning only writes step metrics every `log_every_n_steps`; skip the diagnostics otherwise.
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _model_buffers(self) -> list[torch.Tensor]:
        """The buffers a training forward may change: BatchNorm statistics, the dynamic s, EMAs."""
        return [*self.backbone.buffers(), *self.head.buffers()]

    def _micro_batch_position(self, batch_idx: int) -> tuple[bool, bool, int]:
        """(whether this batch is the first micro-batch of an optimizer step, whether the step follows
        it, the number of micro-batches the step sums) under trainer.accumulate_grad_batches = k:
        Lightning zeroes the gradients before the batches with batch_idx % k == 0 and steps after the
        k-th micro-batch or the epoch's last batch (so its last step may sum fewer than k)."""
        trainer = self.trainer
        accumulation = trainer.accumulate_grad_batches
        start = batch_idx - batch_idx % accumulation
        batches = trainer.num_training_batches  # inf for a loader without a length: every step is taken as full
        micro_batches = accumulation if math.isinf(batches) else min(accumulation, int(batches) - start)
        return batch_idx == start, not trainer.fit_loop._should_accumulate(), micro_batches

    def _step_loss(self) -> torch.Tensor:
        """The mean loss of this optimizer step's micro-batches (non-finite if any of them is)."""
        losses = self._step_losses
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        begin_cudagraph_step()  # validation marks its steps, so CUDA graphs expect every loop to (compile.mode)
        first, last, micro_batches = self._micro_batch_position(batch_idx)
        # A skipped step must leave the model as it was: a non-finite forward has already written
        # NaN into every BatchNorm's running statistics by the time the loss shows it. Every
        # micro-batch changes the buffers, so the copy is the state before the step's first one.
        buffers = self._model_buffers()
        if len(self._buffers_before_step) != len(buffers):  # the first step (or a resume mid-step): allocate the copies once
            self._buffers_before_step = [buffer.clone() for buffer in buffers]
        elif first:  # one fused multi-tensor copy, not one kernel per buffer (hundreds in an IResNet)
            torch._foreach_copy_(self._buffers_before_step, buffers)
        if first:
            self._step_losses = []
        should_log = last and self._should_log()  # once per optimizer step: Lightning writes its last value
        loss, stats = self.head.loss(self.backbone(images), labels, statistics=should_log)
        self._step_losses.append(loss.detach())
        if should_log:
            self.log_dict({f"train/{key}": value for key, value in stats.items()}, on_step=True, on_epoch=False)
            # The loss too only on logging steps (each self.log is Python work), and as a host copy:
            # Lightning reads every progress-bar value with .item() after each step from then on,
            # which for a GPU tensor would be a device sync per step.
            self.log("train/loss", self._step_loss().cpu(), on_step=True, on_epoch=False, prog_bar=True)
        accumulation = self.trainer.accumulate_grad_batches
        if micro_batches < accumulation:  # Lightning divides by k: the epoch's short last step averages its m
            loss = loss * (accumulation / micro_batches)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grad_backbone = total_grad_norm(self.backbone.parameters())
        grad_head = total_grad_norm(self.head.parameters())
        step_loss = self._step_loss()
        finite = torch.isfinite(step_loss)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None:
            finite &= torch.isfinite(grad_backbone + grad_head)
        else:
            # Under fp16 the GradScaler owns overflowing gradients: it skips the step and lowers its
            # scale, which is no failure. Its decision is made global here (a class shard's gradients
            # exist on one rank only), and the buffers are restored when it skips.
            found_inf = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
            overflow = distributed.any_rank(sum(v.to(finite.device) for v in found_inf.values()) > 0)
            for value in found_inf.values():
                value.copy_(overflow)
        finite = distributed.all_ranks(finite)  # each rank sees only its shard's or its batch's values
        stepping = finite & ~overflow if scaler is not None else finite
        finite, step_taken = torch.stack([finite, stepping]).tolist()  # one host sync per step, as a GradScaler does
        self.last_step_taken = step_taken
        if not step_taken:
            self._restore_buffers()
        if finite:
            self.consecutive_nonfinite.zero_()
        else:
            self._skip_step(optimizer, step_loss)
        if self._should_log():
            # s multiplies the gradient like a learning-rate factor: log it when comparing scales.
            self.log("train/grad_norm_backbone", grad_backbone)
            self.log("train/grad_norm_head", grad_head)
            self.log("train/nonfinite_steps", self.nonfinite_steps.float())

    def _restore_buffers(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._model_buffers(), self._buffers_before_step)

    def _skip_step(self, optimizer, step_loss: torch.Tensor) -> None:
        # Optimizers leave parameters whose grad is None untouched (no momentum, no weight decay).
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        lr = optimizer.param_groups[0]["lr"]
        detail = f"step {self.global_step}: loss={step_loss.item():.4g}, s={self.head.scale.value:.4g}, lr={lr:.4g}"
        log.warning("non-finite loss or gradient, step skipped (%s)", detail)
        if int(self.consecutive_nonfinite) >= self.max_consecutive_nonfinite:
            raise NonFiniteTrainingError(
                f"training stopped: {int(self.consecutive_nonfinite)} consecutive steps had a non-finite loss or "
                f"gradient (last at {detail}). Parameters are unchanged since the last finite step; lower the "
                "learning rate or the scale s, check the data, or raise max_consecutive_nonfinite."
            )

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.total_training_steps())
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def total_training_steps(self) -> int:
        """Optimizer steps the run will take, for the LR schedule.

        Lightning's `estimated_stepping_batches` would build the train loader's iterator
        here, before a resumed checkpoint's loop state is restored, and the loader's
        position would then never be loaded (no exact mid-epoch resume). So count from the
        datamodule's loader length instead.
        """
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return int(trainer.estimated_stepping_batches)
        batches = len(datamodule.train_dataloader())
        limit = trainer.limit_train_batches
        batches = int(batches * limit) if isinstance(limit, float) else min(batches, int(limit))
        if trainer.max_epochs is None or trainer.max_epochs < 0:  # max_epochs=-1: only max_steps bounds the run
            if trainer.max_steps <= 0:
                raise ValueError("an LR schedule needs trainer.max_epochs >= 0 or trainer.max_steps > 0")
            return trainer.max_steps
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps > 0 else steps

    # --------------------------------------------------------------- validation
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        for name, val_set in getattr(datamodule, "val_sets", {}).items():
            if name not in self.val_metrics:
                self.val_metrics[name] = VerificationMetric.for_set(val_set)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        images, indices = batch
        metric = list(self.val_metrics.values())[dataloader_idx]
        metric.update(embed(self.backbone, images, self.flip), indices)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a partial pass over the sets: nothing to score
            for metric in self.val_metrics.values():
                metric.reset()
            return
        results = {}
        for name, metric in self.val_metrics.items():
            results[name] = metric.compute()  # gathers every rank's embeddings first
            metric.reset()
            for key, value in results[name].summary().items():
                # equal on every rank (the metric gathered all pairs); sync_dist only states it
                self.log(f"val/{name}/{key}", value, add_dataloader_idx=False, sync_dist=True)
        if results:
            accuracy_mean = sum(r.accuracy for r in results.values()) / len(results)
            self.log("val/accuracy_mean", accuracy_mean, prog_bar=True, add_dataloader_idx=False, sync_dist=True)
            if self.trainer.is_global_zero:
                log_to_wandb(self.loggers, results, self.global_step)  # ROC plot and per-set table
        self.last_validation_step = self.global_step

    # ----------------------------------------------------------- class sharding
    def configure_model(self) -> None:
        """Called by Lightning once the process group exists, before a checkpoint is restored and
        before DDP wraps the module: a class-sharded head keeps its rows, which DDP must not
        all-reduce (their gradients are complete on their rank)."""
        ignored = [f"head.{name}" for name in self.head.shard()]
        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def _head_weight_index(self) -> int:
        # The class centres' key in the optimizer state: configure_optimizers passes self.parameters().
        return next(i for i, p in enumerate(self.parameters()) if p is self.head.weight)

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["facerec_config"] = self.config
        checkpoint["rng_states"] = rng_states()
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger" and logger.version:
                checkpoint["wandb_run_id"] = logger.version  # a resumed run continues this W&B run
        # every rank runs this; a sharded head sends its rows' optimizer state to rank 0, which writes the file
        self.head.gather_optimizer_state(checkpoint.get("optimizer_states", []), self._head_weight_index())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "current_model_state" in checkpoint and not any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            # Written with weight averaging (callbacks=ema): `state_dict` holds the average, and
            # the trained tensors, which the optimizer state belongs to, are here: continue from them.
            log.info("the checkpoint holds averaged weights (callbacks=ema); training without averaging continues from its trained weights")
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        # the weights re-shard in MarginHead._load_from_state_dict, the optimizer state here
        self.head.shard_optimizer_state(checkpoint.get("optimizer_states", []), self._head_weight_index())


def _local_rng_state() -> dict:
    """This process's RNG states as tensors and builtin types (checkpoints stay weights-only loadable);
    "cuda": the generator of this process's own device only (None where CUDA is not in use)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": random.getstate(),
    }


def rng_states() -> dict:
    """Every rank's RNG states, in rank order (every rank calls this; rank 0 writes the checkpoint)."""
    return {"ranks": distributed.all_gather_object(_local_rng_state())}


def set_rng_states(states: dict) -> None:
    """Restore this rank's RNG states. A checkpoint written by fewer ranks than resume it leaves the
    extra ranks with their freshly seeded generators (logged: their draws are not the ones of the
    interrupted run); one written by more ranks gives each rank its own. Checkpoints of earlier
    versions hold rank 0's states and `get_rng_state_all()` of every visible device: this device's
    entry is taken where it exists."""
    rank = distributed.world()[0]
    if "ranks" in states:
        if rank >= len(states["ranks"]):
            log.warning(
                "the checkpoint holds the RNG states of %d ranks; rank %d keeps its seeded generators",
                len(states["ranks"]), rank,
            )
            return
        states = states["ranks"][rank]
        cuda = states["cuda"]
    else:  # before per-rank states: rank 0's, and the CUDA state of every device rank 0 saw
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = states["cuda"][device] if device < len(states["cuda"]) else None
    torch.set_rng_state(states["torch"])
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
