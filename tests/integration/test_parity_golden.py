"""Strict parity with MobileSAM's own generator on every golden file (fp32, CPU).

For each golden file in ../shared/golden and its extra/: the same number of masks and, index for
index, the same RLE, bbox, point_coords and crop_box, predicted_iou within 1e-5 and
stability_score within 5e-3 (`parity.strict_differences`). `parity.KNOWN_PIXEL_DIFFERENCES` lists
the masks that may differ by a few pixels, and why; the README lists them too.
"""

from __future__ import annotations

import threading

import pytest
import torch

from parity import KNOWN_PIXEL_DIFFERENCES, largest_differences, strict_differences
from sam_batch.engines.backend import set_cpu_threads
from sam_batch.engines.factory import build_engine
from sam_batch.engines.torch_backend import MAX_CONCURRENT_BATCHES
from sam_batch.pipeline.amg import _map_in_threads, generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES, PARITY_LINES, golden_files, load_golden


@pytest.fixture(scope="module")
def engine():
    set_cpu_threads()
    return build_engine("vit_t", device="cpu")


def golden_params(golden: dict) -> AmgParams:
    return AmgParams(**golden["params"])


def check_strict(golden_name: str, ours: list[dict], label: str) -> None:
    """Assert strict parity of `ours` with the golden file, and note the figures for the log."""
    golden = load_golden(golden_name)
    differences = strict_differences(ours, golden["masks"], KNOWN_PIXEL_DIFFERENCES.get(golden_name))
    iou, stability = largest_differences(ours, golden["masks"])
    flips = sum(a["segmentation"] != b["segmentation"] for a, b in zip(ours, golden["masks"]))
    verdict = f"{len(differences)} differences" if differences else "strict-equal"
    if flips and not differences:
        verdict += f" (RLE of {flips} mask(s) within the known pixel differences)"
    PARITY_LINES.append(
        f"{label} {golden_name}: ours {len(ours)} reference {len(golden['masks'])}, {verdict}, "
        f"max |d iou| {iou:.1e}, max |d stability| {stability:.1e}"
    )
    assert not differences, differences[:10]


@pytest.mark.slow
@pytest.mark.parametrize("golden_name", golden_files())
def test_masks_are_the_references(engine, golden_name: str) -> None:
    golden = load_golden(golden_name)
    image = load_image(str(IMAGES / golden["image"]))
    assert list(image.shape) == golden["shape"]
    check_strict(golden_name, to_records(generate_masks(engine, image, golden_params(golden))), "cpu layout")


def test_every_golden_file_is_checked() -> None:
    names = golden_files()
    assert len(names) >= 15 and sum(name.startswith("extra/") for name in names) >= 3
    assert set(KNOWN_PIXEL_DIFFERENCES) <= set(names)


class _Batching:
    """The engine, asking for at least `min_prompt_batch` prompts per decode call (as a GPU
    engine does) and `concurrent_batches` decode calls at once; it notes the (thread, torch
    threads) of every decode call."""

    def __init__(self, engine, min_prompt_batch: int = 1, concurrent_batches: int = 1) -> None:
        self.engine, self.mask_threshold, self.windowed_upscale = engine, engine.mask_threshold, engine.windowed_upscale
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
        assert (got["segmentation"], got["bbox"], got["point_coords"]) == (
            want["segmentation"],
            want["bbox"],
            want["point_coords"],
        )
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
