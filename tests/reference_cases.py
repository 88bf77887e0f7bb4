"""What the official-code scripts in `tests/reference/` and the parity tests that read their
outputs share: the prompt cases, and seeded noise for weights that cannot be downloaded here.

Imports torch and numpy only, so that it runs in both environments (`.venv`, `.venv-ref`).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

SEED = 20
PHOTOS = ("dog.jpg", "groceries.jpg")  # in ../shared/data/images
# (name, point coords as fractions of the image's width and height, labels, box as fractions
# or None, multimask_output)
PROMPT_CASES = [
    ("point_multimask", [[0.5, 0.5]], [1], None, True),
    ("point_single", [[0.3, 0.6]], [1], None, False),
    ("box", None, None, [0.2, 0.2, 0.7, 0.8], False),
    ("box_points_multimask", [[0.4, 0.4], [0.6, 0.7]], [1, 0], [0.1, 0.15, 0.9, 0.85], True),
]


def fill_random(model: torch.nn.Module, seed: int = SEED, only: tuple[str, ...] = ()) -> None:
    """Every floating tensor of the state dict (only those whose names hold one of `only`, if
    given) to seeded noise, scale 1/sqrt(last dim) (0.5 for vectors), so that zero- and
    one-initialised tensors matter in comparisons; a BatchNorm's running variance to
    |noise| + 0.5, since it must be positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and (not only or any(part in name for part in only)):
                scale = tensor.shape[-1] ** -0.5 if tensor.ndim > 1 else 0.5
                noise = torch.randn(tensor.shape, generator=generator) * scale
                tensor.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise)


# SAM 1's key prefixes -> SAM 2's, for the tensors the two share (the token MLPs are renamed)
MOBILE_SAM_NAMES = (
    ("prompt_encoder.", "sam_prompt_encoder."),
    ("mask_decoder.", "sam_mask_decoder."),
    (".mlp.lin1.", ".mlp.layers.0."),
    (".mlp.lin2.", ".mlp.layers.1."),
)
# The random trunk's features scaled down to about the size a trained decoder reads (their
# standard deviation is about 85 in the embedding and 1,000 and 500 in the two high-resolution
# levels): the neck's tensors by NECK_SCALE, conv_s0/conv_s1 by CONV_S_SCALE. Unscaled, the
# prompts' positions are swamped and every point gives the same mask.
NECK_SCALE, CONV_S_SCALE = 1e-3, 1e-2


def sam2_weights_with_mobile_sam_decoder(model: torch.nn.Module, mobile_sam: str | os.PathLike) -> None:
    """Weights for a SAM 2.1 model (official or sam-batch's: the names are the same) whose masks
    follow the prompts: seeded noise (`fill_random`), then MobileSAM's prompt encoder and the
    mask decoder tensors SAM 1 shares (`MOBILE_SAM_NAMES`, where the shapes agree), then the
    trunk's features scaled down (`NECK_SCALE`, `CONV_S_SCALE`)."""
    fill_random(model, SEED)
    ours = model.state_dict()
    shared = {}
    for key, value in torch.load(mobile_sam, map_location="cpu", weights_only=True).items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            for old, new in MOBILE_SAM_NAMES:
                key = key.replace(old, new)
            if key in ours and ours[key].shape == value.shape:
                shared[key] = value
    model.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.startswith("image_encoder.neck."):
                tensor.mul_(NECK_SCALE)
            elif name.startswith(("sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.")):
                tensor.mul_(CONV_S_SCALE)


def case_prompts(case: tuple, height: int, width: int) -> tuple:
    """A case's prompts in pixels of an (height, width) image: points (N, 2) or None, labels (N,)
    or None, box (4,) or None, multimask_output."""
    _, points, labels, box, multimask = case
    scale = np.array([width, height], dtype=np.float64)
    return (
        None if points is None else np.array(points) * scale,
        None if labels is None else np.array(labels),
        None if box is None else np.array(box) * np.tile(scale, 2),
        multimask,
    )


def official_arguments(description: str, model_types: Sequence[str]) -> argparse.ArgumentParser:
    """The arguments every official-code script takes: MODEL_TYPE (sam-batch's name), OUT,
    `--ours STATE`, `--image PATH` (repeated) and `--layouts`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model_type", choices=model_types)
    parser.add_argument("out", type=Path)
    parser.add_argument("--ours", type=Path, help="sam-batch's state dict to load strictly first")
    parser.add_argument("--image", type=Path, action="append", default=[])
    parser.add_argument("--layouts", action="store_true", help="write layouts.json (builds every model)")
    return parser


def strict_load_error(model: torch.nn.Module, state: Path) -> str | None:
    """Load the state dict at `state` into `model` with `strict=True`; the one-line reason it
    does not load, or None."""
    try:
        model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True), strict=True)
    except RuntimeError as error:
        return f"{state}: does not load strictly: {str(error).splitlines()[0]}"
    return None


def write_layouts(path: Path, model_types: Sequence[str], build: Callable[[str], torch.nn.Module]) -> None:
    """Every model type's state-dict keys and shapes, as JSON at `path`."""
    layouts = {}
    for name in model_types:
        layouts[name] = {key: list(value.shape) for key, value in build(name).state_dict().items()}
    path.write_text(json.dumps(layouts))
