"""The margin contract: how a head changes the logits of a sample before the scale multiplies them.

A margin defines `target_logit(cos_target, per_sample)`, f(cos theta_y), and where it needs them:
- `margin_inputs`: per-sample inputs of f (AdaFace's standardised norm, MagFace's norm, ElasticFace's
  drawn margins), computed from the batch's embedding norms;
- `nontarget_logits` with `changes_nontargets = True`: a change to the non-target logits (CurricularFace),
  a function of the cosines and the margin's state, which `advance` moves once per training step;
- `centres_per_class` > 1: several centres per class, a class's cosine being its closest centre's
  (Sub-center ArcFace);
- `regulariser`: a loss term on the embedding norms (MagFace).
`per_sample=None` is the nominal margin, the one scale policies evaluate when they are bound.

A margin also names the loss it trains with (`loss`, `logits`): the softmax cross-entropy here, a
binary one-vs-all loss for the sigmoid heads (binary.py), whose margins say so with
`has_partition_function = False`. The head calls these two methods and never asks which it holds.

Hooks that take batch statistics receive the head's class centres (`centres`): `centres.batch_rows(x)`
gives the rows of the global batch under DDP whatever the sharding, `centres.sees_global_batch` says
whether this process's loss already covers it. A new margin is one file with a subclass and one
conf/head/<name>.yaml; the centres, their sharding and the loss need no change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from facerec.heads.loss import MarginCrossEntropy, Workspace, margin_logits

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres
    from facerec.heads.scale import ScalePolicy


class Margin(nn.Module):
    """Base class. Subclasses validate their parameters and pass them to `__init__` as keywords: they
    become attributes (and the repr), before a scale policy evaluates `target_logit`."""

    centres_per_class = 1
    changes_nontargets = False  # True: nontarget_logits changes the non-target logits
    has_partition_function = True  # softmax: P(target) is normalised over the C classes

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

    def advance(self, target: torch.Tensor, centres: ClassCentres) -> None:
        """A training step's update of the margin's state (EMA buffers) from the (N,) target cosines of
        the batch this loss sees, before any logit of the step is computed. Default: no state."""

    def nontarget_logits(
        self, cos: torch.Tensor, target: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(changed logits, their slope in cos) of (n, m) cosines where `changes_nontargets`; target: the
        rows' (n,) target cosines; out: two (n, m) tensors to write them into (the loss passes `cos`
        itself as the first), None: new tensors that autograd can track. The loss calls it on blocks
        of rows, so it must treat rows alone."""
        raise NotImplementedError

    def bind(self, num_classes: int, scale: ScalePolicy) -> None:
        """Called once by the head, after its scale policy is bound: state that starts from the class
        count and s (a sigmoid head's bias). Default: none."""

    def loss(
        self,
        x_hat: torch.Tensor,
        weight: torch.Tensor,
        columns: torch.Tensor,
        per_sample: torch.Tensor | None,
        scale: ScalePolicy,
        centres: ClassCentres,
        workspace: Workspace,
        statistics: dict | None,
    ) -> torch.Tensor:
        """The mean loss of the batch this process covers (the fused softmax cross-entropy, loss.py)."""
        return MarginCrossEntropy.apply(x_hat, weight, columns, per_sample, self, scale, centres, workspace, statistics)

    def logits(self, cos: torch.Tensor, column: torch.Tensor, per_sample: torch.Tensor | None, s: float) -> torch.Tensor:
        """(B, C) scaled logits of cosines to every class (`column`: (B, 1) targets), tracked by
        autograd: the head's inspection `forward`, not the training path."""
        target = cos.gather(1, column).squeeze(1)
        held = torch.ones_like(target, dtype=torch.bool)
        logits, _ = margin_logits(cos, column, held, target, self.target_logit(target, per_sample), self)
        return logits * s

    def regulariser(self, norms: torch.Tensor) -> torch.Tensor | None:
        """A loss term on this rank's embedding norms (N,), added to the cross-entropy; None: none."""
        return None

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in self.parameter_names)
