"""Hydra glue: the resolvers of run names and run dirs, and instantiation of config groups holding several objects."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from facerec.checkpoint_files import RESUME_LAST, find_last_checkpoint
from facerec.cluster import slurm_job_id, slurm_rank


def _run_group() -> str:
    """One group per launch: runs of one multirun share it (the sweep dir's name)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return "sweep_" + str(hydra_cfg.sweep.dir).rstrip("/").split("/")[-1]
    return "run_" + str(hydra_cfg.run.dir).rstrip("/").split("/")[-1]


def swept_keys(task_overrides: list[str], sweeper_params: dict | None = None) -> set[str]:
    """Keys a multirun varies: command-line sweeps (`scale=fixed,auto`) and sweeper params (Optuna)."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    keys = {override.get_key_element() for override in parsed if override.is_sweep_override()}
    return keys | set(sweeper_params or {})


def _run_name() -> str:
    """A readable run name from the overrides, e.g. "scale=auto,seed=1".

    In a multirun only the swept keys name the run (the overrides shared by all
    runs of the sweep would only repeat), read from the sweep's multirun.yaml.
    """
    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("ckpt_path=")]
    multirun_file = Path(str(hydra_cfg.sweep.dir)) / "multirun.yaml"
    if hydra_cfg.mode == RunMode.MULTIRUN and multirun_file.exists():
        master = OmegaConf.load(multirun_file).hydra
        keys = swept_keys(master.overrides.task, master.sweeper.get("params"))
        parsed = OverridesParser.create().parse_overrides(overrides)
        overrides = [o.input_line for o in parsed if o.get_key_element() in keys] or overrides
    return ",".join(overrides) or "default"


def _run_dir(ckpt_path: str | None, runs_dir: str, stamp: str) -> str:
    """A resumed run continues in its own directory: `ckpt_path=last` (or last_or_fail) picks the newest run under
    `runs_dir` holding checkpoints/last.ckpt, and an explicit checkpoint of a train.py run dir
    picks that dir. Otherwise a new directory `runs_dir/stamp`; in a SLURM job `runs_dir/slurm-<job
    id>` instead, the same for all its tasks and after every requeue of the job."""
    job_id = slurm_job_id()
    fresh = str(Path(runs_dir) / (f"slurm-{job_id}" if job_id else stamp))
    if ckpt_path in (None, "", "None"):
        return fresh
    if ckpt_path in RESUME_LAST:
        found = find_last_checkpoint(fresh, runs_dir)
    else:
        found = Path(ckpt_path)
    run_dir = Path(found).resolve().parent.parent if found else None
    return str(run_dir) if run_dir and found.parent.name == "checkpoints" and (run_dir / ".hydra").is_dir() else fresh


def _config_subdir() -> str | None:
    """Where Hydra saves the composed config: `.hydra`, or `.hydra/resumed_<time>` when a resumed
    run reuses its directory, so the original config is never overwritten. Only rank 0 of a SLURM
    job saves it (Lightning's own launcher passes `hydra.output_subdir=null` to the other ranks)."""
    if slurm_rank() > 0:
        return None
    if (Path(HydraConfig.get().runtime.output_dir) / ".hydra" / "config.yaml").exists():
        return f".hydra/resumed_{datetime.now():%Y-%m-%d_%H-%M-%S}"
    return ".hydra"


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("run_group", _run_group, replace=True)
    OmegaConf.register_new_resolver("run_name", _run_name, replace=True)
    OmegaConf.register_new_resolver("run_dir", _run_dir, replace=True)
    # cached: Hydra reads output_subdir once per file it saves, and the first save creates .hydra
    OmegaConf.register_new_resolver("config_subdir", _config_subdir, replace=True, use_cache=True)


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate each `_target_` entry of a group such as `callbacks` or `logger` (None entries skipped)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None and "_target_" in entry]
