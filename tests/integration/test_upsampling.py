"""The windowed upsampling of mask logits (pipeline.upsampling) against SAM's two interpolations.

Real logits: the MobileSAM decoder on the golden dog.jpg embedding (534 x 800).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam_batch.engines.backend import CropEmbedding, upscale_logits
from sam_batch.engines.sam import build_sam
from sam_batch.engines.transforms import preprocess_shape, scale_coords
from sam_batch.pipeline.amg import _stable_masks_batched, _stable_masks_windowed
from sam_batch.pipeline.masks import masks_to_boxes
from sam_batch.pipeline.params import AmgParams
from sam_batch.pipeline.upsampling import MaskUpsampler, bilinear_matrix
from shared_data import GOLDEN, MOBILE_SAM

DOG_HW = (534, 800)


@pytest.mark.parametrize(("in_len", "out_len"), [(256, 1024), (683, 534), (1024, 800), (5, 3), (3, 7), (7, 7)])
def test_bilinear_matrix_is_torch_interpolate(in_len: int, out_len: int) -> None:
    """On float32 logits, as SAM's are (torch computes the source positions in the input's dtype)."""
    signal = torch.randn(1, 1, 1, in_len)
    want = F.interpolate(signal, (1, out_len), mode="bilinear", align_corners=False)[0, 0, 0]
    matrix = torch.from_numpy(bilinear_matrix(in_len, out_len))
    torch.testing.assert_close(matrix @ signal[0, 0, 0].double(), want.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(matrix.sum(1), torch.ones(out_len, dtype=torch.float64))  # convex rows


@pytest.fixture(scope="module")
def dog_logits() -> tuple[CropEmbedding, torch.Tensor]:
    """48 real low-res logit maps (16 points x 3 masks) of dog.jpg and its crop description."""
    model = build_sam("vit_t")
    model.load_state_dict(torch.load(MOBILE_SAM, map_location="cpu", weights_only=True))
    embedding = torch.from_numpy(np.load(GOLDEN / "dog.jpg.embedding.npy"))[None]
    points = np.random.default_rng(0).uniform(0, 1, (16, 2)) * [DOG_HW[1], DOG_HW[0]]
    coords = torch.as_tensor(scale_coords(points, DOG_HW))[:, None, :]
    with torch.inference_mode():
        logits, _ = model.decode(embedding, coords, torch.ones(16, 1, dtype=torch.int64))
    return CropEmbedding(embedding, preprocess_shape(*DOG_HW), DOG_HW), logits.flatten(0, 1)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 1.0, 8.0])
def test_window_holds_every_pixel_above_the_threshold(dog_logits, threshold: float) -> None:
    crop, low_res = dog_logits
    full = upscale_logits(crop, low_res)
    upsampler = MaskUpsampler(crop.input_hw, crop.crop_hw)
    windows = 0
    for low, want in zip(low_res, full):
        found = upsampler.logits_above(low, threshold)
        if found is None:
            assert not (want > threshold).any()
            continue
        window, logits = found
        windows += 1
        torch.testing.assert_close(logits, want[window.slices], atol=1e-4, rtol=1e-5)
        outside = want.clone()
        outside[window.slices] = threshold
        assert not (outside > threshold).any()
    assert windows > 10


def test_all_low_logits_give_no_window() -> None:
    upsampler = MaskUpsampler(preprocess_shape(*DOG_HW), DOG_HW)
    assert upsampler.logits_above(torch.full((256, 256), -3.0), -1.0) is None


@pytest.mark.parametrize(("input_hw", "crop_hw"), [((1024, 683), (1500, 1000)), ((512, 1024), (100, 200))])
def test_window_of_one_hot_logit_matches_interpolation(input_hw, crop_hw) -> None:
    """A single low-res logit above the threshold: the window is exactly its footprint."""
    low = torch.full((256, 256), -5.0)
    low[40, 70] = 5.0
    crop = CropEmbedding(torch.zeros(1), input_hw, crop_hw)
    want = upscale_logits(crop, low[None])[0]
    window, logits = MaskUpsampler(input_hw, crop_hw).logits_above(low, -5.0 + 1e-3)
    rows, cols = torch.nonzero(want > -5.0 + 1e-3, as_tuple=True)
    assert window.rows == (int(rows.min()), int(rows.max()) + 1)
    assert window.cols == (int(cols.min()), int(cols.max()) + 1)
    torch.testing.assert_close(logits, want[window.slices], atol=1e-5, rtol=0)


def test_windowed_stability_filter_equals_the_full_size_one(dog_logits) -> None:
    """Same masks kept, same stability scores, same pixels as filtering full-size logits."""

    class Engine:
        mask_threshold = 0.0
        windowed_upscale = False

        def upscale(self, crop, low_res):
            return upscale_logits(crop, low_res)

    crop, low_res = dog_logits
    params = AmgParams(stability_score_thresh=0.9)
    want_index, want_scores, want_masks = _stable_masks_batched(Engine(), crop, low_res, params)
    index, scores, masks = _stable_masks_windowed(MaskUpsampler(crop.input_hw, crop.crop_hw), low_res, 0.0, params)
    assert len(want_index) > 5
    assert index.tolist() == want_index.tolist()
    torch.testing.assert_close(scores, want_scores, atol=1e-6, rtol=0)
    dense = torch.stack([torch.from_numpy(masks.full(i)) for i in range(len(masks))])
    assert (dense != want_masks.pixels).sum() <= 10  # pixels at a logit within rounding of 0
    assert torch.equal(masks.tight_boxes(), masks_to_boxes(dense))  # each box is its mask's


@pytest.mark.parametrize(
    ("input_hw", "crop_hw"),
    [((1024, 1024), (1024, 1024)), ((683, 1024), (1200, 1800)), ((1024, 576), (1024, 576)), ((1024, 683), (150, 100))],
)
def test_window_logits_are_the_interpolated_ones_on_large_crops(input_hw, crop_hw) -> None:
    """Over windows of many blocks (1024-pixel axes and more), logits equal SAM's interpolation."""
    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.randn(3, 1, 16, 16, generator=generator) * 4, (256, 256), mode="bilinear")[:, 0]
    crop = CropEmbedding(torch.zeros(1), input_hw, crop_hw)
    upsampler = MaskUpsampler(input_hw, crop_hw)
    for low, want in zip(smooth, upscale_logits(crop, smooth)):
        window, logits = upsampler.logits_above(low, -1.0)
        assert window.rows[1] - window.rows[0] > min(crop_hw[0] // 2, 300)
        torch.testing.assert_close(logits, want[window.slices], atol=1e-5, rtol=0)
