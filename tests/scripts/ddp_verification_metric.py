"""Two gloo processes score one verification set through VerificationMetric.

Usage: python ddp_verification_metric.py OUT_DIR  (writes OUT_DIR/rank<r>.json)

The set has 105 images: DistributedSampler pads the two shards to 53 each by
repeating one image, and each rank embeds only its shard. `compute` must gather
every rank's (index, embedding) rows before scoring, so both ranks report the
result of a single-process evaluation (tests/test_evaluation.py checks this).
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler

from facerec.backbones import build
from facerec.data import SyntheticPairs
from facerec.evaluation import VerificationMetric, embed

WORLD_SIZE = 2


def set_and_backbone():
    """The same set and (seeded, untrained) backbone in every process."""
    torch.manual_seed(0)
    backbone = build("tiny", width=4, input_size=32).eval()
    return SyntheticPairs(num_identities=21, images_per_identity=5, num_pairs=100, image_size=32), backbone


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    dataset, backbone = set_and_backbone()
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)  # shuffled: order must not matter
    metric = VerificationMetric.for_set(dataset)
    embedded = []
    with torch.no_grad():
        for images, indices in DataLoader(dataset, batch_size=8, sampler=sampler):
            metric.update(embed(backbone, images), indices)
            embedded += indices.tolist()
    result = metric.compute()
    record = dict(embedded=embedded, fold_policy=result.fold_policy, **result.summary())
    record["fold_accuracies"] = result.fold_accuracies
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # fork: the workers inherit the imports (spawn would import torch and lightning twice more).
    mp.start_processes(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD_SIZE, start_method="fork")
