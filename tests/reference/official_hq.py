"""HQ-SAM's official code (`segment-anything-hq` 0.3) on seeded random weights: what
`tests/integration/test_hq_parity.py` holds sam-batch's `*_hq` models to.

Runs in the reference environment (`make bench-env`), from the repository root:

    .venv-ref/bin/python tests/reference/official_hq.py MODEL_TYPE OUT [--ours STATE] [--base CHECKPOINT]
        [--image PATH ...] [--layouts]

MODEL_TYPE is sam-batch's name (vit_t_hq, vit_b_hq, vit_l_hq, vit_h_hq). It writes into OUT:

- `layouts.json` (with `--layouts`): every official HQ-SAM model's state-dict keys and shapes,
  by sam-batch's name;
- `state_dict.pt`: MODEL_TYPE's official model with every floating tensor replaced by seeded
  noise (`reference_cases.fill_random`), so that zero- and one-initialised tensors matter in comparisons. With
  `--base CHECKPOINT` (SAM's weights of the base type, e.g. `mobile_sam.pt` for vit_t_hq), SAM's
  tensors are those weights and only HQ-SAM's own (`HQ_PARAMETERS`) are noise, as HQ-SAM is
  trained: masks then follow the prompts, which a wholly random decoder's barely do (the HQ
  token's output layer is then scaled by `HQ_OUTPUT_SCALE`);
- `outputs.pt`: per image, the encoder's embedding, early features and HQ features, and the
  official `SamPredictor.predict` outputs (logits, IoU, low-resolution logits) for each case of
  `reference_cases.PROMPT_CASES`;
- `amg_<image name>.json`: `SamAutomaticMaskGenerator.generate` at `AMG_PARAMS` (coco_rle).

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
from segment_anything_hq import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for reference_cases
from reference_cases import (  # noqa: E402
    PROMPT_CASES,
    SEED,
    case_prompts,
    fill_random,
    official_arguments,
    strict_load_error,
    write_layouts,
)

OFFICIAL_NAMES = {"vit_t_hq": "vit_tiny", "vit_b_hq": "vit_b", "vit_l_hq": "vit_l", "vit_h_hq": "vit_h"}
# the parameters HQ-SAM adds to SAM (trained while SAM's stay frozen)
HQ_PARAMETERS = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")
# With --base, the HQ token's output layer is scaled down by this after the noise, so that its
# logits refine SAM's rather than swamp them (at 1, the generator keeps one mask on dog.jpg).
HQ_OUTPUT_SCALE = 0.1
# The stability threshold lowered so that the random HQ parts keep masks: their logits blur
# SAM's edges (stability scores about 0.7-0.95, against the default 0.95).
AMG_PARAMS = {"points_per_side": 8, "stability_score_thresh": 0.85}


def build(model_type: str) -> torch.nn.Module:
    return sam_model_registry[OFFICIAL_NAMES[model_type]]().eval()


def main() -> int:
    parser = official_arguments(__doc__.splitlines()[0], sorted(OFFICIAL_NAMES))
    parser.add_argument("--base", type=Path, help="SAM's checkpoint of the base type for SAM's tensors")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    model = build(args.model_type)
    refused = strict_load_error(model, args.ours) if args.ours is not None else None
    if refused:
        print(refused, file=sys.stderr)
        return 1
    if args.layouts:
        write_layouts(args.out / "layouts.json", sorted(OFFICIAL_NAMES), build)

    if args.base is not None:
        missing, unexpected = model.load_state_dict(torch.load(args.base, map_location="cpu"), strict=False)
        if unexpected or any(not any(part in key for part in HQ_PARAMETERS) for key in missing):
            print(f"{args.base}: not SAM's weights for {args.model_type}", file=sys.stderr)
            return 1
    fill_random(model, SEED, HQ_PARAMETERS if args.base is not None else ())
    if args.base is not None:
        with torch.no_grad():
            for tensor in model.mask_decoder.hf_mlp.layers[-1].parameters():
                tensor.mul_(HQ_OUTPUT_SCALE)
    torch.save(model.state_dict(), args.out / "state_dict.pt")
    # TinyViT caches its attention biases when put in eval mode: again, now the weights are in
    model.eval()
    predictor = SamPredictor(model)
    generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **AMG_PARAMS)
    outputs = {}
    for path in args.image:
        image = np.array(Image.open(path).convert("RGB"))
        predictor.set_image(image)
        early = predictor.interm_features[0].permute(0, 3, 1, 2)
        with torch.no_grad():
            decoder = model.mask_decoder
            hq = decoder.embedding_encoder(predictor.features) + decoder.compress_vit_feat(early)
        record = {"embedding": predictor.features, "early": early, "hq_features": hq}
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
        masks = generator.generate(image)
        (args.out / f"amg_{path.name}.json").write_text(json.dumps({"params": AMG_PARAMS, "masks": masks}))
        print(f"{path.name}: {len(masks)} masks", file=sys.stderr, flush=True)
    torch.save(outputs, args.out / "outputs.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
