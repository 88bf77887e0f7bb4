"""The small-region cleanup against the reference's own `remove_small_regions`
(segment_anything.utils.amg, in the test extra), which labels with OpenCV's
`connectedComponentsWithStats` (8-connectivity, OpenCV's label order).

The reference keeps the largest island when every island is small, and among equal islands the
one OpenCV numbers first; ours labels with scipy and reproduces OpenCV's numbering. The cases
below are built so that ties are common: equal squares, and random specks; and one photo-sized
mask of the golden files.
"""

from __future__ import annotations

import importlib.util

import cv2
import numpy as np
import pytest

from benchmarks.reference import read_golden
from sam_batch.pipeline.masks import remove_small_regions
from sam_batch.pipeline.rle import decode_rle
from shared_data import GOLDEN


def _reference_amg_module():
    """segment_anything/utils/amg.py loaded on its own: the package's __init__ imports
    torchvision, which the product's environment does not have; this file needs only numpy,
    torch and (inside the function) cv2."""
    spec = importlib.util.find_spec("segment_anything")
    assert spec is not None and spec.submodule_search_locations, "the test extra installs segment-anything"
    path = f"{spec.submodule_search_locations[0]}/utils/amg.py"
    module_spec = importlib.util.spec_from_file_location("reference_amg", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


reference_cleanup = _reference_amg_module().remove_small_regions


def squares(rng: np.random.Generator, shape: tuple[int, int], side: int, n: int) -> np.ndarray:
    """A mask of up to `n` equal `side` x `side` squares that touch no other (8-connectivity)."""
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        y, x = rng.integers(0, shape[0] - side), rng.integers(0, shape[1] - side)
        if not mask[max(y - 1, 0) : y + side + 1, max(x - 1, 0) : x + side + 1].any():
            mask[y : y + side, x : x + side] = True
    return mask


def cases() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(7)
    found = []
    for i in range(40):
        shape = (int(rng.integers(5, 90)), int(rng.integers(5, 90)))
        found.append((f"squares-{i}", squares(rng, shape, int(rng.integers(1, 4)), 12), 50.0))
        found.append((f"specks-{i}", rng.random(shape) < rng.uniform(0.02, 0.3), float(rng.integers(2, 30))))
        found.append((f"blobs-{i}", rng.random(shape) < rng.uniform(0.4, 0.7), float(rng.integers(2, 200))))
    golden = read_golden(GOLDEN / "app_assets_picture4.jpg.pps32.crop0.minarea0.json")  # 2048 x 1365
    for i, record in enumerate(golden["masks"][:3]):
        found.append((f"app_assets_picture4-{i}", decode_rle(record["segmentation"]).astype(bool), 5000.0))
    return found


@pytest.mark.parametrize("mode", ["islands", "holes"])
def test_cleanup_matches_the_references(mode: str) -> None:
    ties = 0
    for name, mask, area_thresh in cases():
        want, want_changed = reference_cleanup(mask, area_thresh, mode)
        got, got_changed = remove_small_regions(mask, area_thresh, mode)
        assert got_changed == want_changed, name
        assert np.array_equal(got, want), name
        sizes = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)[2][1:, cv2.CC_STAT_AREA]
        ties += int(len(sizes) > 1 and (sizes < area_thresh).all() and (sizes == sizes.max()).sum() > 1)
    if mode == "islands":
        assert ties >= 20  # the tie-break was really exercised
