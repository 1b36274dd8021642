"""Training identities, verification sets and the LightningDataModule."""
from facerec.data.datamodule import FaceDataModule
from facerec.data.synthetic import IdentityRenderer, SyntheticIdentities, SyntheticPairs
from facerec.data.verification import VerificationSet, balanced_pairs

__all__ = [
    "FaceDataModule",
    "IdentityRenderer",
    "SyntheticIdentities",
    "SyntheticPairs",
    "VerificationSet",
    "balanced_pairs",
]
