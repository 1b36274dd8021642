"""Converters (console scripts, see pyproject.toml):

    facerec-folder-to-rec ROOT OUT_DIR [--identities FILE]     image folder -> train.rec, train.idx, property
    facerec-pairs-to-bin PAIRS ROOT OUT.bin                     LFW pairs file + image folder -> verification .bin

Every source image is decoded first: a corrupt or empty one, or one whose shorter
side is below --min-image-size (default a quarter of --image-size), is skipped and
counted, or raises with --strict. A JPEG already `image_size` x `image_size` is stored byte
for byte, so reading the output gives exactly the pixels of the source; any
other image is fitted (facerec.data.decode's size policy) and encoded as JPEG at
`quality`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import simplejpeg

from facerec.data.bin import write_bin
from facerec.data.decode import DecodeError, ImageTooSmall, decode_image, jpeg_size
from facerec.data.image_folder import scan_folder
from facerec.data.lfw import LfwPairs
from facerec.data.recordio import RecordIOWriter, pack_record

log = logging.getLogger(__name__)


def encode_for_storage(data: bytes, image_size: int = 112, quality: int = 95, min_size: int = 0) -> bytes:
    """JPEG bytes of `image_size` x `image_size` RGB (see the module docstring); DecodeError if
    unreadable, ImageTooSmall if its shorter side is below `min_size`."""
    image = decode_image(data, image_size, min_size)
    if jpeg_size(data) == (image_size, image_size):
        return data
    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB")


def folder_to_rec(
    root: str | Path,
    out_dir: str | Path,
    identities: str | Path | None = None,
    image_size: int = 112,
    quality: int = 95,
    strict: bool = False,
    min_image_size: int | None = None,
) -> dict[str, int]:
    """Write an insightface training set (layout: facerec.data.record_dataset) from `root/<identity>/<image>`.

    Labels follow the folder scan's identity order; an identity none of whose
    images is kept gets no label. Images whose shorter side is below
    `min_image_size` (None: image_size // 4) are skipped like corrupt ones.
    Returns counts of images, classes and skips.
    """
    min_size = image_size // 4 if min_image_size is None else int(min_image_size)
    scan = scan_folder(root, identities)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranges: list[tuple[int, int]] = []
    skipped = {"corrupt_images": 0, "small_images": 0}
    key = 1  # record 0 is the header, written last (its label needs the counts); the .idx maps it
    with RecordIOWriter(out_dir / "train.rec", out_dir / "train.idx") as writer:
        bounds = np.searchsorted(scan.labels, np.arange(len(scan.names) + 1))  # images are grouped by label
        for label in range(len(scan.names)):
            first = key
            for index in range(bounds[label], bounds[label + 1]):
                path = scan.path(index)
                try:
                    payload = encode_for_storage(path.read_bytes(), image_size, quality, min_size)
                except DecodeError as error:
                    if strict:
                        raise type(error)(f"{path}: {error}") from None
                    skipped["small_images" if isinstance(error, ImageTooSmall) else "corrupt_images"] += 1
                    log.warning("skipped %s: %s", path, error)
                    continue
                writer.write(key, pack_record(len(ranges), payload, id=key))
                key += 1
            if key > first:
                ranges.append((first, key))
        first_identity = key
        for identity, (first, end) in enumerate(ranges):
            writer.write(first_identity + identity, pack_record([first, end], b"", id=first_identity + identity))
        writer.write(0, pack_record([first_identity, first_identity + len(ranges)], b""))
    (out_dir / "property").write_text(f"{len(ranges)},{image_size},{image_size}\n")
    stats = {
        "images": first_identity - 1,
        "classes": len(ranges),
        **skipped,
        "skipped_files": scan.skipped_files,
        "empty_identities": len(scan.empty_identities),
    }
    log.info("%s: %s", out_dir, stats)
    return stats


def pairs_to_bin(
    pairs: str | Path,
    root: str | Path,
    out_path: str | Path,
    image_size: int = 112,
    quality: int = 95,
    missing: str = "skip",
) -> dict[str, int]:
    """Write a verification .bin of the pairs of an LFW pairs file over `root` (pairs whose
    images are missing are skipped and counted unless missing="error")."""
    pairs_set = LfwPairs(root, pairs, image_size=image_size, missing=missing)
    encoded = [encode_for_storage(path.read_bytes(), image_size, quality) for path in pairs_set.paths]
    write_bin(out_path, [encoded[i] for pair in pairs_set.pairs for i in pair], pairs_set.issame)
    stats = {"pairs": len(pairs_set.issame), "same": int(pairs_set.issame.sum()), "skipped": len(pairs_set.skipped_lines)}
    log.info("%s: %s", out_path, stats)
    return stats


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--image-size", type=int, default=112, help="output images are SIZE x SIZE (default 112)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images (default 95)")
    return parser


def folder_to_rec_main(argv: list[str] | None = None) -> None:
    parser = _parser("Image folder root/<identity>/<image> -> insightface train.rec, train.idx, property.")
    parser.add_argument("root", help="image folder")
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--identities", help="identity list: one name per line, or LFW's people*.txt")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable or too small image")
    parser.add_argument(
        "--min-image-size", type=int, default=None,
        help="skip images whose shorter side is below this many pixels (default: image size // 4; 0 keeps all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stats = folder_to_rec(
        args.root, args.out_dir, args.identities, args.image_size, args.quality, args.strict, args.min_image_size
    )
    print(f"wrote {args.out_dir}: " + ", ".join(f"{value} {key}" for key, value in stats.items()))


def pairs_to_bin_main(argv: list[str] | None = None) -> None:
    parser = _parser("LFW pairs file + image folder -> insightface verification .bin.")
    parser.add_argument("pairs", help="pairs file (pairs.txt, pairsDevTest.txt, ...)")
    parser.add_argument("root", help="image folder root/<name>/<name>_NNNN.jpg")
    parser.add_argument("out", help="output .bin")
    parser.add_argument("--missing", choices=["skip", "error"], default="skip", help="pairs with a missing image")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    stats = pairs_to_bin(args.pairs, args.root, args.out, args.image_size, args.quality, args.missing)
    print(f"wrote {args.out}: " + ", ".join(f"{value} {key}" for key, value in stats.items()))
