"""`box_nms` against torchvision's own `batched_nms`, recorded on its CPU path by
tests/data/make_nms_reference.py (in the reference environment).

The cases straddle the 1,000 boxes where torchvision re-sorts its kept boxes with an unstable
sort, with tied scores as the generator makes them (1 / crop area, 0 or 1): the same boxes in
the same order, every case, also when the IoU rows are compared a few at a time.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_batch.pipeline import masks
from sam_batch.pipeline.masks import TORCHVISION_RESORT_ABOVE, box_nms
from shared_data import TEST_DATA

RECORDED = np.load(TEST_DATA / "nms_torchvision.npz")
CASES = sorted({name.rsplit("_", 1)[0] for name in RECORDED.files})


@pytest.mark.parametrize("rows_at_once", [masks.NMS_ROWS_AT_ONCE, 97])
def test_box_nms_keeps_torchvisions_boxes_in_torchvisions_order(monkeypatch, rows_at_once: int) -> None:
    monkeypatch.setattr(masks, "NMS_ROWS_AT_ONCE", rows_at_once)
    reordered = 0
    for case in CASES:
        boxes, scores = torch.from_numpy(RECORDED[f"{case}_boxes"]), torch.from_numpy(RECORDED[f"{case}_scores"])
        want = RECORDED[f"{case}_keep"]
        got = box_nms(boxes, scores, float(case.rsplit("_", 1)[1])).numpy()
        assert np.array_equal(got, want), case
        stable = torch.sort(scores[torch.from_numpy(np.sort(want))], descending=True, stable=True).indices
        reordered += int(not np.array_equal(np.sort(want)[stable.numpy()], want))
    assert len(CASES) == 36
    assert reordered >= 8  # above TORCHVISION_RESORT_ABOVE, ties really leave input order


def test_the_recorded_cases_straddle_torchvisions_switch() -> None:
    sizes = {len(RECORDED[f"{case}_scores"]) for case in CASES}
    assert TORCHVISION_RESORT_ABOVE in sizes and TORCHVISION_RESORT_ABOVE + 1 in sizes
