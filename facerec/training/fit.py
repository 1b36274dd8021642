"""Build the data, model, head and trainer from a Hydra config and train."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from facerec.training.checkpoints import LAST, checkpoint_config, find_last_checkpoint, load_checkpoint
from facerec.training.checks import check_data_and_model, check_launch, check_precision
from facerec.training.cluster import slurm_job_id
from facerec.config import instantiate_all
from facerec.training.module import FaceRecognitionModule

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
    if cfg.get("sharding"):  # e.g. Partial FC: the head's class centres sharded over the ranks (same head)
        head = instantiate(cfg.sharding, head)
    return FaceRecognitionModule(
        backbone,
        head,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        flip=cfg.flip,
        config=OmegaConf.to_container(cfg, resolve=True),
        max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
    )


def compile_model(module: FaceRecognitionModule, options: DictConfig) -> None:
    """torch.compile the backbone and/or the head as `options` (the `compile` config) ask.

    nn.Module.compile compiles the module's call in place, so parameter names, checkpoints and
    exports stay as they are (torch.compile(module) would prefix every key with `_orig_mod.`).
    """
    kwargs = {key: options[key] for key in ("mode", "backend") if options.get(key) is not None}
    for name in ("backbone", "head"):
        if options.get(name):
            getattr(module, name).compile(**kwargs)


def resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: None, `last` (see find_last_checkpoint) or an existing path.
    A requeued SLURM job (its run dir already holds a last.ckpt) resumes from it without asking."""
    requested = cfg.get("ckpt_path")
    if requested in (None, ""):
        own = Path(cfg.paths.output_dir) / "checkpoints" / LAST
        if slurm_job_id() and own.is_file():
            log.info("SLURM job %s was requeued: resuming from %s", slurm_job_id(), own)
            return own
        return None
    if requested == "last":
        found = find_last_checkpoint(cfg.paths.output_dir, cfg.paths.runs_dir)
        if found is None:
            log.warning("ckpt_path=last: no last.ckpt in %s or under %s; starting a new run", cfg.paths.output_dir, cfg.paths.runs_dir)
        return found
    path = Path(requested)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={requested}: no such checkpoint file")
    return path


def check_resume_compatible(cfg: DictConfig, checkpoint: dict, path: Path) -> None:
    """A checkpoint resumes only into the same backbone and the same classes."""
    saved = checkpoint_config(checkpoint, path)
    current = OmegaConf.to_container(cfg, resolve=True)
    problems = [
        f"{key}: checkpoint {saved_value!r}, config {current_value!r}"
        for key, saved_value, current_value in [
            ("model", saved.get("model"), current["model"]),
            ("dataset.num_classes", saved.get("dataset", {}).get("num_classes"), current["dataset"]["num_classes"]),
            ("head._target_", saved.get("head", {}).get("_target_"), current["head"]["_target_"]),
        ]
        if saved_value != current_value
    ]
    if problems:
        raise ValueError(
            f"cannot resume from {path}: it was trained with a different model or class set ("
            + "; ".join(problems)
            + "). Resume with the checkpoint's settings, or start a new run (ckpt_path=null)."
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final logged metrics (floats)."""
    configure_torch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path, mmap=True)  # metadata only; Lightning reads the tensors
        check_resume_compatible(cfg, checkpoint, ckpt_path)
        run_id = checkpoint.get("wandb_run_id")
        if run_id and cfg.get("logger") and cfg.logger.get("wandb"):
            with open_dict(cfg):
                cfg.logger.wandb.id = run_id  # continue the same W&B run
        log.info("resuming from %s (step %d)", ckpt_path, checkpoint.get("global_step", -1))
        del checkpoint
    datamodule = instantiate(cfg.dataset)
    module = build_module(cfg)
    check_data_and_model(datamodule, module)
    compile_model(module, cfg.compile)  # after the checks: their eager CPU forward would compile a graph never used again
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers)
    check_launch(trainer)
    check_precision(trainer, module)
    for logger in loggers:
        logger.log_hyperparams(module.config)
    log.info("head: %s | s = %.4f", module.head, module.head.scale.value)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
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
