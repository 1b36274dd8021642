"""RNG states in checkpoints: each rank's own (torch, its device's CUDA generator, numpy, python),
resumable on any number of devices. CUDA's RNG functions are faked on this CPU machine."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from facerec import distributed
from facerec.training import checkpoints


class FakeCuda:
    """A node of `devices` GPUs as one process sees it: a generator state per device, one current device."""

    def __init__(self, monkeypatch, devices: int, current: int = 0):
        self.states = [torch.full((16,), i, dtype=torch.uint8) for i in range(devices)]
        self.current = current
        for name, value in {
            "is_initialized": lambda: True,
            "is_available": lambda: True,
            "device_count": lambda: devices,
            "current_device": lambda: self.current,
            "get_rng_state": lambda device="cuda": self.states[self.current].clone(),
            "get_rng_state_all": lambda: [state.clone() for state in self.states],
            "set_rng_state": self._set,
            "set_rng_state_all": self._set_all,
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def _set(self, state, device="cuda"):
        self.states[self.current] = state.clone()

    def _set_all(self, states):
        for index, state in enumerate(states):  # torch's own: indexes its per-device generators
            if index >= len(self.states):
                raise IndexError("list index out of range")
            self.states[index] = state.clone()


def eight_rank_checkpoint(monkeypatch) -> dict:
    """The RNG states as 8 ranks on 8 GPUs save them: rank r's device r has state r, its CPU seed r."""
    ranks = []
    for rank in range(8):
        cuda = FakeCuda(monkeypatch, devices=8, current=rank)
        cuda.states[rank] = torch.full((16,), 100 + rank, dtype=torch.uint8)
        torch.manual_seed(rank), np.random.seed(rank), random.seed(rank)
        ranks.append(checkpoints._local_rng_state())
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: list(ranks))
    saved = checkpoints.rng_states()
    buffer = io.BytesIO()
    torch.save(saved, buffer)  # weights-only loadable, as every checkpoint here
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_checkpoint_from_8_devices_resumes_on_fewer_with_each_ranks_own_state(monkeypatch, world_size):
    states = eight_rank_checkpoint(monkeypatch)
    for rank in range(world_size):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, world_size))
        cuda = FakeCuda(monkeypatch, devices=world_size, current=rank)
        checkpoints.set_rng_states(states)
        assert torch.equal(cuda.states[rank], torch.full((16,), 100 + rank, dtype=torch.uint8))  # its own, not rank 0's
        torch.manual_seed(rank)
        expected = torch.rand(3)
        checkpoints.set_rng_states(states)
        assert torch.equal(torch.rand(3), expected)  # the CPU generator is rank `rank`'s too
        np.random.seed(rank)
        assert np.random.rand() == pytest.approx(np.random.RandomState(rank).rand())


def test_a_rank_the_checkpoint_does_not_know_keeps_its_seeded_state(monkeypatch, caplog):
    states = eight_rank_checkpoint(monkeypatch)
    monkeypatch.setattr(distributed, "world", lambda: (9, 10))
    cuda = FakeCuda(monkeypatch, devices=10, current=9)
    before = cuda.states[9].clone()
    checkpoints.set_rng_states(states)
    assert torch.equal(cuda.states[9], before) and "rank 9 keeps its seeded generators" in caplog.text


def test_an_older_checkpoint_with_every_devices_state_resumes_on_one_device(monkeypatch):
    """Before per-rank states a checkpoint held get_rng_state_all() of the 8 devices rank 0 saw;
    torch.cuda.set_rng_state_all with them raised IndexError on a machine with fewer GPUs."""
    FakeCuda(monkeypatch, devices=8)
    old = {key: value for key, value in checkpoints._local_rng_state().items() if key != "cuda"}
    old["cuda"] = [torch.full((16,), 50 + i, dtype=torch.uint8) for i in range(8)]
    cuda = FakeCuda(monkeypatch, devices=1)
    with pytest.raises(IndexError):
        torch.cuda.set_rng_state_all(old["cuda"])  # what resuming did before
    checkpoints.set_rng_states(old)
    assert torch.equal(cuda.states[0], old["cuda"][0])
