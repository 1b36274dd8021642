"""What `compile.*` compiles, and that compiled runs compute what eager ones do.

- The flip test and the validation metric under CUDA graphs (compile.mode=reduce-overhead or
  max-autotune): a compiled backbone then returns one static output buffer that its next replay
  overwrites. A CPU stand-in does exactly that, so `embed` must copy every output out and start a
  new CUDA-graph step before every call.
- compile.head=true compiles `head.loss`, the method training calls (not only `head.__call__`):
  graphs are compiled, and the loss, the gradients, the statistics and the head's state after the
  step equal eager ones, dense and class-sharded over two gloo processes.
"""
from __future__ import annotations

import copy
import functools
import importlib
import pickle
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch.utils.data import DataLoader

from facerec.data import VerificationSet
from facerec.evaluation import EvaluationMetric, PairVerification, embed, extract_embeddings
from facerec.heads import AdaFace, CosFace, DynamicScale, FixedScale, MarginHead, PartialFC, SubCenterArcFace
from facerec.training.fit import compile_model
from facerec.training.module import FaceRecognitionModule

EMBEDDING_SIZE = 6


# ------------------------------------------------------------ CUDA-graph outputs
class CudaGraphSteps:
    """Stands in for torch.compiler.cudagraph_mark_step_begin: counts the steps begun."""

    def __init__(self):
        self.count = 0

    def mark_step_begin(self) -> None:
        self.count += 1


class StaticOutputBackbone(nn.Module):
    """A backbone as CUDA graphs run it: every call writes its (B, d) output into the same
    preallocated buffer (one per batch size, as one graph is recorded per shape) and returns that
    buffer. Records the CUDA-graph step each call ran in."""

    def __init__(self, steps: CudaGraphSteps, image_size: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        # a plain tensor, not a parameter: the function only (extraction runs it on the CPU)
        self.projection = torch.randn(3 * image_size * image_size, EMBEDDING_SIZE, generator=generator)
        self.outputs: dict[int, torch.Tensor] = {}
        self.steps, self.call_steps = steps, []

    def reference(self, images: torch.Tensor) -> torch.Tensor:
        """What the backbone computes, in fresh memory."""
        return images.flatten(1) @ self.projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.call_steps.append(self.steps.count)
        output = self.outputs.setdefault(len(images), torch.empty(len(images), EMBEDDING_SIZE))
        return torch.mm(images.flatten(1), self.projection, out=output)


@pytest.fixture
def cudagraph_steps(monkeypatch) -> CudaGraphSteps:
    # A run compiled with CUDA graphs has imported inductor's CUDA-graph trees (embed marks steps only then).
    importlib.import_module("torch._inductor.cudagraph_trees")
    steps = CudaGraphSteps()
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", steps.mark_step_begin)
    return steps


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_the_flip_test_of_a_backbone_that_reuses_its_output_buffer(cudagraph_steps):
    backbone = StaticOutputBackbone(cudagraph_steps)
    x = images(5, seed=1)
    plain, flipped = backbone.reference(x), backbone.reference(x.flip(-1))
    assert not torch.allclose(plain, flipped)  # the flip changes the embedding: the test can tell them apart
    torch.testing.assert_close(embed(backbone, x, "sum"), plain + flipped)
    torch.testing.assert_close(embed(backbone, x, "concat"), torch.cat([plain, flipped], dim=1))
    torch.testing.assert_close(embed(backbone, x, "none"), plain)
    # every call ran in a CUDA-graph step of its own: 5 calls, 5 steps begun before them
    assert backbone.call_steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("flip", ["sum", "concat", "none"])
def test_embeddings_a_metric_keeps_survive_the_next_batches(cudagraph_steps, flip):
    backbone = StaticOutputBackbone(cudagraph_steps)
    batches = [images(4, seed) for seed in range(3)]
    metric = EvaluationMetric(PairVerification(VerificationSet("twelve", 12, pairs=[[0, 1]], issame=[True])))
    for index, batch in enumerate(batches):  # what validation_step does, batch after batch
        metric.update(embed(backbone, batch, flip), torch.arange(4 * index, 4 * index + 4))
    for kept, batch in zip(metric.embeddings, batches):
        expected = {
            "sum": backbone.reference(batch) + backbone.reference(batch.flip(-1)),
            "concat": torch.cat([backbone.reference(batch), backbone.reference(batch.flip(-1))], dim=1),
            "none": backbone.reference(batch),
        }[flip]
        torch.testing.assert_close(kept, expected)


def test_extraction_with_a_backbone_that_reuses_its_output_buffer(cudagraph_steps):
    backbone = StaticOutputBackbone(cudagraph_steps)
    x = images(10, seed=2)
    dataset = [(image, index) for index, image in enumerate(x)]
    table = extract_embeddings(backbone, DataLoader(dataset, batch_size=4))  # batches of 4, 4 and 2
    torch.testing.assert_close(table, backbone.reference(x) + backbone.reference(x.flip(-1)))


def test_without_cuda_graphs_marking_steps_neither_imports_inductor_nor_changes_embeddings():
    # a fresh interpreter: this one has imported inductor's CUDA-graph trees in the tests above
    code = (
        "import sys, torch\n"
        "from facerec.evaluation.embeddings import embed\n"
        "backbone = torch.nn.Flatten()\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "assert torch.equal(embed(backbone, x), x.flatten(1) + x.flip(-1).flatten(1))\n"
        "assert 'torch._inductor.cudagraph_trees' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------ head.loss
HEADS = {
    "cosface + dynamic s": lambda: MarginHead(EMBEDDING_SIZE, 9, CosFace(), DynamicScale()),  # s is a buffer the step updates
    "adaface": lambda: MarginHead(EMBEDDING_SIZE, 9, AdaFace(), FixedScale(30.0)),  # EMA buffers, a per-sample margin
    "subcenter arcface": lambda: MarginHead(EMBEDDING_SIZE, 9, SubCenterArcFace(), FixedScale(30.0)),  # K centres per class
}


def counting_backend(graphs: list) -> Callable:
    """A dynamo backend that records every graph it is given and runs it through AOTAutograd
    (aot_eager: what inductor compiles, without generating code)."""
    aot_eager = lookup_backend("aot_eager")

    def backend(graph_module: torch.fx.GraphModule, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    return backend


def compiled_copy(head: nn.Module, backend, **options) -> nn.Module:
    """A copy of `head` (same weights and buffers) compiled as compile.head=true compiles it."""
    compiled = copy.deepcopy(head)
    module = FaceRecognitionModule(nn.Identity(), compiled, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    compile_model(module, {"head": True, "backend": backend, **options})
    return compiled


def training_step(head: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, statistics: bool):
    """head.loss forward and backward, as training_step and Lightning's backward run them."""
    embeddings = embeddings.clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss, stats = head.loss(embeddings, labels, statistics=statistics)
    loss.backward()
    return loss.detach(), stats, embeddings.grad, head.centres.weight.grad


def assert_same_step(compiled, eager) -> None:
    for ours, theirs in zip(compiled, eager):
        if isinstance(theirs, dict):
            assert ours.keys() == theirs.keys()
            for key in theirs:
                torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # dynamo caches compiled code per code object: every test compiles MarginHead.loss afresh
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(HEADS))
def test_compile_head_compiles_the_loss_training_calls_and_computes_the_eager_step(name):
    torch.manual_seed(0)
    eager = HEADS[name]()
    graphs = []
    compiled = compiled_copy(eager, counting_backend(graphs))
    embeddings, labels = torch.randn(8, EMBEDDING_SIZE) * 5, torch.randint(0, 9, (8,))
    for statistics in (False, True, False):  # a logging step between two plain ones, as training runs them
        graphs_before = len(graphs)
        ours = training_step(compiled, embeddings, labels, statistics)
        assert_same_step(ours, training_step(eager, embeddings, labels, statistics))
        if statistics:
            assert len(graphs) > graphs_before  # the logging step's own graphs
    assert graphs  # today's compile.head compiled head.__call__ only, which training never calls
    # the state after the steps (dynamic s, AdaFace's EMAs) and the checkpoint keys are the eager head's
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_a_compiled_head_copies_and_pickles_as_a_head():
    torch.manual_seed(0)
    compiled = compiled_copy(MarginHead(EMBEDDING_SIZE, 9, CosFace(), FixedScale(30.0)), "aot_eager")
    embeddings, labels = torch.randn(8, EMBEDDING_SIZE), torch.randint(0, 9, (8,))
    copied = copy.deepcopy(compiled)
    with torch.no_grad():
        copied.centres.weight.mul_(-1)  # the copy's loss must read the copy's centres, not the original's
    assert copied.loss.__self__ is copied and copied.loss.__func__ is compiled.loss.__func__
    reference = MarginHead(EMBEDDING_SIZE, 9, CosFace(), FixedScale(30.0))
    reference.load_state_dict(copied.state_dict())
    torch.testing.assert_close(copied.loss(embeddings, labels)[0], reference.loss(embeddings, labels)[0])
    # pickled (torch.save of the module, a spawned process), it comes back with the plain method,
    # as nn.Module.compile's compiled call does
    unpickled = pickle.loads(pickle.dumps(compiled))
    assert unpickled.loss.__func__ is MarginHead.loss and unpickled.loss.__self__ is unpickled
    torch.testing.assert_close(unpickled.loss(embeddings, labels)[0], compiled.loss(embeddings, labels)[0])


# ------------------------------------------- class-sharded: two gloo processes
WORLD_SIZE = 2


def sharded_worker(rank: int, out_dir: str) -> None:
    """One rank: the same class-sharded head eager and compiled, a plain step then a logging step
    on this rank's half of the batch; writes both steps' results and the graph count."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)
    eager = MarginHead(EMBEDDING_SIZE, 9, CosFace(), DynamicScale(), centres=PartialFC)
    eager.shard()
    graphs = []
    compiled = compiled_copy(eager, counting_backend(graphs))
    generator = torch.Generator().manual_seed(1)
    embeddings = (torch.randn(8, EMBEDDING_SIZE, generator=generator) * 5)[rank * 4 : rank * 4 + 4]
    labels = torch.randint(0, 9, (8,), generator=generator)[rank * 4 : rank * 4 + 4]
    results = {
        variant: [training_step(head, embeddings, labels, statistics) for statistics in (False, True)]
        for variant, head in [("eager", eager), ("compiled", compiled)]
    }
    results["graphs"] = len(graphs)
    results["s"] = [eager.scale.value, compiled.scale.value]
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # ~50 s: two spawned processes, each compiling the head twice
def test_a_compiled_class_sharded_head_computes_the_eager_step_on_two_processes(tmp_path):
    mp.spawn(sharded_worker, args=(str(tmp_path),), nprocs=WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert results["graphs"] > 0
        for compiled, eager in zip(results["compiled"], results["eager"]):
            assert_same_step(compiled, eager)
        assert results["s"][0] == pytest.approx(results["s"][1], rel=1e-6)
