"""File readers and datasets: training identities, verification pairs, IJB layouts, image files, and the
LightningDataModule. No scoring here (facerec.evaluation)."""
from facerec.data.align import align_face, similarity_transform
from facerec.data.augment import AdaFaceAugment, Augment, Flip, NoAugment
from facerec.data.bin import BinVerificationSet, read_bin, write_bin
from facerec.data.datamodule import FaceDataModule
from facerec.data.decode import DecodeError, decode_image, normalise
from facerec.data.encoded import EncodedImages
from facerec.data.ijb import IjbImages, IjbMeta, read_1n_templates, read_ijb_meta
from facerec.data.image_folder import ImageFiles, ImageFolderDataset, ImageFolderPairs, scan_folder
from facerec.data.lfw import LfwPairs, read_pairs
from facerec.data.record_dataset import RecordDataset
from facerec.data.recordio import RecordIOError, RecordIOReader, RecordIOWriter, pack_record, unpack_record
from facerec.data.synthetic import IdentityRenderer, SyntheticIdentities, SyntheticPairs
from facerec.data.verification import VerificationSet, balanced_pairs

__all__ = [
    "AdaFaceAugment",
    "Augment",
    "BinVerificationSet",
    "DecodeError",
    "EncodedImages",
    "FaceDataModule",
    "Flip",
    "IdentityRenderer",
    "IjbImages",
    "IjbMeta",
    "ImageFiles",
    "ImageFolderDataset",
    "ImageFolderPairs",
    "LfwPairs",
    "NoAugment",
    "RecordDataset",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "SyntheticIdentities",
    "SyntheticPairs",
    "VerificationSet",
    "align_face",
    "balanced_pairs",
    "decode_image",
    "normalise",
    "pack_record",
    "read_1n_templates",
    "read_bin",
    "read_ijb_meta",
    "read_pairs",
    "scan_folder",
    "similarity_transform",
    "unpack_record",
    "write_bin",
]
