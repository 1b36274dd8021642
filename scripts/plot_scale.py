"""Plot P(theta), the target-class probability against the angle to the class centre.

    python scripts/plot_scale.py                      # -> docs/research/figures/scale_probability.png
    python scripts/plot_scale.py --out /tmp/p.png --num-classes 85742

P(theta) = e^{s f(theta)} / (e^{s f(theta)} + C - 1), the other classes at 90 degrees.
Left: no margin (f = cos) for s = 13.1 (the auto scale at C = 10,575), 30 and 64. Right:
CosFace (f = cos - 0.35) for the plain auto scale, the margin-aware one and 64.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from facerec.heads import CosFace, NormFace, auto_scale  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def target_probability(target_logit, s: float, num_classes: int, theta: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(s * target_logit(torch.cos(theta)) - math.log(num_classes - 1))


def plot(num_classes: int, out: Path) -> None:
    theta0 = math.pi / 4
    theta = torch.linspace(0, math.pi / 2, 901, dtype=torch.float64)
    degrees = torch.rad2deg(theta)
    normface = NormFace().target_logit
    cosface = CosFace(m=0.35).target_logit
    s_auto = auto_scale(num_classes, theta0)
    s_margin = auto_scale(num_classes, theta0, target_logit=cosface)
    auto = (s_auto, f"s = {s_auto:.2f} (auto)")
    panels = [  # title, f, [(s, label)]
        ("no margin: f = cos θ", normface, [auto, (30.0, "s = 30"), (64.0, "s = 64")]),
        ("CosFace: f = cos θ − 0.35", cosface, [auto, (s_margin, f"s = {s_margin:.2f} (auto_margin)"), (64.0, "s = 64")]),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, (title, target_logit, scales) in zip(axes, panels):
        for s, label in scales:
            ax.plot(degrees, target_probability(target_logit, s, num_classes, theta), label=label)
        ax.axvline(math.degrees(theta0), color="grey", linestyle=":", linewidth=1)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="θ, angle to the class centre (degrees)", xlim=(0, 90), ylim=(0, 1.02))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="small", frameon=False)
    axes[0].set_ylabel(f"P(target), C = {num_classes:,}")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=10_575)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "research" / "figures" / "scale_probability.png")
    args = parser.parse_args()
    plot(args.num_classes, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
