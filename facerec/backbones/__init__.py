"""Face backbones: (B, 3, 112, 112) float images -> (B, embedding_size) embeddings."""
from facerec.backbones import tiny  # noqa: F401  (registers "tiny")
from facerec.backbones.registry import build, list_backbones, register

__all__ = ["build", "list_backbones", "register"]
