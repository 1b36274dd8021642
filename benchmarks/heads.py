"""Forward + backward time of every head against a plain nn.Linear + cross-entropy, and against the
implementations a user would otherwise pick.

    python benchmarks/heads.py                  # B=256, d=512, C = 10,575 and 100,000, on CPU
    python benchmarks/heads.py --classes 85742 --repeats 9

Our heads run `head.loss(embeddings, labels)`, the path training takes. The reference columns:
pytorch-metric-learning's CosFaceLoss, ArcFaceLoss and SubCenterArcFaceLoss (the library itself,
where installed: the dev extra), and, re-created here from their published code with plain
autograd, the official AdaFace head (mk-minchul/AdaFace `head.py`: dense one-hot margins),
insightface arcface_torch's CombinedMarginLoss after a normalised linear layer (its ArcFace branch
edits the logits in place under no_grad), and the two sigmoid heads as their authors wrote them:
opensphere's SphereFace2 (`model/head/sphereface2.py`) and CVI-SZU/UniFace's unified cross-entropy
(`head.py`). Every configuration is timed in the same run, interleaved
round by round so that load from other processes hits all of them alike; the table reports the
fastest step of each (the least disturbed one, as `timeit` advises) and the ratio to the plain
linear layer (targets: <= 1.15x for the classic and per-sample heads, 1.2x with the dynamic scale,
1.25x for CurricularFace, 1.15x for the sigmoid heads, and Sub-center ArcFace <= 1.15x of `nn.Linear(d, 3C)`, its fair floor,
timed in the same run). The default clock is this process's CPU time on one thread (`--clock wall
--threads 2` measures wall time; CPU time counts busy-waiting threads).

Load changes the ratios, not only the times: other processes slow the baseline's memory-bound
passes more than the heads' (the head table once read 1.04-1.11x under load average 4-6 and
1.34-1.47x idle). The script prints the CPU model and the 1-minute load average before and after
the run, and marks the ratio tables as measured under load when either exceeds --max-load (default
1.5 on this 2-core machine: the benchmark's own thread adds 1.0 while it runs). Publish unmarked
tables only.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from facerec.heads import (
    AdaCos,
    AdaFace,
    ArcFace,
    AutoMarginScale,
    CombinedMargin,
    CosFace,
    CurricularFace,
    DynamicScale,
    ElasticFace,
    FixedScale,
    MagFace,
    MarginHead,
    NormFace,
    SphereFace,
    SphereFace2,
    SubCenterArcFace,
    UniFace,
)

S = 64.0  # the published s of the reference implementations; our heads use it too (the cost does not depend on s)
SPHEREFACE2_R = 40.0  # SphereFace2's published scale r

# name -> builder(d, C); every head with the fixed scale, plus the policies that cost something.
HEADS = {
    "normface": lambda d, c: MarginHead(d, c, NormFace(), FixedScale(S)),
    "cosface": lambda d, c: MarginHead(d, c, CosFace(), FixedScale(S)),
    "arcface": lambda d, c: MarginHead(d, c, ArcFace(), FixedScale(S)),
    "sphereface": lambda d, c: MarginHead(d, c, SphereFace(), FixedScale(S)),
    "combined": lambda d, c: MarginHead(d, c, CombinedMargin(), FixedScale(S)),
    "cosface + auto_margin": lambda d, c: MarginHead(d, c, CosFace(), AutoMarginScale()),
    "cosface + dynamic": lambda d, c: MarginHead(d, c, CosFace(), DynamicScale()),
    "adacos + dynamic": lambda d, c: MarginHead(d, c, AdaCos(), DynamicScale()),
    "adaface": lambda d, c: MarginHead(d, c, AdaFace(), FixedScale(S)),
    "magface": lambda d, c: MarginHead(d, c, MagFace(), FixedScale(S)),
    "elasticface (arc+)": lambda d, c: MarginHead(d, c, ElasticFace(std=0.0175, plus=True), FixedScale(S)),
    "curricularface": lambda d, c: MarginHead(d, c, CurricularFace(), FixedScale(S)),
    "subcenter arcface (K=3)": lambda d, c: MarginHead(d, c, SubCenterArcFace(), FixedScale(S)),
    "sphereface2 (C)": lambda d, c: MarginHead(d, c, SphereFace2(), FixedScale(SPHEREFACE2_R)),
    "uniface (UCE-m)": lambda d, c: MarginHead(d, c, UniFace(), FixedScale(S)),
}
BASELINE = "nn.Linear + cross-entropy"
WIDE_BASELINE = "nn.Linear(d, 3C) + cross-entropy"  # the floor of a classifier with 3 centres per class


class PlainLinear(nn.Module):
    """The baseline: an unnormalised linear classifier, logits = x W^T, then cross-entropy."""

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(embedding_size, num_classes, bias=False)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.linear(embeddings), labels)


class OfficialAdaFace(nn.Module):
    """The official AdaFace head's formulas (dense one-hot margins), then cross-entropy."""

    def __init__(self, embedding_size: int, num_classes: int, m=0.4, h=0.333, s=S, t_alpha=0.01, eps=1e-3):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(embedding_size, num_classes) * 0.01)
        self.m, self.h, self.s, self.t_alpha, self.eps = m, h, s, t_alpha, eps
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norms = embeddings.norm(dim=1, keepdim=True)
        cosine = (embeddings / norms) @ F.normalize(self.kernel, dim=0)
        cosine = cosine.clamp(-1 + self.eps, 1 - self.eps)
        safe_norms = norms.clamp(0.001, 100).detach()
        with torch.no_grad():
            self.batch_mean = safe_norms.mean() * self.t_alpha + (1 - self.t_alpha) * self.batch_mean
            self.batch_std = safe_norms.std() * self.t_alpha + (1 - self.t_alpha) * self.batch_std
        margin_scaler = ((safe_norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)
        one_hot = torch.zeros_like(cosine).scatter_(1, labels.view(-1, 1), 1.0)
        theta = cosine.acos()
        theta_m = (theta + one_hot * self.m * -margin_scaler).clamp(self.eps, math.pi - self.eps)
        logits = theta_m.cos() - one_hot * (self.m + self.m * margin_scaler)
        return F.cross_entropy(logits * self.s, labels)


class ArcFaceTorchCombined(nn.Module):
    """arcface_torch: a normalised linear layer, CombinedMarginLoss (m1=1, m2=0.5, m3=0: ArcFace), cross-entropy."""

    def __init__(self, embedding_size: int, num_classes: int, m2=0.5, s=S):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)
        self.m2, self.s = m2, s

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1, 1)
        index = torch.arange(len(labels))
        with torch.no_grad():  # as published: the margin is applied in place, outside autograd
            target_logit = logits[index, labels]
            target_logit.arccos_()
            logits.arccos_()
            logits[index, labels] = target_logit + self.m2
            logits.cos_()
        return F.cross_entropy(logits * self.s, labels)


class OfficialSphereFace2(nn.Module):
    """opensphere's SphereFace2 (margin type C): W renormalised in place, the similarity adjustment
    and margin as a detached shift, weighted binary cross-entropy over the dense (B, C) one-hot."""

    def __init__(self, embedding_size: int, num_classes: int, lam=0.7, r=SPHEREFACE2_R, m=0.4, t=3.0, lw=50.0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(embedding_size, num_classes) * 0.01)
        self.b = nn.Parameter(torch.zeros(1))
        self.lam, self.r, self.m, self.t, self.lw, self.num_classes = lam, r, m, t, lw, num_classes

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.w.data = F.normalize(self.w.data, dim=0)
        cos_theta = F.normalize(embeddings, dim=1).mm(self.w)
        one_hot = torch.zeros_like(cos_theta).scatter_(1, labels.view(-1, 1), 1.0)
        with torch.no_grad():
            g_cos_theta = 2.0 * ((cos_theta + 1.0) / 2.0).pow(self.t) - 1.0
            d_theta = g_cos_theta - self.m * (2.0 * one_hot - 1.0) - cos_theta
        logits = self.r * (cos_theta + d_theta) + self.b
        weight = self.lam * one_hot + (1.0 - self.lam) * (1.0 - one_hot)
        weight = self.lw * self.num_classes / self.r * weight
        return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)


class OfficialUniFace(nn.Module):
    """CVI-SZU/UniFace's Unified_Cross_Entropy_Loss (UCE-m): softplus of clamped positive and negative
    logits, selected by a dense boolean one-hot."""

    def __init__(self, embedding_size: int, num_classes: int, m=0.4, s=S, lam=1.0, r=1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_size) * 0.01)
        self.bias = nn.Parameter(torch.full((1,), math.log(num_classes * r * 10)))
        self.m, self.s, self.lam = m, s, lam

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos_theta = F.linear(F.normalize(embeddings, eps=1e-5), F.normalize(self.weight, eps=1e-5))
        cos_m_theta_p = self.s * (cos_theta - self.m) - self.bias
        cos_m_theta_n = self.s * cos_theta - self.bias
        p_loss = torch.log(1 + torch.exp(-cos_m_theta_p.clamp(min=-self.s, max=self.s)))
        n_loss = torch.log(1 + torch.exp(cos_m_theta_n.clamp(min=-self.s, max=self.s))) * self.lam
        one_hot = torch.zeros(cos_theta.shape, dtype=torch.bool).scatter_(1, labels.view(-1, 1), True)
        return (one_hot * p_loss + (~one_hot) * n_loss).sum(dim=1).mean()


class OurLoss(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head.loss(embeddings, labels)[0]


def references(dim: int, num_classes: int) -> dict[str, nn.Module]:
    modules = {
        "ref: official AdaFace head": OfficialAdaFace(dim, num_classes),
        "ref: arcface_torch CombinedMarginLoss": ArcFaceTorchCombined(dim, num_classes),
        "ref: opensphere SphereFace2": OfficialSphereFace2(dim, num_classes),
        "ref: official UniFace UCE": OfficialUniFace(dim, num_classes),
    }
    try:
        from pytorch_metric_learning import losses
    except ImportError:  # the dev extra is not installed: leave those columns out
        return modules
    for name, loss in {
        "ref: pml CosFaceLoss": losses.CosFaceLoss(num_classes=num_classes, embedding_size=dim, margin=0.35, scale=S),
        "ref: pml ArcFaceLoss": losses.ArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=math.degrees(0.5), scale=S),
        "ref: pml SubCenterArcFaceLoss (K=3)": losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=math.degrees(0.5), scale=S, sub_centers=3),
    }.items():
        modules[name] = loss
    return modules


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def step(module: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, clock) -> float:
    """Seconds for one forward + backward of the module's loss."""
    module.zero_grad(set_to_none=True)
    embeddings.grad = None
    start = clock()
    module(embeddings, labels).backward()
    return clock() - start


def benchmark(batch: int, dim: int, num_classes: int, repeats: int, clock, only: list[str] | None = None) -> dict[str, float]:
    """Fastest seconds per step for the baseline, every head and every reference at one class count
    (`only`: the heads and references whose names contain one of these words, and the baselines)."""
    torch.manual_seed(0)
    modules = {name: OurLoss(build(dim, num_classes)) for name, build in HEADS.items()}
    modules.update(references(dim, num_classes))
    if only:
        modules = {name: module for name, module in modules.items() if any(word in name for word in only)}
    modules = {BASELINE: PlainLinear(dim, num_classes), WIDE_BASELINE: PlainLinear(dim, 3 * num_classes), **modules}
    # embedding norms ~ 20-40, as a trained backbone gives them (AdaFace and MagFace read the norm)
    embeddings = (torch.randn(batch, dim) * 1.3).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,))
    times: dict[str, list[float]] = {name: [] for name in modules}
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, thread pool)
        for name, module in modules.items():
            seconds = step(module, embeddings, labels, clock)
            if round_:
                times[name].append(seconds)
    return {name: min(values) for name, values in times.items()}


def cpu_model() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_575, 100_000])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--max-load", type=float, default=1.5, help="1-minute load average above which the ratios are marked")
    parser.add_argument("--only", nargs="+", help="time only the heads and references whose names contain one of these words")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    load_before = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
        f"B={args.batch}, d={args.dim}, fastest of {args.repeats} steps (forward + backward), {args.clock} time; "
        f"load average (1 min) before: {load_before:.2f}",
        flush=True,
    )
    results = {c: benchmark(args.batch, args.dim, c, args.repeats, CLOCKS[args.clock], args.only) for c in args.classes}
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) after: {load_after:.2f}\n")
    if max(load_before, load_after) > args.max_load:
        print(
            f"UNDER LOAD: the load average ({load_before:.2f} before, {load_after:.2f} after) exceeds --max-load "
            f"{args.max_load}; other processes shared the cores, so these ratios describe the load, not the "
            "heads. Do not publish them: rerun on an idle machine.\n"
        )
    header = "| head | " + " | ".join(f"C={c:,}: ms | vs Linear" for c in args.classes) + " |"
    print(header)
    print("|---|" + "---:|---:|" * len(args.classes))
    for name in results[args.classes[0]]:
        cells = [f"{1e3 * results[c][name]:.1f} | {results[c][name] / results[c][BASELINE]:.2f}x" for c in args.classes]
        print(f"| {name} | " + " | ".join(cells) + " |")
    pairs = [  # (ours, the reference a user would otherwise pick, or the fair floor)
        ("subcenter arcface (K=3)", WIDE_BASELINE),
        ("cosface", "ref: pml CosFaceLoss"),
        ("arcface", "ref: pml ArcFaceLoss"),
        ("subcenter arcface (K=3)", "ref: pml SubCenterArcFaceLoss (K=3)"),
        ("adaface", "ref: official AdaFace head"),
        ("combined", "ref: arcface_torch CombinedMarginLoss"),
        ("sphereface2 (C)", "ref: opensphere SphereFace2"),
        ("uniface (UCE-m)", "ref: official UniFace UCE"),
    ]
    print("\n| ours vs reference | " + " | ".join(f"C={c:,}" for c in args.classes) + " |")
    print("|---|" + "---:|" * len(args.classes))
    for ours, reference in pairs:
        if ours in results[args.classes[0]] and reference in results[args.classes[0]]:
            cells = [f"{results[c][ours] / results[c][reference]:.2f}x" for c in args.classes]
            print(f"| {ours} / {reference.removeprefix('ref: ')} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
