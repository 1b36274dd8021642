"""Margin heads (how the target logit is penalised) composed with scale policies (how s is chosen).

Every head trains through `head.loss(embeddings, labels)` (head.py), dense or class-sharded
(`partial_fc`), and the scale s is computed in scale.py only.
"""
from facerec.heads.adaface import AdaFace
from facerec.heads.angles import COS_EPS, angle
from facerec.heads.curricularface import CurricularFace
from facerec.heads.elasticface import ElasticFace
from facerec.heads.head import MarginHead, partial_fc, shard_range
from facerec.heads.magface import MagFace
from facerec.heads.margin_loss import MarginCrossEntropy
from facerec.heads.margins import AdaCos, ArcFace, CombinedMargin, CosFace, NormFace, SphereFace, additive_angular, monotonic_cos
from facerec.heads.scale import AutoMarginScale, AutoScale, DynamicScale, FixedScale, RelativeScale, ScalePolicy, auto_scale
from facerec.heads.subcenter import SubCenterArcFace

__all__ = [
    "COS_EPS",
    "AdaCos",
    "AdaFace",
    "ArcFace",
    "AutoMarginScale",
    "AutoScale",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DynamicScale",
    "ElasticFace",
    "FixedScale",
    "MagFace",
    "MarginCrossEntropy",
    "MarginHead",
    "NormFace",
    "RelativeScale",
    "ScalePolicy",
    "SphereFace",
    "SubCenterArcFace",
    "additive_angular",
    "angle",
    "auto_scale",
    "monotonic_cos",
    "partial_fc",
    "shard_range",
]
