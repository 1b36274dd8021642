"""Evaluation sets by name: the entries of conf/evalset/, named by `eval_sets=[...]` (eval.py) and
`val_sets=[...]` (train.py) alike.

`compose_evalsets` puts each named set's config under `evalset.<name>` of the run config, under the
run's own per-set overrides (`evalset.<name>.<key>=...`); `build_protocols` instantiates them. Set
configs may read the run config (${paths.data_dir}, ${oc.select:model.input_size,112}, ...): they
resolve once they sit in it. Composing needs an initialised Hydra (inside eval.py and train.py, or a
`hydra.initialize*` context).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import Dataset

from facerec.evaluation.protocols.base import EvaluationProtocol

log = logging.getLogger(__name__)

GROUP = "evalset"


def compose_evalsets(cfg: DictConfig, names: Sequence[str], key: str) -> None:
    """Fill cfg.evalset.<name> for every name (`key`: the config key that named them, for errors)
    from conf/evalset/<name>.yaml, with the run's overrides of that set merged on top; a set already
    composed is left as it is."""
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"{key} must name distinct configs of conf/{GROUP}/, got {names}")
    with open_dict(cfg):
        if cfg.get(GROUP) is None:
            cfg[GROUP] = {}
        overrides = cfg[GROUP]
        missing = [name for name in names if "_target_" not in overrides.get(name, {})]
        if not missing:
            return
        try:
            composed = compose(overrides=[f"+{GROUP}@{GROUP}.{name}={name}" for name in missing])[GROUP]
        except MissingConfigException:
            available = GlobalHydra.instance().config_loader().get_group_options(GROUP)
            unknown = [name for name in missing if name not in available]
            raise ValueError(
                f"{key}: no evaluation set config {unknown} (expected conf/{GROUP}/<name>.yaml); "
                f"available: {', '.join(available)}"
            ) from None
        for name in missing:
            overrides[name] = OmegaConf.merge(composed[name], overrides.get(name, {}))


def unnamed_overrides(cfg: DictConfig, names: Sequence[str]) -> list[str]:
    """The sets cfg.evalset overrides that `names` does not name."""
    return sorted(set(cfg.get(GROUP) or {}) - set(names))


def build_protocols(cfg: DictConfig, names: Sequence[str]) -> dict[str, EvaluationProtocol]:
    """{name: protocol} from the composed configs cfg.evalset.<name>, in the order of `names`."""
    protocols = {}
    for name in names:
        protocol = instantiate(cfg[GROUP][name])
        if not isinstance(protocol, EvaluationProtocol):
            raise TypeError(
                f"conf/{GROUP}/{name}.yaml must instantiate a facerec.evaluation.protocols.EvaluationProtocol, "
                f"got {type(protocol).__name__}"
            )
        protocols[name] = protocol
    return protocols


def check_image_size(image_set: Dataset, name: str, size: int, model: str) -> None:
    """The set's images must have the size the model takes (`model`: how messages name it)."""
    shape = tuple(image_set[0][0].shape)
    if shape != (3, size, size):
        raise ValueError(f"evaluation set {name!r} yields images of shape {shape}, but {model} takes (3, {size}, {size})")
