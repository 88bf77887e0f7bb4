"""Mask parity with MobileSAM's own generator on every golden file (fp32, CPU).

For each golden file: at IoU >= 0.9, at least 98% of the reference masks are found among ours
and at least 98% of ours are among the reference's.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from conftest import IMAGES, PARITY_LINES, golden_files, load_golden
from sam_batch.engines.backend import MAX_CONCURRENT_BATCHES, build_engine, set_cpu_threads
from sam_batch.pipeline.amg import _map_in_threads, generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams

MATCH_IOU = 0.9
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def engine():
    set_cpu_threads()
    return build_engine("vit_t", device="cpu")


def agreement(ours: list[dict], reference: list[dict]) -> tuple[float, float, float]:
    """Recall (reference masks found), precision (our masks in the reference), mean best IoU."""
    if not ours or not reference:
        return float(not reference), float(not ours), 0.0
    as_rle = lambda s: {"size": s["size"], "counts": s["counts"].encode()}  # noqa: E731
    iou = np.asarray(
        mask_utils.iou([as_rle(r["segmentation"]) for r in ours], [as_rle(r["segmentation"]) for r in reference], [0] * len(reference))
    )
    best_for_reference, best_for_ours = iou.max(axis=0), iou.max(axis=1)
    return float((best_for_reference >= MATCH_IOU).mean()), float((best_for_ours >= MATCH_IOU).mean()), float(best_for_reference.mean())


def golden_params(golden: dict) -> AmgParams:
    return AmgParams(**golden["params"])


@pytest.mark.slow
@pytest.mark.parametrize("golden_name", golden_files())
def test_masks_match_the_reference(engine, golden_name: str) -> None:
    golden = load_golden(golden_name)
    image = load_image(str(IMAGES / golden["image"]))
    assert list(image.shape) == golden["shape"]
    ours = to_records(generate_masks(engine, image, golden_params(golden)))
    recall, precision, mean_iou = agreement(ours, golden["masks"])
    PARITY_LINES.append(
        f"{golden_name}: ours {len(ours)} reference {len(golden['masks'])} "
        f"recall {recall:.3f} precision {precision:.3f} mean IoU {mean_iou:.4f}"
    )
    assert recall >= MIN_AGREEMENT and precision >= MIN_AGREEMENT, (recall, precision)


class _Batching:
    """The engine, asking for at least `min_prompt_batch` prompts per decode call (as a GPU
    engine does) and `concurrent_batches` decode calls at once; it notes the (thread, torch
    threads) of every decode call."""

    def __init__(self, engine, min_prompt_batch: int = 1, concurrent_batches: int = 1) -> None:
        self.engine, self.mask_threshold = engine, engine.mask_threshold
        self.min_prompt_batch, self.concurrent_batches = min_prompt_batch, concurrent_batches
        self.calls: list[tuple[int, int]] = []

    def encode(self, crop):
        return self.engine.encode(crop)

    def decode(self, crop, points, min_iou=None):
        assert len(points) >= self.min_prompt_batch
        self.calls.append((threading.get_ident(), torch.get_num_threads()))
        return self.engine.decode(crop, points, min_iou)

    def upscale(self, crop, low_res):
        return self.engine.upscale(crop, low_res)


def test_prompts_per_decode_call_change_no_mask(engine) -> None:
    """Batches of max(points_per_batch, min_prompt_batch) prompts give the same records as
    batches of points_per_batch: each mask is filtered on its own."""
    image = load_image(str(IMAGES / "truck.jpg"))
    params = AmgParams(points_per_side=8, points_per_batch=16)
    narrow = to_records(generate_masks(_Batching(engine), image, params))
    wide = to_records(generate_masks(_Batching(engine, min_prompt_batch=64), image, params))
    assert narrow and wide == narrow


def test_batches_decoded_at_once_change_no_mask(engine) -> None:
    """Two batches decoded at once, on two threads of one torch thread each, give the masks of
    one batch after another (scores within fp32 rounding: a matrix product's sums may be
    ordered differently on one thread than on two)."""
    image = load_image(str(IMAGES / "truck.jpg"))
    params = AmgParams(points_per_side=8, points_per_batch=16)
    one_by_one = to_records(generate_masks(_Batching(engine), image, params))
    concurrent = _Batching(engine, concurrent_batches=2)
    at_once = to_records(generate_masks(concurrent, image, params))

    threads = {thread for thread, _ in concurrent.calls}
    assert len(threads) == 2 and threading.get_ident() not in threads
    assert {torch_threads for _, torch_threads in concurrent.calls} == {1}
    assert one_by_one and len(at_once) == len(one_by_one)
    for got, want in zip(at_once, one_by_one):
        assert (got["segmentation"], got["bbox"], got["point_coords"]) == (want["segmentation"], want["bbox"], want["point_coords"])
        assert got["predicted_iou"] == pytest.approx(want["predicted_iou"], abs=1e-5)
        assert got["stability_score"] == pytest.approx(want["stability_score"], abs=1e-5)


def test_threads_share_out_the_callers_torch_threads(engine) -> None:
    """Batch threads split the caller's torch threads between them; the caller keeps its own;
    the CPU engine asks for one batch per torch thread, up to MAX_CONCURRENT_BATCHES."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert engine.concurrent_batches == MAX_CONCURRENT_BATCHES
        seen = _map_in_threads(lambda _: (threading.get_ident(), torch.get_num_threads()), list(range(8)), 4)
        assert {threads for _, threads in seen} == {2} and len({thread for thread, _ in seen}) <= 4
        assert _map_in_threads(lambda item: item * 2, [3, 1, 2], 3) == [6, 2, 4]
        assert torch.get_num_threads() == 8
        torch.set_num_threads(1)
        assert engine.concurrent_batches == 1
    finally:
        torch.set_num_threads(before)
