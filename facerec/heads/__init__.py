"""Margin heads (how the target logit is penalised) composed with scale policies (how s is chosen)."""
from facerec.heads.angles import COS_EPS, angle
from facerec.heads.margins import (
    AdaCos,
    ArcFace,
    CombinedMargin,
    CosFace,
    MarginHead,
    MarginLogits,
    NormFace,
    SphereFace,
    monotonic_cos,
)
from facerec.heads.partial_fc import PartialFC, shard_range
from facerec.heads.scale import (
    AutoMarginScale,
    AutoScale,
    DynamicScale,
    FixedScale,
    ScalePolicy,
    auto_scale,
    gather_batch,
)
from facerec.heads.statistics import angular_statistics

__all__ = [
    "COS_EPS",
    "AdaCos",
    "ArcFace",
    "AutoMarginScale",
    "AutoScale",
    "CombinedMargin",
    "CosFace",
    "DynamicScale",
    "FixedScale",
    "MarginHead",
    "MarginLogits",
    "NormFace",
    "PartialFC",
    "ScalePolicy",
    "SphereFace",
    "angle",
    "angular_statistics",
    "auto_scale",
    "gather_batch",
    "monotonic_cos",
    "shard_range",
]
