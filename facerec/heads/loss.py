"""The softmax cross-entropy of margin logits, written out for every head, dense or class-sharded.

`MarginCrossEntropy` computes the mean loss of the batch from the columns (classes) this process
holds: all of them for dense class centres, its shard under Partial FC, where the row maxima and the
sums of exponentials are reduced over the ranks (`centres.reduce_over_shards`). It takes the head's
three parts, each for its own concern: the margin (what changes the logits), the scale policy (this
step's s) and the class centres (the reductions over shards and over the global batch). It holds one (N, m) buffer:
cosines, then logits, then probabilities, which backward turns into the logits' gradient in place.
No (N, m) one-hot and no copy of W are kept; backward rebuilds the rest from x_hat, W and the norms
(autograd's version costs 2-3x a plain linear layer on CPU: see docs/research/benchmarks.md).

What a margin may change, and how the backward follows it:
- the target logit f(cos theta_y, per-sample inputs): its slopes in cos theta_y and in the per-sample
  inputs come from autograd on (N,) vectors (`target_logit_and_slopes`), so a margin that depends on
  the sample (AdaFace, MagFace, ElasticFace) needs no backward of its own;
- the non-target logits (CurricularFace): `margin.nontarget_logits` returns them with their slope,
  which is kept as a second (N, m) buffer for those heads only;
- several centres per class (Sub-center ArcFace): the cosine to a class is the largest over its K
  centres; the gradient goes to that centre (its index is kept as uint8).

The training diagnostics are computed here, from the same cosines, and over the global batch.
Backward reuses the saved buffer in place, so a graph through this loss can be backpropagated
once (`retain_graph=True` and a second backward raise autograd's "modified by an inplace
operation" error rather than give a wrong gradient).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

from facerec.heads.angles import COS_EPS, angle
from facerec.heads.blocks import row_block
from facerec.heads.centres import cosines

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres
    from facerec.heads.margin import Margin
    from facerec.heads.scale import ScalePolicy


def cosine_grads(
    grad_raw: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x_hat and W from grad_raw = dL/d(x_hat . w_j) (N, m), already divided by |w_j|."""
    grad_x_hat = grad_raw @ weight
    grad_weight = grad_raw.T @ x_hat
    # Through w / |w|: remove from each row its component along w (the normalisation's Jacobian), in
    # place, in row blocks: on the CPU a block stays in cache between its dot products and its update,
    # where whole (m, d) passes cost 2x as much.
    rows = row_block(len(weight), weight.shape[1], weight.device)
    for w, g, n in zip(weight.split(rows), grad_weight.split(rows), norms.split(rows)):
        dots = torch.bmm(w.unsqueeze(1), g.unsqueeze(2)).view(-1)  # row-wise w.g without a (rows, d) product
        g.addcmul_(w, (dots / n.square()).unsqueeze(1), value=-1)
    return grad_x_hat, grad_weight


def target_logit_and_slopes(margin: Margin, target: torch.Tensor, per_sample: torch.Tensor | None, per_sample_grad: bool):
    """f(cos theta_y) and its slopes in cos theta_y and (if `per_sample_grad`) in the per-sample inputs,
    all detached: autograd on (N,) vectors."""
    with torch.enable_grad():
        target_leaf = target.detach().requires_grad_()
        inputs = [target_leaf]
        if per_sample is not None:
            per_sample = per_sample.detach().requires_grad_(per_sample_grad)
            if per_sample_grad:
                inputs.append(per_sample)
        logit = margin.target_logit(target_leaf, per_sample)
        slopes = torch.autograd.grad(logit.sum(), inputs)
    return logit.detach(), slopes[0], (slopes[1] if per_sample_grad else None)


def margin_logits_(
    cos: torch.Tensor,
    column: torch.Tensor,
    held: torch.Tensor,
    target: torch.Tensor,
    target_logit: torch.Tensor,
    margin: Margin,
    centres: ClassCentres,
    update: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The margin logits (before the scale) from (N, m) cosines: the margin's change to the
    non-target logits where it makes one, then f on each row's target column where this process holds
    it (`held`; `column`: (N, 1) target columns). Returns (logits, their slope in cos where the
    non-targets changed, else None). The one place the margin logits are assembled: the fused loss
    calls it on its buffer, which it changes in place, and the head's inspection `forward` on cosines
    that autograd tracks, which it leaves as they are."""
    nontarget_slope = None
    if margin.changes_nontargets:
        cos, nontarget_slope = margin.nontarget_logits(cos, target, centres, update=update)
    targets = torch.where(held, target_logit, cos.gather(1, column).squeeze(1)).unsqueeze(1)
    if cos.requires_grad:
        return cos.scatter(1, column, targets), nontarget_slope
    return cos.scatter_(1, column, targets), nontarget_slope


def nontarget_angles(cos: torch.Tensor, column: torch.Tensor, held: torch.Tensor):
    """Per sample: the largest cosine to another class among these columns, and the sum of the angles
    (radians) to the other classes among them. In row blocks: no full copy of the (N, m) matrix."""
    nearest, angle_sums = [], []
    rows = row_block(*cos.shape, cos.device)
    for c, col, h in zip(cos.split(rows), column.split(rows), held.split(rows)):
        other = c.clone()
        own = other.gather(1, col)
        other.scatter_(1, col, torch.where(h.unsqueeze(1), -math.inf, own))
        nearest.append(other.amax(dim=1) if other.shape[1] else other.new_full((len(other),), -math.inf))
        other.scatter_(1, col, torch.where(h.unsqueeze(1), 0.0, own))  # acos(0) = pi / 2, subtracted below
        angle_sums.append(other.clamp_(-1 + COS_EPS, 1 - COS_EPS).acos_().sum(dim=1) - h * (math.pi / 2))
        del other  # before the next block's copy: one block's copy alive at a time
    return torch.cat(nearest), torch.cat(angle_sums)


class MarginCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of the margin logits, from this process's columns.

    x_hat (N, d): unit embeddings of the batch this loss covers (the global batch when classes are
    sharded); weight (m K, d): the (sampled) class centres this step uses, K per class; labels (N,):
    each sample's column among the m classes, -1 where another rank holds it; per_sample (N, k) or
    None: the margin's per-sample inputs (may require grad: MagFace's norm); margin, scale, centres:
    the head's parts; statistics: a dict to fill with the batch diagnostics, or None.
    """

    @staticmethod
    def forward(
        ctx, x_hat, weight, labels, per_sample, margin: Margin, scale: ScalePolicy, centres: ClassCentres, statistics: dict | None
    ):
        norms, cos = cosines(x_hat, weight)
        k = centres.centres_per_class
        nearest_centre = None
        if k > 1:  # a class's cosine is its closest centre's
            cos, nearest_centre = cos.view(len(cos), -1, k).max(dim=2)
            nearest_centre = nearest_centre.to(torch.uint8)
        held = labels >= 0
        column = labels.clamp(min=0).unsqueeze(1)
        # exactly one process holds each sample's class: a sum over the shards gathers the targets
        target = centres.reduce_over_shards(cos.gather(1, column).squeeze(1) * held)
        target_logit, target_slope, per_sample_slope = target_logit_and_slopes(
            margin, target, per_sample, ctx.needs_input_grad[3]
        )
        s = scale.step(cos, labels, target, centres)  # the policy sees the cosines before the margin
        if statistics is not None:
            nearest_other, angle_sum = nontarget_angles(cos, column, held)
        cos, nontarget_slope = margin_logits_(cos, column, held, target, target_logit, margin, centres, update=True)
        if nontarget_slope is not None:
            # the target column follows f's slope instead (rows whose class is elsewhere keep theirs)
            nontarget_slope.scatter_(1, column, torch.where(held.unsqueeze(1), 1.0, nontarget_slope.gather(1, column)))
        log_normaliser = softmax_over_shards_(cos.mul_(s), centres)
        log_p_target = s * target_logit - log_normaliser
        if statistics is not None:
            statistics.update(
                batch_statistics(centres, target, log_p_target, nearest_other, angle_sum, cos.shape[1], s)
            )
        ctx.save_for_backward(x_hat, weight, norms, cos, column, held, target_slope, per_sample_slope, nontarget_slope, nearest_centre)
        ctx.s, ctx.centres = s, k
        return -log_p_target.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        x_hat, weight, norms, probabilities, column, held, target_slope, per_sample_slope, nontarget_slope, nearest_centre = ctx.saved_tensors
        # dL/dlogit_ij = (p_ij - [j = y_i]) / N, then times s: dL/d(margin logit), in place
        grad_raw = probabilities
        grad_raw.scatter_add_(1, column, -held.to(grad_raw.dtype).unsqueeze(1))
        grad_raw.mul_(grad_loss * ctx.s / len(x_hat))
        grad_target = grad_raw.gather(1, column).squeeze(1) * held  # dL/df_i where this process holds y_i
        if nontarget_slope is not None:
            grad_raw.mul_(nontarget_slope)
        grad_raw.scatter_(1, column, torch.where(held, grad_target * target_slope, grad_raw.gather(1, column).squeeze(1)).unsqueeze(1))
        if ctx.centres > 1:  # to each class's closest centre
            expanded = grad_raw.new_zeros((*grad_raw.shape, ctx.centres))
            expanded.scatter_(2, nearest_centre.long().unsqueeze(2), grad_raw.unsqueeze(2))
            grad_raw = expanded.view(len(grad_raw), -1)
        grad_x_hat, grad_weight = cosine_grads(grad_raw.div_(norms), x_hat, weight, norms)
        grad_per_sample = None
        if per_sample_slope is not None:
            grad_per_sample = per_sample_slope * grad_target.view(-1, *[1] * (per_sample_slope.dim() - 1))
        return grad_x_hat, grad_weight, None, grad_per_sample, None, None, None, None


def softmax_over_shards_(logits: torch.Tensor, centres: ClassCentres) -> torch.Tensor:
    """Turn (N, m) logits, this process's columns of the softmax over all classes, into their
    probabilities in place; returns the (N,) log normaliser ln sum_j exp(logit_ij) over all columns."""
    row_max = logits.amax(dim=1) if logits.shape[1] else logits.new_full((len(logits),), -math.inf)
    row_max = centres.reduce_over_shards(row_max, "max")
    row_max = torch.where(torch.isfinite(row_max), row_max, 0)  # a row with no finite logit anywhere
    logits.sub_(row_max.unsqueeze(1)).exp_()
    total = centres.reduce_over_shards(logits.sum(dim=1))
    logits.div_(total.unsqueeze(1))
    return total.log() + row_max


@torch.no_grad()
def batch_statistics(centres: ClassCentres, target, log_p_target, nearest_other, angle_sum, columns: int, s) -> dict:
    """The diagnostics over the whole batch and all classes (every rank gets the same values).

    theta_med: median target angle (deg); theta_nontarget: mean angle to the other classes (deg);
    p_target: median softmax probability of the target (margin included); top1: fraction of samples
    whose own centre is the nearest (margin excluded); s.
    """
    nearest_other = centres.reduce_over_shards(nearest_other, "max")
    angle_sum = centres.reduce_over_shards(angle_sum)
    classes = centres.reduce_over_shards(angle_sum.new_tensor(float(columns)))
    rows = centres.batch_rows(torch.stack([target, log_p_target, nearest_other, angle_sum], dim=1))
    target, log_p_target, nearest_other, angle_sum = rows.unbind(1)
    return {
        "theta_med": torch.rad2deg(angle(target)).median(),
        "theta_nontarget": torch.rad2deg(angle_sum.sum() / (len(target) * (classes - 1))),
        "p_target": log_p_target.exp().median(),
        "top1": (target > nearest_other).float().mean(),
        "s": torch.as_tensor(s, dtype=target.dtype).detach().clone(),
    }
