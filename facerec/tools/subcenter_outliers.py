"""List the label-noise candidates of a Sub-center ArcFace run: training images far from their class's dominant centre.

    python -m facerec.tools.subcenter_outliers ckpt_path=<train.py checkpoint> [threshold_deg=75] [output=<file.csv>]
        [batch_size=256] [num_workers=0] [device=cuda|cpu]

The checkpoint's backbone embeds the checkpoint's own training set (its saved dataset config), each image
as it is, without the random flip of training. The head gives each class its dominant centre (the one
nearest to most of the class's images) and flags every image whose angle to it exceeds threshold_deg:
Deng et al. (ECCV 2020) drop those (75 degrees) and retrain. Written: a CSV with one row per image
(index, label, source: the file or record, for datasets that name their images, angle_deg, outlier),
by default beside the checkpoint as <checkpoint>.outliers.csv. Printed: each class's dominant centre
and number of outliers.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from facerec.backbones.weights import load_backbone
from facerec.checkpoint_files import load_checkpoint
from facerec.data.decode import image_tensor
from facerec.data.encoded import EncodedImages
from facerec.heads import MarginHead, SubCenterArcFace, dominant_centres_and_outliers
from facerec.training.fit import margin_config


@dataclass
class Options:
    ckpt_path: str = MISSING
    threshold_deg: float = 75.0
    output: str | None = None  # default: <checkpoint>.outliers.csv
    batch_size: int = 256
    num_workers: int = 0
    device: str | None = None  # default: cuda when available


@dataclass
class Outliers:
    csv_path: Path
    labels: torch.Tensor  # (N,) label of each training image
    dominant: torch.Tensor  # (C,) dominant centre of each class, -1 for a class without images
    angle_deg: torch.Tensor  # (N,) angle of each image to its class's dominant centre
    outlier: torch.Tensor  # (N,) bool: angle_deg > threshold


class UnaugmentedImages(Dataset):
    """(image, label, source) of each training image as it is: no random flip, and an image that does
    not decode raises naming it (a replacement by another sample, as training does, would list another
    image's angle under this index). source: the file or record for encoded sets, "" otherwise."""

    def __init__(self, train_set: Dataset):
        self.train_set = train_set

    def __len__(self) -> int:
        return len(self.train_set)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        if isinstance(self.train_set, EncodedImages):
            data, label, source = self.train_set.encoded(index)
            return image_tensor(data, self.train_set.image_size, source), label, source
        image, label = self.train_set[index]
        return image, label, ""


def load_subcenter_run(ckpt_path: str | Path) -> tuple[nn.Module, MarginHead, dict]:
    """(backbone in eval mode, the Sub-center ArcFace head with the checkpoint's centres, run config)."""
    backbone, config = load_backbone(ckpt_path)
    margin = instantiate(margin_config(config["head"]))
    head = MarginHead(config["model"]["embedding_size"], config["dataset"]["num_classes"], margin, instantiate(config["scale"]))
    if not isinstance(margin, SubCenterArcFace):
        raise ValueError(
            f"{ckpt_path}: its head is {config['head']['_target_']}, not facerec.heads.SubCenterArcFace; "
            "outliers are defined by the sub-centres of a head=subcenter_arcface run"
        )
    state = load_checkpoint(ckpt_path, mmap=True)["state_dict"]  # mapped: only the head's tensors are read
    prefix = "head."
    try:
        head.load_state_dict({key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)})
    except RuntimeError as error:
        raise ValueError(
            f"{ckpt_path}: its head weights do not fit the head its config describes ({config['head']}): {error}"
        ) from error
    return backbone, head.eval(), config


@torch.no_grad()
def embed_training_set(
    backbone: nn.Module, train_set: Dataset, batch_size: int = 256, num_workers: int = 0, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(float32 embeddings (N, d) on the CPU, labels (N,), sources) of every training image, in index order."""
    loader = DataLoader(UnaugmentedImages(train_set), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    backbone = backbone.to(device).eval()
    embeddings, labels, sources = [], [], []
    for images, batch_labels, batch_sources in loader:
        embeddings.append(backbone(images.to(device)).float().cpu())
        labels.append(batch_labels)
        sources.extend(batch_sources)
    return torch.cat(embeddings), torch.cat(labels).long(), sources


def write_csv(path: Path, labels: torch.Tensor, sources: list[str], angle_deg: torch.Tensor, outlier: torch.Tensor) -> None:
    """One row per image: index, label, source (only when the dataset names its images), angle_deg, outlier (0/1)."""
    named = any(sources)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["index", "label", *(["source"] if named else []), "angle_deg", "outlier"])
        for index, (label, angle, flag) in enumerate(zip(labels.tolist(), angle_deg.tolist(), outlier.tolist())):
            writer.writerow([index, label, *([sources[index]] if named else []), f"{angle:.4f}", int(flag)])


def find_outliers(
    ckpt_path: str | Path,
    threshold_deg: float = 75.0,
    output: str | Path | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> Outliers:
    """Embed the checkpoint's training set, find each class's dominant centre and the images beyond
    `threshold_deg` from it, and write the CSV (see the module docstring)."""
    if not 0 < threshold_deg < 180:
        raise ValueError(f"threshold_deg must lie in (0, 180) degrees, got {threshold_deg}")
    ckpt_path = Path(ckpt_path)
    backbone, head, config = load_subcenter_run(ckpt_path)
    train_config = dict(config["dataset"]["train"])
    if "flip" in train_config:  # saved before the augment group: its flip is irrelevant here (UnaugmentedImages)
        train_config.pop("flip")
    train_set = instantiate(train_config)
    if getattr(train_set, "num_classes", head.num_classes) != head.num_classes:
        raise ValueError(
            f"{ckpt_path}: its training set ({config['dataset']['train']['_target_']}) now holds {train_set.num_classes} "
            f"identities, its head {head.num_classes} classes; the data changed since training"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embeddings, labels, sources = embed_training_set(backbone, train_set, batch_size, num_workers, device)
    dominant, angle_deg, outlier = dominant_centres_and_outliers(head, embeddings, labels, threshold_deg)
    csv_path = Path(output) if output else ckpt_path.with_name(ckpt_path.name + ".outliers.csv")
    write_csv(csv_path, labels, sources, angle_deg, outlier)
    return Outliers(csv_path, labels, dominant, angle_deg, outlier)


def parse_options(argv: list[str]) -> Options:
    """key=value arguments (see the module docstring) over the defaults of Options."""
    try:
        options = OmegaConf.merge(OmegaConf.structured(Options), OmegaConf.from_dotlist(argv))
        if OmegaConf.is_missing(options, "ckpt_path"):
            raise ValueError("ckpt_path=<train.py checkpoint of a head=subcenter_arcface run> is required")
        return OmegaConf.to_object(options)
    except OmegaConfBaseException as error:
        raise ValueError(f"bad argument ({' '.join(argv)}): {str(error).splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        return
    try:
        options = parse_options(argv)
    except ValueError as error:
        raise SystemExit(f"facerec.tools.subcenter_outliers: {error}\n{__doc__.splitlines()[2]}") from None
    result = find_outliers(**vars(options))
    counts = torch.bincount(result.labels, minlength=len(result.dominant))
    outliers = torch.bincount(result.labels[result.outlier], minlength=len(result.dominant))
    for label in counts.nonzero().view(-1).tolist():
        centre, found, images = int(result.dominant[label]), int(outliers[label]), int(counts[label])
        print(f"class {label}: dominant centre {centre}, {found} of {images} images outliers")
    print(
        f"{int(result.outlier.sum())} of {len(result.labels)} images lie beyond {options.threshold_deg:g} deg "
        f"of their class's dominant centre; written to {result.csv_path}"
    )


if __name__ == "__main__":
    main()
