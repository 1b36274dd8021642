"""Checks run before training starts, so a wrong config fails in seconds with a clear message
instead of hours later (or never) deep inside a stack trace."""
from __future__ import annotations

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from facerec.data import FaceDataModule
from facerec.evaluation.evalsets import check_image_size
from facerec.training.module import FaceRecognitionModule


def check_data_and_model(datamodule: FaceDataModule, module: FaceRecognitionModule) -> None:
    """The head fits the data's classes and the backbone's embeddings; the backbone takes the training
    images and those of the validation sets."""
    head = module.head
    if head.num_classes != datamodule.num_classes:
        raise ValueError(
            f"head.num_classes={head.num_classes} but dataset.num_classes={datamodule.num_classes}; the class "
            "count is stated once, in the dataset config (head configs use ${dataset.num_classes})"
        )
    if len(datamodule.train_set) == 0:
        raise ValueError(f"the training set {type(datamodule.train_set).__name__} holds no images")
    image, label = datamodule.train_set[0]
    backbone = module.backbone
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            embeddings = backbone(torch.stack([image, image]))
    except RuntimeError as error:
        raise ValueError(
            f"the backbone ({type(backbone).__name__}) cannot take the training images of shape "
            f"{tuple(image.shape)}: {error}. Check that the model's input size matches the dataset's image size."
        ) from error
    finally:
        backbone.train(was_training)
    if embeddings.shape != (2, head.embedding_size):
        raise ValueError(
            f"the backbone yields embeddings of shape {tuple(embeddings.shape[1:])} but the head expects "
            f"({head.embedding_size},); head.embedding_size must equal model.embedding_size"
        )
    if not 0 <= int(label) < head.num_classes:
        raise ValueError(f"the first training label is {int(label)}, outside [0, {head.num_classes}) (dataset.num_classes)")
    size = tuple(image.shape[1:])
    for name, image_set in datamodule.val_sets.items():
        check_image_size(image_set, name, size[0], f"the backbone (training images {tuple(image.shape)})")


def check_precision(trainer: L.Trainer, module: FaceRecognitionModule) -> None:
    """A backbone under fp16 autocast needs loss scaling: without a GradScaler its small fp16
    gradients underflow to zero silently. Lightning's `16-mixed` brings one on a GPU (not on a CPU)."""
    if getattr(module.backbone, "autocast", None) != "fp16":
        return
    if getattr(trainer.precision_plugin, "scaler", None) is None:
        raise ValueError(
            f"model.autocast=fp16 needs loss scaling, but trainer.precision={trainer.precision} runs without a "
            "GradScaler (fp16 gradients would underflow silently): use trainer.precision=16-mixed on a GPU, or "
            "model.autocast=bf16 (no scaling needed)"
        )


def check_launch(trainer: L.Trainer) -> None:
    """Lightning starts the other ranks of a one-node DDP run by re-running the command line; in a
    Hydra multirun every rank would then run the whole sweep, in sweep dirs of its own."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    launches_ranks = environment is not None and not environment.creates_processes_externally
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if launches_ranks and trainer.num_devices * trainer.num_nodes > 1 and multirun:
        raise ValueError(
            "a Hydra multirun (-m) cannot start multi-process DDP runs itself: run each configuration "
            "as its own `python train.py trainer=ddp ...`, or submit the sweep to SLURM with "
            "hydra/launcher=slurm (SLURM starts the ranks of each run)"
        )
