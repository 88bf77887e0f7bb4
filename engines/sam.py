"""The SAM model (image encoder + prompt encoder + mask decoder) and its builder.

Frames: the image encoder takes normalised images zero-padded to 1024 x 1024 (see
``transforms``) and makes image embeddings (256, 64, 64); point prompts are xy pixel
coordinates in the input frame; low-resolution mask logits are 256 x 256 over the padded
1024 x 1024 input. HQ-SAM types (``*_hq``) keep the base type's encoder and prompt encoder
and decode with `hq_decoder.HqMaskDecoder`, which also reads the crop's HQ features.
"""

from __future__ import annotations

import torch
from torch import nn

from .hq_decoder import HqMaskDecoder
from .image_encoder import VIT_CONFIGS, ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .registry import HQ_SUFFIX, MODEL_TYPES, is_hq, is_sam2
from .tiny_vit import TinyViT
from .transforms import PIXEL_MEAN, PIXEL_STD

TINY_VIT_EARLY_DIM = 160  # the width of TinyViT's early features (its second stage's output)


class SamModel(nn.Module):
    """SAM: ``image_encoder`` ((N,3,1024,1024) -> (N,256,64,64)), ``prompt_encoder``, ``mask_decoder``.

    ``pixel_mean``/``pixel_std`` (3, 1, 1) are non-persistent buffers, as in the checkpoints,
    which therefore load with ``strict=True``. `hq` says whether the decoder is HQ-SAM's.
    """

    def __init__(self, image_encoder: nn.Module, mask_decoder: MaskDecoder | None = None) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = mask_decoder if mask_decoder is not None else MaskDecoder()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).reshape(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).reshape(3, 1, 1), persistent=False)

    @property
    def hq(self) -> bool:
        return isinstance(self.mask_decoder, HqMaskDecoder)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, padded images (N, 3, 1024, 1024) -> image embeddings (N, 256, 64, 64)."""
        return self.image_encoder(images)

    @torch.no_grad()
    def embed_hq(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """HQ-SAM: images (N, 3, 1024, 1024) -> image embeddings (N, 256, 64, 64) and HQ features
        (N, 32, 256, 256)."""
        embedding, early = self.image_encoder.features(images)
        return embedding, self.mask_decoder.hq_features(embedding, early)

    @torch.no_grad()
    def decode(
        self,
        image_embedding: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        hq_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's masks per point prompt, before upsampling: SAM's three multimask
        outputs, or HQ-SAM's one (the best of three plus the HQ token's, `hq_decoder`).

        image_embedding: (1, 256, 64, 64); point_coords: (B, 1, 2) xy in input-frame pixels;
        point_labels: (B, 1) int, 1 = foreground, 0 = background; hq_features (1, 32, 256, 256)
        for HQ-SAM. Coordinates are used in their own dtype until the positional encoding (SAM's
        generator passes float64). Returns low-resolution mask logits (B, M, 256, 256) and
        predicted IoU (B, M): M = 3, or 1 for HQ-SAM.
        """
        sparse, dense = self.prompt_encoder(point_coords, point_labels)
        return self.decode_sparse(image_embedding, sparse, dense, True, hq_features)

    def decode_sparse(
        self,
        image_embedding: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool | None,
        hq_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder on embedded prompts (sparse (B, N, 256), dense broadcastable to
        (B, 256, 64, 64)): SAM's with `MaskDecoder`'s outputs, HQ-SAM's with `HqMaskDecoder`'s."""
        pe = self.prompt_encoder.dense_pe()
        if self.hq:
            return self.mask_decoder(image_embedding, pe, sparse, dense, multimask_output, hq_features)
        return self.mask_decoder(image_embedding, pe, sparse, dense, multimask_output)


def build_sam(model_type: str) -> SamModel:
    """A randomly initialised SAM or HQ-SAM of ``model_type`` (one of :data:`MODEL_TYPES` but the
    SAM 2.1 types, which `sam2.build_sam2` builds), in eval mode."""
    if model_type not in MODEL_TYPES or is_sam2(model_type):
        known = tuple(t for t in MODEL_TYPES if not is_sam2(t))
        raise ValueError(f"not a SAM or HQ-SAM model type: {model_type!r}; expected one of {known}")
    base = model_type.removesuffix(HQ_SUFFIX)
    if base == "vit_t":
        encoder: nn.Module = TinyViT()
        early_dim = TINY_VIT_EARLY_DIM
    else:
        encoder = ImageEncoderViT(VIT_CONFIGS[base])
        early_dim = VIT_CONFIGS[base].embed_dim
    decoder = HqMaskDecoder(early_dim) if is_hq(model_type) else MaskDecoder()
    return SamModel(encoder, decoder).eval()
