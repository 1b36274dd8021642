"""A small IJB-B/IJB-C look-alike built from real LFW faces, in the official IJB layout, to test the
IJB pipeline (eval.py, validation) without the IJB data:

    facerec-make-fixture [--out logs/fixtures] [--dataset IJBC] [--num-templates 60] [--seed 0]

writes under OUT/<dataset>/ (ds = ijbc or ijbb), where conf/evalset/ijbc_fixture.yaml and
ijbc_fixture_1n.yaml read it (${paths.log_dir}/fixtures/IJBC: logs/fixtures/IJBC from the repo root).
The folder is written under a temporary name and renamed into place, so it is complete or absent:

- `loose_crop/<n>.jpg`: "loose crops", each LFW aligned 112x112 crop warped by a random similarity
  (scale 1.3-2, rotation +-25 degrees, a shift) onto a larger square canvas, JPEG quality 95;
- `meta/<ds>_face_tid_mid.txt`: `image_name template_id media_id`, one line per loose crop;
- `meta/<ds>_name_5pts_score.txt`: `image_name x1 y1 ... x5 y5 faceness`, same order: the landmarks
  are the ArcFace template moved by the image's transform, the faceness a random detector score;
- `meta/<ds>_template_pair_label.txt`: `t1 t2 label` for every pair of templates (genuine: the
  same LFW person);
- `meta/<ds>_1N_gallery_G1.csv`, `..._G2.csv` (IJB-B: `_S1`, `_S2`), `..._1N_probe_mixed.csv`: one row per image,
  header `TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT`. Each
  subject has one gallery template (G1 for the first half of the subjects, G2 for the other) and
  its other templates are probes, so each gallery leaves the other gallery's subjects non-mated;
- `fixture_truth.json` (beside meta/): for each image its LFW source, subject and the 2x3 matrix
  taking the aligned crop's pixels to the loose crop's (for tests of alignment).

Subjects are LFW people with at least `templates_per_subject` x `images_per_template_min` images;
each gets `templates_per_subject` templates of disjoint images (2-4 each), split into 1-3 media.
Template and media ids are random distinct integers, as in IJB. Everything is drawn from `seed`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from facerec.data.align import ALIGNED_SIZE, ARCFACE_TEMPLATE, require_cv2
from facerec.data.ijb import DATASETS, GALLERIES, meta_prefix
from facerec.paths import DATA_DIR

CSV_HEADER = "TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"
DEFAULT_OUT = Path("logs/fixtures")  # ${paths.log_dir}/fixtures from the repo root, where the evalset configs look


def random_similarity(rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """(2x3 matrix taking the 112x112 crop into a canvas, canvas side) for one loose crop."""
    scale = rng.uniform(1.3, 2.0)
    angle = np.deg2rad(rng.uniform(-25, 25))
    side = int(np.ceil(ALIGNED_SIZE * scale * 1.6))
    # The rotated crop's half-diagonal is 0.44 side, so a shift up to 0.05 side keeps it on the canvas.
    centre = side / 2 + rng.uniform(-0.05, 0.05, size=2) * side
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    translation = centre - rotation @ np.full(2, ALIGNED_SIZE / 2)
    return np.hstack([rotation, translation[:, None]]), side


def _subjects(lfw_root: Path, count: int, min_images: int, rng: np.random.Generator) -> list[list[Path]]:
    folder = lfw_root / "aligned_112"
    people = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    eligible = [sorted(p.glob("*.jpg")) for p in people]
    eligible = [files for files in eligible if len(files) >= min_images]
    if len(eligible) < count:
        raise ValueError(
            f"{folder}: the fixture needs {count} people with >= {min_images} images, found {len(eligible)}"
        )
    return [eligible[i] for i in sorted(rng.choice(len(eligible), size=count, replace=False))]


def make_ijb_fixture(
    out_dir: str | Path,
    dataset: str = "IJBC",
    lfw_root: str | Path = DATA_DIR / "lfw",
    num_templates: int = 60,
    seed: int = 0,
    templates_per_subject: int = 3,
    images_per_template_min: int = 2,
    images_per_template_max: int = 4,
) -> Path:
    """Write the fixture under out_dir/<dataset>/ and return that folder (see the module docstring).
    An existing fixture there is kept as it is (another process may have just written it)."""
    root = Path(out_dir) / dataset
    if (root / "meta").is_dir():
        return root
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset}.", dir=out_dir))
    try:
        _write_fixture(staging, dataset, Path(lfw_root), num_templates, seed, templates_per_subject,
                       images_per_template_min, images_per_template_max)  # fmt: skip
        staging.rename(root)
    except OSError:
        if not (root / "meta").is_dir():  # not a concurrent writer's complete fixture: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_fixture(
    root: Path,
    dataset: str,
    lfw_root: Path,
    num_templates: int,
    seed: int,
    templates_per_subject: int,
    images_per_template_min: int,
    images_per_template_max: int,
) -> None:
    cv2 = require_cv2()
    prefix = meta_prefix(dataset)
    if templates_per_subject < 2 or num_templates % templates_per_subject or num_templates // templates_per_subject < 4:
        raise ValueError(
            f"num_templates={num_templates} must be a multiple of templates_per_subject={templates_per_subject} "
            f"(>= 2) giving >= 4 subjects"
        )
    rng = np.random.default_rng(seed)
    num_subjects = num_templates // templates_per_subject
    subjects = _subjects(lfw_root, num_subjects, templates_per_subject * images_per_template_min, rng)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)

    template_ids = rng.choice(np.arange(1, 100 * num_templates), size=num_templates, replace=False)
    media_counter = iter(rng.choice(np.arange(1, 1000 * num_templates), size=10 * num_templates, replace=False))
    tid_mid, five_points, truth = [], [], {}
    first_gallery, second_gallery = (f"gallery_{name}" for name in GALLERIES[dataset])
    csv_rows: dict[str, list[str]] = {first_gallery: [], second_gallery: [], "probe_mixed": []}
    template_subject = np.repeat(np.arange(num_subjects), templates_per_subject)
    for subject, files in enumerate(subjects):
        files = [files[i] for i in rng.permutation(len(files))]
        sizes = rng.integers(images_per_template_min, images_per_template_max + 1, size=templates_per_subject)
        sizes = np.minimum(sizes, len(files) // templates_per_subject)
        starts = np.r_[0, np.cumsum(sizes)]
        for k in range(templates_per_subject):
            template = int(template_ids[subject * templates_per_subject + k])
            members = files[starts[k]:starts[k + 1]]
            num_media = int(rng.integers(1, min(3, len(members)) + 1))
            # Every media gets at least one image; the rest fall into random media.
            media_of = np.r_[np.arange(num_media), rng.integers(0, num_media, size=len(members) - num_media)]
            media_ids = [int(next(media_counter)) for _ in range(num_media)]
            gallery = first_gallery if subject < num_subjects // 2 else second_gallery
            for source, media in zip(members, rng.permutation(media_of)):
                name = f"{len(tid_mid) + 1}.jpg"
                matrix, side = random_similarity(rng)
                aligned = cv2.imread(str(source), cv2.IMREAD_COLOR)
                loose = cv2.warpAffine(
                    aligned, matrix, (side, side), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101
                )
                cv2.imwrite(str(root / "loose_crop" / name), loose, [cv2.IMWRITE_JPEG_QUALITY, 95])
                landmarks = ARCFACE_TEMPLATE @ matrix[:, :2].T + matrix[:, 2]
                faceness = rng.uniform(0.3, 1.0)
                tid_mid.append(f"{name} {template} {media_ids[media]}")
                five_points.append(" ".join([name, *(f"{v:.3f}" for v in landmarks.ravel()), f"{faceness:.3f}"]))
                corners = np.array([[0, 0], [ALIGNED_SIZE, 0], [0, ALIGNED_SIZE], [ALIGNED_SIZE, ALIGNED_SIZE]])
                box = corners @ matrix[:, :2].T + matrix[:, 2]
                x, y = np.maximum(box.min(0), 0)
                w, h = np.minimum(box.max(0), side) - (x, y)
                row = f"{template},{subject + 1},img/{name},{media_ids[media]},{x:.0f},{y:.0f},{w:.0f},{h:.0f}"
                csv_rows[gallery if k == 0 else "probe_mixed"].append(row)
                truth[name] = {
                    "source": str(source.relative_to(lfw_root)),
                    "subject": subject + 1,
                    "template": template,
                    "aligned_to_loose": matrix.round(12).tolist(),
                }

    first, second = np.triu_indices(num_templates, k=1)
    labels = (template_subject[first] == template_subject[second]).astype(int)
    pairs = [f"{template_ids[a]} {template_ids[b]} {y}" for a, b, y in zip(first, second, labels)]
    meta = root / "meta"
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(five_points) + "\n")
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    for part, rows in csv_rows.items():
        (meta / f"{prefix}_1N_{part}.csv").write_text("\n".join([CSV_HEADER, *rows]) + "\n")
    (root / "fixture_truth.json").write_text(
        json.dumps({"dataset": dataset, "seed": seed, "lfw_root": str(lfw_root), "images": truth}, indent=1)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facerec-make-fixture", description="Write a small IJB-layout fixture from LFW faces.")
    parser.add_argument("--out", default=DEFAULT_OUT, type=Path, help=f"the fixture goes to OUT/<dataset>/ (default {DEFAULT_OUT})")
    parser.add_argument("--dataset", default="IJBC", choices=DATASETS)
    parser.add_argument("--lfw-root", default=DATA_DIR / "lfw", type=Path)
    parser.add_argument("--num-templates", default=60, type=int)
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args(argv)
    root = make_ijb_fixture(args.out, args.dataset, args.lfw_root, args.num_templates, args.seed)
    print(f"the {args.dataset} fixture is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
