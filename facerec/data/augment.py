"""Training augmentation policies (conf/augment/): what happens to a decoded face on its way to the network.

A policy is called as `policy(image, key)` with an (H, W, 3) uint8 RGB image and the sample's
dataset key, and returns the network input (3, H, W) float32 (x - 127.5) / 127.5. Every random draw
comes from the key's `augment_seed` (facerec.data.sampling.SampleKey: a function of the run seed, the
epoch and the index alone), so a sample is augmented bitwise the same in any DataLoader worker, on
any rank and after a resume. A plain int key (a dataset indexed outside the training sampler) draws
from the process's `random` instead, as the flip always has.

- `NoAugment` (augment=none): the image as it is.
- `Flip` (augment=flip, the default): mirrored left-right with probability 1/2, the draw
  `augment_random(key) < 0.5` that training has always made, so runs from before policies existed
  are reproduced bitwise.
- `AdaFaceAugment` (augment=adaface): the recipe of AdaFace (Kim et al., CVPR 2022; its official
  dataset/augmenter.py), each op with probability 0.2, in its order, then the flip above:
  crop (a RandomResizedCrop box of 20-100% of the area, aspect 3/4-4/3, kept in place with the rest
  zeroed, not resized), low resolution (down by a factor in [0.2, 1] and back up, each resize with
  an interpolation drawn from nearest, linear, area, cubic, Lanczos) and photometric jitter
  (brightness, contrast, saturation factors in [0.5, 1.5], in a random order). Its low-quality
  results (IJB-S, TinyFace) depend on these. The ops are albumentations transforms (the optional
  `augment` extra), run in the DataLoader workers on the uint8 image: 15,000 images/s per core at
  p = 0.2, 9x the same ops in kornia on batches of 128 on the CPU, whose low-resolution op must
  resize one sample at a time (its sizes and interpolations differ per sample); decode + ops +
  normalise: 4,300 images/s per core, half of decode + flip (docs/research/benchmarks.md, "Augmentation").

`policy.network_input(image, key)` applies a policy to an image that is network input already (a
rendered synthetic face): none and flip keep it exact; pixel ops see it quantised to 8 bits, as a
decoded face is.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from facerec.data.decode import normalise
from facerec.data.sampling import augment_random

POLICIES = "conf/augment/: none, flip, adaface"
_ADAFACE_STREAM = "adaface"  # the AdaFace ops draw from (stream, seed); the flip from the seed alone, as before


class Augment:
    """A policy: `pixels` (its uint8 ops on the image, none here) and `flips` (whether the sample
    is mirrored, never here); subclasses override either."""

    pixel_ops = False  # whether `pixels` can change an image (network_input quantises only then)

    def pixels(self, image: np.ndarray, key: int) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W, 3) uint8: the policy's ops before the flip."""
        return image

    def flips(self, key: int) -> bool:
        return False

    def __call__(self, image: np.ndarray, key: int) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, H, W) float32 network input under this policy."""
        return normalise(self.pixels(image, key), flip=self.flips(key))

    def network_input(self, image: torch.Tensor, key: int) -> torch.Tensor:
        """(3, H, W) float32 network input -> the same under this policy."""
        if self.pixel_ops:
            quantised = image.mul(127.5).add_(127.5).round_().clamp_(0, 255).to(torch.uint8)
            return self(quantised.permute(1, 2, 0).contiguous().numpy(), key)
        return image.flip(-1) if self.flips(key) else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoAugment(Augment):
    """augment=none: the image as it is."""


class Flip(Augment):
    """augment=flip: mirrored left-right with probability 1/2."""

    def flips(self, key: int) -> bool:
        return augment_random(key) < 0.5


NO_AUGMENT = NoAugment()  # the synthetic set's default: its renderer draws its own nuisance, a flip included
FLIP = Flip()  # the encoded sets' default policy, the flip they made before policies


def _probability(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"augment.{name} must be a probability in [0, 1], got {value}")
    return value


def _non_negative(name: str, value: float) -> float:
    value = float(value)
    if value < 0:
        raise ValueError(f"augment.{name} must be >= 0 (factors are drawn from [1 - v, 1 + v]), got {value}")
    return value


def _range(name: str, value, low: float, high: float) -> tuple[float, float]:
    try:
        first, last = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"augment.{name} must be a pair [low, high], got {value!r}") from None
    if not low <= first <= last <= high:
        raise ValueError(f"augment.{name} must be [low, high] with {low} <= low <= high <= {high}, got {value!r}")
    return first, last


def import_albumentations():
    """albumentations, or an ImportError naming the extra that installs it."""
    # Its import asks PyPI for a newer version (2 s timeout): never from a training run or its workers.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations
    except ImportError as error:
        raise ImportError(
            "augment=adaface needs albumentations: pip install 'facerec[augment]' (or -e '.[augment]' in a clone); "
            "augment=none and augment=flip work without it"
        ) from error
    return albumentations


class AdaFaceAugment(Flip):
    """augment=adaface: crop, low resolution and photometric jitter, each with its probability, then the flip.

    crop_p, low_res_p, photometric_p: the probability of each op (AdaFace: 0.2 each).
    crop_scale, crop_ratio: the crop box's area fraction and aspect (width / height) ranges.
    low_res_scale: the range of the downscale factor (the small side is factor x the side).
    brightness, contrast, saturation: the jitter factors are drawn from [max(0, 1 - v), 1 + v].
    """

    pixel_ops = True

    def __init__(
        self,
        crop_p: float = 0.2,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        crop_ratio: tuple[float, float] = (0.75, 4 / 3),
        low_res_p: float = 0.2,
        low_res_scale: tuple[float, float] = (0.2, 1.0),
        photometric_p: float = 0.2,
        brightness: float = 0.5,
        contrast: float = 0.5,
        saturation: float = 0.5,
    ):
        self.crop_p = _probability("crop_p", crop_p)
        self.crop_scale = _range("crop_scale", crop_scale, 1e-3, 1.0)
        self.crop_ratio = _range("crop_ratio", crop_ratio, 1e-3, 1e3)
        self.low_res_p = _probability("low_res_p", low_res_p)
        self.low_res_scale = _range("low_res_scale", low_res_scale, 1e-3, 1.0)
        self.photometric_p = _probability("photometric_p", photometric_p)
        self.brightness = _non_negative("brightness", brightness)
        self.contrast = _non_negative("contrast", contrast)
        self.saturation = _non_negative("saturation", saturation)
        import_albumentations()  # fail when the policy is built (train.py start), not in a DataLoader worker
        # The ops share one python and one numpy stream, re-seeded in place per sample (a fresh pair
        # handed to every op costs ~60 us a sample; Compose.set_random_seed gives each op its own copy
        # of one stream, so whether they fire would coincide).
        self._python_draws = random.Random()
        self._numpy_draws = np.random.Generator(np.random.PCG64())
        self._compose = {}  # (height, width) -> albumentations Compose, built on first use (in each worker)

    def compose(self, shape: tuple[int, int]):
        """The albumentations pipeline for images of `shape` (height, width)."""
        if shape not in self._compose:
            A = import_albumentations()
            import cv2

            # One OpenCV thread per process: the DataLoader workers are the parallelism, and OpenCV's
            # pool on 112x112 resizes made decode + ops ~25% slower on 2 cores.
            cv2.setNumThreads(1)

            class ZeroPaddedCrop(A.RandomResizedCrop):
                """AdaFace's crop: RandomResizedCrop's box, kept where it is on a zero canvas (no resize)."""

                def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params) -> np.ndarray:
                    x_min, y_min, x_max, y_max = crop_coords
                    out = np.zeros_like(img)
                    out[y_min:y_max, x_min:x_max] = img[y_min:y_max, x_min:x_max]
                    return out

            interpolations = [cv2.INTER_NEAREST, cv2.INTER_LINEAR, cv2.INTER_AREA, cv2.INTER_CUBIC, cv2.INTER_LANCZOS4]
            self._compose[shape] = A.Compose(
                [
                    ZeroPaddedCrop(size=shape, scale=self.crop_scale, ratio=self.crop_ratio, p=self.crop_p),
                    # one of the 25 (down, up) pairs, uniformly: the two interpolations drawn independently
                    A.OneOf(
                        [
                            A.Downscale(self.low_res_scale, interpolation_pair={"downscale": down, "upscale": up}, p=1.0)
                            for down in interpolations
                            for up in interpolations
                        ],
                        p=self.low_res_p,
                    ),
                    A.ColorJitter(self.brightness, self.contrast, self.saturation, hue=0.0, p=self.photometric_p),
                ]
            )
            self._compose[shape].set_random_state(self._numpy_draws, self._python_draws)
        return self._compose[shape]

    def seed(self, key: int) -> None:
        """Put the ops' streams at the start of `key`'s: from its augment seed (else from `random`)."""
        seed = getattr(key, "augment_seed", None)
        if seed is None:
            seed = random.getrandbits(64)
        # a string seed is hashed (SHA-512): a stream apart from the flip's random.Random(seed)
        self._python_draws.seed(f"{_ADAFACE_STREAM}:{seed}")
        # numpy's stream (OneOf's choice, ColorJitter's order) continues the python one: a PCG64
        # state set directly, without the ~30 us of hashing a SeedSequence
        self._numpy_draws.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": self._python_draws.getrandbits(128), "inc": self._python_draws.getrandbits(128) | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }

    def pixels(self, image: np.ndarray, key: int) -> np.ndarray:
        compose = self.compose(image.shape[:2])
        self.seed(key)
        return compose(image=image)["image"]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compose": {}}  # to DataLoader workers: each builds its own

    def __repr__(self) -> str:
        return (
            f"AdaFaceAugment(crop_p={self.crop_p}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"low_res_p={self.low_res_p}, low_res_scale={self.low_res_scale}, photometric_p={self.photometric_p}, "
            f"brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"
        )


def check_augment(augment, owner: str) -> Augment:
    """`augment` if it is a policy, else a TypeError naming `owner` (the dataset) and the options."""
    if not isinstance(augment, Augment):
        raise TypeError(
            f"{owner}: augment must be an augmentation policy ({POLICIES}: dataset.train.augment=${{augment}}), "
            f"got {type(augment).__name__} {augment!r}"
        )
    return augment
