"""HQ-SAM (`*_hq` model types) against the official `segment-anything-hq` 0.3 code, on seeded random
weights (the official checkpoints cannot be downloaded here).

`tests/reference/official_hq.py` runs the official code in the reference environment
(`make bench-env`) and writes its weights, layouts and outputs; these tests load them into
sam-batch's model and compare:

- every official layout (vit_t/b/l/h) is ours, key for key and shape for shape, and a state dict
  of ours loads into the official model with `strict=True`;
- the encoder's embedding, early features and HQ features, and `SamPredictor.predict`'s
  low-resolution logits, IoUs and full-size logits: relative error at most `MAX_RELATIVE_ERROR`
  per tensor (fp32, CPU);
- `SamAutomaticMaskGenerator.generate` on two photos: the same masks, index for index
  (`parity.strict_differences`).

vit_t_hq takes MobileSAM's real weights for SAM's part and noise for HQ-SAM's own parameters (as
HQ-SAM is trained), so its masks follow the prompts; vit_b_hq is noise throughout. Where the
reference environment or its `segment_anything_hq` is missing, every test here skips, saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from official_code import as_batch, image_args, missing_reference, relative_error, run_official
from reference_cases import PHOTOS, PROMPT_CASES, case_prompts

from parity import largest_differences, strict_differences
from sam_batch.engines.backend import set_cpu_threads
from sam_batch.engines.sam import build_sam
from sam_batch.engines.torch_backend import TorchEngine
from sam_batch.engines.transforms import image_to_input, resize_longest_side
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES, MOBILE_SAM, PARITY_LINES

MAX_RELATIVE_ERROR = 1e-4
# model type -> SAM's checkpoint for the base's tensors (None: noise throughout), fewest masks
# the official generator must keep per photo for the comparison to mean something
MODELS = {"vit_t_hq": (MOBILE_SAM, 10), "vit_b_hq": (None, 1)}


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory):
    """model type -> the official script's output folder, made on first use."""
    missing = missing_reference("segment_anything_hq")
    if missing:
        pytest.skip(missing)
    if not MOBILE_SAM.exists():
        pytest.skip(f"test data {MOBILE_SAM} not present")
    folders: dict[str, Path] = {}

    def run(model_type: str) -> Path:
        if model_type not in folders:
            out = tmp_path_factory.mktemp(model_type)
            ours = out / "ours.pt"
            torch.save(build_sam(model_type).state_dict(), ours)
            base, _ = MODELS[model_type]
            options = ["--ours", str(ours), *image_args([IMAGES / photo for photo in PHOTOS])]
            options += ["--base", str(base)] if base else []
            options += ["--layouts"] if model_type == "vit_t_hq" else []
            run_official("official_hq.py", model_type, str(out), *options)
            folders[model_type] = out
        return folders[model_type]

    return run


def _engine(folder: Path, model_type: str) -> TorchEngine:
    """Our model with the official script's weights, loaded strictly, in the CPU engine."""
    set_cpu_threads()
    model = build_sam(model_type)
    model.load_state_dict(torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True), strict=True)
    return TorchEngine(model.eval(), torch.device("cpu"))


@pytest.mark.slow
def test_every_official_layout_is_ours(official) -> None:
    """Keys and shapes of every official HQ-SAM model equal ours (so each loads into the other
    strictly); the official script loaded a state dict of ours with strict=True before it ran."""
    layouts = json.loads((official("vit_t_hq") / "layouts.json").read_text())
    assert sorted(layouts) == ["vit_b_hq", "vit_h_hq", "vit_l_hq", "vit_t_hq"]
    for model_type, theirs in layouts.items():
        with torch.device("meta"):
            ours = {key: list(value.shape) for key, value in build_sam(model_type).state_dict().items()}
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
        with torch.no_grad():
            early = engine.model.image_encoder.features(_model_input(engine, image))[1]
        errors = {
            "embedding": relative_error(crop.embedding, theirs["embedding"]),
            "early": relative_error(early, theirs["early"]),
            "hq_features": relative_error(crop.hq_features, theirs["hq_features"]),
        }
        for case in PROMPT_CASES:
            name = case[0]
            points, labels, box, multimask = case_prompts(case, *image.shape[:2])
            low_res, iou = engine.predict(crop, as_batch(points), as_batch(labels), as_batch(box), multimask)
            errors[f"{name} low_res"] = relative_error(low_res[0], theirs[name]["low_res"])
            errors[f"{name} iou"] = relative_error(iou[0], theirs[name]["iou"])
            errors[f"{name} logits"] = relative_error(engine.upscale(crop, low_res[0]), theirs[name]["logits"])
        assert max(errors.values()) <= MAX_RELATIVE_ERROR, (photo, errors)
        worst = max(worst, *errors.values())
    PARITY_LINES.append(f"{model_type} encoder and predictor vs segment-anything-hq: max relative error {worst:.1e}")


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(MODELS))
def test_generator_gives_the_officials_masks(official, model_type: str) -> None:
    folder = official(model_type)
    engine = _engine(folder, model_type)
    _, fewest = MODELS[model_type]
    for photo in PHOTOS:
        reference = json.loads((folder / f"amg_{photo}.json").read_text())
        ours = to_records(generate_masks(engine, load_image(str(IMAGES / photo)), AmgParams(**reference["params"])))
        assert len(reference["masks"]) >= fewest
        assert strict_differences(ours, reference["masks"]) == []
        iou, stability = largest_differences(ours, reference["masks"])
        PARITY_LINES.append(
            f"{model_type} generator vs segment-anything-hq on {photo}: {len(ours)} masks, strict-equal, "
            f"max |d iou| {iou:.1e}, max |d stability| {stability:.1e}"
        )


def _model_input(engine: TorchEngine, image: np.ndarray) -> torch.Tensor:
    """The image as the encoder sees it (1, 3, 1024, 1024)."""
    return image_to_input(resize_longest_side(image), engine.model.pixel_mean, engine.model.pixel_std)
