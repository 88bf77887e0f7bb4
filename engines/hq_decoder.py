"""HQ-SAM's mask decoder: SAM's, plus an HQ output token whose mask reads fused early and late
image features.

Shapes: the image embedding is (1, 256, 64, 64); the early features (1, E, 64, 64) are the
encoder's first global-attention output (E its width: 160 for TinyViT, 768/1024/1280 for the
ViTs); the HQ features (1, 32, 256, 256) fuse both, once per crop (`hq_features`). Parameter
names follow the ``mask_decoder.*`` keys of the official ``sam_hq_vit_*.pth`` checkpoints
(`segment-anything-hq`'s `MaskDecoderHQ`).

An HQ mask is SAM's mask plus the HQ token's: with `multimask_output`, SAM's part is the one of
its three multimask outputs with the highest predicted IoU, and that IoU is the mask's; without,
mask token 0 and its IoU. So every prompt gives one mask. (The official predictor's
`hq_token_only`, which leaves SAM's part out, is not offered: its generator never sets it.)
"""

from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm2d
from .mask_decoder import HeadMLP, MaskDecoder, _to_tokens

HQ_CHANNELS = 32  # the HQ features' and upscaled embedding's channels (transformer width / 8)


def _upscaling(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """Two 2x2 stride-2 transposed convolutions with LayerNorm2d and GELU between: 4x the size."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, mid_channels, kernel_size=2, stride=2),
        LayerNorm2d(mid_channels),
        nn.GELU(),
        nn.ConvTranspose2d(mid_channels, out_channels, kernel_size=2, stride=2),
    )


class HqMaskDecoder(MaskDecoder):
    """SAM's decoder (`MaskDecoder`) with HQ-SAM's output token and feature fusion.

    early_dim: the width E of the encoder's early features.
    """

    def __init__(self, early_dim: int, transformer_dim: int = 256) -> None:
        super().__init__(transformer_dim)
        channels = transformer_dim // 8
        self.hf_token = nn.Embedding(1, transformer_dim)
        self.hf_mlp = HeadMLP(transformer_dim, transformer_dim, channels, 3)
        self.compress_vit_feat = _upscaling(early_dim, transformer_dim, channels)
        self.embedding_encoder = _upscaling(transformer_dim, transformer_dim // 4, channels)
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(channels, transformer_dim // 4, 3, 1, 1),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.Conv2d(transformer_dim // 4, channels, 3, 1, 1),
        )

    def hq_features(self, image_embedding: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
        """Image embedding (N, 256, 64, 64) and early features (N, E, 64, 64) -> HQ features
        (N, 32, 256, 256)."""
        return self.embedding_encoder(image_embedding) + self.compress_vit_feat(early)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        multimask_output: bool | None = True,
        hq_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against one image (see the module notes).

        image_embedding (1, C, h, w); image_pe (1, C, h, w); sparse_embeddings (B, N, C);
        dense_embeddings broadcastable to (B, C, h, w); hq_features (1, C/8, 4h, 4w).
        Returns mask logits (B, 1, 4h, 4w) and predicted IoU (B, 1). With `multimask_output`
        None, every output instead (the predictor's ONNX graph, which combines later): logits
        (B, 5, 4h, 4w) of mask tokens 0-3 and the HQ token, and IoU (B, 4) of tokens 0-3.
        """
        if hq_features is None:
            raise ValueError("an HQ-SAM decoder needs the crop's hq_features")
        batch = sparse_embeddings.shape[0]
        height, width = image_embedding.shape[2:]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_embeddings], dim=1)
        hs, image_tokens = self.transformer(
            _to_tokens(image_embedding + dense_embeddings), _to_tokens(image_pe), tokens
        )

        iou_pred = self.iou_prediction_head(hs[:, 0])  # (B, 4)
        upscaled = self.output_upscaling(image_tokens.transpose(1, 2).reshape(batch, -1, height, width))
        hq_upscaled = self.embedding_maskfeature(upscaled) + hq_features
        hq_logits = _dot(self.hf_mlp(hs[:, 1 + self.num_mask_tokens]), hq_upscaled)  # (B, 4h, 4w)
        hyper_in = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        if multimask_output is None:
            sam_logits = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[2:])
            return torch.cat([sam_logits, hq_logits[:, None]], dim=1), iou_pred
        iou, token = select_sam_output(iou_pred, multimask_output)
        sam_logits = _dot(hyper_in[torch.arange(batch, device=token.device), token], upscaled)
        return (sam_logits + hq_logits)[:, None], iou[:, None]


def select_sam_output(iou_pred: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's part of an HQ mask: IoU predictions (B, 4) of mask tokens 0-3 -> the kept IoU (B,)
    and its mask token (B,): token 0 without `multimask_output`, else the highest of tokens 1-3
    (the first on a tie, as `torch.max`)."""
    if not multimask_output:
        return iou_pred[:, 0], torch.zeros(len(iou_pred), dtype=torch.long, device=iou_pred.device)
    iou, index = torch.max(iou_pred[:, 1:], dim=1)
    return iou, index + 1


def _dot(hyper: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """Per-prompt vectors (B, C/8) against upscaled features (B or 1, C/8, H, W) -> logits (B, H, W)."""
    # shape[0], not len(): an ONNX trace keeps the prompt batch dynamic only when it reads a shape
    return torch.einsum("bc,bchw->bhw", hyper, upscaled.expand(hyper.shape[0], -1, -1, -1))
