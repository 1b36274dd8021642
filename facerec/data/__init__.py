"""Training identities, verification sets and the LightningDataModule."""
from facerec.data.bin import BinVerificationSet, read_bin, write_bin
from facerec.data.datamodule import FaceDataModule
from facerec.data.decode import DecodeError, decode_image, normalise
from facerec.data.encoded import EncodedImages
from facerec.data.image_folder import ImageFolderDataset, ImageFolderPairs, scan_folder
from facerec.data.lfw import LfwPairs, read_pairs
from facerec.data.record_dataset import RecordDataset
from facerec.data.recordio import RecordIOError, RecordIOReader, RecordIOWriter, pack_record, unpack_record
from facerec.data.synthetic import IdentityRenderer, SyntheticIdentities, SyntheticPairs
from facerec.data.verification import VerificationSet, balanced_pairs

__all__ = [
    "BinVerificationSet",
    "DecodeError",
    "EncodedImages",
    "FaceDataModule",
    "IdentityRenderer",
    "ImageFolderDataset",
    "ImageFolderPairs",
    "LfwPairs",
    "RecordDataset",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "SyntheticIdentities",
    "SyntheticPairs",
    "VerificationSet",
    "balanced_pairs",
    "decode_image",
    "normalise",
    "pack_record",
    "read_bin",
    "read_pairs",
    "scan_folder",
    "unpack_record",
    "write_bin",
]
