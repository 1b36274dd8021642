"""eval.py end to end on checkpoints trained by train.py; its bad-input errors; the evaluation sets."""
from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from conftest import CONF_DIR, TINY_RUN, compose_config, read_metrics, run_script
from facerec.backbones import build
from facerec.data import SyntheticPairs, VerificationSet
from facerec.backbones.weights import load_backbone
from facerec.evaluation import (
    EmbeddingNorms,
    Evaluation,
    ProtocolResult,
    extract_embeddings,
    format_table,
    plot_curves,
    verify,
    write_results,
)
from facerec.evaluation.evalsets import compose_evalsets
from facerec.evaluation.evaluate import evaluate
from test_verification import assert_agrees, reference

# The set the smoke run validates on (conf/experiment/smoke.yaml), as eval.py overrides.
SMOKE_SET = [
    "+evalset.synthetic_heldout.pairs.num_identities=20",
    "+evalset.synthetic_heldout.pairs.images_per_identity=4",
    "+evalset.synthetic_heldout.pairs.num_pairs=80",
]


def train_checkpoint(run_dir, *overrides) -> tuple:
    """(the best checkpoint of a train.py run, the CSV row of the validation that chose it)."""
    run_script(["train.py", *TINY_RUN, "logger=csv", f"hydra.run.dir={run_dir}", *overrides])
    (best,) = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt"]
    epoch = torch.load(best, weights_only=True)["epoch"]
    (validation,) = [r for r in read_metrics(run_dir) if r.get("val/accuracy_mean") and int(r["epoch"]) == epoch]
    return best, validation


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    return train_checkpoint(tmp_path_factory.mktemp("smoke"), "trainer.max_epochs=4")


def evaluate_in_process(overrides: list[str], output_dir):
    cfg = compose_config(overrides, output_dir, config_name="eval")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return evaluate(cfg)


def test_eval_py_reproduces_the_validation_and_writes_json_and_roc(smoke_run, tmp_path):
    checkpoint, validation = smoke_run
    out = run_script(["eval.py", f"ckpt_path={checkpoint}", *SMOKE_SET, f"hydra.run.dir={tmp_path}"])
    header = "| set | pairs | accuracy (%) | fold std (%) | TAR@FAR=1e-03 (%) | AUC | EER (%) | folds | embedding norm (mean ± std) |"
    assert f"### pairs\n\n{header}" in out.stdout
    assert "| synthetic_heldout | 80 |" in out.stdout
    assert "synthetic_heldout: 80 images" in out.stdout and "img/s" not in out.stdout + out.stderr  # no bar off a terminal
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["checkpoint"] == str(checkpoint) and results["model"]["input_size"] == 32
    heldout = results["sets"]["synthetic_heldout"]
    assert heldout["kind"] == "pairs"
    # The norms of the flip-summed, un-normalised embeddings of the set's 80 images.
    backbone, _ = load_backbone(checkpoint)
    images = SyntheticPairs(num_identities=20, images_per_identity=4, num_pairs=80, image_size=32)
    norms = extract_embeddings(backbone, images).double().norm(dim=1)
    assert heldout["embedding_norm"]["mean"] == pytest.approx(norms.mean().item(), rel=1e-6)
    assert heldout["embedding_norm"]["std"] == pytest.approx(norms.std(correction=0).item(), rel=1e-5)
    assert f"| {heldout['embedding_norm']['mean']:.3g} ± {heldout['embedding_norm']['std']:.2g} |" in out.stdout
    # The weights and pairs of the validation that chose this checkpoint: the same numbers.
    for key in ["accuracy", "accuracy_std", "auc", "eer", "threshold"]:
        assert abs(heldout[key] - float(validation[f"val/synthetic_heldout/{key}"])) < 1e-6, key
    assert heldout["num_pairs"] == 80 and heldout["fold_policy"] == "consecutive" and len(heldout["fold_accuracies"]) == 10
    assert heldout["tar_at_far"]["1e-03"] is None and "needs >= 1000 different pairs" in " ".join(heldout["notes"])
    # A 95 % interval on each metric, printed as "point [low, high]", kept in results.json.
    low, high = heldout["intervals"]["accuracy"]
    assert low <= heldout["accuracy"] <= high and results["bootstrap"] == {"resamples": 1000, "level": 0.95, "seed": 0}
    assert f"| {100 * heldout['accuracy']:.2f} [{100 * low:.2f}, {100 * high:.2f}] |" in out.stdout
    assert heldout["quality"]["quality"] == "embedding norm" and "### quality (error versus reject)" in out.stdout
    assert results["scores"] == "scores.npz" and (tmp_path / "scores.npz").is_file()
    with Image.open(tmp_path / "curves.png") as png:
        assert png.format == "PNG" and png.size[0] >= 2 * 640  # a ROC and an error-versus-reject panel


def test_eval_reads_the_default_set_at_the_checkpoints_input_size(smoke_run, tmp_path):
    checkpoint, _ = smoke_run
    results = evaluate_in_process([f"ckpt_path={checkpoint}", "batch_size=256", "bf16=true"], tmp_path)
    assert results["synthetic_heldout"].result.num_pairs == 2000  # conf/evalset/synthetic_heldout.yaml, 32 px
    assert results["synthetic_heldout"].result.tar_at_far[1e-3] is not None
    assert (tmp_path / "results.json").exists() and (tmp_path / "curves.png").exists()


def tampered(checkpoint, tmp_path, model=None, weights=None):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["facerec_config"]["model"].update(model or {})
    for key, value in (weights or {}).items():
        ckpt["state_dict"][key] = value
    path = tmp_path / "tampered.ckpt"
    torch.save(ckpt, path)
    return path


def test_bad_input_gets_a_clear_error(smoke_run, tmp_path):
    checkpoint, _ = smoke_run
    with pytest.raises(ValueError, match=r"no evaluation set config \['nope'\] .*conf/evalset/<name>\.yaml.*available: .*synthetic_heldout"):
        evaluate_in_process([f"ckpt_path={checkpoint}", "eval_sets=[synthetic_heldout,nope]"], tmp_path)
    other_size = tampered(checkpoint, tmp_path, model={"embedding_size": 256})
    with pytest.raises(ValueError, match=r"(?s)do not fit the backbone .*size mismatch for fc.weight.*torch.Size\(\[256, "):
        evaluate_in_process([f"ckpt_path={other_size}"], tmp_path)
    other_backbone = tampered(checkpoint, tmp_path, model={"width": 8})
    with pytest.raises(ValueError, match=r"(?s)do not fit the backbone .*'width': 8.*size mismatch for stem"):
        evaluate_in_process([f"ckpt_path={other_backbone}"], tmp_path)
    with pytest.raises(ValueError, match=r"'synthetic_heldout' yields images of shape \(3, 64, 64\), but .*\(tiny\) takes \(3, 32, 32\)"):
        evaluate_in_process([f"ckpt_path={checkpoint}", "+evalset.synthetic_heldout.pairs.image_size=64"], tmp_path)
    with pytest.raises(ValueError, match=r"evalset overrides for \['lfw'\], which eval_sets=\['synthetic_heldout'\] does not name"):
        evaluate_in_process([f"ckpt_path={checkpoint}", "+evalset.lfw.pairs.root=x"], tmp_path)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    nan_weights = tampered(checkpoint, tmp_path, weights={"backbone.fc.bias": state["backbone.fc.bias"] * np.nan})
    with pytest.raises(ValueError, match=r"set 'synthetic_heldout': the model produced non-finite \(NaN/inf\) embeddings for 80 of 80 images"):
        evaluate_in_process([f"ckpt_path={nan_weights}", *SMOKE_SET], tmp_path)


@dataclass
class RankResult(ProtocolResult):
    """A minimal identification result: a CMC."""

    kind = "identification"
    cmc: dict[int, float]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {f"rank{rank}": rate for rank, rate in self.cmc.items()}

    def to_dict(self) -> dict:
        return {"cmc": {str(rank): rate for rank, rate in self.cmc.items()}, "notes": self.notes}

    def table_row(self, intervals=None) -> dict[str, str]:
        return {f"rank-{rank} (%)": f"{100 * rate:.2f}" for rank, rate in self.cmc.items()}

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        return "cmc", np.array(list(self.cmc)), np.array(list(self.cmc.values()))


def test_one_table_per_result_kind_and_a_cmc_panel_beside_the_roc(tmp_path):
    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0
    pair_results = {
        name: verify(rng.normal(size=(40, 8)) + issame[:, None], rng.normal(size=(40, 8)) + issame[:, None], issame)
        for name in ("set_a", "set_b")
    }
    results = {"gallery_g1": RankResult({1: 0.5, 5: 0.75}), **pair_results}
    norms = {"set_a": EmbeddingNorms(2.0, 0.5), "set_b": EmbeddingNorms(3.0, 0.25), "gallery_g1": EmbeddingNorms(1.25, 0.125)}
    evaluations = {name: Evaluation(result, norms[name]) for name, result in results.items()}
    text = format_table(evaluations)
    pairs_table, identification_table = text.split("\n\n### ")
    assert pairs_table.startswith("### pairs\n\n| set | pairs | accuracy (%) |") and "| set_a | 40 |" in pairs_table
    assert pairs_table.splitlines()[-2].endswith("| 2 ± 0.5 |") and pairs_table.splitlines()[-1].endswith("| 3 ± 0.25 |")
    assert identification_table.splitlines()[2] == "| set | rank-1 (%) | rank-5 (%) | embedding norm (mean ± std) |"
    assert identification_table.splitlines()[-1] == "| gallery_g1 | 50.00 | 75.00 | 1.25 ± 0.12 |"
    saved = json.loads(write_results(evaluations, tmp_path / "results.json", checkpoint="x.ckpt").read_text())
    assert saved["checkpoint"] == "x.ckpt" and saved["sets"]["gallery_g1"] == {
        "kind": "identification", "cmc": {"1": 0.5, "5": 0.75}, "notes": [], "embedding_norm": {"mean": 1.25, "std": 0.125},
        "intervals": {},
    }
    assert saved["sets"]["set_b"]["kind"] == "pairs" and saved["sets"]["set_b"]["embedding_norm"] == {"mean": 3.0, "std": 0.25}
    with Image.open(plot_curves(results, tmp_path / "both.png")) as both, Image.open(plot_curves(pair_results, tmp_path / "roc.png")) as roc:
        assert both.size[0] == 2 * roc.size[0]  # a CMC panel beside the ROC panel


def test_extraction_shows_images_per_second_on_a_terminal_only(monkeypatch, capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    images = SyntheticPairs(num_identities=5, images_per_identity=4, num_pairs=20, image_size=32)
    backbone = build("tiny", width=4, input_size=32)
    extract_embeddings(backbone, images, progress=True, description="heldout")
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    extract_embeddings(backbone, images, batch_size=8, progress=True, description="heldout")
    assert re.search(r"heldout: 100%.*20/20 .*img/s", terminal.getvalue())
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    extract_embeddings(backbone, images, progress=False)
    assert quiet.getvalue() == ""


def test_every_evaluation_set_config_composes_to_a_protocol(tmp_path):
    names = sorted(p.stem for p in (CONF_DIR / "evalset").glob("*.yaml"))
    assert "synthetic_heldout" in names
    cfg = compose_config(["ckpt_path=unused"], tmp_path, config_name="eval")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        compose_evalsets(cfg, names, "eval_sets")
    assert all(cfg.evalset[name]._target_.startswith("facerec.evaluation.protocols.") for name in names)


# ------------------------------------------------------------------ real LFW (../shared/data/lfw)
def lfw_set(name: str, tmp_path) -> VerificationSet:
    """A pair set through its real config (conf/evalset/<name>.yaml)."""
    cfg = compose_config([f"eval_sets=[{name}]", "ckpt_path=unused"], tmp_path, config_name="eval")
    return instantiate(cfg.evalset[name]).pairs


def pixel_embeddings(verification_set: VerificationSet) -> np.ndarray:
    """A classic baseline: the zero-mean 28x28 grey image (pixel correlation as the score)."""
    images = torch.stack([verification_set[i][0] for i in range(verification_set.num_images)])
    grey = torch.nn.functional.avg_pool2d(images.mean(dim=1, keepdim=True), 4).flatten(1)
    return (grey - grey.mean(dim=1, keepdim=True)).numpy()


@pytest.mark.slow
def test_lfw_view2_protocol_on_the_real_crops(shared_data, tmp_path):
    lfw = lfw_set("lfw", tmp_path)
    assert len(lfw.pairs) == 6000 and lfw.issame.sum() == 3000
    table = pixel_embeddings(lfw)
    emb1, emb2 = table[lfw.pairs[:, 0]], table[lfw.pairs[:, 1]]
    result = verify(emb1, emb2, lfw.issame, folds=lfw.folds)
    assert result.fold_policy in ("given", "consecutive")  # the official View 2 folds
    folds = np.arange(6000) // 600
    if lfw.folds is not None:
        np.testing.assert_array_equal(lfw.folds, folds)
    splits = [(np.flatnonzero(folds != f), np.flatnonzero(folds == f)) for f in range(10)]
    assert_agrees(result, reference(emb1, emb2, lfw.issame, splits, (1e-1, 1e-2, 1e-3)))
    assert 0.55 < result.accuracy < 0.75  # pixels on aligned faces: above chance, far from a face model


@pytest.mark.slow
def test_eval_py_on_lfw(shared_data, tmp_path):
    checkpoint, _ = train_checkpoint(
        tmp_path / "train", "trainer.max_epochs=1", "dataset.train.image_size=112", "model.input_size=112"
    )
    out = run_script(["eval.py", f"ckpt_path={checkpoint}", "eval_sets=[lfw,synthetic_heldout]", f"hydra.run.dir={tmp_path}"])
    assert "| lfw | 6000 |" in out.stdout
    lfw = json.loads((tmp_path / "results.json").read_text())["sets"]["lfw"]
    assert lfw["num_same"] == 3000 and len(lfw["fold_accuracies"]) == 10
    assert lfw["fold_policy"] in ("given", "consecutive") and lfw["tar_at_far"]["1e-03"] is not None
    assert (tmp_path / "curves.png").exists()


def test_lfw_view1_devtest_gets_stratified_folds(shared_data, tmp_path):
    devtest = lfw_set("lfw_devtest", tmp_path)
    assert devtest.issame[:500].all()  # pairsDevTest.txt lists its same pairs first
    table = pixel_embeddings(devtest)
    result = verify(table[devtest.pairs[:, 0]], table[devtest.pairs[:, 1]], devtest.issame, folds=devtest.folds)
    assert result.fold_policy == "stratified(seed=0)" and "stratified" in result.notes[0]


def test_a_set_whose_file_is_missing_is_named(smoke_run, tmp_path):
    checkpoint, _ = smoke_run
    with pytest.raises(Exception, match=rf"{tmp_path}/agedb_30\.bin"):
        evaluate_in_process([f"ckpt_path={checkpoint}", "eval_sets=[agedb_30]", f"paths.verification_dir={tmp_path}"], tmp_path)
