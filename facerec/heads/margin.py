"""The margin contract: how a head changes the logits of a sample before the scale multiplies them.

A margin defines `target_logit(cos_target, per_sample)`, f(cos theta_y), and where it needs them:
- `margin_inputs`: per-sample inputs of f (AdaFace's standardised norm, MagFace's norm, ElasticFace's
  drawn margins), computed from the batch's embedding norms;
- `nontarget_logits` with `changes_nontargets = True`: a change to the non-target logits (CurricularFace);
- `centres_per_class` > 1: several centres per class, a class's cosine being its closest centre's
  (Sub-center ArcFace);
- `regulariser`: a loss term on the embedding norms (MagFace).
`per_sample=None` is the nominal margin, the one scale policies evaluate when they are bound.

Hooks that take batch statistics receive the head's class centres (`centres`): `centres.batch_rows(x)`
gives the rows of the global batch under DDP whatever the sharding, `centres.sees_global_batch` says
whether this process's loss already covers it. A new margin is one file with a subclass and one
conf/head/<name>.yaml; the centres, their sharding and the loss need no change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres


class Margin(nn.Module):
    """Base class. Subclasses validate their parameters and pass them to `__init__` as keywords: they
    become attributes (and the repr), before a scale policy evaluates `target_logit`."""

    centres_per_class = 1
    changes_nontargets = False  # True: nontarget_logits changes the non-target logits

    def __init__(self, **parameters):
        super().__init__()
        self.parameter_names = tuple(parameters)
        for name, value in parameters.items():
            setattr(self, name, value)

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        """f(cos theta_y) for the target class; per_sample: the margin's inputs, None for the nominal margin."""
        raise NotImplementedError

    def margin_inputs(
        self, norms: torch.Tensor, labels: torch.Tensor, centres: ClassCentres, update: bool
    ) -> torch.Tensor | None:
        """The per-sample inputs from the embedding norms (N,) of the batch this loss sees; `update`: a
        training step (EMA buffers and random draws advance)."""
        return None

    def nontarget_logits(
        self, cos: torch.Tensor, target: torch.Tensor, centres: ClassCentres, update: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(changed (N, m) logits, their slope in cos) where `changes_nontargets`; target: the (N,)
        target cosines; `update`: a training step (EMA buffers advance)."""
        raise NotImplementedError

    def regulariser(self, norms: torch.Tensor) -> torch.Tensor | None:
        """A loss term on this rank's embedding norms (N,), added to the cross-entropy; None: none."""
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in self.parameter_names)
