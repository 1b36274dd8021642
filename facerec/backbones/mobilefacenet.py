"""MobileFaceNet (Chen et al., 2018) as trained by insightface arcface_torch ("mbf", 2x width).

Module and parameter names follow insightface's `backbones/mobilefacenet.py`, so its published
state_dicts load with `strict=True`. The layout: MobileNetV2-style inverted bottlenecks
(1x1 expand -> 3x3 depthwise -> 1x1 linear projection) taking 112x112 down to 7x7, a 1x1 conv
to 512 channels, then a global depthwise conv (GDC: a 7x7 depthwise conv instead of global
average pooling, so each position keeps its own weight) -> FC -> BN to the embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from facerec.backbones.base import FaceBackbone
from facerec.backbones.registry import register


class Layers(nn.Module):
    """Modules applied in order, held as `.layers`: the nesting of insightface's state_dict keys."""

    def __init__(self, *modules: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    padding: int | None = None,
    prelu: bool = True,
) -> Layers:
    """conv -> BN (-> PReLU); `prelu=False` is the linear projection of a bottleneck."""
    padding = kernel // 2 if padding is None else padding
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=groups, bias=False)
    act = (nn.PReLU(out_channels),) if prelu else ()
    return Layers(conv, nn.BatchNorm2d(out_channels), *act)


class Bottleneck(Layers):
    """1x1 expand to `expanded` channels -> 3x3 depthwise (strided) -> 1x1 linear projection."""

    def __init__(self, in_channels: int, out_channels: int, expanded: int, stride: int = 1, residual: bool = False):
        super().__init__(
            conv_bn(in_channels, expanded),
            conv_bn(expanded, expanded, 3, stride, groups=expanded),
            conv_bn(expanded, out_channels, prelu=False),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


def residual_stage(channels: int, blocks: int, expanded: int) -> Layers:
    return Layers(*(Bottleneck(channels, channels, expanded, residual=True) for _ in range(blocks)))


class MobileFaceNet(FaceBackbone):
    """insightface's "mbf": 0.45 G multiply-adds at 112x112.

    dropout (default 0, insightface has none) applies to the 7x7x512 map before the GDC, the
    place of IResNet's dropout before its FC; it holds no weights, so state_dicts are unchanged.
    """

    embedding_layer = ("conv_sep", "features")

    def __init__(
        self,
        embedding_size: int = 512,
        dropout: float = 0.0,
        autocast: str | None = None,
        channels_last: bool = False,
    ):
        super().__init__(embedding_size, autocast, channels_last)
        self.layers = nn.Sequential(
            conv_bn(3, 128, 3, stride=2),  # 56x56
            conv_bn(128, 128, 3, groups=64),
            Bottleneck(128, 128, expanded=128, stride=2),  # 28x28
            residual_stage(128, blocks=4, expanded=128),
            Bottleneck(128, 256, expanded=256, stride=2),  # 14x14
            residual_stage(256, blocks=6, expanded=256),
            Bottleneck(256, 256, expanded=512, stride=2),  # 7x7
            residual_stage(256, blocks=2, expanded=256),
        )
        self.conv_sep = conv_bn(256, 512)
        self.dropout = nn.Dropout(dropout)
        self.features = Layers(  # GDC
            conv_bn(512, 512, 7, groups=512, padding=0, prelu=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        for module in self.modules():  # insightface's initialisation
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.finish_init()

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self.features(self.dropout(self.conv_sep(features)))


register("mobilefacenet")(MobileFaceNet)
