"""Heads: a margin (how the target logit is penalised) over class centres (dense, or sharded by
Partial FC), with a scale policy (how s is chosen), trained through `MarginHead.loss`.

One file per concern: margin.py (the margin contract) and one file per margin family (binary.py: the
sigmoid heads), centres.py and partial_fc.py (the class centres and their sharding), scale.py (where
s is computed), loss.py and binary_loss.py (the fused softmax and one-vs-all losses), head.py (the
composition).
"""
from facerec.heads.adaface import AdaFace
from facerec.heads.angles import COS_EPS, angle
from facerec.heads.binary import BinaryMargin, SphereFace2, UniFace
from facerec.heads.binary_loss import OneVsAllLoss
from facerec.heads.centres import ClassCentres
from facerec.heads.curricularface import CurricularFace
from facerec.heads.elasticface import ElasticFace
from facerec.heads.head import MarginHead
from facerec.heads.loss import MarginCrossEntropy
from facerec.heads.magface import MagFace
from facerec.heads.margin import Margin
from facerec.heads.margins import AdaCos, ArcFace, CombinedMargin, CosFace, NormFace, SphereFace, additive_angular, monotonic_cos
from facerec.heads.partial_fc import PartialFC, shard_range
from facerec.heads.scale import AutoMarginScale, AutoScale, DynamicScale, FixedScale, RelativeScale, ScalePolicy, auto_scale
from facerec.heads.subcenter import SubCenterArcFace, dominant_centres_and_outliers

__all__ = [
    "COS_EPS",
    "AdaCos",
    "AdaFace",
    "ArcFace",
    "AutoMarginScale",
    "AutoScale",
    "BinaryMargin",
    "ClassCentres",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DynamicScale",
    "ElasticFace",
    "FixedScale",
    "MagFace",
    "Margin",
    "MarginCrossEntropy",
    "MarginHead",
    "NormFace",
    "OneVsAllLoss",
    "PartialFC",
    "RelativeScale",
    "ScalePolicy",
    "SphereFace",
    "SphereFace2",
    "SubCenterArcFace",
    "UniFace",
    "additive_angular",
    "angle",
    "auto_scale",
    "dominant_centres_and_outliers",
    "monotonic_cos",
    "shard_range",
]
