"""What every face backbone shares: a conv trunk, then an embedding layer kept in float32.

insightface trains its trunks under fp16 autocast but runs the final FC (and its BatchNorm)
in float32, because the embedding is what the margin head and the verification scores read.
`autocast="fp16"|"bf16"` does the same here, on any device and also inside a Lightning
`precision=...-mixed` run (the embedding layer then opts out of the outer autocast).
"""
from __future__ import annotations

import torch
from torch import nn

AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class FaceBackbone(nn.Module):
    """(B, 3, input_size, input_size) images -> (B, embedding_size) embeddings.

    Subclasses build their modules, define `trunk` (images -> feature maps) and
    `embedding` (feature maps -> embeddings), and call `self.finish_init()` last.
    """

    input_size = 112

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

    def add_embedding_layer(self, channels: int, spatial: int, dropout: float) -> None:
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        # flatten reads NCHW order whatever the memory format, so fc weights stay interchangeable
        return self.features(self.fc(self.dropout(self.bn2(features).flatten(1))))
