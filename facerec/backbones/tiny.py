"""A small residual conv net for CPU runs and tests, with the face-model embedding layer."""
from __future__ import annotations

from torch import nn

from facerec.backbones.registry import register


def conv_bn_act(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.PReLU(out_channels),
    )


class ResidualBlock(nn.Module):
    """Downsampling stage: a strided conv, then a residual 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.down = conv_bn_act(in_channels, out_channels, stride=2)
        self.body = nn.Sequential(
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.act = nn.PReLU(out_channels)

    def forward(self, x):
        x = self.down(x)
        return self.act(x + self.body(x))


class EmbeddingLayer(nn.Module):
    """BN -> dropout -> flatten -> FC -> BN, the output layer of IResNet/MobileFaceNet."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)

    def forward(self, x):
        return self.features(self.fc(self.dropout(self.bn2(x)).flatten(1)))


class TinyNet(nn.Module):
    """112x112 -> 56 (stem) -> 28 -> 14 -> 7 with `width`, 2x, 4x, 8x channels -> embedding."""

    def __init__(self, embedding_size: int = 128, width: int = 16, dropout: float = 0.0, input_size: int = 112):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"TinyNet input_size must be a multiple of 16, got {input_size}")
        self.embedding_size = embedding_size
        self.stem = conv_bn_act(3, width, stride=2)
        self.stages = nn.Sequential(
            ResidualBlock(width, 2 * width),
            ResidualBlock(2 * width, 4 * width),
            ResidualBlock(4 * width, 8 * width),
        )
        self.output = EmbeddingLayer(8 * width, input_size // 16, embedding_size, dropout)

    def forward(self, x):
        return self.output(self.stages(self.stem(x)))


@register("tiny")
def tiny(embedding_size: int = 128, width: int = 16, dropout: float = 0.0, input_size: int = 112) -> TinyNet:
    return TinyNet(embedding_size, width, dropout, input_size)
