"""The LightningModule: backbone -> embedding -> margin head -> cross-entropy, plus verification."""
from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from facerec.evaluation import VerificationMetric, embed, log_to_wandb
from facerec.heads import MarginHead, angular_statistics


def total_grad_norm(parameters) -> torch.Tensor:
    norms = [p.grad.detach().float().norm() for p in parameters if p.grad is not None]
    return torch.stack(norms).norm() if norms else torch.zeros(())


class FaceRecognitionModule(L.LightningModule):
    """Trains `backbone` and `head` with softmax cross-entropy on the head's margin logits.

    optimizer: a factory `params -> Optimizer` (Hydra `_partial_`); scheduler: an
    optional factory `(optimizer, total_steps) -> LRScheduler`, stepped per batch.
    flip: the flip-test mode for verification embeddings ("sum", "concat", "none").
    config: the resolved run config, saved in checkpoints so eval/export can
    rebuild the model without the original command line.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: MarginHead,
        optimizer: Callable,
        scheduler: Callable | None = None,
        flip: str = "sum",
        config: dict | None = None,
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    # ----------------------------------------------------------------- training
    def _should_log(self) -> bool:
        # Lightning only writes step metrics every `log_every_n_steps`; skip the diagnostics otherwise.
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        embeddings = self.backbone(images)
        logits = self.head(embeddings, labels)
        loss = F.cross_entropy(logits, labels)
        if self._should_log():
            scale = self.head.scale.value
            stats = angular_statistics(logits, labels, self.head.target_cosine(embeddings, labels), scale)
            self.log_dict({f"train/{key}": value for key, value in stats.items()}, on_step=True, on_epoch=False)
            self.log("train/s", scale, on_step=True, on_epoch=False)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # s multiplies the gradient like a learning-rate factor: log it when comparing scales.
        if self._should_log():
            self.log("train/grad_norm_backbone", total_grad_norm(self.backbone.parameters()))
            self.log("train/grad_norm_head", total_grad_norm(self.head.parameters()))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

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
                self.log(f"val/{name}/{key}", value, add_dataloader_idx=False)
        if results:
            accuracy_mean = sum(r.accuracy for r in results.values()) / len(results)
            self.log("val/accuracy_mean", accuracy_mean, prog_bar=True, add_dataloader_idx=False)
            if self.trainer.is_global_zero:
                log_to_wandb(self.loggers, results, self.global_step)  # ROC plot and per-set table
        self.last_validation_step = self.global_step

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["facerec_config"] = self.config
