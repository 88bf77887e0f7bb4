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
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from parity import largest_differences, strict_differences
from sam_batch.engines.backend import set_cpu_threads
from sam_batch.engines.sam import build_sam
from sam_batch.engines.torch_backend import TorchEngine
from sam_batch.engines.transforms import image_to_input, resize_longest_side
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES, MOBILE_SAM, PARITY_LINES, REPO

REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"
OFFICIAL_SCRIPT = REPO / "tests" / "reference" / "official_hq.py"
PHOTOS = ("dog.jpg", "groceries.jpg")
MAX_RELATIVE_ERROR = 1e-4
# the official script's prompt cases (tests/reference/official_hq.py: PROMPT_CASES)
PROMPT_CASES = [
    ("point_multimask", [[0.5, 0.5]], [1], None, True),
    ("point_single", [[0.3, 0.6]], [1], None, False),
    ("box", None, None, [0.2, 0.2, 0.7, 0.8], False),
    ("box_points_multimask", [[0.4, 0.4], [0.6, 0.7]], [1, 0], [0.1, 0.15, 0.9, 0.85], True),
]
# model type -> SAM's checkpoint for the base's tensors (None: noise throughout), fewest masks
# the official generator must keep per photo for the comparison to mean something
MODELS = {"vit_t_hq": (MOBILE_SAM, 10), "vit_b_hq": (None, 1)}


def _reference_environment() -> str | None:
    """Why the official code cannot run here, or None when it can."""
    if not REFERENCE_PYTHON.exists():
        return f"reference environment {REFERENCE_PYTHON.parent.parent} not present (make bench-env)"
    probe = subprocess.run(
        [str(REFERENCE_PYTHON), "-c", "import segment_anything_hq"], capture_output=True, text=True, timeout=120
    )
    if probe.returncode != 0:
        return "segment_anything_hq is not installed in .venv-ref (make bench-env)"
    return None


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory):
    """model type -> the official script's output folder, made on first use."""
    missing = _reference_environment()
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
            command = [str(REFERENCE_PYTHON), str(OFFICIAL_SCRIPT), model_type, str(out), "--ours", str(ours)]
            command += ["--base", str(base)] if base else []
            command += ["--layouts"] if model_type == "vit_t_hq" else []
            for photo in PHOTOS:
                command += ["--image", str(IMAGES / photo)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=REPO)
            assert proc.returncode == 0, proc.stderr[-3000:]
            folders[model_type] = out
        return folders[model_type]

    return run


def _engine(folder: Path, model_type: str) -> TorchEngine:
    """Our model with the official script's weights, loaded strictly, in the CPU engine."""
    set_cpu_threads()
    model = build_sam(model_type)
    model.load_state_dict(torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True), strict=True)
    return TorchEngine(model.eval(), torch.device("cpu"))


def _relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp(min=1e-30))


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
            "embedding": _relative_error(crop.embedding, theirs["embedding"]),
            "early": _relative_error(early, theirs["early"]),
            "hq_features": _relative_error(crop.hq_features, theirs["hq_features"]),
        }
        height, width = image.shape[:2]
        scale = np.array([width, height], dtype=np.float64)
        for name, points, labels, box, multimask in PROMPT_CASES:
            low_res, iou = engine.predict(
                crop,
                None if points is None else (np.array(points) * scale)[None],
                None if labels is None else np.array(labels)[None],
                None if box is None else (np.array(box) * np.tile(scale, 2))[None],
                multimask,
            )
            errors[f"{name} low_res"] = _relative_error(low_res[0], theirs[name]["low_res"])
            errors[f"{name} iou"] = _relative_error(iou[0], theirs[name]["iou"])
            errors[f"{name} logits"] = _relative_error(engine.upscale(crop, low_res[0]), theirs[name]["logits"])
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
