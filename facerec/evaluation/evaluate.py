"""Evaluate a model on evaluation sets of any kind: the logic behind `python eval.py`.

One path for every model (facerec.evaluation.models: a train.py checkpoint, insightface-layout
weights, or an ONNX file) and every set: each name in eval_sets is a conf/evalset entry whose
protocol's images are embedded once with the flip test and scored as validation scores them
(facerec.evaluation.metric.evaluate_features).
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from facerec.evaluation.embeddings import extract_embeddings
from facerec.evaluation.evalsets import build_protocols, check_image_size, compose_evalsets, unnamed_overrides
from facerec.evaluation.exclusion import exclude_images
from facerec.evaluation.metric import Evaluation, evaluate_features
from facerec.evaluation.models import load_evaluation_model, resolve_device
from facerec.evaluation.options import scoring_options
from facerec.evaluation.report import SCORES_FILE, format_table, plot_curves, write_results, write_scores

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Evaluation]:
    """Evaluate the model of cfg's model source on cfg.eval_sets; print one table per result kind,
    write results.json and curves.png (ROC panel; CMC panel where identification sets are)."""
    names = list(cfg.eval_sets)
    stray = unnamed_overrides(cfg, names)
    if stray:
        raise ValueError(f"evalset overrides for {stray}, which eval_sets={names} does not name")
    if not names:
        raise ValueError("eval_sets names no evaluation set (conf/evalset/<name>.yaml)")
    device = resolve_device(cfg.device)
    model = load_evaluation_model(cfg, device)
    with open_dict(cfg):
        cfg.model = model.model_config  # set configs may read it (the synthetic set renders at model.input_size)
    compose_evalsets(cfg, names, "eval_sets")
    evaluations: dict[str, Evaluation] = {}
    protocols = build_protocols(cfg, names)
    if cfg.get("exclude"):  # rescored without the images of a CSV (facerec.evaluation.exclusion)
        protocols = exclude_images(protocols, cfg.exclude)
    for name, protocol in protocols.items():
        image_set = protocol.image_set()
        check_image_size(image_set, name, model.input_size, model.description)
        log.info("%s: %d images", name, len(image_set))
        try:
            features = extract_embeddings(
                model.embedder,
                image_set,
                flip=cfg.flip,
                device=model.device,
                bf16=cfg.bf16,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                progress=cfg.progress,
                description=name,
            )
            evaluations[name] = evaluate_features(protocol, features, scoring_options(cfg, protocol, name))
        except ValueError as error:
            raise ValueError(f"evaluation set {name!r}: {error}") from error
        norms = evaluations[name].norms
        log.info("%s: embedding norm %.3f ± %.3f (mean ± std)", name, norms.mean, norms.std)
        for note in evaluations[name].result.notes:
            log.info("%s: %s", name, note)

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    context = dict(**model.source, model=model.model_config, flip=cfg.flip, device=str(device), bf16=cfg.bf16)
    context["bootstrap"] = OmegaConf.to_container(cfg.bootstrap) if cfg.get("bootstrap") is not None else None
    scores_path = write_scores(evaluations, output_dir / SCORES_FILE) if cfg.get("save_scores", True) else None
    results_path = write_results(evaluations, output_dir / "results.json", **context, scores=scores_path and scores_path.name)
    label = Path(next(iter(model.source.values()))).name
    results = {name: e.result for name, e in evaluations.items()}
    curves_path = plot_curves(results, output_dir / "curves.png", title=label, erc={n: e.erc for n, e in evaluations.items()})
    print(f"{format_table(evaluations)}\n\nresults: {results_path}\ncurves: {curves_path}", flush=True)
    return evaluations
