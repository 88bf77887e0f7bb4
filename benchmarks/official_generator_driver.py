"""The official automatic generators, timed in the reference environment (`.venv-ref`), for
`benchmarks/models.py`. Not part of sam-batch: it imports the official packages only.

    .venv-ref/bin/python benchmarks/official_generator_driver.py MODEL_TYPE STATE IMAGE [IMAGE ...]
        --points-per-side N --threads T

MODEL_TYPE is sam-batch's name (`vit_*_hq` -> segment-anything-hq, `sam2.1_hiera_*` -> sam2);
STATE a state dict both load strictly. Prints one JSON line per image: its name, the seconds of
`generate` (the model built and loaded before any timing), and the number of masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from PIL import Image

HQ_NAMES = {"vit_t_hq": "vit_tiny", "vit_b_hq": "vit_b", "vit_l_hq": "vit_l", "vit_h_hq": "vit_h"}


def generator(model_type: str, state: str, points_per_side: int):
    """The official generator of `model_type` with the weights in `state`, at official defaults
    but `points_per_side`."""
    weights = torch.load(state, map_location="cpu", weights_only=True)
    if model_type.endswith("_hq"):
        from segment_anything_hq import SamAutomaticMaskGenerator, sam_model_registry

        model = sam_model_registry[HQ_NAMES[model_type]]()
        model.load_state_dict(weights, strict=True)
        return SamAutomaticMaskGenerator(model.eval(), points_per_side=points_per_side)
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    model = build_sam2(f"configs/sam2.1/{model_type}.yaml", None, device="cpu", mode="eval")
    model.load_state_dict(weights, strict=True)
    return SAM2AutomaticMaskGenerator(model.eval(), points_per_side=points_per_side)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_type")
    parser.add_argument("state")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--points-per-side", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    masks = generator(args.model_type, args.state, args.points_per_side)
    for path in args.images:
        image = np.array(Image.open(path).convert("RGB"))
        started = time.perf_counter()
        with torch.inference_mode():
            records = masks.generate(image)
        seconds = time.perf_counter() - started
        print(json.dumps({"image": path, "seconds": seconds, "masks": len(records)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
