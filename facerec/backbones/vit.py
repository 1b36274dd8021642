"""Vision Transformers for 112x112 faces: ViT-T/S/B/L as arcface_torch trains them on WebFace42M.

Module and parameter names follow insightface's `recognition/arcface_torch/backbones/vit.py`
(read at commit 5ef9804 of deepinsight/insightface), so its published ViT `backbone.pth` files load
with `strict=True`. The layout: a 9x9 convolution of stride 9 cuts the face into 12 x 12 = 144
tokens (the last 4 pixel rows and columns are never read), learned position embeddings and no
class token, pre-norm blocks (LayerNorm -> multi-head self-attention without qkv bias, LayerNorm
-> MLP of ratio 4 with ReLU6, each a residual branch with stochastic depth), a final LayerNorm,
then all 144 tokens flattened -> Linear -> BN -> Linear -> BN (no biases) to the embedding.

In training only: `mask_ratio` of each face's tokens, a random subset per face, skip the
transformer and re-enter as the learned `mask_token` before the flattening (insightface's random
masking); `gradient_checkpointing` recomputes each block's activations in backward.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from facerec.backbones.base import FaceBackbone, checkpointed
from facerec.backbones.registry import register

# arcface_torch's get_model("vit_t" | "vit_s" | "vit_b" | "vit_l_dp005_mask_005"); all use 9x9 patches.
VIT_SIZES = {
    "vit_t": dict(embed_dim=256, depth=12, num_heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_s": dict(embed_dim=512, depth=12, num_heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_b": dict(embed_dim=512, depth=24, num_heads=8, drop_path_rate=0.1, mask_ratio=0.1),
    "vit_l": dict(embed_dim=768, depth=24, num_heads=8, drop_path_rate=0.05, mask_ratio=0.05),
}


def drop_path(branch: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: a residual branch (B, ...) zeroed for a random `rate` of the samples, the
    others scaled by 1 / (1 - rate) so that its expectation is unchanged."""
    if rate == 0.0 or not training:
        return branch
    keep = branch.new_empty((branch.shape[0],) + (1,) * (branch.dim() - 1)).bernoulli_(1 - rate)
    return branch * keep / (1 - rate)


class Attention(nn.Module):
    """Multi-head self-attention, (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        # qkv's output features are ordered (q | k | v) x heads x head_dim
        heads = self.qkv(tokens).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        queries, keys, values = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        # softmax(q k^T / sqrt(head_dim)) v. insightface computes it unfused in float32; the fused GPU
        # kernels (flash, memory-efficient) accumulate in float32 and never store half-precision logits.
        attended = F.scaled_dot_product_attention(queries, keys, values)
        return self.proj(attended.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(tokens)))


class Block(nn.Module):
    """Pre-norm transformer block: tokens + attention(norm1(tokens)), then + mlp(norm2(.))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)  # created before attn, as in insightface: its state_dict order
        self.attn = Attention(dim, num_heads)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens + drop_path(self.attn(self.norm1(tokens)), self.drop_path_rate, self.training)
        return tokens + drop_path(self.mlp(self.norm2(tokens)), self.drop_path_rate, self.training)


class PatchEmbedding(nn.Module):
    """(B, 3, H, W) -> (B, (H // patch) * (W // patch), dim): one token per patch, row by row."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(FaceBackbone):
    """A ViT for (B, 3, 112, 112) faces -> (B, embedding_size); `embedding_size` is insightface's `num_features`.

    embed_dim, depth, num_heads, patch_size, mlp_ratio: the architecture (vit_t/s/b/l fix them).
    drop_path_rate: stochastic depth of the last block, rising linearly from 0 at the first.
    mask_ratio: the fraction of tokens masked per face in training (insightface keeps
    int(144 * (1 - mask_ratio)) of them).
    """

    embedding_layer = ("feature",)

    def __init__(
        self,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        patch_size: int = 9,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        embedding_size: int = 512,
        autocast: str | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__(embedding_size, autocast)
        if embed_dim % num_heads:
            raise ValueError(f"ViT embed_dim must be a multiple of num_heads, got {embed_dim} and {num_heads}")
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"ViT mask_ratio must lie in [0, 1), got {mask_ratio}")
        if not 0 <= drop_path_rate < 1:
            raise ValueError(f"ViT drop_path_rate must lie in [0, 1), got {drop_path_rate}")
        self.num_patches = (self.input_size // patch_size) ** 2
        self.kept_tokens = int(self.num_patches * (1 - mask_ratio))
        self.mask_ratio = mask_ratio
        self.gradient_checkpointing = gradient_checkpointing
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbedding(patch_size, embed_dim)
        # insightface's float32 linspace (on the CPU: a meta-device build cannot read values)
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        # insightface's initialisation (the patch convolution keeps PyTorch's default).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        # Without masking the mask token gets no gradient; frozen, DDP does not wait for one.
        self.mask_token.requires_grad_(self.kept_tokens < self.num_patches)
        self.finish_init()

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> (B, 144, embed_dim) normalised tokens, in the parameters' dtype."""
        tokens = self.patch_embed(images) + self.pos_embed
        masking = self.training and self.kept_tokens < self.num_patches
        if masking:  # a random permutation per face; its first kept_tokens positions go through the blocks
            order = torch.rand(tokens.shape[:2], device=tokens.device).argsort(dim=1)
            kept = order[:, : self.kept_tokens, None].expand(-1, -1, tokens.shape[2])
            tokens = tokens.gather(1, kept)
        for block in self.blocks:
            tokens = checkpointed(block, tokens) if self.gradient_checkpointing and self.training else block(tokens)
        # Out of any autocast dtype first, as insightface's norm(x.float()).
        tokens = self.norm(tokens.to(self.norm.weight.dtype))
        if masking:
            tokens = self.mask_token.expand(len(tokens), self.num_patches, -1).scatter(1, kept, tokens)
        return tokens

    def embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.feature(tokens.flatten(1))


for _name, _size in VIT_SIZES.items():
    register(_name)(partial(VisionTransformer, **_size))
