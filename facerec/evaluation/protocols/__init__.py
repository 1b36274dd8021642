"""Evaluation protocols: pairs (pairs.py), IJB templates (templates.py), 1:N identification
(identification.py, tinyface.py), behind one contract (base.py)."""
from facerec.evaluation.protocols.base import EvaluationProtocol
from facerec.evaluation.protocols.identification import FolderIdentification, GallerySplit, IjbIdentification, megaface_split
from facerec.evaluation.protocols.pairs import PairVerification
from facerec.evaluation.protocols.templates import IjbVerification
from facerec.evaluation.protocols.tinyface import TinyFaceIdentification, tinyface_split

__all__ = [
    "EvaluationProtocol",
    "FolderIdentification",
    "GallerySplit",
    "IjbIdentification",
    "IjbVerification",
    "PairVerification",
    "TinyFaceIdentification",
    "megaface_split",
    "tinyface_split",
]
