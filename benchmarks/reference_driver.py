"""The reference generator's side of `benchmarks.reference`, run by `.venv-ref`'s Python
(never ours): argv[1] is a JSON spec (see `reference.run_reference`); each image's seconds and
records go to its JSON file, and one JSON object of versions is printed last."""

import json
import sys
import time
from importlib.metadata import version

import numpy as np
import torch
from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
model = sam_model_registry[spec["model_type"]](checkpoint=spec["checkpoint"]).to(spec["device"]).eval()
generator = SamAutomaticMaskGenerator(model, points_per_side=spec["points_per_side"], output_mode="coco_rle")
if spec["warm_up"]:  # once, untimed: CUDA's kernels and allocator
    generator.generate(np.load(spec["images"][0][0]))
for pixels, out in spec["images"]:
    image = np.load(pixels)
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "records": records}, f)
    print(f"{pixels}: {seconds:.1f}s, {len(records)} masks", file=sys.stderr, flush=True)
print(
    json.dumps(
        {"torch": torch.__version__, "mobile_sam": version("mobilesam-mirror"), "threads": torch.get_num_threads()}
    )
)
