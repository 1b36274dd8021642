"""Synthetic face-like identities: the embedded default dataset (no download, deterministic).

An identity is a prototype drawn from a seeded random stream: a mirror-symmetric
face (skin tone, oval, eyes, brows, nose, mouth at identity-specific places and
sizes) over a low-frequency texture. A sample of that identity adds nuisance
that a face model must learn to ignore: a per-sample pose/expression field,
illumination ramp, brightness and contrast, a shift of a few pixels, pixel noise
and a horizontal flip. Every image is a pure function of (seed, split, index), so
runs are reproducible and DataLoader workers need no shared state.

Training and held-out identities come from disjoint streams ("train" and
"heldout"), so verification on held-out pairs is open-set, as on real benchmarks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from facerec.data.augment import NO_AUGMENT, Augment, check_augment
from facerec.data.verification import VerificationSet, balanced_pairs

_STREAMS = {"train": 1, "heldout": 2}


def _colour(rgb: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(rgb, dtype=torch.float32)[:, None, None]


class IdentityRenderer:
    """Renders prototypes and nuisance samples of the identities of one split."""

    def __init__(
        self, seed: int, split: str, image_size: int = 112, difficulty: float = 1.0, cache_prototypes: bool = True
    ):
        if split not in _STREAMS:
            raise ValueError(f"split must be one of {sorted(_STREAMS)}, got {split!r}")
        if difficulty < 0:
            raise ValueError(f"difficulty must be >= 0, got {difficulty}")
        self.seed = int(seed)
        self.stream = _STREAMS[split]
        self.size = int(image_size)
        self.difficulty = float(difficulty)
        axis = (torch.arange(self.size, dtype=torch.float32) + 0.5) / self.size * 2 - 1  # [-1, 1]
        self.yy, self.xx = torch.meshgrid(axis, axis, indexing="ij")
        # Prototypes cost ~1 ms to draw; caching them (~150 kB each) makes sampling ~3x faster.
        self.cache_prototypes = cache_prototypes
        self._prototypes: dict[int, torch.Tensor] = {}
        self._bases: dict[int, torch.Tensor] = {}

    def render(self, identity: int, index: int) -> torch.Tensor:
        """Network input (3, H, W) in [-1, 1] for sample `index` of `identity`."""
        prototype = self._prototypes.get(identity)
        if prototype is None:
            prototype = self.prototype(identity)
            if self.cache_prototypes:
                self._prototypes[identity] = prototype
        return to_network_input(self.sample(prototype, index))

    def _rng(self, kind: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, kind, int(index)])

    def _smooth_field(self, rng: np.random.Generator, channels: int, grid: int, amplitude: float) -> torch.Tensor:
        """A bicubic upsampling of a (channels, grid, grid) Gaussian field, as one small matmul."""
        if grid not in self._bases:
            deltas = torch.eye(grid * grid).view(grid * grid, 1, grid, grid)
            upsampled = F.interpolate(deltas, size=(self.size, self.size), mode="bicubic", align_corners=False)
            self._bases[grid] = upsampled.view(grid * grid, -1)
        coarse = torch.from_numpy(rng.standard_normal((channels, grid * grid)).astype(np.float32))
        return (coarse @ self._bases[grid]).view(channels, self.size, self.size) * amplitude

    def _blob(self, cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
        """Soft ellipse mask in [0, 1], centred at (cx, cy) in [-1, 1] image coordinates."""
        r2 = ((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2
        return torch.sigmoid((1.0 - r2) * 6.0)

    def prototype(self, identity: int) -> torch.Tensor:
        """(4, H, W): the identity's face (RGB in [0, 1]) and its soft mask (the background is nuisance)."""
        rng = self._rng(0, identity)
        skin = _colour(rng.uniform([0.45, 0.3, 0.25], [0.9, 0.7, 0.6]))
        texture = self._smooth_field(rng, 3, 6, 0.08)
        texture = 0.5 * (texture + texture.flip(-1))  # faces are nearly symmetric
        face = self._blob(0.0, rng.uniform(-0.05, 0.1), rng.uniform(0.55, 0.75), rng.uniform(0.7, 0.9))
        image = skin + texture

        eye_dx, eye_y = rng.uniform(0.2, 0.38), rng.uniform(-0.3, -0.1)
        eye_r = rng.uniform(0.06, 0.12, 2)
        eye_colour = _colour(rng.uniform(0.0, 0.5, 3))
        brow_gap, brow_w = rng.uniform(0.1, 0.2), rng.uniform(0.1, 0.2)
        nose_y, nose_len = rng.uniform(0.0, 0.2), rng.uniform(0.1, 0.25)
        mouth_y, mouth_w, mouth_h = rng.uniform(0.3, 0.5), rng.uniform(0.15, 0.35), rng.uniform(0.03, 0.09)
        lip = _colour(rng.uniform([0.4, 0.05, 0.05], [0.9, 0.4, 0.4]))
        features = [
            (self._blob(-eye_dx, eye_y, *eye_r) + self._blob(eye_dx, eye_y, *eye_r), eye_colour),
            (
                self._blob(-eye_dx, eye_y - brow_gap, brow_w, 0.03) + self._blob(eye_dx, eye_y - brow_gap, brow_w, 0.03),
                0.5 * eye_colour,
            ),
            (self._blob(0.0, nose_y, 0.05, nose_len) * 0.5, 0.7 * skin),
            (self._blob(0.0, mouth_y, mouth_w, mouth_h), lip),
        ]
        for mask, colour in features:
            mask = mask.clamp(max=1.0)
            image = image * (1 - mask) + colour * mask
        return torch.cat([image, face[None]])

    def sample(self, prototype: torch.Tensor, index: int) -> torch.Tensor:
        """(3, H, W) image in [0, 1]: the prototype under the nuisance of sample `index`."""
        rng = self._rng(1, index)
        d = self.difficulty
        face, mask = prototype[:3], prototype[3:]
        background = _colour(rng.uniform(0.0, 1.0, 3)) + self._smooth_field(rng, 3, 3, 0.2)
        image = background * (1 - mask) + face * mask
        image = image * _colour(1 + 0.15 * d * rng.uniform(-1, 1, 3))  # colour cast
        image = image + self._smooth_field(rng, 3, 4, 0.1 * d)  # pose / expression / make-up
        angle = rng.uniform(0, 2 * np.pi)
        ramp = float(np.cos(angle)) * self.xx + float(np.sin(angle)) * self.yy
        image = image * (1 + 0.25 * d * rng.uniform(-1, 1)) + 0.15 * d * ramp  # illumination, contrast
        image = image + 0.1 * d * rng.uniform(-1, 1)  # brightness
        max_shift = max(1, round(0.06 * d * self.size))
        shift = rng.integers(-max_shift, max_shift + 1, size=2)
        image = torch.roll(image, shifts=(int(shift[0]), int(shift[1])), dims=(1, 2))
        if rng.random() < 0.5:
            image = image.flip(-1)
        # Uniform pixel noise from a per-sample torch generator: 4x cheaper than numpy normals.
        noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**62))))
        return image.add_(noise.sub_(0.5), alpha=0.2 * d).clamp_(0.0, 1.0)


def to_network_input(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] float image -> the convention (x - 127.5) / 127.5 on the 0..255 scale."""
    return image * 2.0 - 1.0


class SyntheticIdentities(Dataset):
    """Training split: `num_classes` identities x `images_per_class` samples, label = identity.

    The identities are the first `num_classes` of the training stream, and sample k of identity i is
    rendered from (seed, i, i * images_per_class + k) alone: changing `num_classes` adds or removes
    whole identities and leaves every other image as it was (the class-count knob of experiment=s_star).
    `augment` (facerec.data.augment) applies on top of the rendered nuisance, which already holds a
    flip: the default, and dataset=synthetic's default, is none.
    """

    def __init__(
        self,
        num_classes: int = 500,
        images_per_class: int = 20,
        seed: int = 0,
        image_size: int = 112,
        difficulty: float = 1.0,
        cache_prototypes: bool = True,
        augment: Augment = NO_AUGMENT,
    ):
        if num_classes < 2 or images_per_class < 1:
            raise ValueError(
                f"synthetic data needs num_classes >= 2 and images_per_class >= 1, got {num_classes}, {images_per_class}"
            )
        self.num_classes = int(num_classes)
        self.images_per_class = int(images_per_class)
        self.renderer = IdentityRenderer(seed, "train", image_size, difficulty, cache_prototypes)
        self.augment = check_augment(augment, type(self).__name__)

    def __len__(self) -> int:
        return self.num_classes * self.images_per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        identity = index // self.images_per_class
        return self.augment.network_input(self.renderer.render(identity, index), index), identity


class SyntheticPairs(VerificationSet):
    """Held-out identities (disjoint from training) and same/different pairs over their images.

    Pairs are laid out as `n_folds` consecutive blocks, each half same and half
    different, like LFW View 2 and the insightface .bin sets.
    """

    def __init__(
        self,
        num_identities: int = 100,
        images_per_identity: int = 10,
        num_pairs: int = 1200,
        n_folds: int = 10,
        seed: int = 0,
        image_size: int = 112,
        difficulty: float = 1.0,
        name: str = "synthetic_heldout",
    ):
        self.renderer = IdentityRenderer(seed, "heldout", image_size, difficulty)
        self.images_per_identity = int(images_per_identity)
        labels = np.repeat(np.arange(num_identities), images_per_identity)
        pairs, issame = balanced_pairs(labels, num_pairs, n_folds, seed=seed)
        super().__init__(name=name, num_images=len(labels), pairs=pairs, issame=issame)

    def image(self, index: int) -> torch.Tensor:
        return self.renderer.render(index // self.images_per_identity, index)

    def image_names(self) -> list[str]:
        """Keys "<name>#<index>": rendered images have no files."""
        return [f"{self.name}#{index}" for index in range(self.num_images)]

    def image_identities(self) -> list[str]:
        """Identity k of the held-out stream is "<name>#identity<k>"."""
        return [f"{self.name}#identity{index // self.images_per_identity}" for index in range(self.num_images)]
