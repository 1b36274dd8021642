"""What every face backbone shares: a conv trunk, then an embedding layer kept in float32.

insightface trains its trunks under fp16 autocast but runs the final FC (and its BatchNorm)
in float32, because the embedding is what the margin head and the verification scores read.
`autocast="fp16"|"bf16"` does the same here, on any device and also inside a Lightning
`precision=...-mixed` run (the embedding layer then opts out of the outer autocast).

`checkpointed` is the gradient checkpointing the deep backbones share (`gradient_checkpointing=True`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class FaceBackbone(nn.Module):
    """(B, 3, input_size, input_size) images -> (B, embedding_size) embeddings.

    Subclasses build their modules, define `trunk` (images -> feature maps) and
    `embedding` (feature maps -> embeddings), and call `self.finish_init()` last.
    """

    input_size = 112
    # The top-level modules `embedding` runs (feature maps -> embeddings): what
    # finetune=linear_probe trains beside the head with finetune.train_embedding_layer=true.
    embedding_layer: tuple[str, ...] = ()

    def __init__(self, embedding_size: int, autocast: str | None = None, channels_last: bool = False):
        super().__init__()
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be null or one of {sorted(AUTOCAST_DTYPES)}, got {autocast!r}")
        self.embedding_size = embedding_size
        self.autocast = autocast
        self.channels_last = channels_last

    def finish_init(self) -> None:
        if self.channels_last:  # NHWC weights: the layout tensor cores and oneDNN convolutions prefer
            self.to(memory_format=torch.channels_last)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # A clear message rather than a matmul error in the FC (skipped while tracing: shapes are tensors then).
        if not torch.jit.is_tracing() and images.shape[-3:] != (3, self.input_size, self.input_size):
            raise ValueError(
                f"{type(self).__name__} takes (B, 3, {self.input_size}, {self.input_size}) images, "
                f"got {tuple(images.shape)}; set the data's image size (dataset.train.image_size) to match"
            )
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.autocast is None:
            return self.embedding(self.trunk(images))
        device = images.device.type
        with torch.autocast(device, dtype=AUTOCAST_DTYPES[self.autocast]):
            features = self.trunk(images)
        with torch.autocast(device, enabled=False):
            return self.embedding(features.float())


class FlatEmbedding(FaceBackbone):
    """A FaceBackbone whose embedding layer is IResNet's: BN -> flatten -> dropout -> FC -> BN.

    The modules are named as in insightface (`bn2`, `dropout`, `fc`, `features`) so that
    public IResNet weights load; subclasses call `add_embedding_layer` after their trunk so
    the state_dict lists keys in insightface's order too.
    """

    embedding_layer = ("bn2", "fc", "features")

    def add_embedding_layer(self, channels: int, spatial: int, dropout: float) -> None:
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        # flatten reads NCHW order whatever the memory format, so fc weights stay interchangeable
        return self.features(self.fc(self.dropout(self.bn2(features).flatten(1))))


@contextlib.contextmanager
def batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Undo, on exit, what a training forward of `module` wrote into its BatchNorms' running statistics."""
    statistics = [
        buffer
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.track_running_stats
        for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
    ]
    saved = [buffer.clone() for buffer in statistics]
    try:
        yield
    finally:
        if statistics:  # (a ViT block has no BatchNorm)
            with torch.no_grad():
                torch._foreach_copy_(statistics, saved)


def checkpointed(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`module(inputs)` keeping none of the activations inside `module` for backward: backward runs
    the module's forward again (same RNG state, same autocast) to recompute them.

    Eager recomputation would apply each BatchNorm's momentum update a second time; it runs inside
    `batchnorm_statistics_kept`, so running statistics end as without checkpointing. Compiled graphs
    recompute without mutating buffers (and torch.compile accepts no such context), so none is passed there.
    """
    if torch.compiler.is_compiling():
        return checkpoint(module, inputs, use_reentrant=False)
    return checkpoint(module, inputs, use_reentrant=False, context_fn=partial(_forward_and_recompute_contexts, module))


def _forward_and_recompute_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, ...]:
    return contextlib.nullcontext(), batchnorm_statistics_kept(module)
