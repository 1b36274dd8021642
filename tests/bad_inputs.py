"""The catalogue of bad inputs: each case builds one broken file or config in a temporary folder and
feeds it to the real code. `test_bad_inputs.py` checks what each one does; scripts/reliability_table.py
writes the table in docs/guide/reliability.md from the same cases (a test keeps the two in step).

A case returns None when the input must raise (the outcome is the exception), or a string saying
what was skipped and counted when the input is tolerated by design.
"""
from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_helpers import corrupt_frame, corrupt_record, write_headerless_rec, write_image, write_jpeg_folder, write_rec_folder



@dataclass(frozen=True)
class BadInput:
    category: str
    description: str
    run: Callable[[Path], str | None]
    error: type[BaseException] | None  # None: tolerated (skipped and counted, never silent)
    match: str  # a regex the message (or the skip report) must contain


CASES: list[BadInput] = []


def case(category: str, description: str, error: type[BaseException] | None, match: str):
    def register(run: Callable[[Path], str | None]) -> Callable[[Path], str | None]:
        CASES.append(BadInput(category, description, run, error, match))
        return run

    return register


class WritesAFile:
    """Unpickling this would create `target` (a stand-in for any code a crafted pickle runs)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def _refused_without_running(load: Callable[[Path], object], path: Path, marker: Path) -> None:
    try:
        load(path)
    finally:
        assert not marker.exists(), f"loading {path} ran code"


def _hydra(tmp: Path, *overrides: str) -> None:
    from conftest import run_script

    result = run_script(["train.py", *overrides, f"hydra.run.dir={tmp}"], timeout=300, check=False)
    noise = ("HYDRA_FULL_ERROR", "Config search path", "provider=")
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip() and not any(n in line for n in noise)]
    raise RuntimeError(" ".join(lines))


def _compose(tmp: Path, *overrides: str):
    from conftest import compose_config

    return compose_config(["experiment=smoke", *overrides], tmp)


# ------------------------------------------------------------------ training data
@case("training data", "corrupt JPEG record in train.rec, strict=true", ValueError, r"train\.rec record 6: corrupt JPEG")
def corrupt_record_strict(tmp: Path):
    from facerec.data import RecordDataset

    RecordDataset(corrupt_record(write_rec_folder(tmp)), num_classes=3, strict=True)[5]


@case("training data", "corrupt JPEG record in train.rec (default strict=false)", None, r"replaced 1 .*record 6: corrupt JPEG")
def corrupt_record_replaced(tmp: Path) -> str:
    return _read_every_sample(corrupt_record(write_rec_folder(tmp)), "by another sample chosen from its index: batches keep their size")


def _read_every_sample(rec: Path, how: str) -> str:
    """Read every sample of a 3-class training set `rec`; the replacement report."""
    from facerec.data import NoAugment, RecordDataset

    dataset = RecordDataset(rec, num_classes=3, augment=NoAugment())
    messages = _captured_warnings(lambda: [dataset[i] for i in range(len(dataset))])
    return f"replaced {dataset.replaced} ({how}; counted, logged: {messages[0]})"


@case("training data", "train.rec truncated", ValueError, r"truncated")
def truncated_rec(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_rec_folder(tmp)
    data = (rec / "train.rec").read_bytes()
    (rec / "train.rec").write_bytes(data[: len(data) - 100])
    RecordDataset(rec, num_classes=3)


@case("training data", "train.idx from another file (offsets shifted)", ValueError, r"does not match")
def index_mismatch(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_rec_folder(tmp)
    rows = [line.split("\t") for line in (rec / "train.idx").read_text().splitlines()]
    (rec / "train.idx").write_text("".join(f"{k}\t{int(o) + 4}\n" for k, o in rows))
    RecordDataset(rec, num_classes=3)


@case("training data", "`property` file missing", FileNotFoundError, r"property")
def missing_property(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_rec_folder(tmp)
    (rec / "property").unlink()
    RecordDataset(rec, num_classes=3)


@case("training data", "`property` states another class count than dataset.num_classes", ValueError, r"states 3 classes but dataset\.num_classes=4")
def property_mismatch(tmp: Path):
    from facerec.data import RecordDataset

    RecordDataset(write_rec_folder(tmp), num_classes=4)


@case("training data", "a label >= num_classes in records without a header record (im2rec's layout)", ValueError, r"has label 2, outside \[0, 2\)")
def label_out_of_range(tmp: Path):
    from facerec.data import RecordDataset

    dataset = RecordDataset(write_headerless_rec(tmp, [k % 3 for k in range(6)], num_classes=2), num_classes=2)
    for index in range(len(dataset)):
        dataset[index]


@case("training data", "`property` states more classes than header record 0 lists (25 against 3)", ValueError, r"property states 25 classes, but header record 0 of .*train\.rec lists 3 identity records.*state dataset\.num_classes=3")
def property_disagrees_with_header(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_rec_folder(tmp)
    (rec / "property").write_text("25,112,112")
    RecordDataset.count_classes(rec)  # what train.py reads when dataset.num_classes is left out


@case("training data", "`property` states fewer classes than header record 0 lists (2 against 3)", ValueError, r"property states 2 classes, but header record 0 of .*train\.rec lists 3 identity records")
def property_below_header(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_rec_folder(tmp)
    (rec / "property").write_text("2,112,112")
    RecordDataset(rec, num_classes=2)  # stated as the property file says: still refused, the records hold 3


@case("training data", "train.idx cut short inside its last line", ValueError, r"train\.idx: its last line \('15\\t\d+'\) has no line break: the \.idx is truncated")
def idx_cut_in_a_line(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_rec_folder(tmp)
    (rec / "train.idx").write_bytes((rec / "train.idx").read_bytes()[:-3])
    RecordDataset(rec, num_classes=3)


@case("training data", "train.idx cut at a line break, records without a header (im2rec's layout)", ValueError, r"train\.rec holds records after the last one .*train\.idx lists \(byte \d+ of \d+\): the \.idx is truncated")
def idx_cut_at_a_line_break(tmp: Path):
    from facerec.data import RecordDataset

    rec = write_headerless_rec(tmp, [0, 1, 2, 0, 1, 2], num_classes=3)
    rows = (rec / "train.idx").read_text().splitlines(keepends=True)
    (rec / "train.idx").write_text("".join(rows[:-2]))
    RecordDataset(rec, num_classes=3)


@case("training data", "a corrupt RecordIO frame in the middle of train.rec (default strict=false)", None, r"replaced 1 .*train\.rec: no RecordIO magic at byte \d+ for record 6")
def corrupt_frame_replaced(tmp: Path) -> str:
    return _read_every_sample(corrupt_frame(write_rec_folder(tmp)), "like a corrupt JPEG")


@case("training data", "a corrupt RecordIO frame in the middle of train.rec, strict=true", ValueError, r"train\.rec: no RecordIO magic at byte \d+ for record 6 .*train\.idx does not match")
def corrupt_frame_strict(tmp: Path):
    from facerec.data import RecordDataset

    RecordDataset(corrupt_frame(write_rec_folder(tmp)), num_classes=3, strict=True)[5]


@case("training data", "a 1x1 image in an image folder (min_image_size: a quarter of the input size by default)", None, r"replaced 1 .*9\.png: 1x1 pixels, below the minimum side of 28 \(min_image_size\)")
def tiny_image(tmp: Path) -> str:
    from facerec.data import ImageFolderDataset, NoAugment

    root = write_jpeg_folder(tmp / "faces", identities=2, per_identity=2)
    write_image(root / "id01" / "9.png", np.zeros((1, 1, 3), np.uint8))
    dataset = ImageFolderDataset(root, augment=NoAugment())
    messages = _captured_warnings(lambda: dataset[4])
    return f"replaced {dataset.replaced} (counted, logged: {messages[0]})"


@case("training data", "a zero-byte image file, strict=true", ValueError, r"id01/1\.jpg: the file is empty \(0 bytes\)")
def empty_image(tmp: Path):
    from facerec.data import ImageFolderDataset

    root = write_jpeg_folder(tmp / "faces", identities=2, per_identity=2)
    (root / "id01" / "1.jpg").write_bytes(b"")
    ImageFolderDataset(root, strict=True)[3]


@case("training data", "a 1x1 image given to facerec-folder-to-rec", None, r"skipped .*9\.png: 1x1 pixels, below the minimum side of 28.*'small_images': 1")
def tiny_image_converted(tmp: Path) -> str:
    from facerec.data.convert import folder_to_rec

    root = write_jpeg_folder(tmp / "faces", identities=2, per_identity=2)
    write_image(root / "id01" / "9.png", np.zeros((1, 1, 3), np.uint8))
    stats = {}
    messages = _captured_warnings(lambda: stats.update(folder_to_rec(root, tmp / "rec")))
    return f"{messages[0]}; counted: {stats}"


@case("training data", "an empty identity folder and non-image files", None, r"skipped 1 files without an image suffix.*skipped 1 identity folders without images")
def empty_identity(tmp: Path) -> str:
    from facerec.data import ImageFolderDataset

    root = write_jpeg_folder(tmp / "faces", identities=2, per_identity=2)
    (root / "id_empty").mkdir()
    (root / "id00" / "notes.txt").write_text("not an image")
    messages = _captured_warnings(lambda: ImageFolderDataset(root))
    return "skipped, counted and logged: " + " | ".join(messages)


@case("training data", "dataset.num_classes differs from the identities in the data", Exception, r"dataset\.num_classes=21 but the training data has 20 identities")
def num_classes_vs_data(tmp: Path):
    from hydra.utils import instantiate

    cfg = _compose(tmp, "dataset.num_classes=21", "dataset.train.num_classes=20")
    instantiate(cfg.dataset)


# ------------------------------------------------------------ verification data
@case("verification data", ".bin whose issame count is not half the image count", ValueError, r"3 images for 2 pairs; a \.bin holds two images per pair")
def bin_pair_count(tmp: Path):
    from facerec.data import read_bin, write_bin

    write_bin(tmp / "x.bin", [b"a", b"b", b"c"], [True, False])
    read_bin(tmp / "x.bin")


@case("verification data", "malicious .bin (a pickle that would create a file)", pickle.UnpicklingError, r"refusing to load")
def malicious_bin(tmp: Path):
    from facerec.data import read_bin

    with open(tmp / "evil.bin", "wb") as f:
        pickle.dump(([WritesAFile(tmp / "pwned")], [True]), f)
    _refused_without_running(read_bin, tmp / "evil.bin", tmp / "pwned")


@case("verification data", "LFW pairs line naming a missing image (Betsy_Coffin_0001), missing=error", FileNotFoundError, r"image not found")
def lfw_missing_image(tmp: Path):
    from facerec.data import LfwPairs

    root = tmp / "lfw"
    (root / "Ann").mkdir(parents=True)
    for number in (1, 2):
        (root / "Ann" / f"Ann_000{number}.jpg").write_bytes(b"")
    (tmp / "pairs.txt").write_text("1\t1\nAnn\t1\t2\nAnn\t1\tCarl\t1\n")
    LfwPairs(root, tmp / "pairs.txt", missing="error")


@case("verification data", "NaN embeddings given to verify()", ValueError, r"non-finite")
def nan_embeddings(tmp: Path):
    from facerec.evaluation import verify

    emb = np.ones((20, 4))
    emb[3, 1] = np.nan
    verify(emb, np.ones((20, 4)), np.arange(20) % 2 == 0)


# ---------------------------------------------------------------------- config
@case("config", "an unknown group option: head=nope", RuntimeError, r"Could not find 'head/nope'")
def unknown_option(tmp: Path):
    _hydra(tmp, "head=nope")


@case("config", "a key that does not exist: scale.nope=1", RuntimeError, r"Could not override 'scale\.nope'")
def unknown_key(tmp: Path):
    _hydra(tmp, "scale.nope=1")


@case("config", "a head config that states a size (the sizes come from model and dataset): +head.embedding_size=64", ValueError, r"head\.embedding_size: a head config holds the margin's parameters only")
def embedding_size(tmp: Path):
    from facerec.training.fit import build_module

    build_module(_compose(tmp, "+head.embedding_size=64"))


@case("config", "an evaluation set at another image size than the training images", ValueError, r"'synthetic_heldout' yields images of shape \(3, 48, 48\), but the backbone \(training images \(3, 32, 32\)\) takes \(3, 32, 32\)")
def val_image_size(tmp: Path):
    from hydra.utils import instantiate

    from facerec.evaluation.evalsets import build_protocols
    from facerec.training.checks import check_data_and_model
    from facerec.training.fit import build_module

    cfg = _compose(tmp, "+evalset.synthetic_heldout.pairs.image_size=48")
    image_sets = {name: protocol.image_set() for name, protocol in build_protocols(cfg, cfg.val_sets).items()}
    check_data_and_model(instantiate(cfg.dataset, _partial_=True)(val_sets=image_sets), build_module(cfg))


@case("config", "the model's input size differs from the data's image size", ValueError, r"takes \(B, 3, 64, 64\) images, got \(2, 3, 32, 32\)")
def image_size(tmp: Path):
    from hydra.utils import instantiate

    from facerec.training.checks import check_data_and_model
    from facerec.training.fit import build_module

    cfg = _compose(tmp, "model.input_size=64")
    check_data_and_model(instantiate(cfg.dataset), build_module(cfg))


@case("config", "YAML's spelling of infinity on the command line: scale=dynamic scale.max_scale=.inf", Exception, r"scale\.max_scale must be a number > 0 \(inf: no cap")
def max_scale_string(tmp: Path):
    from facerec.training.fit import build_module

    build_module(_compose(tmp, "scale=dynamic", "scale.max_scale=.inf"))


@case("config", "a margin value for a head without margin: head=normface +head.m=0.3", Exception, r"NormFace has no margin parameters")
def margin_on_normface(tmp: Path):
    from facerec.training.fit import build_module

    build_module(_compose(tmp, "head=normface", "+head.m=0.3"))


# ----------------------------------------------------------------- checkpoints
@case("checkpoints", "malicious .ckpt (a pickle that would create a file)", ValueError, r"weights-only")
def malicious_ckpt(tmp: Path):
    from facerec.checkpoint_files import load_checkpoint

    torch.save({"state_dict": {}, "x": WritesAFile(tmp / "pwned")}, tmp / "evil.ckpt")
    _refused_without_running(load_checkpoint, tmp / "evil.ckpt", tmp / "pwned")


@case("checkpoints", "a checkpoint not written by train.py", ValueError, r"holds no facerec run config")
def foreign_ckpt(tmp: Path):
    from facerec.backbones.weights import load_backbone

    torch.save({"state_dict": {}}, tmp / "other.ckpt")
    load_backbone(tmp / "other.ckpt")


@case("checkpoints", "resuming a checkpoint into another class count", ValueError, r"dataset\.num_classes: checkpoint 20, config 19")
def resume_other_classes(tmp: Path):
    _resume_smoke_run_with(tmp, "dataset.num_classes=19")


def _resume_smoke_run_with(tmp: Path, *overrides: str) -> None:
    """The resume check of a checkpoint of experiment=smoke, resumed with `overrides`."""
    from omegaconf import OmegaConf

    from facerec.training.fit import check_resume_compatible

    saved = OmegaConf.to_container(_compose(tmp), resolve=True)
    check_resume_compatible(_compose(tmp, *overrides), {"facerec_config": saved}, tmp / "last.ckpt")


@case("checkpoints", "ckpt_path pointing at no file", FileNotFoundError, r"ckpt_path=.*no such checkpoint file")
def missing_ckpt(tmp: Path):
    from facerec.training.fit import resolve_ckpt_path

    resolve_ckpt_path(_compose(tmp, f"ckpt_path={tmp / 'nope.ckpt'}"))


@case("checkpoints", "ckpt_path naming a directory (a run dir)", IsADirectoryError, r"ckpt_path=.* is a directory, not a checkpoint file; name one of the checkpoints in it: checkpoints/last\.ckpt")
def ckpt_directory(tmp: Path):
    from facerec.training.fit import resolve_ckpt_path

    (tmp / "run" / "checkpoints").mkdir(parents=True)
    torch.save({}, tmp / "run" / "checkpoints" / "last.ckpt")
    resolve_ckpt_path(_compose(tmp, f"ckpt_path={tmp / 'run'}"))


@case("checkpoints", "ckpt_path=last_or_fail with no earlier run (ckpt_path=last starts a new run, with a warning)", FileNotFoundError, r"ckpt_path=last_or_fail: no last\.ckpt in .* nothing to resume")
def last_or_fail(tmp: Path):
    from facerec.training.fit import resolve_ckpt_path

    resolve_ckpt_path(_compose(tmp, "ckpt_path=last_or_fail", f"paths.runs_dir={tmp / 'runs'}"))


@case("checkpoints", "resuming with another scale policy (scale=auto into scale=dynamic)", ValueError, r"scale: checkpoint AutoScale\(theta0=0\.785\d+, criterion='half'\), config DynamicScale\(.*resume\.allow_changes=\[scale\]")
def resume_other_scale(tmp: Path):
    _resume_smoke_run_with(tmp, "scale=dynamic")


@case("checkpoints", "the disk fills during a checkpoint save", OSError, r"no space left on the device for checkpoint .*last\.ckpt: it needs about 800,000 bytes .*the previous last\.ckpt \([\d,]+ bytes\) is intact")
def disk_full(tmp: Path):
    from fault_injection import full_disk
    from facerec.training.checkpoints import AtomicCheckpointIO

    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"w": torch.ones(10_000)}, tmp / "last.ckpt")
    with full_disk():  # 200 kB of room (tests/test_reliability.py also fills a real tmpfs)
        writer.save_checkpoint({"w": torch.ones(200_000)}, tmp / "last.ckpt")


def _captured_warnings(action: Callable[[], object]) -> list[str]:
    """Run `action` and return the warnings it logged (the skip reports)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        action()
    finally:
        root.removeHandler(handler)
    return [record.getMessage() for record in records]


def outcome(bad: BadInput, tmp: Path) -> str:
    """What the code does with the bad input: one line, the temporary folder written <tmp>, at most
    450 characters (the rest of a long message is cut at a word)."""
    try:
        report = bad.run(tmp)
    except BaseException as error:  # noqa: BLE001 - the outcome under test
        text = f"{type(error).__name__}: {error}"
    else:
        text = report if report is not None else "no error"
    text = " ".join(text.replace(str(tmp), "<tmp>").split())
    return text if len(text) <= 450 else text[:450].rsplit(" ", 1)[0] + " …"


# ------------------------------------------------- checkpoints and weights files (eval.py)
def _saved_checkpoint(path: Path) -> Path:
    """An 80 kB checkpoint in torch.save's zip format."""
    torch.save({"state_dict": {"backbone.w": torch.randn(20_000, generator=torch.Generator().manual_seed(0))}}, path)
    return path


@case("checkpoints", "a checkpoint cut to 20 kB (an interrupted copy)", ValueError, r"truncated \(20,000 bytes\): a zip archive .*central directory")
def truncated_ckpt(tmp: Path):
    from facerec.checkpoint_files import load_checkpoint

    path = _saved_checkpoint(tmp / "last.ckpt")
    path.write_bytes(path.read_bytes()[:20_000])
    load_checkpoint(path)


@case("checkpoints", "a file that is no checkpoint at all (an HTML error page saved as .ckpt)", ValueError, r"corrupt \([\d,]+ bytes\): neither a zip archive .* nor a pickle")
def not_a_ckpt(tmp: Path):
    from facerec.checkpoint_files import load_checkpoint

    (tmp / "last.ckpt").write_text("<html><body>404 Not Found</body></html>\n")
    load_checkpoint(tmp / "last.ckpt")


@case("checkpoints", "a checkpoint with damaged bytes inside its pickle", ValueError, r"corrupt \([\d,]+ bytes\): member .*data\.pkl of its zip archive fails its CRC-32 check")
def damaged_ckpt(tmp: Path):
    from facerec.checkpoint_files import load_checkpoint

    path = _saved_checkpoint(tmp / "last.ckpt")
    data = bytearray(path.read_bytes())
    start = data.index(b"data.pkl") + len(b"data.pkl")  # the pickle follows its local file header
    data[start + 64 : start + 96] = bytes(32)
    path.write_bytes(bytes(data))
    load_checkpoint(path)


@case("checkpoints", "eval.py weights= (insightface backbone.pth) cut short", ValueError, r"weights file .*truncated \([\d,]+ bytes\)")
def truncated_weights(tmp: Path):
    from facerec.backbones import build
    from facerec.backbones.weights import load_backbone_weights

    torch.save(build("tiny", width=4, input_size=32).state_dict(), tmp / "backbone.pth")
    (tmp / "backbone.pth").write_bytes((tmp / "backbone.pth").read_bytes()[:-100])
    load_backbone_weights({"_target_": "facerec.backbones.build", "name": "tiny", "width": 4, "input_size": 32}, tmp / "backbone.pth")


@case("checkpoints", "eval.py weights= of another backbone (tiny width 4 into width 8)", ValueError, r"do not fit model=tiny .*shape mismatches: stem\.0\.weight: file \(4, 3, 3, 3\), model \(8, 3, 3, 3\)")
def weights_of_another_backbone(tmp: Path):
    from facerec.backbones import build
    from facerec.backbones.weights import load_backbone_weights

    torch.save(build("tiny", width=4, input_size=32).state_dict(), tmp / "backbone.pth")
    load_backbone_weights({"_target_": "facerec.backbones.build", "name": "tiny", "width": 8, "input_size": 32}, tmp / "backbone.pth")
