"""Face backbones: (B, 3, 112, 112) float images -> (B, embedding_size) embeddings.

By name: `build("iresnet50", embedding_size=512)`; names: tiny, iresnet18/34/50/100/200, mobilefacenet,
vit_t/s/b/l (arcface_torch's ViT-T/S/B/L).
"""
from facerec.backbones import iresnet, mobilefacenet, tiny, vit  # noqa: F401  (register their names)
from facerec.backbones.base import FaceBackbone
from facerec.backbones.registry import build, list_backbones, register

__all__ = ["FaceBackbone", "build", "list_backbones", "register"]
