"""Record torchvision's own `batched_nms` on boxes whose scores tie, for `tests/unit/test_nms_reference.py`.

Run in the reference environment (`make bench-env`), from the repository root:

    .venv-ref/bin/python tests/data/make_nms_reference.py

torchvision takes one path up to 1,000 boxes on the CPU (4,000 coordinates) and another above,
and the second re-sorts the kept boxes with an unstable sort, so the order of equal scores
depends on the path. The cases straddle that count, with the scores the generator gives NMS:
predicted IoUs (few ties), 1 / crop area (ties by crop) and 0 / 1 (the small-region cleanup).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.ops import batched_nms

OUT = Path(__file__).with_name("nms_torchvision.npz")
SIZES = (40, 999, 1000, 1001, 1500, 2600)
THRESHOLDS = (0.7, 0.5)


def boxes_like_masks(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) float32 XYXY integer-valued boxes in a 1500 x 1000 image, many overlapping."""
    x0 = rng.integers(0, 1400, n)
    y0 = rng.integers(0, 900, n)
    w = rng.integers(0, 300, n)
    h = rng.integers(0, 300, n)
    return np.stack([x0, y0, np.minimum(x0 + w, 1499), np.minimum(y0 + h, 999)], axis=1).astype(np.float32)


def scores_of(kind: str, rng: np.random.Generator, n: int) -> np.ndarray:
    if kind == "iou":
        return rng.uniform(0.88, 1.0, n).astype(np.float32)
    if kind == "crop_area":
        areas = np.array([1500 * 1000, 1000 * 700, 600 * 400], dtype=np.float32)
        return (1.0 / areas[rng.integers(0, len(areas), n)]).astype(np.float32)
    return rng.integers(0, 2, n).astype(np.float32)  # "unchanged": 0 or 1


def main() -> None:
    rng = np.random.default_rng(20261203)
    arrays: dict[str, np.ndarray] = {}
    for size in SIZES:
        for kind in ("iou", "crop_area", "unchanged"):
            for threshold in THRESHOLDS:
                key = f"{kind}_{size}_{threshold}"
                boxes, scores = boxes_like_masks(rng, size), scores_of(kind, rng, size)
                keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.zeros(size), threshold)
                arrays[f"{key}_boxes"], arrays[f"{key}_scores"] = boxes, scores
                arrays[f"{key}_keep"] = keep.numpy()
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({len(arrays) // 3} cases)")


if __name__ == "__main__":
    main()
