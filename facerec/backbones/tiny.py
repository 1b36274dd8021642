"""A small residual conv net for CPU runs and tests, with IResNet's embedding layer."""
from __future__ import annotations

from torch import nn

from facerec.backbones.base import FlatEmbedding
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


class TinyNet(FlatEmbedding):
    """112x112 -> 56 (stem) -> 28 -> 14 -> 7 with `width`, 2x, 4x, 8x channels -> embedding."""

    def __init__(
        self,
        embedding_size: int = 128,
        width: int = 16,
        dropout: float = 0.0,
        input_size: int = 112,
        autocast: str | None = None,
        channels_last: bool = False,
    ):
        super().__init__(embedding_size, autocast, channels_last)
        if input_size % 16:
            raise ValueError(f"TinyNet input_size must be a multiple of 16, got {input_size}")
        self.input_size = input_size
        self.stem = conv_bn_act(3, width, stride=2)
        self.stages = nn.Sequential(
            ResidualBlock(width, 2 * width),
            ResidualBlock(2 * width, 4 * width),
            ResidualBlock(4 * width, 8 * width),
        )
        self.add_embedding_layer(8 * width, input_size // 16, dropout)
        self.finish_init()

    def trunk(self, images):
        return self.stages(self.stem(images))


register("tiny")(TinyNet)
