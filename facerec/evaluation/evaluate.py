"""Evaluate a checkpoint on verification sets: the logic behind `python eval.py`."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from facerec.training.checkpoints import load_backbone
from facerec.data import VerificationSet
from facerec.evaluation.embeddings import extract_embeddings
from facerec.evaluation.report import format_table, plot_roc, write_results
from facerec.evaluation.verification import VerificationResult, verify

log = logging.getLogger(__name__)


def compose_verification_sets(names: Sequence[str]) -> DictConfig:
    """{name: config} from conf/verification/<name>.yaml, through Hydra's config search path.

    Runs inside an initialised Hydra (eval.py, or a `hydra.initialize*` context).
    Interpolations in the set configs (e.g. ${paths.data_dir}) stay unresolved:
    they resolve once the configs sit in the caller's config.
    """
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"eval_sets must name distinct configs of conf/verification/, got {names}")
    try:
        composed = compose(overrides=[f"+verification@verification.{name}={name}" for name in names])
    except MissingConfigException:
        available = GlobalHydra.instance().config_loader().get_group_options("verification")
        unknown = [name for name in names if name not in available]
        raise ValueError(
            f"eval_sets: no verification config {unknown} (expected conf/verification/<name>.yaml); "
            f"available: {', '.join(available)}"
        ) from None
    return composed.verification


def resolve_device(device: str) -> torch.device:
    """"auto" -> the GPU where there is one, else the CPU; anything else as torch names it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def evaluate_set(
    backbone: nn.Module, verification_set: VerificationSet, n_folds: int = 10, **extract_options
) -> VerificationResult:
    """Embed every image of the set once (see extract_embeddings), then score its pairs."""
    table = extract_embeddings(backbone, verification_set, **extract_options)
    pairs = verification_set.pairs
    return verify(table[pairs[:, 0]], table[pairs[:, 1]], verification_set.issame, n_folds, verification_set.folds)


def check_input_size(verification_set: VerificationSet, name: str, model_config: dict) -> None:
    """The set's images must have the size the backbone was built for (112 unless its config says otherwise)."""
    size = int(model_config.get("input_size", 112))
    shape = tuple(verification_set[0][0].shape)
    if shape != (3, size, size):
        raise ValueError(
            f"verification set {name!r} yields images of shape {shape}, but the checkpoint's backbone "
            f"({model_config.get('name', model_config.get('_target_'))}) takes (3, {size}, {size})"
        )


def evaluate(cfg: DictConfig) -> dict[str, VerificationResult]:
    """Evaluate cfg.ckpt_path on cfg.eval_sets; print the table, write results.json and roc.png."""
    stray = set(cfg.verification) - set(cfg.eval_sets)
    if stray:
        raise ValueError(f"verification overrides for {sorted(stray)}, which eval_sets={list(cfg.eval_sets)} does not name")
    backbone, run_config = load_backbone(cfg.ckpt_path)
    with open_dict(cfg):
        # Set configs may read the checkpoint's model config (the synthetic set renders at model.input_size).
        cfg.model = run_config["model"]
        cfg.verification = OmegaConf.merge(compose_verification_sets(cfg.eval_sets), cfg.verification)
    device = resolve_device(cfg.device)
    results = {}
    for name in cfg.eval_sets:
        verification_set = instantiate(cfg.verification[name])
        if not isinstance(verification_set, VerificationSet):
            raise TypeError(
                f"conf/verification/{name}.yaml must instantiate a facerec.data.VerificationSet, "
                f"got {type(verification_set).__name__}"
            )
        check_input_size(verification_set, name, run_config["model"])
        log.info("%s: %d images, %d pairs", name, verification_set.num_images, len(verification_set.pairs))
        try:
            results[name] = evaluate_set(
                backbone,
                verification_set,
                n_folds=cfg.n_folds,
                flip=cfg.flip,
                device=device,
                bf16=cfg.bf16,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
            )
        except ValueError as error:
            raise ValueError(f"verification set {name!r}: {error}") from error
        for note in results[name].notes:
            log.info("%s: %s", name, note)

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    context = dict(checkpoint=str(cfg.ckpt_path), model=run_config["model"], flip=cfg.flip, device=str(device), bf16=cfg.bf16)
    results_path = write_results(results, output_dir / "results.json", **context)
    roc_path = plot_roc(results, output_dir / "roc.png", title=f"ROC: {Path(cfg.ckpt_path).name}")
    print(f"{format_table(results)}\n\nresults: {results_path}\nROC curves: {roc_path}", flush=True)
    return results
