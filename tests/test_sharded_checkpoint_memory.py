"""Saving a class-sharded head (Partial FC) on two gloo ranks: only rank 0 holds the full tensors.

Lightning builds the state dict and runs `on_save_checkpoint` on every rank and rank 0 alone writes
the file, so only rank 0 may build the full (C K, d) weight and per-row optimizer state in host
memory. Each rank measures its own peak resident memory above its resident memory before
`state_dict()` and before `gather_optimizer_state` (VmHWM, reset through /proc/self/clear_refs), at
C = 400,000 and d = 128 in float32: the full matrix is 205 MB, a shard 102 MB. A small problem with
uneven shards and two centres per class checks what each rank gets and that the saved checkpoint
re-shards on load.

python tests/test_sharded_checkpoint_memory.py OUT_DIR runs the two ranks (what the test runs) and
prints each rank's peak increases; they write OUT_DIR/rank{0,1}.pt.
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import run_script
from facerec.heads import CosFace, FixedScale, MarginHead, PartialFC, SubCenterArcFace

WORLD_SIZE = 2
NUM_CLASSES, EMBEDDING_SIZE = 400_000, 128
FULL_BYTES = NUM_CLASSES * EMBEDDING_SIZE * 4  # float32
BATCH = 8  # the global batch: 4 samples on each rank


def resident_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_increase(call):
    """(call(), its peak resident memory above the resident memory before it, in bytes)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to VmRSS
    before = resident_bytes("VmRSS")
    result = call()
    return result, resident_bytes("VmHWM") - before


def train_one_step(head: nn.Module, rank: int, seed: int) -> torch.optim.Optimizer:
    """SGD with momentum after one `head.loss` step on this rank's half of a global batch."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, head.embedding_size, generator=generator) * 10
    labels = torch.randint(0, head.num_classes, (BATCH,), generator=generator)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    half = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
    head.loss(x[half], labels[half])[0].backward()
    optimizer.step()
    optimizer.zero_grad()  # frees the gradient: only the weight and its momentum stay
    return optimizer


def sharded_subcenter_head(seed: int) -> MarginHead:
    """C = 9 classes of 2 centres: rows 10 on rank 0, 8 on rank 1."""
    torch.manual_seed(seed)
    head = MarginHead(6, 9, SubCenterArcFace(centres=2), FixedScale(30.0), centres=PartialFC)
    head.shard()
    return head


def run_round_trip(rank: int, out_dir: Path) -> dict:
    """What each rank saves, and what a fresh sharded head loads from the checkpoint rank 0 wrote."""
    head = sharded_subcenter_head(seed=0)
    optimizer = train_one_step(head, rank, seed=1)
    optimizer_states = [optimizer.state_dict()]
    head.gather_optimizer_state(optimizer_states, param_index=0)
    state_dict = head.state_dict()
    saved_momentum = optimizer_states[0]["state"][0]["momentum_buffer"]
    if rank == 0:
        torch.save({"state_dict": state_dict, "optimizer_states": optimizer_states}, out_dir / "checkpoint.pt")
    dist.barrier()
    checkpoint = torch.load(out_dir / "checkpoint.pt", weights_only=True)
    loaded = sharded_subcenter_head(seed=2)  # other weights, overwritten by the load
    loaded.load_state_dict(checkpoint["state_dict"])
    loaded_optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1, momentum=0.9)
    loaded.shard_optimizer_state(checkpoint["optimizer_states"], param_index=0)
    loaded_optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    # this rank's own (unwritten) state dict loads into a head sharded the same way
    own = sharded_subcenter_head(seed=2)
    own.load_state_dict(state_dict)
    own_optimizer = torch.optim.SGD(own.parameters(), lr=0.1, momentum=0.9)
    own.shard_optimizer_state(optimizer_states, param_index=0)
    own_optimizer.load_state_dict(optimizer_states[0])
    return {
        "shard": head.centres.weight.detach().clone(),
        "momentum": optimizer.state[head.centres.weight]["momentum_buffer"].clone(),
        "saved_weight": state_dict["centres.weight"],
        "saved_momentum": saved_momentum,
        "loaded_weight": loaded.centres.weight.detach(),
        "loaded_momentum": loaded_optimizer.state[loaded.centres.weight]["momentum_buffer"],
        "own_weight": own.centres.weight.detach(),
        "own_momentum": own_optimizer.state[own.centres.weight]["momentum_buffer"],
    }


def run_memory(rank: int) -> dict:
    """Peak host memory increases (bytes) of `state_dict()` and `gather_optimizer_state` at C = 400,000."""
    torch.manual_seed(0)
    head = MarginHead(EMBEDDING_SIZE, NUM_CLASSES, CosFace(), FixedScale(30.0), centres=PartialFC)
    head.shard()
    optimizer = train_one_step(head, rank, seed=3)
    state_dict, state_dict_increase = peak_increase(head.state_dict)
    weight_rows = len(state_dict["centres.weight"])
    del state_dict
    optimizer_states = [optimizer.state_dict()]
    _, optimizer_increase = peak_increase(lambda: head.gather_optimizer_state(optimizer_states, param_index=0))
    return {
        "state_dict": state_dict_increase,
        "optimizer_state": optimizer_increase,
        "weight_rows": weight_rows,
        "momentum_rows": len(optimizer_states[0]["state"][0]["momentum_buffer"]),
        "shard_bytes": head.centres.weight.nelement() * head.centres.weight.element_size(),
    }


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    out = Path(out_dir)
    results = {"round_trip": run_round_trip(rank, out), "memory": run_memory(rank)}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


# ------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharded_checkpoint_memory")
    run_script([__file__, str(out)], timeout=120)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("call", ["state_dict", "optimizer_state"])
def test_only_rank_0_builds_the_full_tensor_in_host_memory(ranks, call):
    rank0, rank1 = (rank["memory"] for rank in ranks)
    assert rank0["weight_rows"] == rank0["momentum_rows"] == NUM_CLASSES
    assert 0.95 * FULL_BYTES <= rank0[call] < 1.25 * FULL_BYTES  # the full tensor once, no CPU staging copy
    assert rank1[call] < 0.6 * FULL_BYTES, f"rank 1's {call} took {rank1[call] / 1e6:.0f} MB"
    assert rank1["weight_rows"] == rank1["momentum_rows"] == NUM_CLASSES // WORLD_SIZE  # its own rows


def test_rank_0_saves_every_rank_s_rows_and_the_others_their_own(ranks):
    rank0, rank1 = (rank["round_trip"] for rank in ranks)
    assert len(rank0["shard"]) == 10 and len(rank1["shard"]) == 8  # uneven shards, 2 centres per class
    assert torch.equal(rank0["saved_weight"], torch.cat([rank0["shard"], rank1["shard"]]))
    assert torch.equal(rank0["saved_momentum"], torch.cat([rank0["momentum"], rank1["momentum"]]))
    assert torch.equal(rank1["saved_weight"], rank1["shard"])
    assert torch.equal(rank1["saved_momentum"], rank1["momentum"])


def test_the_saved_checkpoint_and_each_rank_s_own_state_load_back_into_its_rows(ranks):
    for rank in ranks:
        result = rank["round_trip"]
        for source in ("loaded", "own"):
            assert torch.equal(result[f"{source}_weight"], result["shard"]), source
            assert torch.equal(result[f"{source}_momentum"], result["momentum"]), source


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE)
    print(f"C = {NUM_CLASSES}, d = {EMBEDDING_SIZE}, float32: full {FULL_BYTES / 1e6:.0f} MB")
    for rank in range(WORLD_SIZE):
        memory = torch.load(Path(sys.argv[1]) / f"rank{rank}.pt", weights_only=True)["memory"]
        print(
            f"rank {rank}: shard {memory['shard_bytes'] / 1e6:.0f} MB, peak host memory increase "
            f"state_dict {memory['state_dict'] / 1e6:.0f} MB, gather_optimizer_state {memory['optimizer_state'] / 1e6:.0f} MB"
        )
