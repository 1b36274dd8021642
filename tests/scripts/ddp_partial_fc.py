"""Two gloo processes run class-sharded heads (Partial FC centres) in float64 and record what they computed.

python tests/scripts/ddp_partial_fc.py OUT_DIR writes OUT_DIR/rank{0,1}.pt (torch.save of plain
tensors and dicts), which tests/test_partial_fc.py compares with the dense head in one process on
the same global batch (the problems below are shared with it). Both ranks hold equal batches
(BATCH / 2 each), as the head contract requires; the shards are unequal (C = 7 over 2 ranks).

- "heads": for every head x scale policy, sample_rate = 1, one training step (`head.loss` with
  statistics, then backward): the loss, this rank's regulariser term, this rank's embedding
  gradient, the gathered gradient of all class centres, the s used, the statistics, the buffers
  after the step and the cosines of this rank's embeddings to every class (`head.cosine`).
- "binary": the same for every sigmoid head x fixed or automatic scale (the heads that refuse
  scale=dynamic, kept out of HEADS, which tests/test_heads.py runs with it), on embeddings near
  their own class's centre (`binary_problem`), plus the gradient and value of the learned bias.
- "shard": what `shard()` returned, and the refusal of `head(embeddings, labels)` once sharded.
- "ddp", "binary_ddp": a linear backbone under DistributedDataParallel with the shard kept out of
  its all-reduce: every parameter's gradient after DDP's averaging (MagFace, whose regulariser is
  per rank; UniFace, whose bias stays in the all-reduce), the shard's gathered.
- "sampled", "binary_sampled": sample_rate < 1: the loss, the classes each rank sampled and their
  weights in a loss summed over classes (CosFace; UniFace's UCE-mb-lambda, negatives weighted 0.5).
- "resume": SGD with momentum for two steps, then a checkpoint (full weights, buffers and optimizer
  state, written by rank 0 as the LightningModule's hooks do), the logits of a batch, and the
  state dict after one more step (the full weights on rank 0, its own rows on rank 1).
- "inference_with_grad": the error, if any, of `head(embeddings)` with grad mode on.
"""
from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from facerec import distributed
from facerec.heads import (
    AdaCos,
    AdaFace,
    ArcFace,
    AutoMarginScale,
    AutoScale,
    ClassCentres,
    CombinedMargin,
    CosFace,
    CurricularFace,
    DynamicScale,
    ElasticFace,
    FixedScale,
    MagFace,
    MarginHead,
    NormFace,
    PartialFC,
    SphereFace,
    SphereFace2,
    SubCenterArcFace,
    UniFace,
    shard_range,
)

WORLD_SIZE = 2
HEADS = {
    "normface": (NormFace, {}),
    "cosface": (CosFace, {}),
    "arcface": (ArcFace, {}),
    "sphereface": (SphereFace, {}),
    "combined": (CombinedMargin, {}),
    "adacos": (AdaCos, {}),
    "adaface": (AdaFace, {}),
    "magface": (MagFace, {}),
    "elastic_arc": (ElasticFace, {"kind": "arc"}),
    "elastic_cos": (ElasticFace, {"m": 0.35, "kind": "cos"}),
    "elastic_arc_plus": (ElasticFace, {"std": 0.0175, "kind": "arc", "plus": True}),
    "elastic_cos_plus": (ElasticFace, {"m": 0.35, "std": 0.025, "kind": "cos", "plus": True}),
    "curricularface": (CurricularFace, {}),
    "subcenter": (SubCenterArcFace, {}),
}
# sigmoid heads: scale=dynamic refuses them, so they run with the scale policies in BINARY_SCALES
BINARY_HEADS = {
    "sphereface2": (SphereFace2, {}),
    "sphereface2_a": (SphereFace2, {"margin_type": "A"}),
    "sphereface2_m": (SphereFace2, {"margin_type": "M", "m": 1.5}),
    "uniface": (UniFace, {}),
    "uniface_mb": (UniFace, {"m": 0.4, "lam": 0.5, "r": 2.0}),
}
SCALES = {"fixed": lambda: FixedScale(30.0), "auto": AutoScale, "auto_margin": AutoMarginScale, "dynamic": lambda: DynamicScale(max_scale=math.inf)}  # uncapped: s moves
BINARY_SCALES = ("fixed", "auto")
BATCH = 10  # the global batch: 5 samples on each rank
SAMPLE_RATE = 0.25
MOMENTUM, WEIGHT_DECAY, LR = 0.9, 5e-4, 0.5


def problem(num_classes: int, embedding_size: int, batch: int, seed: int, norm: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of norms ~2 norm (inside MagFace's [10, 110] for the default) and their labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, embedding_size, generator=generator, dtype=torch.float64) * norm
    return x, torch.randint(0, num_classes, (batch,), generator=generator)


def build_head(name: str, scale: str, num_classes: int, embedding_size: int, sample_rate: float | None = None) -> MarginHead:
    """The float64 head (same weights on every rank and in the test process): dense, or with Partial
    FC's class centres at `sample_rate` (sharded once `shard()` runs)."""
    torch.manual_seed(1)
    head_cls, kwargs = HEADS[name] if name in HEADS else BINARY_HEADS[name]
    centres = ClassCentres if sample_rate is None else partial(PartialFC, sample_rate=sample_rate)
    return MarginHead(embedding_size, num_classes, head_cls(**kwargs), SCALES[scale](), centres=centres).double()


def binary_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings at cosines from -0.7 to 0.95 to their own class's centre (build_head's centres):
    a sigmoid head's bias starts where features at 90 degrees to every centre balance, so on
    random embeddings P(target) at s = 30 is below 1e-3 for nearly every sample; here some P lie
    near 0, some near 1 and some between, for every head and scale."""
    noise, labels = problem(7, 5, BATCH, seed=0, norm=1.0)
    centres = F.normalize(build_head("uniface", "fixed", 7, 5).centres.weight.detach())
    return centres[labels] * torch.linspace(0, 4, BATCH, dtype=torch.float64).unsqueeze(1) + noise, labels


def rows(rank: int, batch: int) -> slice:
    """This rank's equal share of a global batch."""
    share = batch // WORLD_SIZE
    return slice(rank * share, (rank + 1) * share)


def every_rank_s_rows(head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """The full (C K, ...) tensor from each rank's rows, on every rank (`gather_rows` gives it to
    rank 0 only, for checkpoints): the test compares every rank's."""
    k = head.centres.centres_per_class
    return distributed.all_gather_uneven(rows, [shard_range(head.num_classes, WORLD_SIZE, rank)[1] * k for rank in range(WORLD_SIZE)])


def buffers(head: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in head.named_buffers()}


def sharded_step(name: str, scale: str, x: torch.Tensor, labels: torch.Tensor, rank: int) -> tuple[MarginHead, dict]:
    """One training step of the sharded head (C = 7, d = 5) on this rank's share of the global batch:
    (the head after it, what the test compares)."""
    head = build_head(name, scale, 7, 5, sample_rate=1.0)
    head.shard()
    mine = rows(rank, len(x))
    x_local = x[mine].clone().requires_grad_()
    loss, stats = head.loss(x_local, labels[mine], statistics=True)
    loss.backward()
    regulariser = head.margin.regulariser(x_local.detach().norm(dim=1))
    with torch.no_grad():  # inference, as validation runs it
        cosine = head.cosine(x_local.detach())
    return head, {
        "loss": loss.detach(),
        "regulariser": torch.zeros((), dtype=torch.float64) if regulariser is None else regulariser,
        "grad_x": x_local.grad,
        "grad_weight": every_rank_s_rows(head, head.centres.weight.grad),
        "s": torch.tensor(head.scale.value, dtype=torch.float64),
        "statistics": stats,
        "buffers": buffers(head),
        "cosine": cosine,
    }


def run_heads(rank: int) -> dict:
    x, labels = problem(7, 5, BATCH, seed=0)
    return {f"{name}/{scale}": sharded_step(name, scale, x, labels, rank)[1] for name in HEADS for scale in SCALES}


def run_binary(rank: int) -> dict:
    x, labels = binary_problem()
    results = {}
    for name in BINARY_HEADS:
        for scale in BINARY_SCALES:
            head, result = sharded_step(name, scale, x, labels, rank)
            bias = head.margin.bias
            results[f"{name}/{scale}"] = {**result, "grad_bias": bias.grad, "bias": bias.detach().clone()}
    return results


def run_shard(rank: int) -> dict:
    x, labels = problem(7, 5, BATCH, seed=0)
    head = build_head("cosface", "auto", 7, 5, sample_rate=1.0)
    ignored = head.shard()
    try:
        head(x[rows(rank, BATCH)], labels[rows(rank, BATCH)])
        refusal = ""
    except TypeError as error:
        refusal = str(error)
    return {"ignored": ignored, "refusal": refusal}


class Model(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.backbone = nn.Linear(3, 5).double()
        self.head = head

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(self.backbone(images), labels)[0]


def ddp_model(name: str) -> Model:
    torch.manual_seed(2)
    return Model(build_head(name, "auto", 7, 5, sample_rate=1.0))


def ddp_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose embeddings have norms inside MagFace's [10, 110], so its regulariser has a gradient."""
    return problem(7, 3, BATCH, seed=3, norm=20.0)[0], problem(7, 5, BATCH, seed=0)[1]


def run_ddp(rank: int, name: str) -> dict:
    """Every parameter's gradient after DDP's backward, by name (the shard's gathered from all ranks)."""
    images, labels = ddp_problem()
    model = ddp_model(name)
    ignored = [f"head.{key}" for key in model.head.shard()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    wrapped = DistributedDataParallel(model)  # kept alive until backward: its reducer all-reduces then
    mine = rows(rank, BATCH)
    wrapped(images[mine], labels[mine]).backward()
    grads = {key: parameter.grad for key, parameter in model.named_parameters()}
    grads["head.centres.weight"] = every_rank_s_rows(model.head, grads["head.centres.weight"])
    return grads


def run_sampled(rank: int, name: str) -> dict:
    x, labels = problem(40, 6, 12, seed=4)
    head = build_head(name, "auto", 40, 6, sample_rate=SAMPLE_RATE)
    head.shard()
    torch.manual_seed(10 + rank)
    loss, _ = head.loss(x[rows(rank, 12)], labels[rows(rank, 12)])
    return {"loss": loss.detach(), "sampled": head.centres.sampled, "weights": head.centres.sampled_weights}


def sgd(head: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(head.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def resume_problem() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """A head with state (CurricularFace's t), C = 9 (rows 5 + 4), three training batches of 8 and
    an evaluation batch of 6."""
    head = build_head("curricularface", "auto", 9, 6, sample_rate=1.0)
    batches = [problem(9, 6, 8, seed=20 + step) for step in range(3)]
    return head, batches, problem(9, 6, 6, seed=30)[0]


def step(head: nn.Module, optimizer, x: torch.Tensor, labels: torch.Tensor) -> None:
    optimizer.zero_grad()
    head.loss(x, labels)[0].backward()
    optimizer.step()


def run_resume(rank: int, out_dir: Path) -> dict:
    head, batches, x_eval = resume_problem()
    head.shard()
    optimizer = sgd(head)
    half = rows(rank, 8)
    for x, labels in batches[:2]:
        step(head, optimizer, x[half], labels[half])
    optimizer_states = [optimizer.state_dict()]
    head.gather_optimizer_state(optimizer_states, param_index=0)
    checkpoint = {"state_dict": head.state_dict(), "optimizer_states": optimizer_states}
    if rank == 0:
        torch.save(checkpoint, out_dir / "resume.ckpt")
    with torch.no_grad():
        logits = head(x_eval[rows(rank, 6)])
    x, labels = batches[2]
    step(head, optimizer, x[half], labels[half])
    return {"logits": logits, "state_after_step": head.state_dict()}


def run_inference_with_grad(rank: int) -> str:
    """`head(embeddings)` of a sharded head with grad mode on (the centres require grad), a few
    times: the first error, or "" if every call returned."""
    head = build_head("cosface", "auto", 7, 5, sample_rate=1.0)
    head.shard()
    x = problem(7, 5, BATCH, seed=0)[0][rows(rank, BATCH)]
    for _ in range(8):
        try:
            head(x)
        except RuntimeError as error:
            return str(error)
    return ""


def worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD_SIZE)
    out = Path(out_dir)
    results = {
        "heads": run_heads(rank),
        "binary": run_binary(rank),
        "shard": run_shard(rank),
        "ddp": run_ddp(rank, "magface"),
        "binary_ddp": run_ddp(rank, "uniface"),
        "sampled": run_sampled(rank, "cosface"),
        "binary_sampled": run_sampled(rank, "uniface_mb"),
        "resume": run_resume(rank, out),
        "inference_with_grad": run_inference_with_grad(rank),  # last: a failed collective stays the last one
    }
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD_SIZE)
