"""Two gloo processes score evaluation protocols of every kind through EvaluationMetric, the path of
validation during training: pairs, IJB templates (1:1) and IJB 1:N.

Usage: python ddp_evaluation_metric.py OUT_DIR IJB_ROOT  (writes OUT_DIR/rank<r>.json)

Each rank embeds only its DistributedSampler shard (shuffled, and padded to equal shards by
repeating images: the pair set's 105 images become 2 x 53). `compute` must gather every rank's
(index, embedding) rows before scoring, so both ranks report the result of a single-process
evaluation (tests/test_extraction.py checks this).
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
from facerec.evaluation import EvaluationMetric, IjbIdentification, IjbVerification, PairVerification, embed

WORLD_SIZE = 2


def protocols_and_backbones(ijb_root: str) -> dict:
    """name -> (protocol, the same seeded, untrained backbone in every process, at the set's size)."""
    torch.manual_seed(0)
    small = build("tiny", width=4, input_size=32).eval()
    torch.manual_seed(0)
    full = build("tiny", width=4, input_size=112).eval()
    pairs = SyntheticPairs(num_identities=21, images_per_identity=5, num_pairs=100, image_size=32)
    return {
        "pairs": (PairVerification(pairs), small),
        "templates": (IjbVerification(ijb_root), full),
        "identification": (IjbIdentification(ijb_root), full),
    }


def worker(rank: int, port: int, out_dir: str, ijb_root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    record = {}
    for name, (protocol, backbone) in protocols_and_backbones(ijb_root).items():
        images = protocol.image_set()
        sampler = DistributedSampler(images, shuffle=True, seed=0)  # shuffled: order must not matter
        metric = EvaluationMetric(protocol)
        embedded = []
        with torch.no_grad():
            for batch, indices in DataLoader(images, batch_size=8, sampler=sampler):
                metric.update(embed(backbone, batch), indices)
                embedded += indices.tolist()
        evaluation = metric.compute()
        record[name] = {"embedded": embedded, "summary": evaluation.summary(), "notes": evaluation.result.notes}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    # fork: the workers inherit the imports (spawn would import torch and lightning twice more).
    mp.start_processes(worker, args=(free_port(), sys.argv[1], sys.argv[2]), nprocs=WORLD_SIZE, start_method="fork")
