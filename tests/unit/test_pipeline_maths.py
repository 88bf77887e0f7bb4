"""The AMG maths (grids, masks, RLE, NMS, cleanup) against hand-built cases; against the golden
files in tests/integration/test_golden_maths.py."""

import numpy as np
import pytest
import torch

from sam_batch.pipeline import grids, masks, rle

# pycocotools' decode trips numpy 2's __array__(copy=...) deprecation on every call.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

DEFAULT_CROP_OVERLAP = 512 / 1500


# --- grids -----------------------------------------------------------------------------


def test_point_grid_order_and_offset():
    grid = grids.point_grid(4)
    assert grid.shape == (16, 2)
    np.testing.assert_allclose(
        grid[:5], [[0.125, 0.125], [0.375, 0.125], [0.625, 0.125], [0.875, 0.125], [0.125, 0.375]]
    )
    np.testing.assert_allclose(grid[-1], [0.875, 0.875])


def test_point_grids_per_layer_downscale():
    sizes = [len(g) for g in grids.point_grids_per_layer(32, 2, 2)]
    assert sizes == [32 * 32, 16 * 16, 8 * 8]
    assert [len(g) for g in grids.point_grids_per_layer(15, 1, 2)] == [225, 49]


def test_crop_boxes_truck_layer1():
    boxes, layers = grids.crop_boxes(1200, 1800, 1, DEFAULT_CROP_OVERLAP)
    # overlap = int(0.3413 * 1200) = 409; crop 1105 x 805; ordered by x0, then y0.
    assert boxes == [
        [0, 0, 1800, 1200],
        [0, 0, 1105, 805],
        [0, 396, 1105, 1200],
        [696, 0, 1800, 805],
        [696, 396, 1800, 1200],
    ]
    assert layers == [0, 1, 1, 1, 1]


def test_crop_boxes_layer2_tiles_image():
    boxes, layers = grids.crop_boxes(500, 700, 2, DEFAULT_CROP_OVERLAP)
    assert layers == [0] + [1] * 4 + [2] * 16
    layer2 = np.array(boxes[5:])
    assert layer2[:, :2].min() == 0 and layer2[:, 2].max() == 700 and layer2[:, 3].max() == 500
    assert (layer2[:4, 0] == 0).all() and list(layer2[:4, 1]) == sorted(layer2[:4, 1])


# --- rle -------------------------------------------------------------------------------


def test_rle_roundtrip_is_column_major():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = mask[2, 1] = mask[1, 3] = True
    encoded = rle.encode_rle(mask)
    assert encoded["size"] == [3, 4] and isinstance(encoded["counts"], str)
    assert (rle.decode_rle(encoded) == mask).all()
    assert rle.rle_area(encoded) == 3


def test_encode_rle_batch_matches_single():
    stack = np.random.default_rng(0).random((5, 13, 17)) > 0.6
    assert rle.encode_rle_batch(stack) == [rle.encode_rle(m) for m in stack]
    assert rle.encode_rle_batch(np.zeros((0, 4, 5), bool)) == []


# --- masks: scores, boxes, crops -------------------------------------------------------


def test_stability_score_hand_built():
    logits = torch.tensor(
        [[[2.0, 1.5, 0.5, -0.5], [-2.0, -2.0, 1.0, 0.0]], [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]]]
    )
    # mask 0: > 1 -> {2.0, 1.5} = 2; > -1 -> {2, 1.5, 0.5, -0.5, 1.0, 0.0} = 6
    scores = masks.stability_score(logits, 0.0, 1.0)
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx([2 / 6, 1.0])


def test_stability_score_wide_rows_do_not_overflow():
    logits = torch.full((1, 2, 40_000), 5.0)
    logits[0, 1, :30_000] = 0.5
    # int16 row sums would wrap at 32767; > 1: 40000 + 10000 of 80000 pixels > -1.
    assert masks.stability_score(logits, 0.0, 1.0).tolist() == [0.625]


def test_masks_to_boxes_inclusive_and_empty():
    stack = torch.zeros((3, 5, 6), dtype=torch.bool)
    stack[0, 1:4, 2:5] = True
    stack[1, 4, 0] = True
    boxes = masks.masks_to_boxes(stack)
    assert boxes.dtype == torch.int64
    assert boxes.tolist() == [[2, 1, 4, 3], [0, 4, 0, 4], [0, 0, 0, 0]]


def test_uncrop_boxes_and_points():
    crop = [696, 396, 1800, 1200]
    assert masks.uncrop_boxes(torch.tensor([[1, 2, 3, 4]]), crop).tolist() == [[697, 398, 699, 400]]
    points = masks.uncrop_points(torch.tensor([[0.5, 1.5]], dtype=torch.float64), crop)
    assert points.dtype == torch.float64 and points.tolist() == [[696.5, 397.5]]


def test_box_near_crop_edge():
    image = [0, 0, 1800, 1200]
    top_left = [0, 0, 1105, 805]
    boxes = torch.tensor(
        [
            [5, 5, 100, 100],  # on image edges only
            [500, 300, 1090, 400],  # right crop edge, inside the image
            [500, 300, 1080, 780],  # 25 px from both crop edges
            [500, 300, 1085, 400],
        ]
    )  # exactly atol from the crop edge
    assert masks.box_near_crop_edge(boxes, top_left, image).tolist() == [False, True, False, True]
    bottom_right = [696, 396, 1800, 1200]
    boxes = torch.tensor([[2, 100, 50, 150], [100, 100, 1103, 803]])
    assert masks.box_near_crop_edge(boxes, bottom_right, image).tolist() == [True, False]
    assert not masks.box_near_crop_edge(boxes, image, image).any()


# --- masks: NMS ------------------------------------------------------------------------


def brute_force_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Pairwise greedy NMS over integer boxes, like torchvision's CPU kernel.

    Areas and intersections of integer boxes are exact in float32, so only the IoU
    division rounds; the float32 IoU is compared with the threshold in double.
    """
    boxes = boxes.tolist()
    areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    suppressed, keep = set(), []
    for pos, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            w = max(0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            iou = np.float32(w * h) / np.float32(areas[i] + areas[j] - w * h)
            if float(iou) > threshold:
                suppressed.add(j)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_box_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 200, (300, 2))
    boxes = np.concatenate([corners, corners + rng.integers(1, 80, (300, 2))], axis=1)
    scores = rng.integers(0, 20, 300).astype(np.float32)  # many ties
    for threshold in (0.3, 0.7, 0.86):
        keep = masks.box_nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores), threshold)
        assert keep.dtype == torch.int64
        assert keep.tolist() == brute_force_nms(boxes, scores, threshold)


def test_box_nms_threshold_is_strict_and_empty_input_works():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]])  # IoU exactly 0.5
    scores = torch.tensor([0.9, 0.8])
    assert masks.box_nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert masks.box_nms(boxes, scores, 0.49).tolist() == [0]
    # IoU 765 / 2550 = 0.3 rounds up in float32; torchvision compares in double, suppresses.
    boxes = torch.tensor([[25.0, 183.0, 79.0, 228.0], [17.0, 190.0, 76.0, 205.0]])
    assert masks.box_nms(boxes, scores, 0.3).tolist() == [0]
    assert masks.box_nms(torch.zeros((0, 4)), torch.zeros(0), 0.7).tolist() == []


# --- masks: small regions --------------------------------------------------------------


def test_remove_small_regions_fills_small_holes():
    mask = np.zeros((10, 10), bool)
    mask[1:9, 1:9] = True
    mask[3:5, 3:5] = False  # a 4-pixel hole
    filled, changed = masks.remove_small_regions(mask, 5, "holes")
    assert changed and filled[1:9, 1:9].all() and filled.sum() == 64
    same, changed = masks.remove_small_regions(mask, 4, "holes")
    assert not changed and same is mask


def test_remove_small_regions_holes_include_small_border_background():
    mask = np.ones((6, 6), bool)
    mask[0, 0] = mask[5, 5] = False
    filled, changed = masks.remove_small_regions(mask, 2, "holes")
    assert changed and filled.all()


def test_remove_small_regions_islands_use_8_connectivity():
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one diagonal island of 3
    mask[5:8, 5:8] = True  # 9
    mask[0, 7] = True  # 1
    cleaned, changed = masks.remove_small_regions(mask, 3, "islands")
    assert changed
    expected = mask.copy()
    expected[0, 7] = False
    assert (cleaned == expected).all()


def test_remove_small_regions_keeps_largest_when_all_islands_small():
    mask = np.zeros((8, 8), bool)
    mask[0, 0:3] = True  # 3
    mask[4:6, 4:7] = True  # 6
    mask[7, 0] = True  # 1
    cleaned, changed = masks.remove_small_regions(mask, 10, "islands")
    assert changed
    expected = np.zeros((8, 8), bool)
    expected[4:6, 4:7] = True
    assert (cleaned == expected).all()
    empty, changed = masks.remove_small_regions(np.zeros((4, 4), bool), 10, "islands")
    assert not changed and not empty.any()


def test_remove_small_regions_breaks_ties_like_opencv():
    # OpenCV numbers regions by their first 2x2 block in raster order: (1, 3) comes before
    # (0, 9), though (0, 9) is first in pixel raster order. The reference keeps (1, 3).
    mask = np.zeros((3, 12), bool)
    mask[0, 9] = mask[1, 3] = mask[1, 7] = mask[1, 11] = True
    cleaned, changed = masks.remove_small_regions(mask, 23, "islands")
    expected = np.zeros_like(mask)
    expected[1, 3] = True
    assert changed and (cleaned == expected).all()
