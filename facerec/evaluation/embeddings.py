"""Embedding extraction with the flip test."""
from __future__ import annotations

import torch
from torch import nn

FLIP_MODES = ("sum", "concat", "none")


def embed(backbone: nn.Module, images: torch.Tensor, flip: str = "sum") -> torch.Tensor:
    """Float32 embeddings of a batch: flip="sum" gives e(x) + e(flip(x)) (the convention),
    "concat" gives [e(x), e(flip(x))], "none" gives e(x)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if flip == "none":
        return backbone(images).float()
    both = backbone(torch.cat([images, images.flip(-1)])).float()
    plain, flipped = both.chunk(2)
    return plain + flipped if flip == "sum" else torch.cat([plain, flipped], dim=1)
