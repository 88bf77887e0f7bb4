"""SAM 2's mask decoder, for images: SAM's two-way transformer and heads, with the encoder's two
high-resolution levels added into the upscaling, a sigmoid on the IoU head, and "dynamic
multimask" for single-mask output.

Shapes: image embedding (1, 256, 64, 64); high-resolution features (1, 32, 256, 256) and
(1, 64, 128, 128), already through ``conv_s0`` and ``conv_s1`` (`Sam2Model.embed` applies them
once per image, as the official model does); low-resolution mask logits (B, M, 256, 256).
Parameter names follow ``sam_mask_decoder.*`` of the official ``sam2.1_hiera_*.pt``. The object
score token and head serve the video tracker: carried for strict loading, never run here.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import LayerNorm2d
from .mask_decoder import HeadMLP, _to_tokens
from .transformer import TwoWayTransformer

MULTIMASK_OUTPUTS = 3
# single-mask output falls back to the best multimask output when token 0's mask is unstable:
# its stability (pixels above +delta over pixels above -delta) below the threshold
DYNAMIC_MULTIMASK_DELTA = 0.05
DYNAMIC_MULTIMASK_THRESHOLD = 0.98


def _token_mlp(dim: int, hidden: int) -> nn.Module:
    return HeadMLP(dim, hidden, dim, 2)


class Sam2MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> mask logits (256²) and predicted IoU per mask."""

    def __init__(self, transformer_dim: int = 256) -> None:
        super().__init__()
        self.num_mask_tokens = MULTIMASK_OUTPUTS + 1
        self.transformer = TwoWayTransformer(embedding_dim=transformer_dim, token_mlp=_token_mlp)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.obj_score_token = nn.Embedding(1, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.conv_s0 = nn.Conv2d(transformer_dim, transformer_dim // 8, kernel_size=1)
        self.conv_s1 = nn.Conv2d(transformer_dim, transformer_dim // 4, kernel_size=1)
        self.output_hypernetworks_mlps = nn.ModuleList(
            HeadMLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = HeadMLP(transformer_dim, 256, self.num_mask_tokens, 3)
        self.pred_obj_score_head = HeadMLP(transformer_dim, transformer_dim, 1, 3)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        high_res_features: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against one image.

        image_embedding (1, C, h, w); image_pe (1, C, h, w); sparse_embeddings (B, N, C);
        dense_embeddings (1 or B, C, h, w) or broadcastable; high_res_features as in the module
        notes. Returns every mask token's logits (B, 4, 4h, 4w) and IoU (B, 4); `select_masks`
        keeps a prompt's.
        """
        batch = sparse_embeddings.shape[0]
        height, width = image_embedding.shape[2:]
        output_tokens = torch.cat([self.obj_score_token.weight, self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_embeddings], dim=1)
        image_tokens = _to_tokens(image_embedding + dense_embeddings)
        hs, image_tokens = self.transformer(image_tokens, _to_tokens(image_pe), tokens)

        up1, norm, act1, up2, act2 = self.output_upscaling
        feat_s0, feat_s1 = high_res_features
        x = image_tokens.transpose(1, 2).reshape(batch, -1, height, width)
        x = act1(norm(up1(x) + feat_s1))
        upscaled = act2(up2(x) + feat_s0)  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack([mlp(hs[:, 2 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], 1)
        logits = (hyper_in @ upscaled.flatten(2)).unflatten(-1, upscaled.shape[2:])  # (B, 4, 4h, 4w)
        return logits, torch.sigmoid(self.iou_prediction_head(hs[:, 1]))


def select_masks(logits: torch.Tensor, iou: torch.Tensor, multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every mask token's logits (B, 4, H, W) and IoU (B, 4) -> what a prompt keeps: the three
    multimask outputs (tokens 1-3), or one mask (`dynamic_single_mask`)."""
    if multimask_output:
        return logits[:, 1:], iou[:, 1:]
    return dynamic_single_mask(logits, iou)


def dynamic_single_mask(logits: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every output's logits (B, 4, H, W) and IoU (B, 4) -> one mask a prompt (B, 1, H, W), (B, 1):
    token 0's where its stability is at least `DYNAMIC_MULTIMASK_THRESHOLD`, else the multimask
    output (tokens 1-3) with the highest IoU (the first on a tie)."""
    flat = logits[:, 0].flatten(1)
    above = (flat > DYNAMIC_MULTIMASK_DELTA).sum(-1).float()
    union = (flat > -DYNAMIC_MULTIMASK_DELTA).sum(-1).float()
    stable = torch.where(union > 0, above / union, 1.0) >= DYNAMIC_MULTIMASK_THRESHOLD
    best = torch.argmax(iou[:, 1:], dim=-1) + 1
    rows = torch.arange(len(iou), device=iou.device)
    chosen = torch.where(stable, 0, best)
    return logits[rows, chosen][:, None], iou[rows, chosen][:, None]
