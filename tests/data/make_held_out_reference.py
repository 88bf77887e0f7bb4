"""Write the reference generator's masks for the held-out photos in tests/data/held_out/, for
`tests/integration/test_parity_run.py`.

The photos are scikit-image's bundled ones, saved as PNG so that both environments read the
same pixels: coffee, rocket, hubble_deep_field and mosaic (1120 x 1400:
astronaut, coffee, chelsea and rocket centred in the cells of a 2 x 2 grid on gray). Run in the
reference environment (`make bench-env`), from the repository root, naming the photos to redo
(all without names):

    .venv-ref/bin/python tests/data/make_held_out_reference.py [NAME.png ...]

Each `NAME.png` gets `NAME.png.json`: `image`, `shape`, `params` and `masks` (the reference's
coco_rle records, as returned), with MobileSAM's `SamAutomaticMaskGenerator` on the CPU in fp32.
`one_pixel.json` beside this file is the same for a 1 x 1 image of gray 120 at 4 x 4 points
(written when no names are given).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry
from PIL import Image

HELD_OUT = Path(__file__).with_name("held_out")
CHECKPOINT = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "mobile_sam.pt"
PARAMS = {"points_per_side": 16}
ONE_PIXEL_PARAMS = {"points_per_side": 4}
ONE_PIXEL_GRAY = 120


def main() -> None:
    torch.set_num_threads(2)
    model = sam_model_registry["vit_t"](checkpoint=str(CHECKPOINT)).eval()
    generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **PARAMS)
    for path in [HELD_OUT / name for name in sys.argv[1:]] or sorted(HELD_OUT.glob("*.png")):
        image = np.array(Image.open(path).convert("RGB"))
        masks = generator.generate(image)
        record = {"image": path.name, "shape": list(image.shape), "params": PARAMS, "masks": masks}
        path.with_name(path.name + ".json").write_text(json.dumps(record))
        print(f"{path.name}: {len(masks)} masks", file=sys.stderr, flush=True)
    if not sys.argv[1:]:
        one_pixel = np.full((1, 1, 3), ONE_PIXEL_GRAY, np.uint8)
        masks = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **ONE_PIXEL_PARAMS).generate(one_pixel)
        record = {"image": None, "gray": ONE_PIXEL_GRAY, "shape": [1, 1, 3], "params": ONE_PIXEL_PARAMS, "masks": masks}
        HELD_OUT.with_name("one_pixel.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
