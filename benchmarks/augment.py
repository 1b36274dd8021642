"""Augmentation throughput: the augment=none|flip|adaface policies per core and through the training loader,
and the AdaFace ops in albumentations (the policy, per sample in the workers) against kornia (batched).

    python benchmarks/augment.py [--images 4000] [--rounds 3]

Reads real 112x112 LFW JPEGs (../shared/data or $FACEREC_DATA). Per core: decode + policy +
normalise on one thread (= one DataLoader worker) with the keys of an epoch's sampler, policies
interleaved round by round so machine load hits all alike, best round each. The AdaFace ops alone
(on decoded images) with albumentations, per sample, reseeded from each key as the policy does,
beside the same ops in kornia on batches of 128 float images on this CPU (per-sample parameters
drawn from each key; the low-resolution op resizes one sample at a time, its sizes and
interpolations differing per sample) when kornia is installed. Then FaceDataModule's training loader
(ImageFolderDataset, batches of 128, the sample keys of its ResumableSampler) with 1 worker.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from facerec.data import AdaFaceAugment, FaceDataModule, Flip, ImageFolderDataset, NoAugment  # noqa: E402
from facerec.data.decode import decode_image  # noqa: E402
from facerec.data.sampling import ResumableSampler  # noqa: E402
from facerec.paths import DATA_DIR  # noqa: E402

POLICIES = {"none": NoAugment(), "flip": Flip(), "adaface": AdaFaceAugment()}
KORNIA_MODES = ["nearest", "bilinear", "area", "bicubic"]  # torch's resizes (no Lanczos)


def best_rate(pipelines: dict, items: list, rounds: int, per_call: int = 1) -> dict[str, float]:
    """Best images/s over `rounds` of each pipeline(item, i), interleaved round by round."""
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(rounds):
        for name, pipeline in pipelines.items():
            start = time.perf_counter()
            for i, item in enumerate(items):
                pipeline(item, i)
            best[name] = max(best[name], len(items) * per_call / (time.perf_counter() - start))
    return best


def kornia_adaface(batch: torch.Tensor, seeds: list[int], p: float = 0.2) -> torch.Tensor:
    """The AdaFace ops on (B, 3, H, W) uint8 with kornia, parameters drawn per sample from its seed."""
    from kornia.enhance import adjust_brightness, adjust_contrast, adjust_saturation

    images = batch.float() / 255
    size = images.shape[-1]
    draws = torch.stack([torch.rand(13, generator=torch.Generator().manual_seed(seed % 2**64)) for seed in seeds])
    fire = draws[:, :3] < p
    area = (0.2 + 0.8 * draws[:, 3]) * size * size
    aspect = torch.exp(np.log(0.75) + (np.log(4 / 3) - np.log(0.75)) * draws[:, 4])
    width = (area * aspect).sqrt().round().clamp(1, size)
    height = (area / aspect).sqrt().round().clamp(1, size)
    top, left = ((size - height) * draws[:, 5]).floor(), ((size - width) * draws[:, 6]).floor()
    axis = torch.arange(size, dtype=torch.float32)
    rows = (axis >= top[:, None]) & (axis < (top + height)[:, None])
    cols = (axis >= left[:, None]) & (axis < (left + width)[:, None])
    keep = (rows[:, :, None] & cols[:, None, :]) | ~fire[:, 0, None, None]
    images = images * keep[:, None]
    for i in torch.nonzero(fire[:, 1]).flatten().tolist():
        side = max(1, int((0.2 + 0.8 * draws[i, 7]) * size))
        small = F.interpolate(images[i : i + 1], size=(side, side), mode=KORNIA_MODES[int(draws[i, 8] * 4)])
        up = KORNIA_MODES[int(draws[i, 9] * 4)]
        images[i : i + 1] = F.interpolate(small, size=(size, size), mode="bilinear" if up == "area" else up).clamp(0, 1)
    jitter = fire[:, 2]
    if jitter.any():
        chosen = images[jitter]
        chosen = adjust_brightness(chosen, draws[jitter, 10] - 0.5)
        chosen = adjust_contrast(chosen, 0.5 + draws[jitter, 11])
        images[jitter] = adjust_saturation(chosen, 0.5 + draws[jitter, 12])
    return (images * 255).round().to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # (the AdaFace policy sets OpenCV's threads to 1 itself)
    files = sorted((DATA_DIR / "lfw" / "aligned_112").glob("*/*.jpg"))[: args.images]
    people = sorted({f.parent.name for f in files})
    dataset = ImageFolderDataset(DATA_DIR / "lfw" / "aligned_112", identities=people)
    sampler = ResumableSampler(dataset, seed=42)
    keys = list(sampler)[: len(files)]
    blobs = [dataset.scan.path(key).read_bytes() for key in keys]
    print(f"{len(blobs)} LFW JPEGs, 112x112; one thread")

    samples = list(zip(blobs, keys))
    per_core = best_rate(
        {name: (lambda item, i, policy=policy: policy(decode_image(item[0]), item[1])) for name, policy in POLICIES.items()},
        samples,
        args.rounds,
    )
    for name, images_per_s in per_core.items():
        print(f"decode + {name:8s} + normalise (one core) {images_per_s:8.0f} images/s")

    decoded = [(decode_image(data), key) for data, key in samples]
    every = AdaFaceAugment(crop_p=1.0, low_res_p=1.0, photometric_p=1.0)
    ops = best_rate(
        {
            "albumentations, p = 0.2 (the policy)": lambda item, i: POLICIES["adaface"].pixels(*item),
            "albumentations, p = 1 (every op)": lambda item, i: every.pixels(*item),
        },
        decoded,
        args.rounds,
    )
    try:
        import kornia  # noqa: F401
    except ImportError:
        print("kornia not installed: its batched ops are not measured")
    else:
        batches = [
            (torch.from_numpy(np.stack([image for image, _ in decoded[s : s + 128]])).permute(0, 3, 1, 2),
             [key.augment_seed for _, key in decoded[s : s + 128]])
            for s in range(0, len(decoded) - 127, 128)
        ]
        ops.update(
            best_rate(
                {
                    "kornia batch 128 (CPU), p = 0.2": lambda item, i: kornia_adaface(*item, p=0.2),
                    "kornia batch 128 (CPU), p = 1": lambda item, i: kornia_adaface(*item, p=1.0),
                },
                batches,
                args.rounds,
                per_call=128,
            )
        )
    for name, images_per_s in ops.items():
        print(f"AdaFace ops, {name:38s} {images_per_s:8.0f} images/s")

    for name, policy in POLICIES.items():
        dataset.augment = policy
        loader = FaceDataModule(len(people), dataset, batch_size=128, num_workers=1, persistent_workers=True).train_dataloader()
        rates = []
        for epoch in range(1 + args.rounds):  # the first starts the worker
            loader.sampler.set_epoch(epoch)
            start, count = time.perf_counter(), 0
            for images, _ in loader:
                count += len(images)
            rates.append(count / (time.perf_counter() - start))
        print(f"training loader, augment={name:8s} 1 worker: {max(rates[1:]):7.0f} images/s (best of {args.rounds} epochs)")


if __name__ == "__main__":
    main()
