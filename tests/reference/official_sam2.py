"""SAM 2.1's official code (`sam2` 1.1.0) on seeded random weights: what
`tests/integration/test_sam2_parity.py` holds sam-batch's `sam2.1_hiera_*` models to.

Runs in the reference environment (`make bench-env`; `sam2` installed with SAM2_BUILD_CUDA=0),
from the repository root:

    .venv-ref/bin/python tests/reference/official_sam2.py MODEL_TYPE OUT [--ours STATE]
        [--decoder-from CHECKPOINT] [--image PATH ...] [--layouts]

MODEL_TYPE is sam-batch's name (sam2.1_hiera_t, sam2.1_hiera_s, sam2.1_hiera_b+, sam2.1_hiera_l),
the model built from the package's own config (`configs/sam2.1/<type>.yaml`) by `build_sam2`, as
`SAM2ImagePredictor` uses it. It writes into OUT:

- `layouts.json` (with `--layouts`): every size's state-dict keys and shapes;
- `checkpoint.pt`: the model's weights in the official checkpoint's form (`{"model": ...}`),
  every floating tensor seeded noise (`reference_cases.fill_random`). With `--decoder-from
  mobile_sam.pt`, `reference_cases.sam2_weights_with_mobile_sam_decoder` instead: the prompt
  encoder and the mask decoder's tensors that SAM 1 shares are MobileSAM's trained values and the
  random trunk's features are scaled down, so that masks follow the prompts, which a wholly
  random model's do not;
- `outputs.pt`: per image, the image embedding and the two high-resolution features, and
  `SAM2ImagePredictor.predict` (logits, IoU, low-resolution logits) for each prompt case;
- `amg_<m2m>_<image name>.json`: `SAM2AutomaticMaskGenerator.generate` at `AMG_PARAMS`
  (coco_rle), with `use_m2m` off (`amg_off_...`) and on (`amg_on_...`).

With `--ours STATE`, it first loads sam-batch's state dict STATE into the official model with
`strict=True` and exits with status 1 if that fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference_cases
from reference_cases import (  # noqa: E402
    PROMPT_CASES,
    SEED,
    case_prompts,
    fill_random,
    official_arguments,
    sam2_weights_with_mobile_sam_decoder,
    strict_load_error,
    write_layouts,
)

MODEL_TYPES = ("sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")
# The thresholds lowered so that random weights keep masks.
AMG_PARAMS = {"points_per_side": 8, "pred_iou_thresh": 0.56, "stability_score_thresh": 0.35}


def build(model_type: str) -> torch.nn.Module:
    return build_sam2(f"configs/sam2.1/{model_type}.yaml", None, device="cpu", mode="eval")


def main() -> int:
    parser = official_arguments(__doc__.splitlines()[0], MODEL_TYPES)
    parser.add_argument("--decoder-from", type=Path, help="MobileSAM's checkpoint for the shared decoder tensors")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build(args.model_type)
    refused = strict_load_error(model, args.ours) if args.ours is not None else None
    if refused:
        print(refused, file=sys.stderr)
        return 1
    if args.layouts:
        write_layouts(args.out / "layouts.json", MODEL_TYPES, build)

    if args.decoder_from is not None:
        sam2_weights_with_mobile_sam_decoder(model, args.decoder_from)
    else:
        fill_random(model, SEED)
    torch.save({"model": model.state_dict()}, args.out / "checkpoint.pt")
    predictor = SAM2ImagePredictor(model)
    outputs = {}
    for path in args.image:
        image = np.array(Image.open(path).convert("RGB"))
        predictor.set_image(image)
        features = predictor._features
        record = {"embedding": features["image_embed"], "high_res": list(features["high_res_feats"])}
        for case in PROMPT_CASES:
            points, labels, box, multimask = case_prompts(case, *image.shape[:2])
            logits, iou, low_res = predictor.predict(
                points, labels, box, multimask_output=multimask, return_logits=True
            )
            record[case[0]] = {
                "logits": torch.from_numpy(logits),
                "iou": torch.from_numpy(iou),
                "low_res": torch.from_numpy(low_res),
            }
        outputs[path.name] = record
        for m2m in (False, True):
            generator = SAM2AutomaticMaskGenerator(model, output_mode="coco_rle", use_m2m=m2m, **AMG_PARAMS)
            masks = generator.generate(image)
            name = f"amg_{'on' if m2m else 'off'}_{path.name}.json"
            (args.out / name).write_text(json.dumps({"params": {**AMG_PARAMS, "use_m2m": m2m}, "masks": masks}))
            print(f"{path.name} use_m2m={m2m}: {len(masks)} masks", file=sys.stderr, flush=True)
    torch.save(outputs, args.out / "outputs.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
