"""insightface verification `.bin` files (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw, vgg2_fp).

A `.bin` is a pickle of `(images, issame)`: `images` a list of 2N encoded images
(JPEG bytes; some files hold them as 1-D uint8 numpy arrays), `issame` N booleans;
pair i is images 2i and 2i+1. The released files are laid out as 10 consecutive
folds, each half same and half different, so the evaluation's consecutive folds
are the protocol's.

A pickle can run any code while it loads, so these files are read with an
unpickler that admits no global beyond the few that bytes and numpy arrays need
(the pickle opcodes for lists, tuples, bytes and booleans need none): a file that
names anything else (os.system, builtins.open, ...) is refused before anything runs.
"""
from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from facerec.data.decode import image_tensor
from facerec.data.verification import VerificationSet


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that names a global the .bin format does not use."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, restricted to that one use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array reconstructor, wherever this numpy keeps it
_SCALAR = np.float32(0).__reduce__()[0]  # numpy scalars (np.bool_ in issame lists)
_ADMITTED = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        admitted = _ADMITTED.get((module, name))
        if admitted is None:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: a verification .bin holds only bytes, lists, booleans "
                "and numpy arrays; this file is not one (or was crafted to run code)"
            )
        return admitted


def read_bin(path: str | Path) -> tuple[list[bytes], np.ndarray]:
    """(2N encoded images, N issame booleans) of a `.bin`, loaded with the restricted unpickler."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification .bin not found: {path}")
    try:
        # encoding="bytes": the released files were pickled by Python 2, whose str are the JPEG bytes.
        content = _RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{path}: {error}") from None
    except Exception as error:  # truncated or not a pickle at all: any of a dozen exception types
        raise ValueError(f"{path}: not a verification .bin pickle ({type(error).__name__}: {error})") from None
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise ValueError(f"{path}: expected a pickled pair (images, issame), got {type(content).__name__}")
    raw_images, raw_issame = content
    images = []
    for index, image in enumerate(raw_images):
        if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 1:
            image = image.tobytes()
        if not isinstance(image, (bytes, bytearray)):
            raise ValueError(f"{path}: image {index} is a {type(image).__name__}, expected encoded image bytes")
        images.append(bytes(image))
    issame = np.asarray(raw_issame)
    if issame.ndim != 1 or not (issame.dtype == bool or np.isin(issame, (0, 1)).all()):
        raise ValueError(f"{path}: issame must be a list of booleans, got {issame.dtype} of shape {issame.shape}")
    if len(images) != 2 * len(issame):
        raise ValueError(
            f"{path}: {len(images)} images but {len(issame)} issame labels; a .bin holds two images per pair "
            f"(expected {2 * len(issame)} images)"
        )
    return images, issame.astype(bool)


def write_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write `(images, issame)` as insightface does (readable by insightface's own loaders)."""
    images, issame = [bytes(image) for image in images], [bool(same) for same in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; a .bin holds two images per pair")
    Path(path).write_bytes(pickle.dumps((images, issame), protocol=4))


class BinVerificationSet(VerificationSet):
    """A `.bin` verification set; images are decoded when read (the encoded bytes stay in memory)."""

    def __init__(self, path: str | Path, name: str | None = None, image_size: int = 112):
        self.path = Path(path)
        self.images, issame = read_bin(self.path)
        self.image_size = int(image_size)
        pairs = np.arange(len(self.images)).reshape(-1, 2)
        super().__init__(name=name or self.path.stem, num_images=len(self.images), pairs=pairs, issame=issame)

    def image(self, index: int) -> torch.Tensor:
        return image_tensor(self.images[index], self.image_size, f"{self.path} image {index}")

    def image_names(self) -> list[str]:
        """Keys "<name>#<index>": a .bin holds no file names."""
        return [f"{self.name}#{index}" for index in range(self.num_images)]

    def image_identities(self) -> None:
        """A .bin does not name its people."""
        return None
