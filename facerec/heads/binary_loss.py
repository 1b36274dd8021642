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
sigmoids, both from one exponential; backward turns the sigmoids into the logits' gradient in place
(summing them per row for the bias in the same pass) and reuses loss.py's matrix products. The
sample's own column is not a negative term: its entry is taken out of the row sums afterwards, on
(N,) vectors, and overwritten with the positive side's gradient by one scatter. The negative side's
adjustment of the cosine is a shift the gradient does not see (as both published heads define it:
its slope in cos theta is 1); the positive side's slope comes from autograd on (N,) vectors, as for
the softmax margins.

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

# softplus(x) of the (N,) vectors (the positive side, the own column's correction) is taken as x
# above this (torch's default, 20, leaves an error of e^-20 ~ 2e-9, seen by float64 parity checks;
# e^-50 is below float64's precision at 50); the (N, m) buffer's softplus is log1p(exp), clamped below
SOFTPLUS_LINEAR = 50.0
# the negative logits' clamp before exp: e^limit and 1 + e^limit are finite, and softplus(limit) =
# limit + e^-limit equals the limit to the dtype's precision (the loss runs in float32 or float64)
EXP_LIMIT = {torch.float32: 80.0, torch.float64: 700.0}

if TYPE_CHECKING:
    from facerec.heads.binary import BinaryMargin
    from facerec.heads.centres import ClassCentres
    from facerec.heads.scale import ScalePolicy


def row_sums(block: torch.Tensor, column_weights: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """sum_j c_j block_ij into `out` (n,): a matrix-vector product with the column weights, or a plain
    row sum where there are none."""
    if column_weights is None:
        return torch.sum(block, dim=1, out=out)
    return torch.mv(block, column_weights, out=out)


def negative_terms_(
    cos: torch.Tensor,
    s: float,
    bias: torch.Tensor,
    margin: BinaryMargin,
    column_weights: torch.Tensor | None,
) -> torch.Tensor:
    """The forward's one pass over its (N, m) buffer, in row blocks that stay in cache: cosines ->
    negative-side logits z = s f-(cos) - b -> their sigmoids, in place. Returns the rows' sums (N,) of
    c_j softplus(z_ij) over every column (the own class's included: the caller removes it).

    Both come from one exponential e = exp(z): softplus(z) = log1p(e) and sigmoid(z) = e / (1 + e)
    (torch's softplus and sigmoid take one each, and a softplus read back from the sigmoid loses the
    loss where sigmoid(z) rounds to 1). exp overflows above ~88 (float32), so z is clamped at
    EXP_LIMIT and the part above it added back (softplus(z) = z there, to the dtype's precision; the
    sigmoid is 1 either way). On the CPU the clamp (three passes: the excess, its row sums, the
    clamp) is skipped when no logit can reach the limit: z <= s f-(1) - b, f- being increasing.
    Elsewhere it always runs, as the check would read b from the device every step."""
    limit = EXP_LIMIT[cos.dtype]
    clamp = cos.device.type != "cpu" or float(margin.negative_logits(cos.new_ones(1), s, bias)) > limit
    rows = pass_block(*cos.shape, cos.device)
    sums = cos.new_empty(len(cos))
    for c, out in zip(cos.split(rows), sums.split(rows)):
        margin.negative_logits(c, s, bias, out=c)
        if clamp:
            beyond = row_sums((c - limit).clamp_(min=0), column_weights, torch.empty_like(out))
            c.clamp_(max=limit)
        e = torch.exp(c)
        torch.div(e, e + 1, out=c)
        row_sums(e.log1p_(), column_weights, out)
        if clamp:
            out += beyond
    return sums


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
        local_target = cos.gather(1, column).squeeze(1)
        target = centres.reduce_over_shards(local_target * held)
        positive, positive_slope, _ = target_logit_and_slopes(margin, target, None, False)
        s = scale.step(cos, labels, target, centres)
        if statistics is not None:
            nearest_other, angle_sum = nontarget_angles(cos, column, held)
        b = bias.detach().to(x_hat.dtype)
        column_weights = centres.column_weights()
        # the own class's entry of the negative side (where this process holds it) is not a term:
        # its softplus is taken out of the row sums, its sigmoid out of backward's
        own_weight = held.to(x_hat.dtype) if column_weights is None else held * column_weights[column.squeeze(1)]
        own_negative_z = margin.negative_logits(local_target, s, b)
        own_terms = F.softplus(own_negative_z, threshold=SOFTPLUS_LINEAR) * own_weight
        negative_sums = centres.reduce_over_shards(negative_terms_(cos, s, b, margin, column_weights) - own_terms)
        z_positive = s * positive - b
        factor = margin.loss_factor(s)
        per_sample = margin.positive_weight * F.softplus(-z_positive, threshold=SOFTPLUS_LINEAR) + margin.negative_weight * negative_sums
        if statistics is not None:
            log_p_target = F.logsigmoid(z_positive)
            statistics.update(batch_statistics(centres, target, log_p_target, nearest_other, angle_sum, cos.shape[1], s))
            statistics["bias"] = b.clone()
            statistics["threshold"] = b / s  # the value of f at which P = 1/2
        own_sigmoids = torch.sigmoid(own_negative_z) * own_weight
        ctx.save_for_backward(x_hat, weight, norms, buffer, column, held, torch.sigmoid(z_positive), positive_slope, column_weights, own_sigmoids)
        ctx.s, ctx.factor, ctx.margin, ctx.centres, ctx.workspace = s, factor, margin, centres, workspace
        return factor * per_sample.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        x_hat, weight, norms, buffer, column, held, p_positive, positive_slope, column_weights, own_sigmoids = ctx.saved_tensors
        margin, s = ctx.margin, ctx.s
        unit = grad_loss * ctx.factor / len(x_hat)  # dL/d(softplus term) for one sample
        # dL/dz: w- c_j sigmoid(z_ij) on the negatives, w+ (sigmoid(z_iy) - 1) on the own class
        negative_scale = unit * margin.negative_weight
        grad_positive_z = unit * margin.positive_weight * (p_positive - 1)
        sigmoids = buffer[0]
        # per column: the factor that turns sigmoid_ij into dL/dcos_ij divided by |w_j| (s dL/dz: the
        # negative side's slope is 1), applied in the pass that also sums c_j sigmoid_ij for the bias
        column_factor = (negative_scale * s) / norms
        if column_weights is not None:
            column_factor = column_factor * column_weights
        rows = pass_block(*sigmoids.shape, sigmoids.device)
        sigmoid_sums = sigmoids.new_empty(len(sigmoids))
        for g, out in zip(sigmoids.split(rows), sigmoid_sums.split(rows)):
            row_sums(g, column_weights, out)
            g.mul_(column_factor)
        # the own class: s f+' dL/dz, over |w|
        own = torch.where(held, grad_positive_z * positive_slope * s / norms[column.squeeze(1)], sigmoids.gather(1, column).squeeze(1))
        sigmoids.scatter_(1, column, own.unsqueeze(1))
        # dL/db = -sum dL/dz: the negatives of every shard, the positives (the same on every rank)
        negative_sum = (sigmoid_sums - own_sigmoids).sum()  # row by row, as the forward's softplus sums
        grad_bias = -(ctx.centres.reduce_over_shards(negative_sum * negative_scale) + grad_positive_z.sum())
        grad_x_hat, grad_weight = cosine_grads(buffer, x_hat, weight, norms)
        ctx.workspace.give("cosines", buffer)
        return grad_x_hat, grad_weight, None, grad_bias.reshape(()).to(x_hat.dtype), None, None, None, None, None
