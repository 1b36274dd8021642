"""Encoded image bytes -> RGB uint8 arrays of the network's size -> normalised network input.

JPEG goes through simplejpeg (libjpeg-turbo, straight into a numpy array): 2x
Pillow on 112x112 faces, with the same pixels (both use libjpeg-turbo's default
integer DCT and fancy upsampling; see benchmarks/decode.py). It decodes strictly:
a corrupt JPEG raises instead of returning partly grey pixels, which Pillow
accepts silently. Other formats (PNG, BMP, PGM/PPM, TIFF, WebP) go through
Pillow.

Size policy (images that are not `size` x `size`): scale so the shorter side is
`size`, then crop the centre (Pillow's ImageOps.fit, bicubic): the aspect ratio
is kept and nothing is padded. ORL's 92x112 faces become 112x136 and lose 12
rows at the top and bottom. Greyscale, palette and CMYK images become RGB
(grey replicated to the three channels).

Images whose shorter side is below `min_size` (training sets: a quarter of the network's size by
default) are refused as unreadable: a 1x1 or 8x8 image upscaled to 112x112 is a flat patch, not a
face. An empty file is refused naming that.

Network input: (3, H, W) float32, (x - 127.5) / 127.5, optionally mirrored.
"""
from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".pbm", ".pnm", ".tif", ".tiff", ".webp"})
_JPEG_START = b"\xff\xd8"


class DecodeError(ValueError):
    """Bytes that are not a readable image."""


class ImageTooSmall(DecodeError):
    """A readable image whose shorter side is below the minimum a set accepts."""


def is_jpeg(data: bytes) -> bool:
    return data[:2] == _JPEG_START


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG header, or None when `data` is not a readable JPEG header."""
    if not is_jpeg(data):
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return height, width


def fit(image: np.ndarray, size: int) -> np.ndarray:
    """The size policy above: shorter side to `size`, centre crop, bicubic."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(ImageOps.fit(Image.fromarray(image), (size, size), Image.Resampling.BICUBIC))


def decode_image(data: bytes, size: int = 112, min_size: int = 0) -> np.ndarray:
    """(size, size, 3) uint8 RGB from encoded image bytes; DecodeError when they are not a readable
    image, or one whose shorter side is below `min_size` pixels."""
    if not data:
        raise DecodeError("the file is empty (0 bytes)")
    if is_jpeg(data):
        try:
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except ValueError as error:
            raise DecodeError(f"corrupt JPEG: {error}") from None
    else:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                image = np.array(opened.convert("RGB"))  # writable: torch.from_numpy warns otherwise
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise DecodeError(f"not a readable image: {error}") from None
    height, width = image.shape[:2]
    if min(height, width) < min_size:
        raise ImageTooSmall(
            f"{width}x{height} pixels, below the minimum side of {min_size} (min_image_size): it would be "
            f"upscaled to {size}x{size}"
        )
    return fit(image, size)


def normalise(image: np.ndarray, flip: bool = False) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 (x - 127.5) / 127.5, mirrored left-right when `flip`."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    if flip:
        tensor = tensor.flip(-1)
    return tensor.float().sub_(127.5).div_(127.5)


def image_tensor(data: bytes, size: int, source: str) -> torch.Tensor:
    """Network input from encoded bytes; a DecodeError names `source` (a file, a record, an index)."""
    try:
        return normalise(decode_image(data, size))
    except DecodeError as error:
        raise DecodeError(f"{source}: {error}") from None
