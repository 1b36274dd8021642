"""IResNet-18/34/50/100/200 (Deng et al., ArcFace), weight-compatible with insightface arcface_torch.

Module and parameter names follow insightface's `backbones/iresnet.py`, so the state_dicts
it publishes (`r50/backbone.pth`, ...) load with `strict=True`. The layout: a 3x3 stem at full
112x112 resolution, four stages of "improved" basic blocks, each stage halving the resolution
(112 -> 56 -> 28 -> 14 -> 7), then BN -> dropout -> FC -> BN to the embedding.
`gradient_checkpointing=True` recomputes each block's activations in backward (training only).
insightface's iresnet.py has a module-level `using_ckpt = False` for this, whose checkpoint branch
calls a misspelt method (`forard_imlp`), so it cannot be switched on there.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from facerec.backbones.base import FlatEmbedding, checkpointed
from facerec.backbones.registry import register

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3 (strided) -> BN, plus the shortcut.

    The "improved" residual unit of ArcFace: BN before the first conv, no activation after
    the addition, and the stride on the second conv.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = conv3x3(channels, channels, stride)
        self.bn3 = nn.BatchNorm2d(channels)
        # A projection only where the shape changes (no key otherwise, as in insightface).
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
    """`blocks` IBasicBlocks, the first halving the resolution."""
    return nn.Sequential(
        IBasicBlock(in_channels, channels, stride=2), *(IBasicBlock(channels, channels) for _ in range(blocks - 1))
    )


class IResNet(FlatEmbedding):
    """IResNet-`depth` for 112x112 faces. `embedding_size` is insightface's `num_features`."""

    def __init__(
        self,
        depth: int = 50,
        embedding_size: int = 512,
        dropout: float = 0.0,
        autocast: str | None = None,
        channels_last: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(embedding_size, autocast, channels_last)
        self.gradient_checkpointing = gradient_checkpointing
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"IResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        blocks = STAGE_BLOCKS[depth]
        self.conv1 = conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        self.layer1 = stage(64, 64, blocks[0])
        self.layer2 = stage(64, 128, blocks[1])
        self.layer3 = stage(128, 256, blocks[2])
        self.layer4 = stage(256, 512, blocks[3])
        self.add_embedding_layer(512, self.input_size // 16, dropout)
        # insightface's initialisation and its fixed embedding-BN scale (gamma = 1, not trained).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        self.finish_init()

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(images)))
        if not (self.gradient_checkpointing and self.training):
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        for block in (*self.layer1, *self.layer2, *self.layer3, *self.layer4):
            x = checkpointed(block, x)
        return x


for _depth in STAGE_BLOCKS:
    register(f"iresnet{_depth}")(partial(IResNet, _depth))
