"""Identity-overlap audit: which identities of an evaluation set also occur in a training set.

    python -m facerec.tools.overlap lfw_devtrain lfw                  # by name (no model needed)
    python -m facerec.tools.overlap lfw_devtrain lfw ckpt_path=...    # and by embedding
    python -m facerec.tools.overlap /data/faces lfw weights=backbone.pth model=iresnet50
    python eval.py ckpt_path=... eval_sets=[lfw] exclude=logs/overlap/runs/<time>/exclude.csv

The training set is a conf/dataset name (the identities and images of its image-folder training set,
e.g. lfw_devtrain: the people of peopleDevTrain.txt) or a folder root/<identity>/<image>. The
evaluation set is a conf/evalset name; its protocol names each image's identity
(EvaluationProtocol.image_identities).

- By name: an evaluation identity whose name is a training identity's name.
- By embedding (with a model: ckpt_path, weights or onnx_path, as eval.py): every image is embedded
  with the flip test and L2-normalised; each evaluation identity's mean and each training class's
  mean (at most max_images_per_class images, a seeded sample) are L2-normalised; an evaluation
  identity is flagged when the cosine to its nearest training class mean exceeds a threshold.
- The threshold is calibrated on the evaluation set itself: the impostor scores are the cosines
  between the means of distinct evaluation identities (all pairs, or a seeded sample of
  max_impostor_pairs), the same kind of comparison made between different people. With
  far_per=identity (default) the threshold is their (1 - far / T) quantile, T the number of training
  classes: each identity is compared with T classes, so by the union bound an identity absent from
  training is flagged with probability at most about `far`. With far_per=comparison it is the
  (1 - far) quantile: a flagged identity is closer to a training class than all but a fraction `far`
  of distinct-person pairs are to each other. Where there are fewer than 1 / rate impostor pairs,
  the threshold is their maximum and the summary says so.

Outputs in the run dir: suspects.csv (eval_identity, training_identity, cosine, by_name,
by_embedding, images; one row per flagged identity) and exclude.csv (image, set, identity: every
image of a flagged identity, as eval.py's exclude= reads it), and a printed summary.
"""
from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import Dataset

from facerec.data.image_folder import FolderScan, ImageFiles, scan_folder
from facerec.evaluation.protocols.base import EvaluationProtocol

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # cosines per block of a matrix product
Embed = Callable[[Dataset, str], np.ndarray]  # (images yielding (image, index), description) -> (N, d) features


@dataclass
class TrainingImages:
    """A training set's identities and images: `paths[i]` shows `names[labels[i]]`."""

    names: list[str]
    paths: list[Path]
    labels: np.ndarray
    description: str

    @classmethod
    def of_scan(cls, scan: FolderScan, description: str) -> TrainingImages:
        return cls(list(scan.names), [scan.path(i) for i in range(len(scan.labels))], np.asarray(scan.labels), description)


@dataclass
class Suspect:
    eval_identity: str
    images: int  # the identity's images in the evaluation set
    by_name: bool
    by_embedding: bool
    training_identity: str  # the nearest training class where flagged by embedding, else the same name
    cosine: float | None  # to training_identity (None without a model)


@dataclass
class OverlapReport:
    eval_set: str
    training: str
    num_eval_identities: int
    num_eval_images: int
    num_training_identities: int
    suspects: list[Suspect]
    exclude: list[tuple[str, str]]  # (image key, identity) of every image of a flagged identity
    threshold: float | None = None  # None: no embedding audit
    comparison_far: float | None = None  # the impostor tail the threshold leaves
    impostor_pairs: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, by_name: bool | None = None, by_embedding: bool | None = None) -> int:
        return sum(
            (by_name is None or s.by_name == by_name) and (by_embedding is None or s.by_embedding == by_embedding)
            for s in self.suspects
        )


def normalised_means(features: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """(count, d) float32: the L2-normalised mean of each label's L2-normalised features."""
    features = np.asarray(features, dtype=np.float64)
    features = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    sums = np.zeros((count, features.shape[1]))
    np.add.at(sums, labels, features)
    return (sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)


def impostor_scores(means: np.ndarray, max_pairs: int, seed: int = 0) -> np.ndarray:
    """Cosines between the (normalised) means of distinct identities: every pair i < j, or
    `max_pairs` pairs drawn with `seed` where there are more."""
    n = len(means)
    if n < 2:
        raise ValueError(f"calibrating the threshold needs >= 2 evaluation identities, got {n}")
    if n * (n - 1) // 2 <= max_pairs:
        rows = max(1, CHUNK // n)
        scores = []
        for start in range(0, n, rows):
            block = means[start : start + rows] @ means.T
            upper = np.arange(n)[None, :] > np.arange(start, start + len(block))[:, None]
            scores.append(block[upper])
        return np.concatenate(scores)
    rng = np.random.default_rng(seed)
    i = rng.integers(n, size=max_pairs)
    j = rng.integers(n - 1, size=max_pairs)
    j += j >= i  # uniform over j != i
    return np.einsum("nd,nd->n", means[i], means[j])


def nearest_classes(queries: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, cosine) of each query's nearest class (rows normalised)."""
    rows = max(1, CHUNK // max(1, len(classes)))
    best, cosine = [], []
    for start in range(0, len(queries), rows):
        block = queries[start : start + rows] @ classes.T
        best.append(block.argmax(axis=1))
        cosine.append(block.max(axis=1))
    return np.concatenate(best), np.concatenate(cosine)


def audit_overlap(
    train: TrainingImages,
    protocol: EvaluationProtocol,
    eval_set: str,
    embed: Embed | None = None,
    image_size: int = 112,
    far: float = 1e-3,
    far_per: str = "identity",
    max_impostor_pairs: int = 20_000_000,
    max_images_per_class: int | None = None,
    seed: int = 0,
) -> OverlapReport:
    """The audit of the module docstring: by name always, by embedding where `embed` is given
    (`image_size`: the model's input size, for the training images)."""
    if far_per not in ("identity", "comparison"):
        raise ValueError(f"far_per must be 'identity' or 'comparison', got {far_per!r}")
    if not 0 < far < 1:
        raise ValueError(f"far must lie in (0, 1), got {far}")
    keys, identities = protocol.image_names(), protocol.image_identities()
    if identities is None:
        raise ValueError(
            f"evaluation set {eval_set!r} ({type(protocol).__name__}) does not name its images' identities "
            "(image_identities() is None): the audit compares identities"
        )
    eval_names, eval_labels = np.unique(np.asarray(identities, dtype=object).astype(str), return_inverse=True)
    eval_counts = np.bincount(eval_labels, minlength=len(eval_names))
    train_index = {name: index for index, name in enumerate(train.names)}
    by_name = np.array([name in train_index for name in eval_names], dtype=bool)
    report = OverlapReport(eval_set, train.description, len(eval_names), len(keys), len(train.names), [], [])

    by_embedding = np.zeros(len(eval_names), dtype=bool)
    nearest = cosine_to_name = None
    if embed is not None:
        eval_means = normalised_means(embed(protocol.image_set(), eval_set), eval_labels, len(eval_names))
        chosen = sample_per_class(train.labels, max_images_per_class, seed)
        train_features = embed(ImageFiles([train.paths[i] for i in chosen], image_size), "training images")
        train_means = normalised_means(train_features, train.labels[chosen], len(train.names))
        impostors = impostor_scores(eval_means, max_impostor_pairs, seed)
        rate = far / len(train.names) if far_per == "identity" else far
        threshold = float(np.quantile(impostors, 1 - rate, method="higher"))
        nearest = nearest_classes(eval_means, train_means)
        by_embedding = nearest[1] > threshold
        cosine_to_name = {
            label: float(eval_means[label] @ train_means[train_index[eval_names[label]]]) for label in np.flatnonzero(by_name)
        }
        report.threshold, report.comparison_far, report.impostor_pairs = threshold, rate, len(impostors)
        if len(impostors) * rate < 1:
            report.notes.append(
                f"{len(impostors)} impostor pairs do not resolve a rate of {rate:.2g}: the threshold is their maximum"
            )

    flagged = by_name | by_embedding
    for label in np.flatnonzero(flagged):
        name = str(eval_names[label])
        if by_embedding[label]:
            match, cosine = train.names[nearest[0][label]], float(nearest[1][label])
        else:
            match, cosine = name, None if cosine_to_name is None else cosine_to_name[label]
        flags = bool(by_name[label]), bool(by_embedding[label])
        report.suspects.append(Suspect(name, int(eval_counts[label]), *flags, match, cosine))
    report.exclude = [(key, str(eval_names[label])) for key, label in zip(keys, eval_labels) if flagged[label]]
    return report


def sample_per_class(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Sorted image indices: every image, or at most `limit` of each class drawn with `seed`."""
    if limit is None:
        return np.arange(len(labels))
    if limit < 1:
        raise ValueError(f"max_images_per_class must be >= 1 or null, got {limit}")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == label))[:limit] for label in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def write_report(report: OverlapReport, output_dir: str | Path) -> tuple[Path, Path]:
    """suspects.csv and exclude.csv in output_dir."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    suspects, exclude = output_dir / "suspects.csv", output_dir / "exclude.csv"
    with open(suspects, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["eval_identity", "training_identity", "cosine", "by_name", "by_embedding", "images"])
        for s in report.suspects:
            cosine = "" if s.cosine is None else f"{s.cosine:.4f}"
            writer.writerow([s.eval_identity, s.training_identity, cosine, int(s.by_name), int(s.by_embedding), s.images])
    with open(exclude, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "set", "identity"])
        writer.writerows((key, report.eval_set, identity) for key, identity in report.exclude)
    return suspects, exclude


def summary(report: OverlapReport) -> str:
    lines = [
        f"{report.eval_set}: {report.num_eval_identities} identities, {report.num_eval_images} images; "
        f"training: {report.training}, {report.num_training_identities} identities",
        f"by name: {report.count(by_name=True)} identities",
    ]
    if report.threshold is None:
        lines.append("by embedding: not run (no model: ckpt_path=, weights= or onnx_path=)")
    else:
        lines += [
            f"by embedding: {report.count(by_embedding=True)} identities (cosine to the nearest training class mean > "
            f"{report.threshold:.4f}, the {1 - report.comparison_far:.8g} quantile of {report.impostor_pairs} "
            "impostor scores)",
            f"both: {report.count(by_name=True, by_embedding=True)}; by name only: "
            f"{report.count(by_name=True, by_embedding=False)}; by embedding only: "
            f"{report.count(by_name=False, by_embedding=True)}",
        ]
    lines.append(f"flagged: {len(report.suspects)} identities, {len(report.exclude)} images")
    return "\n".join(lines + report.notes)


def training_images(cfg: DictConfig) -> TrainingImages:
    """cfg.train_set: a folder root/<identity>/<image>, or a conf/dataset name whose training set
    is an image folder (its scan: the identities it trains on, e.g. lfw_devtrain's DevTrain people)."""
    spec = str(cfg.train_set)
    if Path(spec).is_dir():
        return TrainingImages.of_scan(scan_folder(spec), spec)
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import MissingConfigException

    try:
        dataset = compose(overrides=[f"+dataset@dataset={spec}"])["dataset"]
    except MissingConfigException:
        available = GlobalHydra.instance().config_loader().get_group_options("dataset")
        raise ValueError(
            f"train_set={spec}: neither a folder nor a conf/dataset name; datasets: {', '.join(available)}"
        ) from None
    with open_dict(cfg):
        cfg.dataset = dataset  # resolved in the run config: ${paths.data_dir}
        cfg.dataset.train.augment = {"_target_": "facerec.data.augment.NoAugment"}
    train = hydra.utils.instantiate(OmegaConf.to_container(cfg.dataset.train, resolve=True))
    scan = getattr(train, "scan", None)
    if not isinstance(scan, FolderScan):
        raise ValueError(
            f"train_set={spec}: its training set ({type(train).__name__}) is not an image folder with identity names; "
            "give the folder root/<identity>/<image> instead"
        )
    return TrainingImages.of_scan(scan, f"dataset={spec} ({scan.root})")


def run(cfg: DictConfig) -> OverlapReport:
    """The audit of cfg (conf/overlap.yaml): prints the summary, writes suspects.csv and exclude.csv."""
    from facerec.evaluation.embeddings import extract_embeddings
    from facerec.evaluation.evalsets import build_protocols, check_image_size, compose_evalsets, unnamed_overrides
    from facerec.evaluation.models import MODEL_SOURCES, load_evaluation_model, resolve_device

    stray = unnamed_overrides(cfg, [cfg.eval_set])
    if stray:
        raise ValueError(f"evalset overrides for {stray}, which eval_set={cfg.eval_set} does not name")
    train = training_images(cfg)
    embed, image_size = None, 112
    if any(cfg.get(key) is not None for key in MODEL_SOURCES):
        model = load_evaluation_model(cfg, resolve_device(cfg.device))
        with open_dict(cfg):
            cfg.model = model.model_config  # set configs may read ${model.input_size}
        image_size = model.input_size

        def embed(images: Dataset, description: str) -> np.ndarray:
            check_image_size(images, description, model.input_size, model.description)
            return extract_embeddings(
                model.embedder, images, flip=cfg.flip, device=model.device, bf16=cfg.bf16, batch_size=cfg.batch_size,
                num_workers=cfg.num_workers, progress=cfg.progress, description=description,
            ).numpy()  # fmt: skip

    compose_evalsets(cfg, [cfg.eval_set], "eval_set")
    protocol = build_protocols(cfg, [cfg.eval_set])[cfg.eval_set]
    report = audit_overlap(
        train, protocol, cfg.eval_set, embed, image_size, cfg.far, cfg.far_per, cfg.max_impostor_pairs,
        cfg.max_images_per_class, cfg.seed,
    )  # fmt: skip
    suspects, exclude = write_report(report, cfg.output_dir)
    print(f"{summary(report)}\nsuspects: {suspects}\nexclude: {exclude}", flush=True)
    return report


def positional_overrides(argv: Sequence[str]) -> list[str]:
    """The command line with its first two plain words as train_set= and eval_set=."""
    argv, keys = list(argv), ["train_set", "eval_set"]
    for position, word in enumerate(argv):
        if not keys or "=" in word or word.startswith(("-", "~", "+")):
            break
        argv[position] = f"{keys.pop(0)}={word}"
    return argv


@hydra.main(version_base="1.3", config_path="../../conf", config_name="overlap")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    from facerec.config import register_resolvers

    register_resolvers()
    sys.argv[1:] = positional_overrides(sys.argv[1:])
    main()
