"""Build the data, model, head, validation protocols and trainer from a Hydra config, and train."""
from __future__ import annotations

import inspect
import logging
import os
import types
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from facerec.backbones.registry import TRAINING_INIT_KEYS
from facerec.backbones.weights import build_backbone, initialise_backbone
from facerec.checkpoint_files import LAST, RESUME_LAST, checkpoint_config, file_sha256, find_last_checkpoint, load_checkpoint
from facerec.cluster import slurm_job_id
from facerec.config import instantiate_all
from facerec.evaluation import VAL_SCORES_FILE, EvaluationProtocol, ScoringOptions, bootstrap_from
from facerec.evaluation.evalsets import build_protocols, compose_evalsets, unnamed_overrides
from facerec.heads import MarginHead
from facerec.training.checks import check_data_and_model, check_launch, check_precision
from facerec.training.distillation import build_distillation
from facerec.training.finetune import FineTuning
from facerec.training.module import FaceRecognitionModule

log = logging.getLogger(__name__)


def configure_torch(cfg: DictConfig) -> None:
    # Denormals made small CPU runs ~10x slower here; flushing them costs no accuracy that matters.
    torch.set_flush_denormal(bool(cfg.torch.flush_denormal))
    if cfg.torch.num_threads:
        torch.set_num_threads(int(cfg.torch.num_threads))
    torch.set_float32_matmul_precision(cfg.torch.matmul_precision)


def count_classes(dataset_config: DictConfig) -> int:
    """The class count of a dataset config's training data, read by the training set's class: a class
    whose class count is in its data offers a classmethod `count_classes`, called with the training
    config's entries it names (ImageFolderDataset: the identity folders holding images; RecordDataset:
    the `property` file)."""
    train_config = dataset_config.train
    counter = getattr(get_class(train_config._target_), "count_classes", None)
    if counter is None:
        raise ValueError(
            f"dataset.num_classes is not set, and the training set {train_config._target_} cannot read its class "
            "count from its data: state dataset.num_classes=<number of classes>"
        )
    arguments = {name: train_config[name] for name in inspect.signature(counter).parameters if name in train_config}
    return int(counter(**arguments))


def fill_num_classes(cfg: DictConfig) -> None:
    """Fill in dataset.num_classes from the training data when it is left out (null or absent), once,
    before anything is built; a stated count is left as it is (the training set checks it against
    its data). The count read is recorded in the config Hydra saved in the run dir."""
    if OmegaConf.select(cfg, "dataset.num_classes") is not None:
        return
    num_classes = count_classes(cfg.dataset)
    with open_dict(cfg):
        cfg.dataset.num_classes = num_classes
    log.info("dataset.num_classes = %d, read from the training data (%s)", num_classes, cfg.dataset.train.get("root", cfg.dataset.train._target_))
    record_in_saved_config("dataset.num_classes", num_classes)


def record_in_saved_config(key: str, value) -> None:
    """Set `key` in the config.yaml Hydra saved in this run's dir (where this rank saved one), atomically."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return
    saved = Path(HydraConfig.get().runtime.output_dir) / HydraConfig.get().output_subdir / "config.yaml"
    if saved.is_file():  # only the rank that saved it (the others run with hydra.output_subdir=null)
        saved_config = OmegaConf.load(saved)
        OmegaConf.update(saved_config, key, value)
        temporary = saved.with_name(f".{saved.name}.tmp")
        OmegaConf.save(saved_config, temporary)
        os.replace(temporary, saved)  # never a half-written config


SIZE_KEYS = ("embedding_size", "num_classes")  # in head configs saved before the sizes moved out


def build_head(cfg: DictConfig) -> MarginHead:
    """The head a run config describes: the margin (head=), the scale policy (scale=) and, with
    sharding=partial_fc, Partial FC's class centres, for model.embedding_size and dataset.num_classes."""
    num_classes = OmegaConf.select(cfg, "dataset.num_classes")
    if num_classes is None:
        raise ValueError("dataset.num_classes is not set: state it, or read it from the data first (fill_num_classes)")
    stated = [key for key in SIZE_KEYS if key in cfg.head]
    if stated:  # a head config written for the layout before the head took its sizes at build time
        raise ValueError(
            f"head.{stated[0]}: a head config holds the margin's parameters only; the head's sizes are "
            "model.embedding_size and dataset.num_classes, stated once there"
        )
    centres = {"centres": instantiate(cfg.sharding)} if cfg.get("sharding") else {}
    margin = instantiate(margin_config(OmegaConf.to_container(cfg.head, resolve=True)))
    return MarginHead(cfg.model.embedding_size, num_classes, margin, instantiate(cfg.scale), **centres)


def margin_config(head: dict) -> dict:
    """The margin's config in a head config: all but `init` (how a new run starts the class centres,
    which the LightningModule does, not the margin) and the sizes of head configs saved before they
    moved out (SIZE_KEYS; build_head refuses them in a new config)."""
    return {key: value for key, value in head.items() if key not in ("init", *SIZE_KEYS)}


def build_module(
    cfg: DictConfig, load_weights: bool = True, val_protocols: dict[str, EvaluationProtocol] | None = None
) -> FaceRecognitionModule:
    """The module a run config describes, validating on `val_protocols`. The backbone starts from
    model.weights when set (and `load_weights`: a resumed run takes its weights from the checkpoint,
    and the record of the starting weights too), then the fine-tuning mode (finetune=) prepares it."""
    if cfg.model.get("freeze"):
        raise ValueError(
            f"model.freeze={list(cfg.model.freeze)}: parameters are kept fixed by the fine-tuning mode now: "
            f"finetune=partial finetune.freeze=[{','.join(map(str, cfg.model.freeze))}]"
        )
    backbone = build_backbone(cfg.model)
    starting_weights = None
    if cfg.model.get("weights") and load_weights:
        initialise_backbone(backbone, cfg.model, cfg.model.weights)
        starting_weights = {"file": str(cfg.model.weights), "sha256": file_sha256(cfg.model.weights)}
        log.info("backbone initialised from model.weights=%s (sha256 %s)", cfg.model.weights, starting_weights["sha256"])
    # _partial_: the mode's own ValueError reaches the user, not wrapped in an InstantiationException
    finetuning = instantiate(cfg.finetune, _partial_=True)() if cfg.get("finetune") else FineTuning()
    return FaceRecognitionModule(
        finetuning.prepare(backbone),
        build_head(cfg),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        flip=cfg.flip,
        config=OmegaConf.to_container(cfg, resolve=True),
        max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
        val_protocols=val_protocols,
        val_options=ScoringOptions(bootstrap_from(cfg.get("val_bootstrap")), erc=False),  # eval.py draws the quality curves
        val_scores_path=Path(cfg.paths.output_dir) / VAL_SCORES_FILE if cfg.get("save_val_scores") else None,
        centre_init=cfg.head.get("init", "random"),
        finetuning=finetuning,
        starting_weights=starting_weights,
        distillation=build_distillation(
            OmegaConf.to_container(cfg.distill, resolve=True) if cfg.get("distill") else None,
            cfg.model.embedding_size,
            OmegaConf.select(cfg, "dataset.train.image_size"),
            f"dataset.train.image_size of {OmegaConf.select(cfg, 'dataset.train._target_')}",
        ),
    )


def compose_val_sets(cfg: DictConfig) -> list[str]:
    """Compose the configs of the evaluation sets val_sets names (conf/evalset/, as eval.py's
    eval_sets) into cfg.evalset, and return the names. Per-set overrides of sets it does not name (an
    experiment's, for its dataset's default sets) are left out."""
    names = list(cfg.get("val_sets") or [])
    unused = unnamed_overrides(cfg, names)
    if unused:
        log.info("evalset overrides for %s are not used: val_sets=%s does not name them", unused, names)
        with open_dict(cfg):
            for name in unused:
                del cfg.evalset[name]
    compose_evalsets(cfg, names, "val_sets")
    return names


def compile_model(module: FaceRecognitionModule, options: DictConfig) -> None:
    """torch.compile the backbone and/or the head as `options` (the `compile` config) ask.

    nn.Module.compile compiles the module's call in place, so parameter names, checkpoints and
    exports stay as they are (torch.compile(module) would prefix every key with `_orig_mod.`).
    Training never calls the head (it calls `head.loss`), so the head's `loss` is compiled too, as
    a method bound to this head and kept in its instance dict: parameters and checkpoint keys stay
    as they are, a deep copy binds the compiled function to the copy, and a pickled head comes back
    with the plain method (as nn.Module.compile's call does). What dynamo makes of it (graph breaks
    inside MarginCrossEntropy, a backward that stays eager): docs/research/benchmarks.md.
    """
    kwargs = {key: options[key] for key in ("mode", "backend") if options.get(key) is not None}
    if options.get("backbone"):
        module.backbone.compile(**kwargs)
    if options.get("head"):
        head = module.head
        head.compile(**kwargs)  # head(embeddings[, labels]): inspection logits
        head.loss = types.MethodType(torch.compile(type(head).loss, **kwargs), head)


def resolve_ckpt_path(cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: None, `last` or `last_or_fail` (see find_last_checkpoint) or an
    existing file. A requeued SLURM job (its run dir already holds a last.ckpt) resumes from it
    without asking. `last` with no earlier run starts a new one (a warning says so); `last_or_fail`
    refuses to, for jobs that must continue or stop."""
    requested = cfg.get("ckpt_path")
    if requested in (None, ""):
        own = Path(cfg.paths.output_dir) / "checkpoints" / LAST
        if slurm_job_id() and own.is_file():
            log.info("SLURM job %s was requeued: resuming from %s", slurm_job_id(), own)
            return own
        return None
    if requested in RESUME_LAST:
        found = find_last_checkpoint(cfg.paths.output_dir, cfg.paths.runs_dir)
        if found is None:
            where = f"no {LAST} in {cfg.paths.output_dir} or in a run under {cfg.paths.runs_dir}"
            if requested == "last_or_fail":
                raise FileNotFoundError(f"ckpt_path=last_or_fail: {where}; nothing to resume, and this setting never starts a new run")
            log.warning("ckpt_path=last: %s; starting a new run (ckpt_path=last_or_fail refuses instead)", where)
        return found
    path = Path(requested)
    if path.is_dir():
        inside = [found for pattern in ("*.ckpt", "checkpoints/*.ckpt", "*/checkpoints/*.ckpt") for found in sorted(path.glob(pattern))]
        listing = ", ".join(str(p.relative_to(path)) for p in inside[:20]) + (" ..." if len(inside) > 20 else "")
        raise IsADirectoryError(
            f"ckpt_path={requested} is a directory, not a checkpoint file; "
            + (f"name one of the checkpoints in it: {listing}" if inside else "it holds no .ckpt file, nor do checkpoints/ folders in it or in its runs")
            + " (or ckpt_path=last for the newest run's last.ckpt)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={requested}: no such checkpoint file")
    return path


# Settings a resumed run may change where resume.allow_changes names them: the scale policy (its
# state starts afresh) and the margin's parameters (the margin's running state is kept).
CHANGEABLE_ON_RESUME = ("scale", "head")
NO_FINETUNING = {"_target_": "facerec.training.finetune.FineTuning", "backbone_lr_scale": 1.0}  # conf/finetune/none.yaml


def check_resume_compatible(cfg: DictConfig, checkpoint: dict, path: Path) -> None:
    """A checkpoint resumes only into the same backbone, class set, head kind and fine-tuning mode
    (model.weights aside: a resumed run takes its weights from the checkpoint; head.init too: it takes its
    class centres from there), and into the same scale policy and margin parameters unless
    resume.allow_changes names them (the change is logged)."""
    saved = checkpoint_config(checkpoint, path)
    current = OmegaConf.to_container(cfg, resolve=True)
    allowed = list(OmegaConf.select(cfg, "resume.allow_changes", default=None) or [])
    unknown = [name for name in allowed if name not in CHANGEABLE_ON_RESUME]
    if unknown:
        raise ValueError(f"resume.allow_changes: unknown setting(s) {unknown}; expected any of {list(CHANGEABLE_ON_RESUME)}")

    def architecture(model: dict) -> dict:
        return {key: value for key, value in model.items() if key not in TRAINING_INIT_KEYS}

    def described(value) -> str:  # a config with a _target_ as Class(key=value, ...): short enough to read
        if isinstance(value, dict) and "_target_" in value:
            arguments = ", ".join(f"{k}={v!r}" for k, v in value.items() if k != "_target_")
            return f"{str(value['_target_']).rsplit('.', 1)[-1]}({arguments})"
        return repr(value)

    def changes(pairs) -> list[str]:
        return [f"{key}: checkpoint {described(old)}, config {described(new)}" for key, old, new in pairs if old != new]

    fixed = changes([
        ("model", architecture(saved["model"]), architecture(current["model"])),
        ("dataset.num_classes", saved.get("dataset", {}).get("num_classes"), current["dataset"]["num_classes"]),
        ("head._target_", saved.get("head", {}).get("_target_"), current["head"]["_target_"]),
        # the optimizer state and a LoRA checkpoint's adapted form belong to the mode (no finetune key: finetune=none)
        ("finetune", saved.get("finetune", NO_FINETUNING), current.get("finetune", NO_FINETUNING)),
    ])
    changeable = {
        "scale": changes([("scale", saved.get("scale"), current["scale"])]),
        "head": [] if fixed else changes([("head", margin_config(saved.get("head", {})), margin_config(current["head"]))]),
    }
    refused = fixed + [change for name, found in changeable.items() if name not in allowed for change in found]
    if refused:
        deliberate = [name for name, found in changeable.items() if found and name not in allowed]
        raise ValueError(
            f"cannot resume from {path}: it was trained with other settings ("
            + "; ".join(refused)
            + "). Resume with the checkpoint's settings, or start a new run (ckpt_path=null)"
            + (f", or make the change deliberate: resume.allow_changes=[{','.join(deliberate)}]" if deliberate and not fixed else "")
            + "."
        )
    check_same_distillation(cfg, checkpoint, saved, path)
    for name in allowed:
        for change in changeable[name]:
            log.warning("resuming from %s with a changed setting (resume.allow_changes names %s): %s", path, name, change)


def check_same_distillation(cfg: DictConfig, checkpoint: dict, saved_config: dict, path: Path) -> None:
    """A distilled run resumes only with the same distillation settings, from the teacher file it learnt
    from (by SHA-256: the file may have moved); a run without distillation only without it."""
    saved = checkpoint.get("distill_teacher")
    teacher = OmegaConf.select(cfg, "distill.teacher")
    if saved is None and teacher is None:
        return
    if saved is None or teacher is None:
        raise ValueError(
            f"cannot resume from {path}: it was trained "
            + (f"with distillation from {saved['file']} (sha256 {saved['sha256']}); resume with distill.teacher=<that file>" if saved else
               "without distillation; resume without distill= (distill=null), or start a new run to distil")
        )

    def settings(distill: dict | None) -> dict:
        return {key: value for key, value in (distill or {}).items() if key not in ("teacher", "teacher_model")}

    before, now = settings(saved_config.get("distill")), settings(OmegaConf.to_container(cfg.distill, resolve=True))
    if before != now:
        changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
        raise ValueError(
            f"cannot resume from {path}: its distillation settings differ ("
            + "; ".join(f"distill.{key}: checkpoint {before.get(key)!r}, config {now.get(key)!r}" for key in changed)
            + "). Resume with the checkpoint's settings, or start a new run"
        )
    current = file_sha256(teacher) if Path(teacher).is_file() else None
    if current != saved["sha256"]:
        raise ValueError(
            f"cannot resume from {path}: it learnt from the teacher {saved['file']} (sha256 {saved['sha256']}), "
            f"and distill.teacher={teacher} is " + ("not a file" if current is None else f"another file (sha256 {current})")
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train as configured; returns the final logged metrics (floats)."""
    configure_torch(cfg)
    L.seed_everything(cfg.seed, workers=True)
    fill_num_classes(cfg)
    ckpt_path = resolve_ckpt_path(cfg)
    if ckpt_path is not None:
        checkpoint = load_checkpoint(ckpt_path, mmap=True)  # metadata only; Lightning reads the tensors
        check_resume_compatible(cfg, checkpoint, ckpt_path)
        if cfg.model.get("weights"):
            log.info("model.weights=%s is not loaded: the resumed run takes its weights from %s", cfg.model.weights, ckpt_path)
        run_id = checkpoint.get("wandb_run_id")
        if run_id and cfg.get("logger") and cfg.logger.get("wandb"):
            with open_dict(cfg):
                cfg.logger.wandb.id = run_id  # continue the same W&B run
        log.info("resuming from %s (step %d)", ckpt_path, checkpoint.get("global_step", -1))
        del checkpoint
    protocols = build_protocols(cfg, compose_val_sets(cfg))
    # the dataset config names its default sets; the datamodule takes the image sets of those validated on
    datamodule = instantiate(cfg.dataset, _partial_=True)(val_sets={name: p.image_set() for name, p in protocols.items()})
    module = build_module(cfg, load_weights=ckpt_path is None, val_protocols=protocols)
    check_data_and_model(datamodule, module)
    compile_model(module, cfg.compile)  # after the checks: their eager CPU forward would compile a graph never used again
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=loggers)
    check_launch(trainer)
    check_precision(trainer, module)
    for logger in loggers:
        logger.log_hyperparams(module.config)
        if ckpt_path is None:  # a fact of the run, logged once at its start: the tools read it (the s-sweep view)
            logger.log_metrics({"data/train_images": float(len(datamodule.train_set))}, step=0)
    log.info("head: %s | s = %.4f", module.head, module.head.scale.value)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if datamodule.val_sets and module.last_validation_step != trainer.global_step:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    finally:
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero:
                import wandb

                wandb.finish()  # the next run of a multirun gets its own W&B run
    if trainer.is_global_zero:
        report(metrics, trainer)
    return metrics


REPORTED = ("tar@far=1e-04", "auc", "rank1", "tpir@fpir=1e-01")  # the line of a set without an accuracy


def report(metrics: dict[str, float], trainer: L.Trainer) -> None:
    lines = [f"finished after {trainer.global_step} steps; output: {trainer.default_root_dir}"]
    sets = dict.fromkeys(key.split("/")[1] for key in sorted(metrics) if key.count("/") >= 2 and key.startswith("val/"))
    for name in sets:
        accuracy = metrics.get(f"val/{name}/accuracy")
        if accuracy is not None:
            std = metrics.get(f"val/{name}/accuracy_std", float("nan"))
            lines.append(f"held-out verification {name}: accuracy {100 * accuracy:.2f}% ± {100 * std:.2f}%")
            continue
        shown = [
            f"{key} {metrics[f'val/{name}/{key}']:.4f}" if key == "auc" else f"{key} {100 * metrics[f'val/{name}/{key}']:.2f}%"
            for key in REPORTED
            if f"val/{name}/{key}" in metrics
        ]
        lines.append(f"held-out {name}: {', '.join(shown)}")
    checkpoint = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if checkpoint:
        lines.append(f"best checkpoint: {checkpoint}")
    print("\n".join(lines), flush=True)
