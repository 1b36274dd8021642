"""The LightningModule: backbone -> embedding -> head (margin, class centres, scale) -> loss, and
validation through the evaluation protocols eval.py runs."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facerec import lightning_compat
from facerec.evaluation import EvaluationMetric, EvaluationProtocol, ScoringOptions, embed, log_to_wandb, mean_accuracy, write_scores
from facerec.evaluation.embeddings import begin_cudagraph_step
from facerec.heads import MarginHead
from facerec.training.checkpoints import rng_states, set_rng_states
from facerec.training.class_means import CENTRE_INITS, start_centres_at_class_means
from facerec.training.distillation import Distillation
from facerec.training.finetune import FineTuning
from facerec.training.step_guard import NonFiniteStepGuard

log = logging.getLogger(__name__)


def total_grad_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class FaceRecognitionModule(L.LightningModule):
    """Trains `backbone` and `head` with the head's loss (`head.loss`: margin cross-entropy, dense or
    class-sharded; the module never asks which), and validates on `val_protocols` (name -> evaluation
    protocol, any kind: pairs, IJB templates, 1:N), logging `val/<name>/<metric>` for each.

    optimizer: a factory `params -> Optimizer` (Hydra `_partial_`); scheduler: an
    optional factory `(optimizer, total_steps) -> LRScheduler`, stepped per optimizer step.
    flip: the flip-test mode for validation embeddings ("sum", "concat", "none").
    config: the resolved run config, saved in checkpoints so eval/export can
    rebuild the model without the original command line.
    max_consecutive_nonfinite: a step whose loss or gradient is not finite on any rank is skipped
    on every rank and leaves the model exactly as it was (facerec.training.step_guard); this many in
    a row stop the run.
    distillation: with a teacher (facerec.training.distillation, distill=), a step's loss is its
    weighting of the head's loss and the distillation losses, each logged (train/loss_margin,
    train/distill_<loss>, train/teacher_cosine); its projection is trained with the rest.
    centre_init: head.init, how a new run's class centres start: "random" (as the head built them) or
    "class_means" (the class means of the starting backbone, facerec.training.class_means; a
    resumed run takes its centres from its checkpoint either way).
    finetuning: the fine-tuning mode (finetune=, facerec.training.finetune) `backbone` was prepared
    by: it gives the optimizer's parameter groups, and converts checkpoints' backbone to the plain
    form eval.py and export read and back. starting_weights: {"file", "sha256"} of model.weights,
    recorded in checkpoints (a resumed run keeps its checkpoint's).

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
        val_protocols: Mapping[str, EvaluationProtocol] | None = None,
        distillation: Distillation | None = None,
        val_options: ScoringOptions | None = None,
        val_scores_path: str | Path | None = None,
        centre_init: str = "random",
        finetuning: FineTuning | None = None,
        starting_weights: dict[str, str] | None = None,
    ):
        super().__init__()
        if centre_init not in CENTRE_INITS:
            raise ValueError(f"head.init={centre_init!r}: expected one of {', '.join(CENTRE_INITS)}")
        self.backbone = backbone
        self.head = head
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.flip = flip
        self.config = config
        self.step_guard = NonFiniteStepGuard(max_consecutive_nonfinite)
        self.distillation = distillation
        self.val_metrics = nn.ModuleDict({name: EvaluationMetric(p, val_options) for name, p in (val_protocols or {}).items()})
        self.val_scores_path = None if val_scores_path is None else Path(val_scores_path)
        self.last_validation_step = -1
        self.val_history: list[list] = []  # [step, set, accuracy] of every validation (the W&B panel per set)
        self.centre_init = centre_init
        self.finetuning = finetuning if finetuning is not None else FineTuning()
        self.starting_weights = starting_weights
        self.register_load_state_dict_pre_hook(_rename_keys_of_earlier_modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    # ----------------------------------------------------------------- training
    def _model_buffers(self) -> list[torch.Tensor]:
        """The buffers a training forward may change: BatchNorm statistics, the dynamic s, EMAs,
        distillation's running thresholds."""
        extra = self.distillation.buffers() if self.distillation is not None else ()
        return [*self.backbone.buffers(), *self.head.buffers(), *extra]

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
        return batch_idx == start, lightning_compat.optimizer_steps_after_batch(trainer), micro_batches

    @property
    def last_step_taken(self) -> bool:
        """Whether the last optimizer step changed the model (the weight EMA averages only those)."""
        return self.step_guard.step_taken

    def training_step(self, batch, batch_idx):
        images, labels = batch
        begin_cudagraph_step()  # validation marks its steps, so CUDA graphs expect every loop to (compile.mode)
        first, last, micro_batches = self._micro_batch_position(batch_idx)
        self.step_guard.start_micro_batch(self._model_buffers(), first)
        should_log = last and lightning_compat.logs_this_step(self.trainer)  # once per optimizer step
        embeddings = self.backbone(images)
        loss, stats = self.head.loss(embeddings, labels, statistics=should_log)
        if self.distillation is not None:
            loss, distill_stats = self.distillation(images, embeddings, labels, loss)
            stats = {**stats, **distill_stats}
        self.step_guard.record_loss(loss)
        if should_log:
            self.log_dict({f"train/{key}": value for key, value in stats.items()}, on_step=True, on_epoch=False)
            # The loss too only on logging steps (each self.log is Python work), and as a host copy:
            # Lightning reads every progress-bar value with .item() after each step from then on,
            # which for a GPU tensor would be a device sync per step.
            self.log("train/loss", self.step_guard.step_loss().cpu(), on_step=True, on_epoch=False, prog_bar=True)
        accumulation = self.trainer.accumulate_grad_batches
        if micro_batches < accumulation:  # Lightning divides by k: the epoch's short last step averages its m
            loss = loss * (accumulation / micro_batches)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        grad_backbone = total_grad_norm(self.backbone.parameters())
        grad_head = total_grad_norm(self.head.parameters())
        grad_checked = grad_backbone + grad_head  # the guard tests it for finiteness
        if self.distillation is not None:  # the projection of embedding distillation
            grad_checked = grad_checked + total_grad_norm(self.distillation.parameters())

        def describe(loss: torch.Tensor) -> str:
            lr = optimizer.param_groups[-1]["lr"]  # the head's (finetune= may give the backbone a group of its own)
            return f"step {self.global_step}: loss={loss.item():.4g}, s={self.head.scale.value:.4g}, lr={lr:.4g}"

        self.step_guard.check(self.trainer, optimizer, grad_checked, self._model_buffers(), describe)
        if lightning_compat.logs_this_step(self.trainer):
            # s multiplies the gradient like a learning-rate factor: log it when comparing scales.
            self.log("train/grad_norm_backbone", grad_backbone)
            self.log("train/grad_norm_head", grad_head)
            self.log("train/nonfinite_steps", self.step_guard.nonfinite_steps.float())

    def _parameter_groups(self) -> list[dict]:
        """The fine-tuning mode's parameter groups: every parameter, the backbone's first, in
        self.parameters()'s order (the backbone is the first module)."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return self.finetuning.param_groups(list(self.backbone.parameters()), [p for p in self.parameters() if id(p) not in backbone])

    def configure_optimizers(self):
        groups = self._parameter_groups()
        optimizer = self.optimizer_factory([{k: v for k, v in group.items() if k != "lr_scale"} for group in groups])
        for group, wanted in zip(optimizer.param_groups, groups):
            group["lr"] *= wanted["lr_scale"]
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
        loaders = list(getattr(datamodule, "val_sets", {}))
        if datamodule is not None and loaders != list(self.val_metrics):
            raise ValueError(
                f"the datamodule's validation sets {loaders} are not the module's evaluation sets {list(self.val_metrics)}; "
                "build both from the same val_sets (facerec.training.fit.train)"
            )

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        images, indices = batch
        metric = list(self.val_metrics.values())[dataloader_idx]
        metric.update(embed(self.backbone, images, self.flip), indices)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a partial pass over the sets: nothing to score
            for metric in self.val_metrics.values():
                metric.reset()
            return
        evaluations = {}
        for name, metric in self.val_metrics.items():
            evaluations[name] = metric.compute()  # gathers every rank's embeddings first
            metric.reset()
            summary = evaluations[name].summary()
            for key, value in {**summary, **evaluations[name].bounds()}.items():
                # equal on every rank (the metric gathered all images); sync_dist only states it
                self.log(f"val/{name}/{key}", value, add_dataloader_idx=False, sync_dist=True)
            if "accuracy" in summary:
                self.val_history.append([self.global_step, name, summary["accuracy"]])
        accuracy_mean = mean_accuracy(evaluations)
        if accuracy_mean is not None:
            self.log("val/accuracy_mean", accuracy_mean, prog_bar=True, add_dataloader_idx=False, sync_dist=True)
        if evaluations and self.trainer.is_global_zero:
            log_to_wandb(self.loggers, evaluations, self.global_step, history=self.val_history)  # tables, ROC, CMC, accuracy per set
            if self.val_scores_path is not None:  # the last validation's scored items: facerec.tools.compare pairs runs on them
                self.val_scores_path.parent.mkdir(parents=True, exist_ok=True)
                write_scores(evaluations, self.val_scores_path)
        self.last_validation_step = self.global_step

    # ----------------------------------------------------------- class sharding
    def configure_model(self) -> None:
        """Called by Lightning once the process group exists, before a checkpoint is restored and
        before DDP wraps the module: a class-sharded head keeps its rows, which DDP must not
        all-reduce (their gradients are complete on their rank)."""
        ignored = [f"head.{name}" for name in self.head.shard()]
        if ignored:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, ignored)

    def on_train_start(self) -> None:
        """head.init=class_means in a new run: the centres start at the class means, here because every
        rank holds its rows by now (configure_model), a resumed run has restored its own, and no
        optimizer step has been taken. train/init_top1: the training images' top-1 against them."""
        if self.centre_init != "class_means" or self.trainer.ckpt_path is not None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("head.init=class_means reads the training images from the datamodule: fit with datamodule=")
        result = start_centres_at_class_means(
            self.backbone, self.head, datamodule.unaugmented_train_dataloader(), self.device, self.trainer.precision_plugin
        )
        for logger in self.loggers:
            logger.log_metrics({"train/init_top1": result.top1}, step=self.global_step)

    def _centres_index(self) -> int:
        # The class centres' key in the optimizer state: the position in configure_optimizers' groups.
        parameters = (p for group in self._parameter_groups() for p in group["params"])
        return next(i for i, p in enumerate(parameters) if p is self.head.centres.weight)

    # -------------------------------------------------------------- checkpoints
    def _convert_backbone(self, checkpoint: dict, convert) -> None:
        """Apply `convert(name, backbone state) -> backbone state` to the backbone's entries of the
        checkpoint's module states (`state_dict`, and `current_model_state` under weight averaging)."""
        prefix = "backbone."
        for name in ("state_dict", "current_model_state"):
            if name in checkpoint:
                state = checkpoint[name]
                backbone = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
                converted = convert(name, backbone)
                if converted is not backbone:  # the plain form is the trained one for every mode but LoRA: left as it was
                    rest = {key: value for key, value in state.items() if not key.startswith(prefix)}
                    checkpoint[name] = {**{prefix + key: value for key, value in converted.items()}, **rest}

    def _save_plain_backbone(self, checkpoint: dict) -> None:
        """The checkpoint's module states get the plain backbone; what resuming needs beyond it goes to
        `finetune_training_state`."""
        kept = {}

        def plain(name: str, state: dict) -> dict:
            plain_state, kept[name] = self.finetuning.plain_state(self.backbone, state)
            return plain_state

        self._convert_backbone(checkpoint, plain)
        kept = {name: state for name, state in kept.items() if state}
        if kept:
            checkpoint["finetune_training_state"] = kept

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["facerec_config"] = self.config
        checkpoint["starting_weights"] = self.starting_weights
        checkpoint["val_history"] = self.val_history
        self._save_plain_backbone(checkpoint)
        checkpoint["rng_states"] = rng_states()
        if self.distillation is not None:  # which teacher: a resumed run must learn from the same one
            checkpoint["distill_teacher"] = self.distillation.teacher.identity
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger" and logger.version:
                checkpoint["wandb_run_id"] = logger.version  # a resumed run continues this W&B run
        # every rank runs this; a sharded head sends its rows' optimizer state to rank 0, which writes the file
        self.head.gather_optimizer_state(checkpoint.get("optimizer_states", []), self._centres_index())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        kept = checkpoint.pop("finetune_training_state", {})
        self._convert_backbone(checkpoint, lambda name, plain: self.finetuning.training_state(plain, kept.get(name, {})))
        self.starting_weights = checkpoint.get("starting_weights")
        self.val_history = checkpoint.get("val_history", [])
        if "current_model_state" in checkpoint and not any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            # Written with weight averaging (callbacks=ema): `state_dict` holds the average, and
            # the trained tensors, which the optimizer state belongs to, are here: continue from them.
            log.info("the checkpoint holds averaged weights (callbacks=ema); training without averaging continues from its trained weights")
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        saved_scale = checkpoint.get("facerec_config", {}).get("scale")
        if saved_scale is not None and saved_scale != (self.config or {}).get("scale"):
            # resume.allow_changes=[scale] (train.py refuses it otherwise): the new policy starts from
            # its own initial state, whatever state the old one had
            fresh = {f"head.scale.{key}": value for key, value in self.head.scale.state_dict().items()}
            for name in ("state_dict", "current_model_state"):
                if name in checkpoint:
                    kept = {k: v for k, v in checkpoint[name].items() if not k.startswith("head.scale.")}
                    checkpoint[name] = {**kept, **fresh}
            log.info("scale policy changed on resume: %s starts from s = %.4f", self.head.scale, self.head.scale.value)
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        # the weights re-shard as the class centres load them, the optimizer state here
        self.head.shard_optimizer_state(checkpoint.get("optimizer_states", []), self._centres_index())


def _rename_keys_of_earlier_modules(module: FaceRecognitionModule, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the step guard had a module of its own keep its counters at the
    top level: move them, so such checkpoints resume."""
    for name in ("nonfinite_steps", "consecutive_nonfinite"):
        if prefix + name in state_dict:
            state_dict[f"{prefix}step_guard.{name}"] = state_dict.pop(prefix + name)
