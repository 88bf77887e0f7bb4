"""Checkpoints of the model families whose weights cannot be downloaded here, made from MobileSAM's
(../shared) and seeded noise, so that their masks follow the prompts: vit_t_hq (HQ-SAM) and
sam2.1_hiera_t (SAM 2.1). `tests/conftest.py` serves them as the `hq_checkpoint` and
`sam2_checkpoint` fixtures."""

from __future__ import annotations

from pathlib import Path

import torch
from reference_cases import SEED, sam2_weights_with_mobile_sam_decoder

from sam_batch.engines.sam import build_sam
from sam_batch.engines.sam2 import build_sam2

# HQ-SAM's own parts of the decoder, which SAM's checkpoints lack
HQ_PARTS = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


def write_hq_checkpoint(path: Path, mobile_sam: Path) -> Path:
    """vit_t_hq weights at `path` (a plain state dict): MobileSAM's for SAM's part, seeded noise
    (a tenth in the HQ token's output layer) for HQ-SAM's own, as `tests/reference/official_hq.py
    --base` makes them."""
    model = build_sam("vit_t_hq")
    missing, unexpected = model.load_state_dict(
        torch.load(mobile_sam, map_location="cpu", weights_only=True), strict=False
    )
    assert not unexpected and missing and all(any(part in key for part in HQ_PARTS) for key in missing)
    generator = torch.Generator().manual_seed(SEED)
    state = model.state_dict()
    for key in missing:
        scale = state[key].shape[-1] ** -0.5 if state[key].ndim > 1 else 0.5
        state[key] = torch.randn(state[key].shape, generator=generator) * scale
    for key in ("mask_decoder.hf_mlp.layers.2.weight", "mask_decoder.hf_mlp.layers.2.bias"):
        state[key] = state[key] * 0.1
    torch.save(state, path)
    return path


def write_sam2_checkpoint(path: Path, mobile_sam: Path) -> Path:
    """sam2.1_hiera_t weights at `path` in the official checkpoint's form (`{"model": ...}`), made
    as `tests/reference/official_sam2.py --decoder-from` makes them
    (`reference_cases.sam2_weights_with_mobile_sam_decoder`)."""
    model = build_sam2("sam2.1_hiera_t")
    sam2_weights_with_mobile_sam_decoder(model, mobile_sam)
    torch.save({"model": model.state_dict()}, path)
    return path
