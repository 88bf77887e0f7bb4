"""SAM 2.1 (`sam2.1_hiera_*` model types) against the official `sam2` 1.1.0 code, on seeded random
weights (the official checkpoints cannot be downloaded here).

`tests/reference/official_sam2.py` runs the official code in the reference environment (`make
bench-env`, where `sam2` is installed with SAM2_BUILD_CUDA=0) and writes its checkpoint, layouts
and outputs; these tests load them into sam-batch's model and compare:

- every official size's layout (t, s, b+, l) is ours, key for key and shape for shape, the
  official checkpoint form (`{"model": ...}`) loads strictly, and a state dict of ours loads
  into the official model with `strict=True`;
- the image embedding and the two high-resolution features, and `SAM2ImagePredictor.predict`'s
  low-resolution logits, IoUs and full-size logits (multimask on and off, points, a box, both):
  relative error at most `MAX_RELATIVE_ERROR` per tensor (fp32, CPU);
- `SAM2AutomaticMaskGenerator.generate` on two photos with `use_m2m` off and on: the same
  masks in the same order (`parity.strict_differences`), except that a mask may differ by
  `MAX_FLIPPED_PIXELS` where our logit there is within `NEAR_THRESHOLD` of the threshold
  (fp32 rounding); point_coords within `POINT_TOLERANCE` (the official generator keeps them in
  float32, we in float64).

sam2.1_hiera_t takes MobileSAM's trained prompt encoder and decoder tensors, with the random
trunk's features scaled down (see the script), so that masks follow the prompts; sam2.1_hiera_s
is noise throughout, its large activations testing the encoder. Where the reference
environment or its `sam2` is missing, every test here skips, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from official_code import as_batch, image_args, missing_reference, relative_error, run_official
from reference_cases import PHOTOS, PROMPT_CASES, case_prompts

from parity import decode, largest_differences, strict_differences
from sam_batch.engines.backend import set_cpu_threads
from sam_batch.engines.checkpoints import load_state_dict
from sam_batch.engines.sam2 import build_sam2
from sam_batch.engines.sam2_engine import Sam2Engine, Sam2Generator, TorchSam2Networks
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES, MOBILE_SAM, PARITY_LINES

MAX_RELATIVE_ERROR = 1e-4
MAX_FLIPPED_PIXELS = 2
NEAR_THRESHOLD = 1e-4
POINT_TOLERANCE = 1e-3  # pixels
SIZES = ("sam2.1_hiera_b+", "sam2.1_hiera_l", "sam2.1_hiera_s", "sam2.1_hiera_t")
# model type -> MobileSAM's checkpoint for the decoder (None: noise throughout), fewest masks
# the official generator must keep per photo and setting for the comparison to mean something
MODELS = {"sam2.1_hiera_t": (MOBILE_SAM, 20), "sam2.1_hiera_s": (None, 0)}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory):
    """model type -> the official script's output folder, made on first use."""
    missing = missing_reference("sam2")
    if missing:
        pytest.skip(missing)
    if not MOBILE_SAM.exists():
        pytest.skip(f"test data {MOBILE_SAM} not present")
    folders: dict[str, Path] = {}

    def run(model_type: str) -> Path:
        if model_type not in folders:
            out = tmp_path_factory.mktemp(model_type.replace("+", "p"))
            ours = out / "ours.pt"
            torch.save(build_sam2(model_type).state_dict(), ours)
            decoder, _ = MODELS[model_type]
            options = ["--ours", str(ours), *image_args([IMAGES / photo for photo in PHOTOS])]
            options += ["--decoder-from", str(decoder)] if decoder else []
            options += ["--layouts"] if model_type == "sam2.1_hiera_t" else []
            run_official("official_sam2.py", model_type, str(out), *options)
            folders[model_type] = out
        return folders[model_type]

    return run


def _engine(folder: Path, model_type: str, generator: Sam2Generator | None = None) -> Sam2Engine:
    """Our model with the official checkpoint, read as sam-batch reads checkpoints and loaded strictly."""
    set_cpu_threads()
    model = build_sam2(model_type)
    model.load_state_dict(load_state_dict(folder / "checkpoint.pt"), strict=True)
    return Sam2Engine(TorchSam2Networks(model, torch.device("cpu")), generator or Sam2Generator())


@pytest.mark.slow
def test_every_official_layout_is_ours(official) -> None:
    layouts = json.loads((official("sam2.1_hiera_t") / "layouts.json").read_text())
    assert sorted(layouts) == sorted(SIZES)
    for model_type, theirs in layouts.items():
        with torch.device("meta"):
            ours = {key: list(value.shape) for key, value in build_sam2(model_type).state_dict().items()}
        assert ours == theirs, model_type


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_encoder_and_predictor_are_the_officials(official, model_type: str) -> None:
    folder = official(model_type)
    engine = _engine(folder, model_type)
    outputs = torch.load(folder / "outputs.pt", map_location="cpu", weights_only=True)
    worst = 0.0
    for photo in PHOTOS:
        image = load_image(str(IMAGES / photo))
        crop = engine.encode(image)
        theirs = outputs[photo]
        errors = {"embedding": relative_error(crop.embedding, theirs["embedding"])}
        for level, (ours, official_level) in enumerate(zip(crop.high_res_features, theirs["high_res"])):
            errors[f"high_res {level}"] = relative_error(ours, official_level)
        for case in PROMPT_CASES:
            name = case[0]
            points, labels, box, multimask = case_prompts(case, *image.shape[:2])
            low_res, iou = engine.predict(crop, as_batch(points), as_batch(labels), as_batch(box), multimask)
            errors[f"{name} low_res"] = relative_error(low_res[0].clamp(-32, 32), theirs[name]["low_res"])
            errors[f"{name} iou"] = relative_error(iou[0], theirs[name]["iou"])
            errors[f"{name} logits"] = relative_error(engine.upscale(crop, low_res[0]), theirs[name]["logits"])
        assert max(errors.values()) <= MAX_RELATIVE_ERROR, (photo, errors)
        worst = max(worst, *errors.values())
    PARITY_LINES.append(f"{model_type} encoder and predictor vs sam2 1.1.0: max relative error {worst:.1e}")


@pytest.mark.slow
@pytest.mark.parametrize("use_m2m", [False, True], ids=["m2m_off", "m2m_on"])
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_generator_gives_the_officials_masks(official, model_type: str, use_m2m: bool) -> None:
    folder = official(model_type)
    engine = _engine(folder, model_type, Sam2Generator(use_m2m=use_m2m))
    _, fewest = MODELS[model_type]
    for photo in PHOTOS:
        reference = json.loads((folder / f"amg_{'on' if use_m2m else 'off'}_{photo}.json").read_text())
        params = {key: value for key, value in reference["params"].items() if key != "use_m2m"}
        image = load_image(str(IMAGES / photo))
        ours = to_records(generate_masks(engine, image, AmgParams(**params)))
        theirs = reference["masks"]
        assert len(theirs) >= fewest
        flips = _flipped_near_threshold(engine, image, ours, theirs)
        differences = strict_differences(ours, theirs, {index: (MAX_FLIPPED_PIXELS, "") for index in flips})
        assert [d for d in differences if "point_coords" not in d] == []
        for got, want in zip(ours, theirs):
            assert np.allclose(got["point_coords"], want["point_coords"], atol=POINT_TOLERANCE, rtol=0)
        iou, stability = largest_differences(ours, theirs)
        PARITY_LINES.append(
            f"{model_type} generator (use_m2m {use_m2m}) vs sam2 1.1.0 on {photo}: {len(ours)} masks, "
            f"{len(flips)} with a pixel on the other side of the threshold, max |d iou| {iou:.1e}, "
            f"max |d stability| {stability:.1e}"
        )


def _flipped_near_threshold(engine: Sam2Engine, image: np.ndarray, ours: list[dict], theirs: list[dict]) -> list[int]:
    """Indexes of masks whose RLEs differ by at most `MAX_FLIPPED_PIXELS` pixels, each with one of
    its point's logits within `NEAR_THRESHOLD` of the threshold: fp32 rounding, not a different
    mask. (Whole-image crops only: the point is in the crop's pixels.)"""
    flips = []
    crop = None
    for index, (got, want) in enumerate(zip(ours, theirs)):
        if got["segmentation"] == want["segmentation"]:
            continue
        rows, cols = np.nonzero(decode(got["segmentation"]) != decode(want["segmentation"]))
        if len(rows) > MAX_FLIPPED_PIXELS:
            continue
        crop = crop or engine.encode(image)
        low_res, _ = engine.decode(crop, np.array(got["point_coords"]))
        logits = engine.upscale(crop, low_res[0])[:, rows, cols] - engine.mask_threshold
        if bool((logits.abs() < NEAR_THRESHOLD).any(0).all()):
            flips.append(index)
    return flips
