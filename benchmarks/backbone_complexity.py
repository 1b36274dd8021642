"""Parameters and FLOPs of each registered backbone at its input size (112x112 unless stated).

    python benchmarks/backbone_complexity.py

Counted on the meta device (shapes only, no arithmetic), so even IResNet-200 takes a second.
FLOPs are torch.utils.flop_counter's: 2 per multiply-add of convolutions and matrix products
(a ViT's attention products included); BatchNorm, LayerNorm, activations, softmax and residual
additions are not counted. insightface's published "GFLOPs" come from ptflops, which counts 1 per
multiply-add and adds BatchNorm and LayerNorm (2 per element: scale and shift), PReLU and ReLU6
(1 per element); for its ViTs, whose attention products are no nn.Module that ptflops sees,
arcface_torch's flops.py adds them as `extra_gflops`. The last column recomputes that convention.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facerec.backbones import build, list_backbones

# ptflops' per-output-element cost of the layers FlopCounterMode leaves out.
PTFLOPS_ELEMENTWISE = {nn.BatchNorm1d: 2, nn.BatchNorm2d: 2, nn.LayerNorm: 2, nn.PReLU: 1, nn.ReLU6: 1}


def complexity(name: str) -> dict[str, float]:
    with torch.device("meta"):
        model = build(name).eval()
        images = torch.empty(1, 3, model.input_size, model.input_size)
    elementwise = []
    hooks = [
        module.register_forward_hook(
            lambda _m, _i, out, cost=PTFLOPS_ELEMENTWISE[type(module)]: elementwise.append(cost * out.numel())
        )
        for module in model.modules()
        if type(module) in PTFLOPS_ELEMENTWISE
    ]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    flops = counter.get_total_flops()
    return {
        "input": model.input_size,
        "params": sum(p.numel() for p in model.parameters()),
        "flops": flops,
        "ptflops": flops / 2 + sum(elementwise),
    }


def main() -> None:
    print(f"torch {torch.__version__}, batch 1, torch.utils.flop_counter (FLOPs = 2 x multiply-adds)")
    print("| backbone | input | params (M) | GFLOPs | G multiply-adds | ptflops convention (G) |")
    print("|---|---|---|---|---|---|")
    rows = sorted(((name, complexity(name)) for name in list_backbones()), key=lambda row: row[1]["flops"])
    for name, c in rows:
        print(
            f"| {name} | {c['input']}x{c['input']} | {c['params'] / 1e6:.2f} | {c['flops'] / 1e9:.3f} | "
            f"{c['flops'] / 2e9:.3f} | {c['ptflops'] / 1e9:.3f} |"
        )


if __name__ == "__main__":
    main()
