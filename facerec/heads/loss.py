"""The softmax cross-entropy of margin logits, written out for every head, dense or class-sharded.

`MarginCrossEntropy` computes the mean loss of the batch from the columns (classes) this process
holds: all of them for dense class centres, its shard under Partial FC, where the row maxima and the
sums of exponentials are reduced over the ranks (`centres.reduce_over_shards`). It takes the head's
three parts, each for its own concern: the margin (what changes the logits), the scale policy (this
step's s) and the class centres (the reductions over shards and over the global batch). It holds one (N, m) buffer:
cosines, then exponentials of the logits, which backward turns into the logits' gradient in place.
No (N, m) one-hot and no copy of W are kept; backward rebuilds the rest from x_hat, W and the norms
(autograd's version costs 2-3x a plain linear layer on CPU: see docs/research/benchmarks.md).

Beyond the three matrix products of a linear layer, a step makes one pass over the buffer in
forward (margin, scale, exponentials: `exp_margin_logits_`) and one in backward (the logits'
gradient), each in row blocks that stay in cache, plus what normalisation needs: W's row norms, the
division by them and the radial projection of W's gradient. The softmax's normalisation is a
per-row factor applied inside backward's pass, and the buffers are kept from step to step
(`Workspace`). docs/research/benchmarks.md breaks a step down by stage
(benchmarks/head_breakdown.py).

What a margin may change, and how the backward follows it:
- the target logit f(cos theta_y, per-sample inputs): its slopes in cos theta_y and in the per-sample
  inputs come from autograd on (N,) vectors (`target_logit_and_slopes`), so a margin that depends on
  the sample (AdaFace, MagFace, ElasticFace) needs no backward of its own;
- the non-target logits (CurricularFace): `margin.nontarget_logits` writes them, block by block
  in the same forward pass, with their slope, which is kept as a second (N, m) buffer for those
  heads only;
- several centres per class (Sub-center ArcFace): the cosine to a class is the largest over its K
  centres; the gradient goes to that centre (the first of equal ones), which the (K, N, m) cosines
  to every centre, turned into a 0/1 selection, record for backward.

The training diagnostics are computed here, from the same cosines, and over the global batch.
Backward reuses the saved buffer in place, so a graph through this loss can be backpropagated
once (`retain_graph=True` and a second backward raise autograd's "modified by an inplace
operation" error rather than give a wrong gradient).
"""
from __future__ import annotations

import math
from itertools import repeat
from typing import TYPE_CHECKING

import torch
from torch.autograd.function import once_differentiable

from facerec.heads.angles import COS_EPS, angle
from facerec.heads.blocks import pass_block, row_block, row_dots

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres
    from facerec.heads.margin import Margin
    from facerec.heads.scale import ScalePolicy


class Workspace:
    """The loss's (N, m)-sized buffers, kept from one step to the next: on the CPU a fresh buffer of
    more than 32 MB is new memory from the kernel each step, and its page faults cost ~1 us per 4 KB
    (25 ms a step for B = 256, C = 100,000). A forward takes each buffer it needs by its role; backward
    gives it back when done with it. A buffer is reused only at the same shape, dtype and device (a
    new batch size or class count gets a new one, and the old is dropped); one whose backward never
    runs (a forward under no_grad) is simply not given back, so no two steps ever share one. The
    head owns one `Workspace`; nothing in it is saved in checkpoints, and a copy or a pickle of the
    head (the EMA's averaged copy, a spawned process) starts with an empty one."""

    def __init__(self):
        self.free: dict[str, torch.Tensor] = {}

    def __deepcopy__(self, memo: dict) -> Workspace:
        return Workspace()

    def __getstate__(self) -> dict:
        return {"free": {}}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self.free.pop(role, None)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    def give(self, role: str, buffer: torch.Tensor | None) -> None:
        if buffer is not None:
            self.free[role] = buffer


def centre_cosines(x_hat: torch.Tensor, weight: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """The row norms |w| (m K,) of the unnormalised class centres W, and in `out` (K, N, m) the
    cosines of the unit rows x_hat to every centre, centre by centre: out[c] holds each class's
    centre c, W's rows c, c + K, ... (one matrix product per centre, on W's strided rows, as fast as
    one of the whole). The products are divided by the norms in place: W / |w| is never formed."""
    norms = torch.linalg.vector_norm(weight, dim=1).clamp_min_(1e-12)  # F.normalize's epsilon
    by_centre = norms_by_centre(norms, k)
    for centre in range(k):
        torch.mm(x_hat, weight[centre::k].T, out=out[centre]).div_(by_centre[centre])
    return norms


def norms_by_centre(norms: torch.Tensor, k: int) -> torch.Tensor:
    """The (m K,) row norms of W as (K, m), contiguous: dividing by a strided vector is 10x slower."""
    return norms.view(-1, k).T.contiguous() if k > 1 else norms.unsqueeze(0)


def cosine_grads(
    grad_raw: torch.Tensor, x_hat: torch.Tensor, weight: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of x_hat and W from grad_raw (K, N, m) = dL/d(x_hat . w) per centre, laid out as
    `centre_cosines` lays out the cosines, already divided by |w|."""
    k = len(grad_raw)
    grad_x_hat = torch.mm(grad_raw[0], weight[0::k])
    for centre in range(1, k):
        grad_x_hat.addmm_(grad_raw[centre], weight[centre::k])
    grad_weight = torch.empty_like(weight)
    for centre in range(k):
        torch.mm(grad_raw[centre].T, x_hat, out=grad_weight[centre::k])
    # Through w / |w|: remove from each row its component along w (the normalisation's Jacobian), in
    # place, in row blocks: on the CPU a block stays in cache between its dot products and its update,
    # where whole (m, d) passes cost 2x as much.
    rows = row_block(len(weight), weight.shape[1], weight.device)
    for w, g, n in zip(weight.split(rows), grad_weight.split(rows), norms.split(rows)):
        g.addcmul_(w, (row_dots(w, g) / n.square()).unsqueeze(1), value=-1)
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


def margin_logits(
    cos: torch.Tensor,
    column: torch.Tensor,
    held: torch.Tensor,
    target: torch.Tensor,
    target_logit: torch.Tensor,
    margin: Margin,
    nontarget_slope: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The margin logits (before the scale) of (n, m) cosines: the margin's change to the non-target
    logits where it makes one, then f on each row's target column where this process holds it
    (`held`; `column`: (n, 1) target columns; target, target_logit: (n,)). Returns (logits, their
    slope in cos where the non-targets changed, else None). The one place the margin logits are
    assembled: the fused loss calls it on blocks of its buffer, which it changes in place (and the
    slope into `nontarget_slope`), and the head's inspection `forward` on cosines that autograd
    tracks, which it leaves as they are."""
    in_place = not cos.requires_grad
    if margin.changes_nontargets:
        cos, nontarget_slope = margin.nontarget_logits(cos, target, out=(cos, nontarget_slope) if in_place else None)
    targets = torch.where(held, target_logit, cos.gather(1, column).squeeze(1)).unsqueeze(1)
    return (cos.scatter_(1, column, targets) if in_place else cos.scatter(1, column, targets)), nontarget_slope


def exp_margin_logits_(
    cos: torch.Tensor,
    column: torch.Tensor,
    held: torch.Tensor,
    target: torch.Tensor,
    target_logit: torch.Tensor,
    s: float | torch.Tensor,
    margin: Margin,
    nontarget_slope: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's one pass over its (N, m) buffer, in row blocks that stay in cache: cosines ->
    margin logits -> times s -> exp(logit - the row's largest logit among these columns), in place.
    Fills `nontarget_slope` (N, m) where the margin changes the non-target logits. Returns (the rows'
    largest scaled logits (N,), -inf for a process without columns; the rows' sums of the
    exponentials (N,)). The normalisation over all shards' columns is left to `normalisers`."""
    rows = pass_block(*cos.shape, cos.device)
    slopes = nontarget_slope.split(rows) if nontarget_slope is not None else repeat(None)
    maxima, sums = [], []
    for c, col, h, t, f, slope_out in zip(
        cos.split(rows), column.split(rows), held.split(rows), target.split(rows), target_logit.split(rows), slopes
    ):
        margin_logits(c, col, h, t, f, margin, slope_out)
        c.mul_(s)
        row_max = c.amax(dim=1) if c.shape[1] else c.new_full((len(c),), -math.inf)
        c.sub_(row_max.unsqueeze(1)).exp_()  # a process without columns has no block to change
        maxima.append(row_max)
        sums.append(c.sum(dim=1))
    return torch.cat(maxima), torch.cat(sums)


def normalisers(row_max: torch.Tensor, row_sum: torch.Tensor, centres: ClassCentres) -> tuple[torch.Tensor, torch.Tensor]:
    """From each process's row maxima and sums of exponentials (`exp_margin_logits_`): (the log
    normaliser ln sum_j exp(logit_ij) over every shard's columns (N,); the factor (N,) that turns this
    process's exponentials into probabilities, p_ij = exp(logit_ij - row_max_i) x factor_i). The
    factor is applied in backward, in the pass that forms the logits' gradient: no sweep of its own."""
    global_max = centres.reduce_over_shards(row_max.clone(), "max")  # in place; finite: every row has columns somewhere
    shift = torch.exp(row_max - global_max)  # 0 for a process without columns (row_max = -inf)
    total = centres.reduce_over_shards(row_sum * shift)
    return total.log() + global_max, shift / total


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
        angle_sums.append(other.clamp_(-1 + COS_EPS, 1 - COS_EPS).acos_().sum(dim=1) - h.to(c.dtype) * (math.pi / 2))
        del other  # before the next block's copy: one block's copy alive at a time
    return torch.cat(nearest), torch.cat(angle_sums)


def closest_centres_(every_centre: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """(N, m) cosines to each class's closest centre, from the (K, N, m) cosines to every centre,
    which become in place the 0/1 selection of that centre (the first of equal ones), for backward to
    send each class's gradient there. In row blocks, with float arithmetic: bool masks, `where` or a
    scatter cost 3-20x a float multiply on the CPU."""
    k = len(every_centre)
    closest = workspace.take("closest", every_centre.shape[1:], every_centre.dtype, every_centre.device)
    rows = pass_block(*closest.shape, closest.device)
    for every, best in zip(every_centre.split(rows, dim=1), closest.split(rows)):
        torch.maximum(every[0], every[1], out=best)
        for centre in range(2, k):
            torch.maximum(best, every[centre], out=best)
        unclaimed = torch.ones_like(best)
        for centre in range(k):
            selected = every[centre].sub_(best).sign_().add_(1)  # 1 where this centre is the closest
            if centre:
                selected.mul_(unclaimed)
            unclaimed.sub_(selected)
    return closest


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
        ctx,
        x_hat,
        weight,
        labels,
        per_sample,
        margin: Margin,
        scale: ScalePolicy,
        centres: ClassCentres,
        workspace: Workspace,
        statistics: dict | None,
    ):
        k = centres.centres_per_class
        every_centre = workspace.take("cosines", (k, len(x_hat), len(weight) // k), x_hat.dtype, x_hat.device)
        norms = centre_cosines(x_hat, weight, k, every_centre)
        # a class's cosine is its closest centre's; every_centre becomes which one that is
        cos = closest_centres_(every_centre, workspace) if k > 1 else every_centre[0]
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
        margin.advance(target, centres)
        nontarget_slope = workspace.take("nontarget_slope", cos.shape, cos.dtype, cos.device) if margin.changes_nontargets else None
        row_max, row_sum = exp_margin_logits_(cos, column, held, target, target_logit, s, margin, nontarget_slope)
        log_normaliser, row_factor = normalisers(row_max, row_sum, centres)
        log_p_target = s * target_logit - log_normaliser
        if statistics is not None:
            statistics.update(
                batch_statistics(centres, target, log_p_target, nearest_other, angle_sum, cos.shape[1], s)
            )
        ctx.save_for_backward(
            x_hat, weight, norms, cos, row_factor, column, held, target_slope, per_sample_slope,
            nontarget_slope, every_centre,
        )
        ctx.s, ctx.centres, ctx.workspace = s, k, workspace
        return -log_p_target.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (x_hat, weight, norms, exponentials, row_factor, column, held,
         target_slope, per_sample_slope, nontarget_slope, every_centre) = ctx.saved_tensors
        k = ctx.centres
        # dL/d(margin logit)_ij = s (p_ij - [j = y_i]) / N, with p_ij = exponential_ij x row_factor_i
        unit = grad_loss * ctx.s / len(x_hat)
        row_scale = (row_factor * unit).unsqueeze(1)
        minus_unit = (-unit * held).to(exponentials.dtype).unsqueeze(1)
        # the gradient goes per centre, divided by |w|, into every_centre (K, N, m), which with one
        # centre per class is the exponentials' own buffer
        centre_norms = norms_by_centre(norms, k).unsqueeze(1)
        # one pass over the buffer in row blocks (each in cache), as in forward
        rows = pass_block(*exponentials.shape, exponentials.device)
        blocks = zip(
            exponentials.split(rows), every_centre.split(rows, dim=1), row_scale.split(rows), minus_unit.split(rows),
            column.split(rows), held.split(rows), target_slope.split(rows),
            nontarget_slope.split(rows) if nontarget_slope is not None else repeat(None),
        )
        grad_target = []
        for g, out, scale_rows, minus, col, h, slope, nontarget in blocks:
            g.mul_(scale_rows).scatter_add_(1, col, minus)
            grad_f = g.gather(1, col).squeeze(1) * h  # dL/df_i where this process holds y_i
            if nontarget is not None:
                g.mul_(nontarget)
            g.scatter_(1, col, torch.where(h, grad_f * slope, g.gather(1, col).squeeze(1)).unsqueeze(1))
            if k > 1:  # to each class's closest centre: out holds 1 there, 0 at the other centres
                out.mul_(g)
            out.div_(centre_norms)
            grad_target.append(grad_f)
        grad_x_hat, grad_weight = cosine_grads(every_centre, x_hat, weight, norms)
        workspace = ctx.workspace
        workspace.give("cosines", every_centre)
        if k > 1:
            workspace.give("closest", exponentials)
        workspace.give("nontarget_slope", nontarget_slope)
        grad_per_sample = None
        if per_sample_slope is not None:
            grad_target = torch.cat(grad_target)
            grad_per_sample = per_sample_slope * grad_target.view(-1, *[1] * (per_sample_slope.dim() - 1))
        return grad_x_hat, grad_weight, None, grad_per_sample, None, None, None, None, None


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
