"""Two gloo processes run the class-sharded head (PartialFC) in float64 and record what it computed.

python tests/scripts/ddp_partial_fc.py OUT_DIR writes OUT_DIR/rank{0,1}.pt (torch.save of plain
tensors and dicts), which tests/test_partial_fc.py compares with dense float64 references on the
same global batch (the problems below are shared with it):

- "heads": for every margin x scale policy, sample_rate = 1: the loss, this rank's embedding
  gradient, the gathered gradient of all class centres and the s used; the ranks hold unequal
  batches (UNEVEN) and unequal shards (C = 7 over 2 ranks).
- "ddp": a linear backbone under DistributedDataParallel with the shard kept out of its all-reduce:
  the backbone's gradient after DDP's averaging.
- "sampled": sample_rate < 1: the loss and the classes each rank sampled.
- "resume": SGD with momentum for two steps, then a checkpoint (full weights and optimizer state,
  written by rank 0 as the LightningModule's hooks do), the logits of a batch, and the full weights
  after one more step.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facerec.heads import (
    AdaCos,
    ArcFace,
    AutoMarginScale,
    AutoScale,
    CombinedMargin,
    CosFace,
    DynamicScale,
    FixedScale,
    NormFace,
    PartialFC,
    SphereFace,
)

WORLD_SIZE = 2
MARGINS = {
    "normface": NormFace,
    "cosface": CosFace,
    "arcface": ArcFace,
    "sphereface": SphereFace,
    "combined": CombinedMargin,
    "adacos": AdaCos,
}
SCALES = {"fixed": lambda: FixedScale(30.0), "auto": AutoScale, "auto_margin": AutoMarginScale, "dynamic": lambda: DynamicScale(max_scale=math.inf)}  # uncapped: s moves
UNEVEN = (7, 4)  # samples on rank 0 and rank 1
SAMPLE_RATE = 0.25
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.5


def problem(num_classes: int, embedding_size: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, embedding_size, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, num_classes, (batch,), generator=generator)


def build_head(margin: str, scale: str, num_classes: int, embedding_size: int) -> nn.Module:
    """The unsharded float64 head (same weights on every rank and in the test process)."""
    torch.manual_seed(1)
    return MARGINS[margin](embedding_size, num_classes, scale=SCALES[scale]()).double()


def rows(rank: int, sizes=UNEVEN) -> slice:
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def run_heads(rank: int) -> dict:
    x, labels = problem(7, 5, sum(UNEVEN), seed=0)
    results = {}
    for margin in MARGINS:
        for scale in SCALES:
            head = PartialFC(build_head(margin, scale, 7, 5))
            head.shard()
            x_local = x[rows(rank)].clone().requires_grad_()
            loss, _ = head.loss(x_local, labels[rows(rank)])
            loss.backward()
            results[f"{margin}/{scale}"] = {
                "loss": loss.detach(),
                "grad_x": x_local.grad,
                "grad_weight": head.gather_rows(head.weight.grad),
                "s": torch.tensor(head.scale.value, dtype=torch.float64),
            }
    return results


class Model(nn.Module):
    def __init__(self, head: PartialFC):
        super().__init__()
        self.backbone = nn.Linear(3, 5).double()
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(self.backbone(images), labels)[0]


def ddp_model() -> Model:
    torch.manual_seed(2)
    return Model(PartialFC(build_head("arcface", "auto", 7, 5)))


def run_ddp(rank: int) -> dict:
    images = problem(7, 3, sum(UNEVEN), seed=3)[0]
    labels = problem(7, 5, sum(UNEVEN), seed=0)[1]
    model = ddp_model()
    model.head.shard()
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["head.weight"])
    wrapped = DistributedDataParallel(model)  # kept alive until backward: its reducer all-reduces then
    wrapped(images[rows(rank)], labels[rows(rank)]).backward()
    return {"grad_backbone": model.backbone.weight.grad, "grad_weight": model.head.gather_rows(model.head.weight.grad)}


def run_sampled(rank: int) -> dict:
    x, labels = problem(40, 6, 12, seed=4)
    head = PartialFC(build_head("cosface", "auto", 40, 6), sample_rate=SAMPLE_RATE)
    head.shard()
    torch.manual_seed(10 + rank)
    loss, _ = head.loss(x[rows(rank, (6, 6))], labels[rows(rank, (6, 6))])
    return {"loss": loss.detach(), "sampled": head.sampled}


def sgd(head: PartialFC) -> torch.optim.Optimizer:
    return torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def resume_problem() -> tuple[PartialFC, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A head with C = 9 (rows 5 + 4), three training batches of 8 and an evaluation batch of 6."""
    head = PartialFC(build_head("arcface", "auto", 9, 6))
    batches = [problem(9, 6, 8, seed=20 + step) for step in range(3)]
    return head, batches, problem(9, 6, 6, seed=30)[0]


def step(head: PartialFC, optimizer, x: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad()
    head.loss(x, labels)[0].backward()
    optimizer.step()


def run_resume(rank: int, out_dir: Path) -> dict:
    head, batches, x_eval = resume_problem()
    head.shard()
    optimizer = sgd(head)
    half = rows(rank, (4, 4))
    for x, labels in batches[:2]:
        step(head, optimizer, x[half], labels[half])
    optimizer_states = [optimizer.state_dict()]
    head.gather_optimizer_state(optimizer_states, param_index=0)
    checkpoint = {"state_dict": head.state_dict(), "optimizer_states": optimizer_states}
    if rank == 0:
        torch.save(checkpoint, out_dir / "resume.ckpt")
    logits = head(x_eval[rows(rank, (3, 3))])
    x, labels = batches[2]
    step(head, optimizer, x[half], labels[half])
    return {"logits": logits, "weight_after_step": head.state_dict()["weight"]}


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    out = Path(out_dir)
    results = {"heads": run_heads(rank), "ddp": run_ddp(rank), "sampled": run_sampled(rank), "resume": run_resume(rank, out)}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE)
