"""head.init=class_means: a new run's class centres start at the mean direction of each class's training
images under the starting backbone, instead of at random.

Why: fine-tuning a trained backbone on new identities (model.weights=...) with random centres spends
its first steps learning centres from scratch, and meanwhile the loss (times s) pulls the backbone's
embeddings towards directions that mean nothing. Started at the class means, the head classifies the
training set from the first step on (train/top1 far above 1/C), and the gradients refine what the
backbone already knows.

One pass over the training set before the first training step: the backbone in eval mode (BatchNorm's
running statistics, no dropout), the images without augmentation (the datamodule's
`unaugmented_train_dataloader`, in index order, each rank its share), no gradient. Each embedding is
L2-normalised before it is averaged: the loss sees directions only, and a norm that grows with image
quality (MagFace, AdaFace) should not let a class's sharp images outvote the others. The per-class
sums and counts are all-reduced, so every rank holds every class's mean, and the head keeps its own
rows (Partial FC) or all of them (MarginHead.start_centres_at: their norm, the sub-centres' noise).
Memory beside the backbone: the (C, d) sums and the full (C K, d) centre matrix on every rank's device.

The result, logged once: the images embedded, the seconds taken, and the top-1 of the embedded images
against the filled centres (an image counts when its own class's closest centre is nearer than every
other class's, train/top1's rule), measured on a systematic sample of at most TOP1_SAMPLE of them
(every k-th index: a standard error under half a point) so that it costs a fraction of the pass even
at millions of classes.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import Precision
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from facerec import distributed
from facerec.evaluation import embed
from facerec.heads import MarginHead
from facerec.heads.centres import cosines

log = logging.getLogger(__name__)

CENTRE_INITS = ("random", "class_means")  # head.init: random is the centres' N(0, 0.01^2) start
TOP1_SAMPLE = 10_000  # the most images the top-1 is measured on
COSINE_BLOCK = 2**24  # the most cosines held at once while measuring it


@dataclass(frozen=True)
class ClassMeans:
    images: int  # embedded, over all ranks
    seconds: float
    top1: float  # of the sampled images against the filled centres


@torch.no_grad()
def start_centres_at_class_means(
    backbone: nn.Module, head: MarginHead, loader: DataLoader, device: torch.device, precision: Precision
) -> ClassMeans:
    """Embed `loader`'s (image, label) batches (this rank's share of the training set, unaugmented) with
    `backbone` under `precision` (Lightning's: autocast, input dtype), start `head`'s centres at the
    class means and measure the top-1 (see the module docstring). Every rank calls it; a class with
    no image on any rank is a ValueError on every rank."""
    start = time.perf_counter()
    rank, world_size = distributed.world()
    num_classes = head.num_classes
    stride = max(1, math.ceil(len(loader.dataset) / TOP1_SAMPLE))
    if rank == 0:
        log.info("head.init=class_means: embedding the %d training images (world size %d)", len(loader.dataset), world_size)
    sums = torch.zeros(num_classes, head.embedding_size, device=device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    sampled, sampled_labels, position = [], [], 0
    was_training = backbone.training
    backbone.eval()
    # disable=None: tqdm turns itself off where stderr is no terminal (logs, CI, pytest)
    bar = tqdm(total=len(loader.sampler), desc="head.init=class_means", unit="img", disable=None if rank == 0 else True)
    try:
        for images, labels in loader:
            if labels.min() < 0 or labels.max() >= num_classes:  # on the host: no device sync
                raise ValueError(
                    f"head.init=class_means: a training label lies outside [0, {num_classes}) (dataset.num_classes): "
                    f"labels {labels.min().item()}..{labels.max().item()} in a batch"
                )
            with precision.forward_context():
                embeddings = embed(backbone, precision.convert_input(images.to(device, non_blocking=True)), "none")
            x_hat = F.normalize(embeddings.float())
            labels = labels.to(device).long()
            sums.index_add_(0, labels, x_hat)
            counts.index_add_(0, labels, torch.ones_like(labels))
            keep = torch.arange(position, position + len(labels), device=device) % stride == 0
            sampled.append(x_hat[keep])
            sampled_labels.append(labels[keep])
            position += len(labels)
            bar.update(len(labels))
    finally:
        bar.close()
        backbone.train(was_training)
    distributed.all_reduce(sums)
    distributed.all_reduce(counts)
    empty = torch.nonzero(counts == 0).view(-1).tolist()
    if empty:
        listed = ", ".join(map(str, empty[:20])) + (", ..." if len(empty) > 20 else "")
        raise ValueError(
            f"head.init=class_means: {len(empty)} of the dataset.num_classes={num_classes} classes have no image in "
            f"the training set (class index {listed}); each class's centre starts at the mean of its images. Check "
            "the data and dataset.num_classes, or start the centres at random (head.init=random)"
        )
    # the run's seed (seed_everything on every rank): the sub-centres' noise is the same on every rank
    full = head.start_centres_at(sums / counts.unsqueeze(1), torch.Generator().manual_seed(torch.initial_seed()))
    top1 = top1_against(torch.cat(sampled), torch.cat(sampled_labels), full, head)
    result = ClassMeans(int(counts.sum()), time.perf_counter() - start, top1)
    if rank == 0:
        log.info(
            "head.init=class_means: the %d class centres start at the means of %d images (%.1f s); top-1 of the "
            "embedded images against them: %.2f%%", num_classes, result.images, result.seconds, 100 * result.top1,
        )
    return result


def top1_against(x_hat: torch.Tensor, labels: torch.Tensor, full: torch.Tensor, head: MarginHead) -> float:
    """The fraction, over every rank's rows, of unit rows `x_hat` (n, d) whose class `labels` (n,) has its
    closest centre of the full (C K, d) matrix nearer than every other class's; blocks of rows keep at
    most COSINE_BLOCK cosines at once."""
    rows = max(1, COSINE_BLOCK // len(full))
    correct = torch.zeros((), dtype=torch.long, device=full.device)
    for first in range(0, len(x_hat), rows):
        block = labels[first : first + rows].unsqueeze(1)
        cos = head.centres.closest(cosines(x_hat[first : first + rows], full)[1])
        target = cos.gather(1, block).squeeze(1)
        correct += (target > cos.scatter_(1, block, -math.inf).amax(dim=1)).sum()
    totals = distributed.all_reduce(torch.stack([correct, torch.tensor(len(x_hat), device=full.device)]))
    return totals[0].item() / totals[1].item()
