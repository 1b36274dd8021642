"""Build the data, model, head and trainer from a Hydra config and train."""
from __future__ import annotations

import logging

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from facerec.config import instantiate_all
from facerec.module import FaceRecognitionModule

log = logging.getLogger(__name__)


def configure_torch(cfg: DictConfig) -> None:
    # Denormals made small CPU runs ~10x slower here; flushing them costs no accuracy that matters.
    torch.set_flush_denormal(bool(cfg.torch.flush_denormal))
    if cfg.torch.num_threads:
        torch.set_num_threads(int(cfg.torch.num_threads))
    torch.set_float32_matmul_precision(cfg.torch.matmul_precision)


def build_module(cfg: DictConfig) -> FaceRecognitionModule:
    backbone = instantiate(cfg.model)
    head = instantiate(cfg.head, scale=instantiate(cfg.scale))
    return FaceRecognitionModule(
        backbone,
        head,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        flip=cfg.flip,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final logged metrics (floats)."""
    configure_torch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    module = build_module(cfg)
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers)
    for logger in loggers:
        logger.log_hyperparams(module.config)
    log.info("head: %s | s = %.4f", module.head, module.head.scale.value)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        if datamodule.val_sets and module.last_validation_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    finally:
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                wandb.finish()  # the next run of a multirun gets its own W&B run
    if trainer.is_global_zero:
        report(metrics, trainer)
    return metrics


def report(metrics: dict[str, float], trainer: L.Trainer) -> None:
    lines = [f"finished after {trainer.global_step} steps; output: {trainer.default_root_dir}"]
    for key in sorted(metrics):
        if key.startswith("val/") and key.endswith("/accuracy"):
            std = metrics.get(key + "_std", float("nan"))
            lines.append(f"held-out verification {key[4:-9]}: accuracy {100 * metrics[key]:.2f}% ± {100 * std:.2f}%")
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        lines.append(f"best checkpoint: {checkpoint}")
    print("\n".join(lines), flush=True)
