"""Margin heads (how the target logit is penalised) composed with scale policies (how s is chosen)."""
from facerec.heads.margins import COS_EPS, ArcFace, CosFace, MarginHead
from facerec.heads.scale import AutoScale, FixedScale, ScalePolicy, auto_scale
from facerec.heads.statistics import angular_statistics

__all__ = [
    "COS_EPS",
    "ArcFace",
    "AutoScale",
    "CosFace",
    "FixedScale",
    "MarginHead",
    "ScalePolicy",
    "angular_statistics",
    "auto_scale",
]
