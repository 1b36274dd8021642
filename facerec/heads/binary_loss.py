"""The one-vs-all (sigmoid) loss of SphereFace2 and UniFace, written out for every head, dense or
class-sharded.

Each sample i and class j make one binary problem with the logit z_ij = s f(cos theta_ij) - b: f is
the margin's positive-side function f+ for the sample's own class and its negative-side one f- for
the others, b the learned bias (binary.py). The mean loss of the batch is

    L = kappa / N sum_i [ w+ softplus(-z_iy) + w- sum_{j != y_i} c_j softplus(z_ij) ],

with w+, w- the margin's weights of the two sides, kappa its loss factor (SphereFace2's
lw / r) and c_j the class centres' column weights (1, or under Partial FC with sampling the inverse
of a drawn class's chance, so that the expected loss is the full one). There is no normalisation
over classes: each term is its own sigmoid, so no row maximum or sum is reduced over the shards,
only the per-sample sums of the negative terms.

The pass structure is the softmax loss's (loss.py): one (N, m) buffer holds the cosines, then in
forward (one pass in cache-sized row blocks) the logits, their softplus summed per row, and the
sigmoids; backward turns the sigmoids into the logits' gradient in place and reuses loss.py's
matrix products. The negative side's adjustment of the cosine is a shift the gradient does not see
(as both published heads define it: its slope in cos theta is 1); the positive side's slope comes
from autograd on (N,) vectors, as for the softmax margins.

The gradient of the bias is the sum of the logits' gradients with the sign flipped; under Partial FC
its negative part is summed over the shards in backward, so every rank holds the same, full
gradient of a parameter DDP averages.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from facerec.heads.blocks import pass_block
from facerec.heads.loss import Workspace, batch_statistics, centre_cosines, cosine_grads, nontarget_angles, target_logit_and_slopes

# softplus(x) is taken as x above this (torch's default, 20, leaves an error of e^-20 ~ 2e-9, seen
# by float64 parity checks; e^-50 is below float64's precision at 50)
SOFTPLUS_LINEAR = 50.0

if TYPE_CHECKING:
    from facerec.heads.binary import BinaryMargin
    from facerec.heads.centres import ClassCentres
    from facerec.heads.scale import ScalePolicy


def negative_terms_(
    cos: torch.Tensor,
    column: torch.Tensor,
    held: torch.Tensor,
    s: float | torch.Tensor,
    bias: torch.Tensor,
    margin: BinaryMargin,
    column_weights: torch.Tensor | None,
) -> torch.Tensor:
    """The forward's one pass over its (N, m) buffer, in row blocks that stay in cache: cosines ->
    negative-side logits s f-(cos) - b -> their sigmoids, in place. Returns the rows' sums (N,) of
    c_j softplus(z_ij) over the other classes among these columns (the own column left out where
    this process holds it)."""
    rows = pass_block(*cos.shape, cos.device)
    sums = []
    for c, col, h in zip(cos.split(rows), column.split(rows), held.split(rows)):
        torch.add(-bias, margin.negative_logits(c, out=c), alpha=s, out=c)  # s f- - b in one pass
        terms = F.softplus(c, threshold=SOFTPLUS_LINEAR)
        if column_weights is not None:
            terms.mul_(column_weights)
        sums.append(terms.sum(dim=1) - terms.gather(1, col).squeeze(1) * h)
        c.sigmoid_()
    return torch.cat(sums)


class OneVsAllLoss(torch.autograd.Function):
    """Mean one-vs-all loss of a sigmoid head, from this process's columns.

    x_hat (N, d): unit embeddings of the batch this loss covers (the global batch when classes are
    sharded); weight (m, d): the (sampled) class centres this step uses; labels (N,): each sample's
    column among them, -1 where another rank holds it; bias: the margin's b (a 0-d parameter);
    margin, scale, centres: the head's parts; statistics: a dict to fill, or None.
    """

    @staticmethod
    def forward(ctx, x_hat, weight, labels, bias, margin: BinaryMargin, scale: ScalePolicy, centres: ClassCentres, workspace: Workspace, statistics: dict | None):
        buffer = workspace.take("cosines", (1, len(x_hat), len(weight)), x_hat.dtype, x_hat.device)
        norms = centre_cosines(x_hat, weight, 1, buffer)
        cos = buffer[0]
        held = labels >= 0
        column = labels.clamp(min=0).unsqueeze(1)
        target = centres.reduce_over_shards(cos.gather(1, column).squeeze(1) * held)
        positive, positive_slope, _ = target_logit_and_slopes(margin, target, None, False)
        s = scale.step(cos, labels, target, centres)
        if statistics is not None:
            nearest_other, angle_sum = nontarget_angles(cos, column, held)
        b = bias.detach().to(x_hat.dtype)
        column_weights = centres.column_weights()
        negative_sums = centres.reduce_over_shards(negative_terms_(cos, column, held, s, b, margin, column_weights))
        z_positive = s * positive - b
        factor = margin.loss_factor(s)
        per_sample = margin.positive_weight * F.softplus(-z_positive, threshold=SOFTPLUS_LINEAR) + margin.negative_weight * negative_sums
        if statistics is not None:
            log_p_target = F.logsigmoid(z_positive)
            statistics.update(batch_statistics(centres, target, log_p_target, nearest_other, angle_sum, cos.shape[1], s))
            statistics["bias"] = b.clone()
            statistics["threshold"] = b / s  # the value of f at which P = 1/2
        ctx.save_for_backward(x_hat, weight, norms, buffer, column, held, torch.sigmoid(z_positive), positive_slope, column_weights)
        ctx.s, ctx.factor, ctx.margin, ctx.centres, ctx.workspace = s, factor, margin, centres, workspace
        return factor * per_sample.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        x_hat, weight, norms, buffer, column, held, p_positive, positive_slope, column_weights = ctx.saved_tensors
        margin, s = ctx.margin, ctx.s
        unit = grad_loss * ctx.factor / len(x_hat)  # dL/d(softplus term) for one sample
        # dL/dz: w- c_j sigmoid(z_ij) on the negatives, w+ (sigmoid(z_iy) - 1) on the own class
        negative_scale = unit * margin.negative_weight
        grad_positive_z = unit * margin.positive_weight * (p_positive - 1)
        sigmoids = buffer[0]
        # per column: c_j, and the factor that turns sigmoid_ij into dL/dcos_ij divided by |w_j|
        # (s dL/dz: the negative side's slope is 1), so one pass does both
        weights = column_weights if column_weights is not None else torch.ones_like(norms)
        column_factor = weights * (negative_scale * s) / norms
        rows = pass_block(*sigmoids.shape, sigmoids.device)
        negative_sum = torch.zeros((), dtype=sigmoids.dtype, device=sigmoids.device)
        for g, col, h, gz, slope in zip(
            sigmoids.split(rows), column.split(rows), held.split(rows), grad_positive_z.split(rows), positive_slope.split(rows)
        ):
            own = g.gather(1, col).squeeze(1) * h  # sigmoid(z) of the own class's negative-side logit: not a term
            negative_sum += (torch.mv(g, weights) - own).sum()
            g.mul_(column_factor)
            # the own class: s f+' dL/dz, over |w|
            g.scatter_(1, col, torch.where(h, gz * slope * s / norms[col.squeeze(1)], g.gather(1, col).squeeze(1)).unsqueeze(1))
        # dL/db = -sum dL/dz: the negatives of every shard, the positives (the same on every rank)
        grad_bias = -(ctx.centres.reduce_over_shards(negative_sum * negative_scale) + grad_positive_z.sum())
        grad_x_hat, grad_weight = cosine_grads(buffer, x_hat, weight, norms)
        ctx.workspace.give("cosines", buffer)
        return grad_x_hat, grad_weight, None, grad_bias.reshape(()).to(x_hat.dtype), None, None, None, None, None
