"""Write the reference predictor's masks for held-out prompts on two photos the golden prompt
files do not cover, for `tests/integration/test_prompts_held_out.py`.

Run in the reference environment (`make bench-env`), from the repository root:

    .venv-ref/bin/python tests/data/make_held_out_prompts.py

For each photo of `PHOTOS` (in ../shared/data/images) it writes
`held_out_prompts/NAME.prompts.json` in the format of ../shared/golden/prompts: `image`,
`shape`, `predictor`, `seed` and `prompts`, each prompt `prompt_id`, `box`, `points`,
`point_labels`, `multimask_output`, `masks` (COCO RLE, counts as text) and `scores`, from
MobileSAM's `SamPredictor` on the CPU in fp32 with the real checkpoint.

The prompts come from a seeded RNG (`SEED`, then the photo's index), `OBJECTS` per photo, three
prompts each, as in the golden files:
- `K-point`: a foreground point drawn uniformly away from the edges, multimask on;
- `K-box`: the bounds of that point's best mask (highest score), grown by `GROW` px and clipped
  to the image, multimask off (a random box where that mask is empty); a point whose box an
  earlier object has is drawn again (`DRAWS` at most);
- `K-box+points`: the box, the point (1) and a background point (0) drawn outside the box where
  the image has room, multimask off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from mobile_sam import SamPredictor, sam_model_registry
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1].parent / "shared"
IMAGES = SHARED / "data" / "images"
CHECKPOINT = SHARED / "models" / "mobile_sam.pt"
OUT = HERE / "held_out_prompts"
PHOTOS = ("groceries.jpg", "picture1.jpg")
SEED = 18
OBJECTS = 8
GROW = 4
DRAWS = 20  # points drawn at most for an object whose box is not one of the photo's already
EDGE = 0.05  # share of each side kept free of foreground points


def rle(mask: np.ndarray) -> dict:
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def predicted(predictor: SamPredictor, prompt: dict) -> dict:
    """The prompt with the predictor's masks and scores."""
    box = np.array(prompt["box"], dtype=np.float64) if prompt["box"] is not None else None
    points = np.array(prompt["points"], dtype=np.float64) if prompt["points"] is not None else None
    labels = np.array(prompt["point_labels"], dtype=np.int64) if prompt["point_labels"] is not None else None
    masks, scores, _ = predictor.predict(
        point_coords=points, point_labels=labels, box=box, multimask_output=prompt["multimask_output"]
    )
    return {**prompt, "masks": [rle(m) for m in masks], "scores": [float(s) for s in scores]}


def foreground_point(rng: np.random.Generator, width: int, height: int) -> list[float]:
    x = rng.integers(int(width * EDGE), int(width * (1 - EDGE)))
    y = rng.integers(int(height * EDGE), int(height * (1 - EDGE)))
    return [float(x) + 0.5, float(y) + 0.5]


def background_point(rng: np.random.Generator, box: list[float], width: int, height: int) -> list[float]:
    """A point outside `box` (100 draws), else the image's corner farthest from the box's centre."""
    x0, y0, x1, y1 = box
    for _ in range(100):
        x, y = float(rng.integers(0, width)) + 0.5, float(rng.integers(0, height)) + 0.5
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            return [x, y]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [0.5 if cx > width / 2 else width - 0.5, 0.5 if cy > height / 2 else height - 0.5]


def box_of(mask: np.ndarray, rng: np.random.Generator, width: int, height: int) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        return [float(x0), float(y0), float(max(x1, x0 + 8)), float(max(y1, y0 + 8))]
    return [
        float(max(0, xs.min() - GROW)),
        float(max(0, ys.min() - GROW)),
        float(min(width - 1, xs.max() + GROW)),
        float(min(height - 1, ys.max() + GROW)),
    ]


def prompts_for(predictor: SamPredictor, rng: np.random.Generator, width: int, height: int) -> list[dict]:
    out, boxes = [], set()
    for k in range(OBJECTS):
        for _ in range(DRAWS):  # a point whose box is new, so that each object is another one
            point = foreground_point(rng, width, height)
            alone = {"prompt_id": f"{k}-point", "box": None, "points": [point], "point_labels": [1]}
            alone = predicted(predictor, {**alone, "multimask_output": True})
            best = mask_utils.decode(alone["masks"][int(np.argmax(alone["scores"]))])
            box = box_of(best, rng, width, height)
            if tuple(box) not in boxes:
                break
        boxes.add(tuple(box))
        negative = background_point(rng, box, width, height)
        boxed = {"prompt_id": f"{k}-box", "box": box, "points": None, "point_labels": None, "multimask_output": False}
        both = {
            "prompt_id": f"{k}-box+points",
            "box": box,
            "points": [point, negative],
            "point_labels": [1, 0],
            "multimask_output": False,
        }
        out += [predicted(predictor, boxed), alone, predicted(predictor, both)]
    return out


def main() -> None:
    torch.set_num_threads(2)
    model = sam_model_registry["vit_t"](checkpoint=str(CHECKPOINT)).to("cpu").eval()
    predictor = SamPredictor(model)
    OUT.mkdir(exist_ok=True)
    for index, name in enumerate(PHOTOS):
        image = np.asarray(ImageOps.exif_transpose(Image.open(IMAGES / name)).convert("RGB"))
        predictor.set_image(image)
        rng = np.random.default_rng([SEED, index])
        height, width = image.shape[:2]
        record = {
            "image": name,
            "shape": list(image.shape),
            "predictor": "SamPredictor.predict",
            "seed": [SEED, index],
            "prompts": prompts_for(predictor, rng, width, height),
        }
        (OUT / f"{name}.prompts.json").write_text(json.dumps(record))
        print(f"{name}: {len(record['prompts'])} prompts", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
