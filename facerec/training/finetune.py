"""How a run trains the backbone it starts from (finetune=): which of its parameters learn, at which
learning rate, and in which form the backbone trains. One contract for every mode, so the
LightningModule never asks which one it holds:

- `prepare(backbone)`: the module to train (the backbone itself, with parameters frozen, or wrapped
  in adapters);
- `param_groups(backbone_parameters, other_parameters)`: the optimizer's groups, each with an
  `lr_scale` the module applies to the optimizer's learning rate;
- `plain_state(trained, state)` and `training_state(plain, kept)`: a checkpoint's `state_dict` always
  holds the plain backbone (what eval.py, export and model.weights= read); what only resuming needs
  (LoRA's base weights and adapters) is kept beside it.

The modes (conf/finetune/):
- none / full: every parameter learns, the backbone's at `backbone_lr_scale` times the LR (full: 0.1,
  a pretrained backbone moves less than a new head);
- partial: the parameters under the `freeze` name prefixes stay fixed;
- linear_probe: the whole backbone stays fixed, or all of it but its embedding layer
  (`train_embedding_layer`);
- lora: low-rank adapters (the peft library's LoRA) on the backbone's convolutions and linear layers,
  the backbone itself fixed.

A frozen parameter gets requires_grad=False: no gradient, so the optimizer never changes it (weight
decay and momentum included). A BatchNorm whose parameters are all frozen also keeps its running
statistics: it runs in eval mode whenever the backbone trains (a forward pre-hook, since Lightning
sets the whole model to train mode at each epoch and after each validation). Under LoRA every
BatchNorm is frozen: only the adapters change the model.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from functools import partial
from itertools import chain

import torch
from torch import nn

log = logging.getLogger(__name__)


class FineTuning:
    """finetune=none (backbone_lr_scale 1) and finetune=full: every parameter learns, the backbone's
    at backbone_lr_scale times the optimizer's learning rate."""

    def __init__(self, backbone_lr_scale: float = 1.0):
        if not backbone_lr_scale > 0:
            raise ValueError(
                f"finetune.backbone_lr_scale={backbone_lr_scale}: expected a positive factor; "
                "a backbone that should not learn is finetune=linear_probe"
            )
        self.backbone_lr_scale = float(backbone_lr_scale)

    def prepare(self, backbone: nn.Module) -> nn.Module:
        """The module to train in place of `backbone` (which may be changed: frozen, wrapped)."""
        return backbone

    def param_groups(self, backbone_parameters: Sequence[nn.Parameter], other_parameters: Sequence[nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups: every parameter, in the order given (the backbone's first),
        frozen ones too (they get no gradient, so no update). One group where the backbone learns at
        the optimizer's rate; otherwise "backbone" and "head" groups, named as the LR monitor logs them."""
        if self.backbone_lr_scale == 1.0:
            return [{"params": [*backbone_parameters, *other_parameters], "lr_scale": 1.0}]
        return [
            {"params": list(backbone_parameters), "lr_scale": self.backbone_lr_scale, "name": "backbone"},
            {"params": list(other_parameters), "lr_scale": 1.0, "name": "head"},
        ]

    def plain_state(self, trained: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the plain backbone's state_dict, what resuming needs beyond it) for `state`, a state_dict
        of `trained` (the module `prepare` returned)."""
        return state, {}

    def training_state(self, plain: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state_dict of the trained module from what `plain_state` returned."""
        return plain

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone_lr_scale={self.backbone_lr_scale})"


class PartialFineTuning(FineTuning):
    """finetune=partial: the backbone's parameters whose names start with any of `freeze` stay fixed."""

    def __init__(self, freeze: Sequence[str], backbone_lr_scale: float = 1.0):
        super().__init__(backbone_lr_scale)
        self.prefixes = (freeze,) if isinstance(freeze, str) else tuple(str(prefix) for prefix in freeze)
        if not self.prefixes:
            raise ValueError("finetune=partial with finetune.freeze=[]: name the parameter prefixes to keep fixed, or use finetune=full")

    def prepare(self, backbone: nn.Module) -> nn.Module:
        frozen = freeze(backbone, self.prefixes, "finetune.freeze")
        total = len(list(backbone.parameters()))
        if len(frozen) == total:
            raise ValueError(
                f"finetune.freeze={list(self.prefixes)} freezes every parameter of the backbone {type(backbone).__name__}: "
                "nothing of it is left to train; that is finetune=linear_probe"
            )
        log.info("finetune.freeze=%s: %d of the backbone's %d parameter tensors frozen", list(self.prefixes), len(frozen), total)
        return backbone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(freeze={list(self.prefixes)}, backbone_lr_scale={self.backbone_lr_scale})"


class LinearProbe(FineTuning):
    """finetune=linear_probe: the backbone stays fixed and the head learns; with
    train_embedding_layer=true the backbone's embedding layer (its `embedding_layer` modules: IResNet's
    BN-FC-BN, the ViT's feature MLP) learns as well."""

    def __init__(self, train_embedding_layer: bool = False, backbone_lr_scale: float = 1.0):
        super().__init__(backbone_lr_scale)
        self.train_embedding_layer = bool(train_embedding_layer)

    def prepare(self, backbone: nn.Module) -> nn.Module:
        tops = top_level_names(backbone)
        kept = tuple(getattr(backbone, "embedding_layer", ())) if self.train_embedding_layer else ()
        if self.train_embedding_layer and not set(kept) & set(tops):
            raise ValueError(
                f"finetune.train_embedding_layer=true: the backbone {type(backbone).__name__} names no embedding layer "
                f"(its `embedding_layer`, of its parameters' top-level names {tops})"
            )
        frozen = freeze(backbone, [top for top in tops if top not in kept], "finetune=linear_probe")
        log.info("finetune=linear_probe: %d of the backbone's %d parameter tensors frozen", len(frozen), len(list(backbone.parameters())))
        return backbone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(train_embedding_layer={self.train_embedding_layer}, backbone_lr_scale={self.backbone_lr_scale})"


class LoRA(FineTuning):
    """finetune=lora: peft's low-rank adapters (W + (alpha / rank) B A, B starting at zero, so the first
    forward is the starting model's) on the backbone's convolutions (not the grouped, depthwise ones) and linear layers, or on
    `target_modules` (peft's matching: a module name or its last dotted parts, or one regular
    expression over the whole name); the backbone itself fixed, BatchNorm statistics included.

    Checkpoints: `state_dict` holds the backbone with the adapters merged into its weights (peft's
    merge_and_unload on a copy), so eval.py, export and model.weights= read a plain backbone; the
    adapted form (base weights and adapters) is kept beside it for resuming, exactly."""

    def __init__(
        self,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] | str | None = None,
        backbone_lr_scale: float = 1.0,
    ):
        super().__init__(backbone_lr_scale)
        if int(rank) < 1:
            raise ValueError(f"finetune.rank={rank}: expected a positive rank")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.target_modules = target_modules if target_modules is None or isinstance(target_modules, str) else list(target_modules)

    def prepare(self, backbone: nn.Module) -> nn.Module:
        from peft import LoraConfig, LoraModel  # an optional dependency (pip install 'facerec[finetune]')

        # grouped (depthwise) convolutions aside: a rank-r update of one is not low-rank per group (peft
        # refuses a rank its groups do not divide)
        adaptable = [
            name
            for name, module in backbone.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        ]
        # the default as one regular expression of the exact names: a list would also match any module
        # whose name ends in one of them (MobileFaceNet's `layers.0` is a block and a convolution)
        targets = "|".join(map(re.escape, adaptable)) if self.target_modules is None else self.target_modules
        freeze(backbone, top_level_names(backbone), "finetune=lora")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, bias="none")
        try:
            adapted = LoraModel(backbone, config, "default")
        except ValueError as error:  # peft: no module matched, or a module kind LoRA does not adapt
            shown = ", ".join(adaptable[:12]) + (f", ... ({len(adaptable)} in all)" if len(adaptable) > 12 else "")
            raise ValueError(
                f"finetune.target_modules={self.target_modules!r} does not fit the backbone {type(backbone).__name__} ({error}); "
                f"its convolutions and linear layers are named {shown}; peft matches a name, its last dotted parts, "
                "or one regular expression over the whole name"
            ) from None
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        log.info(
            "finetune=lora: rank %d adapters on %d modules, %d trainable parameters beside the backbone's %d fixed ones",
            self.rank, sum(1 for name, _ in adapted.named_modules() if name.endswith("lora_A")), trainable,
            sum(p.numel() for p in backbone.parameters() if not p.requires_grad),
        )
        return adapted

    def plain_state(self, trained: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        merged = copy.deepcopy(trained)
        merged.load_state_dict(state)
        plain = {key: value.detach() for key, value in merged.merge_and_unload().state_dict().items()}
        return plain, state

    def training_state(self, plain: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not kept:
            raise ValueError(
                "finetune=lora resumes from the base weights and adapters a LoRA run's checkpoint keeps "
                "(finetune_training_state), and this checkpoint has none: it was not written by a finetune=lora run"
            )
        return kept

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, "
            f"target_modules={self.target_modules}, backbone_lr_scale={self.backbone_lr_scale})"
        )


def freeze(backbone: nn.Module, prefixes: str | Sequence[str], key: str) -> list[str]:
    """Keep the backbone's parameters whose names start with any of `prefixes` fixed; returns their
    names. A BatchNorm whose parameters and statistics all fall under them runs in eval mode whenever
    the backbone trains. `key` names the setting in errors."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(str(prefix) for prefix in prefixes)
    names = [name for name, _ in backbone.named_parameters()]
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in names)]
    if unmatched:
        raise ValueError(
            f"{key}={list(prefixes)}: no parameter name of the backbone {type(backbone).__name__} starts with "
            f"{', '.join(map(repr, unmatched))}; its parameters are named {', '.join(top_level_names(backbone))}.<...> (backbone.named_parameters())"
        )
    frozen = [name for name in names if name.startswith(prefixes)]
    for name in frozen:
        backbone.get_parameter(name).requires_grad_(False)
    batchnorms = [
        name
        for name, module in backbone.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and all(
            f"{name}.{key}".startswith(prefixes)
            for key, _ in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        )
    ]
    if batchnorms:
        backbone.register_forward_pre_hook(partial(keep_in_eval_mode, batchnorms))
    return frozen


def top_level_names(backbone: nn.Module) -> list[str]:
    """The first parts of the backbone's parameter names, in its order (IResNet: conv1, bn1, layer1, ...)."""
    return list(dict.fromkeys(name.split(".")[0] for name, _ in backbone.named_parameters()))


def keep_in_eval_mode(names: list[str], backbone: nn.Module, args) -> None:
    """Forward pre-hook: the backbone's submodules `names` run in eval mode even in training."""
    if backbone.training:
        for name in names:
            backbone.get_submodule(name).eval()
