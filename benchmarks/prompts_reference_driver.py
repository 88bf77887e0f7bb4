"""The reference predictor's side of `benchmarks.prompts`, run by `.venv-ref`'s Python (never
ours): argv[1] is a JSON spec (see `prompts.run_reference`). MobileSAM's `SamPredictor` loops
over the prompts as its users do: `set_image` once per image, `predict` once per box
(multimask off), on the spec's `device` ("cpu" when absent). One untimed image and box first
(warm-up). Prints one JSON object: the loop's seconds (set_image + predict, the model loaded and
the pixels decoded, the device synchronised at the end), every prompt's score in order, and the
versions."""

import json
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from mobile_sam import SamPredictor, sam_model_registry

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
device = spec.get("device", "cpu")
model = sam_model_registry[spec["model_type"]](checkpoint=spec["checkpoint"]).to(device).eval()
predictor = SamPredictor(model)
pixels = {path: np.load(path) for path in spec["pixels"]}
first_path, first_boxes = spec["images"][0]
predictor.set_image(pixels[first_path])
predictor.predict(box=np.array(first_boxes[0], dtype=np.float64), multimask_output=False)
scores = []
start = time.perf_counter()
for path, boxes in spec["images"]:
    predictor.set_image(pixels[path])
    for box in boxes:
        _, found, _ = predictor.predict(box=np.array(box, dtype=np.float64), multimask_output=False)
        scores.append(float(found[0]))
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
print(
    json.dumps(
        {
            "seconds": seconds,
            "scores": scores,
            "torch": torch.__version__,
            "mobile_sam": version("mobilesam-mirror"),
            "threads": torch.get_num_threads(),
        }
    )
)
