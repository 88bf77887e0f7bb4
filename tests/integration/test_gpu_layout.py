"""The torch engine's GPU layout, run on the CPU: the path a GPU takes, held to the golden files.

In the gpu layout the engine decodes with the model's batched decoder (`SamModel.decode`), at
least `GPU_PROMPT_BATCH` prompts a call, brings masks to full size a chunk at a time
(`amg._stable_masks_batched`) and NMS runs where the masks are. None of that needs a GPU, so
every CI run checks it: strict-equal to the reference on golden files, bf16 autocast against
fp32, masks moved between devices, a decode batch halved when the device runs out of memory,
the TF32 switches each precision sets, and candidates kept on the device.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_parity_golden import check_strict

from benchmarks.reference import agreement
from sam_batch.engines.backend import GPU_PROMPT_BATCH, EngineError, load_model, set_cpu_threads, tf32_settings
from sam_batch.engines.torch_backend import TorchEngine
from sam_batch.pipeline.amg import CropMasks, generate_masks, image_candidates, masks_from_candidates, to_records
from sam_batch.pipeline.candidates import crop_row, crops_from_rows
from sam_batch.pipeline.held_masks import DeviceMasks
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams, candidate_floor
from shared_data import IMAGES, PARITY_LINES, load_golden

# bf16 keeps 8 bits of mantissa (a relative step of 2^-8): a predicted IoU or a stability score
# within about 0.004 of its threshold may land on the other side, so a mask or two of a photo
# comes or goes, while the masks both keep stay nearly the same. Measured at 8x8 points, default
# thresholds: groceries.jpg 30/30 masks, recall and precision 1.000, mean best IoU 0.9967;
# dog.jpg 15 against 13 (precision 0.933, two masks more), 0.9968; picture2.jpg 1.000, 0.9966.
MIN_BF16_AGREEMENT = 0.9
MIN_BF16_MEAN_IOU = 0.99
GPU_LAYOUT_GOLDEN = (
    "extra/groceries.jpg.pps8.iou0.stab0.json",
    "extra/picture1.jpg.pps16.iou050.stab080.minarea300.json",
)


@pytest.fixture(scope="module")
def model():
    set_cpu_threads()
    return load_model("vit_t").model


class Recording:
    """An engine, noting the prompts of each decode call and how many masks it upscales."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine
        self.mask_threshold, self.min_prompt_batch = engine.mask_threshold, engine.min_prompt_batch
        self.concurrent_batches, self.windowed_upscale = engine.concurrent_batches, engine.windowed_upscale
        self.prompts: list[int] = []
        self.upscaled = 0

    def encode(self, crop):
        return self.engine.encode(crop)

    def decode(self, crop, points, min_iou=None):
        self.prompts.append(len(points))
        return self.engine.decode(crop, points, min_iou)

    def upscale(self, crop, low_res):
        self.upscaled += len(low_res)
        return self.engine.upscale(crop, low_res)


def records_of(engine, golden_name: str) -> list[dict]:
    golden = load_golden(golden_name)
    return to_records(generate_masks(engine, load_image(str(IMAGES / golden["image"])), AmgParams(**golden["params"])))


def test_the_gpu_layout_is_the_batched_decoder(model) -> None:
    engine = TorchEngine(model, torch.device("cpu"), layout="gpu")
    assert engine.point_decoder is None and not engine.windowed_upscale
    assert engine.min_prompt_batch == GPU_PROMPT_BATCH and engine.concurrent_batches == 1
    assert TorchEngine(model, torch.device("cpu")).layout == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("golden_name", GPU_LAYOUT_GOLDEN)
def test_gpu_layout_is_strict_equal_to_the_reference(model, golden_name: str) -> None:
    engine = Recording(TorchEngine(model, torch.device("cpu"), layout="gpu"))
    check_strict(golden_name, records_of(engine, golden_name), "gpu layout")
    assert engine.upscaled > 0  # masks went through the chunked, on-device upscaling
    if "pps16" in golden_name:
        assert max(engine.prompts) >= GPU_PROMPT_BATCH


@pytest.mark.slow
def test_bf16_autocast_agrees_with_fp32(model) -> None:
    image, params = load_image(str(IMAGES / "groceries.jpg")), AmgParams(points_per_side=8)
    fp32 = to_records(generate_masks(TorchEngine(model, torch.device("cpu"), "fp32", layout="gpu"), image, params))
    bf16 = to_records(generate_masks(TorchEngine(model, torch.device("cpu"), "bf16", layout="gpu"), image, params))
    found = agreement(bf16, fp32)
    PARITY_LINES.append(
        f"gpu layout bf16 against fp32, groceries.jpg 8x8: {len(bf16)} against {len(fp32)} masks, recall "
        f"{found.recall:.3f} precision {found.precision:.3f} mean best IoU {found.mean_best_iou:.4f}"
    )
    assert found.recall >= MIN_BF16_AGREEMENT and found.precision >= MIN_BF16_AGREEMENT
    assert found.mean_best_iou >= MIN_BF16_MEAN_IOU


def test_masks_move_between_devices_with_their_shapes() -> None:
    """`CropMasks.select` on a device's tensors (the meta device: shapes only) keeps points on
    the host; `cpu` brings a CUDA crop's masks back where a GPU exists."""
    n, h, w = 6, 30, 40
    on_meta = CropMasks(
        masks=DeviceMasks(torch.zeros((n, h, w), dtype=torch.bool, device="meta")),
        boxes=torch.zeros((n, 4), device="meta"),
        iou=torch.zeros(n, device="meta"),
        stability=torch.zeros(n, device="meta"),
        points=torch.arange(2 * n, dtype=torch.float64).reshape(n, 2),
        crop_box=[0, 0, w, h],
    )
    picked = on_meta.select(torch.tensor([4, 1]))
    assert picked.masks.pixels.shape == (2, h, w) and picked.masks.pixels.device.type == "meta"
    assert picked.boxes.shape == (2, 4) and picked.iou.shape == picked.stability.shape == (2,)
    assert picked.points.tolist() == [[8.0, 9.0], [2.0, 3.0]] and picked.points.device.type == "cpu"
    if torch.cuda.is_available():
        on_gpu = CropMasks(
            DeviceMasks(torch.ones((n, h, w), dtype=torch.bool, device="cuda")),
            *(torch.ones(shape, device="cuda") for shape in ((n, 4), (n,), (n,))),
            points=on_meta.points,
            crop_box=[0, 0, w, h],
        )
        back = on_gpu.select(torch.tensor([2, 0], device="cuda")).cpu()
        assert back.masks.pixels.device.type == "cpu" and back.masks.full(0).all() and len(back) == 2


class RunsOutOfMemory:
    """An engine whose decode calls fail like a full GPU above `limit` prompts."""

    def __init__(self, engine, limit: int) -> None:
        self.engine, self.limit, self.prompts = engine, limit, []
        self.mask_threshold, self.min_prompt_batch = engine.mask_threshold, engine.min_prompt_batch
        self.concurrent_batches, self.windowed_upscale = 1, engine.windowed_upscale

    def encode(self, crop):
        return self.engine.encode(crop)

    def decode(self, crop, points, min_iou=None):
        self.prompts.append(len(points))
        if len(points) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.engine.decode(crop, points, min_iou)

    def upscale(self, crop, low_res):
        return self.engine.upscale(crop, low_res)


def test_out_of_memory_halves_the_decode_batch_and_segments_the_image_again(tmp_path, caplog) -> None:
    from sam_batch.jobs.job_file import parse_job
    from sam_batch.jobs.worker import ImageSegmenter

    job = parse_job(
        {
            "name": "oom",
            "input": {"uris": [str(IMAGES / "dog.jpg")]},
            "output": {"uri": str(tmp_path)},
            "amg": {"points_per_side": 8, "points_per_batch": 64},
            "engine": {"device": "cpu"},
        }
    )
    segmenter = ImageSegmenter(job)
    want = segmenter.segment(str(IMAGES / "dog.jpg"))
    segmenter.engine = RunsOutOfMemory(segmenter.engine, limit=16)
    with caplog.at_level(logging.WARNING, logger="sam_batch"):
        got = segmenter.segment(str(IMAGES / "dog.jpg"))
    assert got.image_row["status"] == "ok" and got.mask_rows == want.mask_rows and want.mask_rows
    assert segmenter.engine.prompts[:3] == [64, 32, 16]
    assert segmenter.params.points_per_batch == 16  # kept for the next image
    assert "out of GPU memory at 64 prompts per decode call; segmenting it again at 32" in caplog.text

    segmenter.engine.limit, segmenter.engine.prompts = 0, []  # out of memory at one prompt a call
    failed = segmenter.segment(str(IMAGES / "dog.jpg"))
    assert segmenter.engine.prompts[:5] == [16, 8, 4, 2, 1]
    assert failed.image_row["status"] == "error"
    assert (
        failed.image_row["error"] == "segment: DecoderOutOfMemory: out of device memory decoding 1 prompts in one call"
    )
    assert segmenter.params.points_per_batch == 16  # as the image started: the next one tries again


def test_out_of_memory_outside_the_decoder_is_the_images_error(tmp_path) -> None:
    from sam_batch.jobs.job_file import parse_job
    from sam_batch.jobs.worker import ImageSegmenter

    job = parse_job(
        {
            "name": "oom",
            "input": {"uris": [str(IMAGES / "dog.jpg")]},
            "output": {"uri": str(tmp_path)},
            "amg": {"points_per_side": 4},
            "engine": {"device": "cpu"},
        }
    )
    segmenter = ImageSegmenter(job)

    def encode(crop):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    segmenter.engine.encode = encode
    failed = segmenter.segment(str(IMAGES / "dog.jpg"))
    assert failed.image_row["error"].startswith("segment: OutOfMemoryError: CUDA out of memory")
    assert segmenter.params.points_per_batch == 64


def test_fp32_means_full_fp32_and_tf32_is_asked_for(model) -> None:
    for precision, mode in (("tf32", "tf32"), ("fp32", "ieee")):
        TorchEngine(model, torch.device("cpu"), precision, layout="gpu")
        assert tf32_settings() == {"tf32_matmul": mode, "tf32_cudnn_conv": mode}


def test_the_cpu_layout_refuses_other_devices_and_precisions(model) -> None:
    with pytest.raises(EngineError, match="the cpu layout runs on the CPU only, not on meta"):
        TorchEngine(model, torch.device("meta"), layout="cpu")
    with pytest.raises(EngineError, match="engine.precision: bf16 needs a GPU"):
        TorchEngine(model, torch.device("cpu"), "bf16")


def test_candidates_kept_in_the_gpu_layout_give_its_masks(model) -> None:
    """Candidates held on the device (`DeviceMasks`) at the floor, stored as rows and read back,
    give the masks the layout makes at the job's thresholds."""
    engine = TorchEngine(model, torch.device("cpu"), "fp32", layout="gpu")
    image, params = load_image(str(IMAGES / "dog.jpg")), AmgParams(points_per_side=8, crop_n_layers=1)
    expected = to_records(generate_masks(engine, image, params))
    crops = image_candidates(engine, image, candidate_floor(params))
    rows = [crop_row(crop, index, 0, 1, None) for index, crop in enumerate(crops)]
    assert to_records(masks_from_candidates(crops_from_rows(rows), image.shape[:2], params)) == expected
