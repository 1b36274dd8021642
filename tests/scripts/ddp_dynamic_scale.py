"""Two gloo processes train a CosFace head with the dynamic scale under DDP and record s.

python tests/scripts/ddp_dynamic_scale.py OUT_DIR writes OUT_DIR/rank{0,1}.json: the s
after each of STEPS training steps on equal halves of one batch, then the s of a forward
pass on an uneven split (BATCH = 11 + 5). Run by tests/test_scale.py, which replays the
same steps in one process on the whole batch (`problem`, `train` are shared with it).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from facerec.heads import CosFace, DynamicScale

WORLD_SIZE, BATCH, STEPS, UNEVEN_SPLIT = 2, 16, 3, (11, 5)


def problem() -> tuple[CosFace, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = CosFace(8, 30, scale=DynamicScale(max_scale=math.inf), m=0.35)  # uncapped: s moves every step
    return head, torch.randn(BATCH, 8), torch.randint(0, 30, (BATCH,))


def train(model: torch.nn.Module, head: CosFace, x: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """STEPS SGD steps on (x, labels); the s after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(model(x, labels), labels).backward()
        optimizer.step()
        history.append(head.scale.value)
    return history


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    head, x, labels = problem()
    # broadcast_buffers=False: each rank keeps the s it computed, so equal values prove the sync.
    model = DistributedDataParallel(head, broadcast_buffers=False)
    history = train(model, head, x.chunk(WORLD_SIZE)[rank], labels.chunk(WORLD_SIZE)[rank])
    with torch.no_grad():
        head(x.split(UNEVEN_SPLIT)[rank], labels.split(UNEVEN_SPLIT)[rank])
    result = {"steps": history, "uneven": head.scale.value}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE)
