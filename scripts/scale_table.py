"""Print the table of automatic scales in docs/research/scale.md (python scripts/scale_table.py).

Each cell is s for one dataset's class count and one margin at theta0 = 45 deg, as
"half / inflection" (the two `scale.criterion`s; see facerec.heads.scale.auto_scale).
"""
from __future__ import annotations

from facerec.heads import AdaFace, ArcFace, CombinedMargin, CosFace, MagFace, NormFace, SphereFace, auto_scale

DATASETS = {"CASIA-WebFace": 10_575, "MS1MV2": 85_742, "MS1MV3": 93_431, "Glint360K": 360_232}
# column title -> a margin whose target logit f the margin-aware scale uses (normface: the plain auto scale)
MARGINS = {
    "auto (no margin)": NormFace(),
    "CosFace m=0.35": CosFace(m=0.35),
    "ArcFace m=0.5": ArcFace(m=0.5),
    "SphereFace m1=1.35": SphereFace(m1=1.35),
    "combined (1, 0.3, 0.2)": CombinedMargin(m1=1.0, m2=0.3, m3=0.2),
    # the per-sample margins at their nominal value (each head's docstring says which)
    "AdaFace m=0.4 (z = 0)": AdaFace(m=0.4),
    "MagFace (m = 0.625)": MagFace(),
}


def table() -> str:
    lines = [
        "| dataset | C | " + " | ".join(MARGINS) + " |",
        "|---|---:|" + "---:|" * len(MARGINS),
    ]
    for name, num_classes in DATASETS.items():
        cells = [
            " / ".join(f"{auto_scale(num_classes, criterion=c, target_logit=margin.target_logit):.2f}" for c in ("half", "inflection"))
            for margin in MARGINS.values()
        ]
        lines.append(f"| {name} | {num_classes:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
