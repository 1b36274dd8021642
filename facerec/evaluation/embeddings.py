"""Embedding extraction with the flip test, batched over a verification set, on any device."""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

FLIP_MODES = ("sum", "concat", "none")


def embed(backbone: nn.Module, images: torch.Tensor, flip: str = "sum") -> torch.Tensor:
    """Float32 embeddings of a batch: flip="sum" gives e(x) + e(flip(x)) (the convention),
    "concat" gives [e(x), e(flip(x))], "none" gives e(x). The result never shares memory with the
    backbone's outputs, so it may be kept across batches (a metric does) under CUDA graphs too."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    plain = _forward_copy(backbone, images)
    if flip == "none":
        return plain
    # Two passes of the batch, not one of twice its size: the batch size stays the one asked for
    # (the tiny net on a CPU: 1,010 images/s at batch 128, 700 at batch 256).
    flipped = _forward_copy(backbone, images.flip(-1))
    return plain + flipped if flip == "sum" else torch.cat([plain, flipped], dim=1)


def begin_cudagraph_step() -> None:
    """Start a new CUDA-graph step (torch.compiler.cudagraph_mark_step_begin): from then on the
    CUDA graphs of compiled modules (compile.mode=reduce-overhead or max-autotune) may overwrite
    the outputs they returned before it.

    Once a step has been marked anywhere in the process, CUDA-graph trees begin new steps only where
    marked (their own rule, a new step at each compiled call with no backward pending, is off), so
    every loop that replays compiled graphs should mark its steps. The mark lives in inductor's
    CUDA-graph trees, whose first import costs seconds; until a compiled call has imported them no
    CUDA graph exists, and this does nothing.
    """
    if "torch._inductor.cudagraph_trees" in sys.modules:
        torch.compiler.cudagraph_mark_step_begin()


def _forward_copy(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, d) float32 output of one backbone call, in a step of its own and copied out.

    A backbone compiled with CUDA graphs returns its graph's static output buffer, which the next
    replay overwrites: the flipped pass would overwrite the plain one, and the next batch what a
    metric kept.
    """
    begin_cudagraph_step()
    output = backbone(images)
    # .float() of a float32 tensor is that tensor: the copy is explicit (B x d, nothing next to the forward)
    return output.float() if output.dtype != torch.float32 else output.clone()


def embedding_table(embeddings: torch.Tensor, indices: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images, d) table from (embedding, image index) rows given in any order.

    Rows may repeat an index (DistributedSampler pads shards with repeats; the
    repeats carry the same image). Every image must be covered, with finite values.
    """
    indices = indices.long().view(-1)
    if len(indices) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(indices)} image indices")
    if len(indices) and (indices.min() < 0 or indices.max() >= num_images):
        raise ValueError(f"image indices must lie in [0, {num_images}), got [{int(indices.min())}, {int(indices.max())}]")
    table = torch.zeros(num_images, embeddings.shape[1], dtype=torch.float32)
    table[indices] = embeddings.float().cpu()
    covered = torch.zeros(num_images, dtype=torch.bool)
    covered[indices] = True
    if not covered.all():
        missing = torch.nonzero(~covered).view(-1)
        raise ValueError(
            f"{len(missing)} of {num_images} images were never embedded (first: {missing[:5].tolist()}); "
            "the loader must cover every image of the verification set"
        )
    invalid = ~torch.isfinite(table).all(dim=1)
    if invalid.any():
        bad = torch.nonzero(invalid).view(-1)
        raise ValueError(
            f"the model produced non-finite (NaN/inf) embeddings for {len(bad)} of {num_images} images "
            f"(first: {bad[:5].tolist()})"
        )
    return table


@torch.no_grad()
def extract_embeddings(
    backbone: nn.Module,
    data: Dataset | DataLoader,
    flip: str = "sum",
    device: str | torch.device | None = None,
    bf16: bool = False,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = False,
    description: str = "embedding",
) -> torch.Tensor:
    """(num_images, d) float32 embeddings, on the CPU, of a verification set in image-index order.

    data: a dataset yielding (image, index) (a facerec VerificationSet) or a DataLoader over one.
    device: where the backbone runs (default: where its parameters are, the CPU for a module
    without any, e.g. an ONNX model); bf16: autocast the backbone to bfloat16 (the embeddings are
    returned in float32). progress: a bar over the images (images per second), labelled
    `description`, shown only when stderr is a terminal.
    """
    if device is None:
        parameter = next(backbone.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    if not isinstance(data, DataLoader):
        data = DataLoader(data, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    loader = data
    was_training = backbone.training
    backbone.eval().to(device)
    embeddings, indices = [], []
    # disable=None: tqdm turns itself off where stderr is no terminal (logs, CI, pytest)
    bar = tqdm(total=len(loader.dataset), desc=description, unit="img", disable=None if progress else True)
    try:
        for images, index in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # kept on the device (embedding_table copies once): a .cpu() per batch would stall the GPU
                embeddings.append(embed(backbone, images.to(device, non_blocking=True), flip))
            indices.append(torch.as_tensor(index))
            bar.update(len(images))
    finally:
        bar.close()
        backbone.train(was_training)
    return embedding_table(torch.cat(embeddings), torch.cat(indices), len(loader.dataset))
