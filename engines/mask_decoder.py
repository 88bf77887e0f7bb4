"""SAM's mask decoder: the two-way transformer, then mask and IoU heads.

Frames and shapes: the image embedding is (1, 256, 64, 64); low-resolution mask logits are
(B, M, 256, 256) over the 1024x1024 model-input frame. Parameter names follow the
``mask_decoder.*`` keys of the SAM and MobileSAM checkpoints.

The decoder runs B prompts against one image. The image side (embedding, positional encoding,
their projections in the first layer) stays batch-1 and broadcasts until the first
image-to-token attention makes it prompt-specific. The arithmetic is the reference's; only the
order of fp32 roundings differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .transformer import TwoWayTransformer


class HeadMLP(nn.Module):
    """``num_layers`` Linear layers (``layers.i``) with `activation` (ReLU) between them: the mask
    decoder's hypernetwork and IoU heads, and SAM 2's MLPs."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.act = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> mask logits (256x256) and predicted IoU per mask.

    Four mask tokens: token 0 is the single-mask output, tokens 1-3 the three multimask outputs.
    """

    def __init__(
        self,
        transformer_dim: int = 256,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.num_mask_tokens = num_multimask_outputs + 1
        self.transformer = TwoWayTransformer(embedding_dim=transformer_dim)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            HeadMLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = HeadMLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        multimask_output: bool | None = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against one image.

        image_embedding (1, C, h, w); image_pe (1, C, h, w); sparse_embeddings (B, N, C);
        dense_embeddings broadcastable to (B, C, h, w). Returns mask logits (B, M, 4h, 4w) and
        predicted IoU (B, M), with M = 3 (tokens 1-3) if ``multimask_output`` is True, 1 (token 0)
        if False, and all 4 (tokens 0-3) if None (the predictor's ONNX graph, which picks later).
        """
        batch = sparse_embeddings.shape[0]
        height, width = image_embedding.shape[2:]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_embeddings], dim=1)
        image_tokens = _to_tokens(image_embedding + dense_embeddings)
        hs, image_tokens = self.transformer(image_tokens, _to_tokens(image_pe), tokens)

        first, stop = {True: (1, self.num_mask_tokens), False: (0, 1), None: (0, self.num_mask_tokens)}[
            multimask_output
        ]
        iou_pred = self.iou_prediction_head(hs[:, 0])[:, first:stop]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(first, stop)], dim=1)
        return self._mask_logits(hyper_in, image_tokens, height, width), iou_pred

    def _mask_logits(self, hyper_in: torch.Tensor, image_tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Upscale the image tokens 4x and dot each upscaled pixel with every mask's hypernetwork output.

        hyper_in (B, M, C/8); image_tokens (B, height * width, C) -> logits (B, M, 4 height, 4 width).
        ``output_upscaling`` is two 2x2 stride-2 transposed convolutions, each of which maps every
        input pixel to its own 2x2 output block. They run here as channels-last matmuls that
        produce those blocks, and the blocks are put back into raster order only at the end, on
        the M logit maps instead of the C/4 and C/8 feature maps.
        """
        up1, norm, act, up2, _ = self.output_upscaling
        x = _blockwise_transposed_conv(image_tokens, up1)  # (B, hw, 2, 2, C/4)
        x = act(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
        x = act(_blockwise_transposed_conv(x, up2))  # (B, hw, 2, 2, 2, 2, C/8)
        batch, masks = hyper_in.shape[:2]
        logits = hyper_in @ x.reshape(batch, -1, x.shape[-1]).transpose(1, 2)  # (B, M, hw * 16), block order
        logits = logits.reshape(batch, masks, height, width, 2, 2, 2, 2).permute(0, 1, 2, 4, 6, 3, 5, 7)
        return logits.reshape(batch, masks, 4 * height, 4 * width)


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, H * W, C) token rows."""
    return x.flatten(2).transpose(1, 2).contiguous()


def _blockwise_transposed_conv(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """A 2x2 stride-2 transposed conv on channels-last pixels: (..., C_in) -> (..., 2, 2, C_out).

    Output block (a, b) of a pixel lands at (2 y + a, 2 x + b) in the conv's usual NCHW output.
    """
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(2, 3, 1, 0).reshape(4 * c_out, c_in)  # rows ordered (a, b, C_out)
    return F.linear(x, weight, conv.bias.repeat(4)).reshape(*x.shape[:-1], 2, 2, c_out)
