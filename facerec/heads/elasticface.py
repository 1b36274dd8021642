"""ElasticFace (Boutros et al., CVPRW 2022): the margin of each sample is drawn from N(m, sigma).

ElasticFace-Arc: cos(theta + m_i); ElasticFace-Cos: cos(theta) - m_i. The "+" variants sort the
draws so that the samples farthest from their centre (smallest target cosine) get the largest
margins. The draws come from a generator seeded by (seed, training step), a buffer: the same on
every rank, reproducible, and exact on resume. The draw covers the global batch (each rank of a
dense DDP run takes its own slice); the "+" sort ranks the samples of the batch the head sees (the
global batch when classes are sharded, each rank's own under dense DDP, as the official code does).
Paper settings: Arc m = 0.5, sigma = 0.05 (Arc+: 0.0175); Cos m = 0.35, sigma = 0.05 (Cos+: 0.025).
Two differences from the official code: the "+" assignment is the paper's (the k-th smallest draw
to the sample with the k-th largest target cosine; the official `margin[index]` indexes the draws
by the sort order itself, which gives that assignment only when the order is its own inverse), and
ElasticFace-Arc continues past theta + m_i > pi as ArcFace does here (the official code does not).
The nominal margin (what `scale=auto_margin` evaluates) is m.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from facerec import distributed
from facerec.heads.margin import Margin
from facerec.heads.margins import additive_angular

if TYPE_CHECKING:
    from facerec.heads.centres import ClassCentres


class ElasticFace(Margin):
    def __init__(
        self,
        m: float = 0.5,
        std: float = 0.05,
        kind: str = "arc",
        plus: bool = False,
        seed: int = 0,
    ):
        if kind not in ("arc", "cos"):
            raise ValueError(f"ElasticFace kind must be 'arc' or 'cos', got {kind!r}")
        if not (0 <= m < 1.5 and std >= 0):
            raise ValueError(f"ElasticFace needs 0 <= m < 1.5 and std >= 0, got m={m}, std={std}")
        super().__init__(m=float(m), std=float(std), kind=kind, plus=bool(plus), seed=int(seed))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # draws taken: checkpointed

    def margin_inputs(self, norms: torch.Tensor, labels: torch.Tensor, centres: ClassCentres, update: bool) -> torch.Tensor:
        rank, world_size = distributed.world()
        shards = 1 if centres.sees_global_batch else world_size  # a dense head under DDP sees 1/R of the batch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.step))
        draws = torch.normal(self.m, self.std, (len(labels) * shards,), generator=generator, dtype=torch.float64)
        if update:
            self.step += 1
        mine = draws[(rank if shards > 1 else 0) * len(labels) :][: len(labels)]
        return mine.to(device=norms.device, dtype=norms.dtype)

    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        margins = self.m if per_sample is None else per_sample
        if per_sample is not None and self.plus:  # the largest margins to the smallest target cosines
            order = cos_target.detach().argsort(descending=True)
            margins = torch.empty_like(per_sample).scatter_(0, order, per_sample.sort().values)
        if self.kind == "arc":
            return additive_angular(cos_target, margins)
        return cos_target - margins
