"""Two gloo processes train a CosFace head with the dynamic scale under DDP and record s.

python tests/scripts/ddp_dynamic_scale.py OUT_DIR writes OUT_DIR/rank{0,1}.json: the s after
each of STEPS training steps (`head.loss`) on equal halves of one batch (all ranks hold the same
batch size), then the statistics of one more step on those halves, which are the global batch's.
Run by tests/test_scale.py, which replays the same steps in one process on the whole batch
(`problem`, `train`, `statistics` and `HeadLoss` are shared with it).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facerec.heads import CosFace, DynamicScale, MarginHead

WORLD_SIZE, BATCH, STEPS = 2, 16, 3


class HeadLoss(nn.Module):
    """The head's training loss as a forward pass, so DDP's forward prepares its gradient reduction."""

    def __init__(self, head: CosFace):
        super().__init__()
        self.head = head

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(embeddings, labels)[0]


def problem() -> tuple[CosFace, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = MarginHead(8, 30, CosFace(m=0.35), DynamicScale(max_scale=math.inf))  # uncapped: s moves every step
    return head, torch.randn(BATCH, 8), torch.randint(0, 30, (BATCH,))


def train(model: nn.Module, head: CosFace, x: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """STEPS SGD steps on (x, labels); the s after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(x, labels).backward()
        optimizer.step()
        history.append(head.scale.value)
    return history


def statistics(head: CosFace, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The diagnostics of one more (gradient-free) step."""
    with torch.no_grad():
        return {key: value.item() for key, value in head.loss(x, labels, statistics=True)[1].items()}


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    head, x, labels = problem()
    # broadcast_buffers=False: each rank keeps the s it computed, so equal values prove the sync.
    model = DistributedDataParallel(HeadLoss(head), broadcast_buffers=False)
    x, labels = x.chunk(WORLD_SIZE)[rank], labels.chunk(WORLD_SIZE)[rank]
    result = {"steps": train(model, head, x, labels), "statistics": statistics(head, x, labels)}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's finalisation: there, about one run in 25 aborted with
    # "terminate called without an active exception" (gloo's threads torn down while Python
    # objects die, pytorch/pytorch#179291), after the results above were written.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE)
