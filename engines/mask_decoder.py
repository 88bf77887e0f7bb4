"""SAM's prompt encoder and mask decoder (two-way transformer + mask/IoU heads).

Frames and shapes: prompts are points in the 1024x1024 model-input frame; the image embedding is
(1, 256, 64, 64); low-resolution mask logits are (B, M, 256, 256) over the same 1024 frame.
Parameter names follow the ``prompt_encoder.*`` / ``mask_decoder.*`` keys of the SAM and
MobileSAM checkpoints.

The decoder runs B prompts against one image. The image side (embedding, positional encoding,
their projections in the first layer) stays batch-1 and broadcasts until the first
image-to-token attention makes it prompt-specific. The arithmetic is the reference's; only the
order of fp32 roundings differs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: unit-square positions (..., 2) as xy -> (..., 2 * num_feats)."""

    def __init__(self, num_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def encode(self, unit_xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) xy in [0, 1] -> (..., 2 * num_feats) as [sin, cos] of a random projection."""
        proj = (2 * unit_xy - 1) @ self.positional_encoding_gaussian_matrix
        proj = (2 * math.pi) * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Encoding of the pixel centres of a height x width grid: (1, 2 * num_feats, height, width)."""
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        unit_xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self.encode(unit_xy).permute(2, 0, 1).unsqueeze(0)

    def points(self, xy: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 2) xy in pixels of an image of size ``image_hw`` -> (..., 2 * num_feats)."""
        size = torch.tensor([image_hw[1], image_hw[0]], device=xy.device, dtype=xy.dtype)
        return self.encode((xy / size).to(torch.float32))


class PromptEncoder(nn.Module):
    """Points (and optionally a mask) -> sparse and dense prompt embeddings.

    ``point_embeddings`` holds four learned vectors: negative point, positive point, and the two
    box corners (boxes are not used by this project but their weights are part of the checkpoint).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, embed_dim, 64, 64)."""
        return self.pe_layer.grid(*self.image_embedding_size)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings of point prompts plus one padding "not a point" token.

        coords: (B, N, 2) xy in input-frame pixels; labels: (B, N) with 1 = foreground,
        0 = background, -1 = ignore. Returns (B, N + 1, embed_dim).
        """
        pe = self.pe_layer.points(coords + 0.5, self.input_image_size)  # sample at pixel centres
        negative, positive = self.point_embeddings[0].weight, self.point_embeddings[1].weight
        by_label = torch.cat([self.not_a_point_embed.weight, negative, positive])  # rows for labels -1, 0, 1
        ignored = (labels == -1).unsqueeze(-1)
        points = torch.where(ignored, 0.0, pe) + by_label[labels.long() + 1]
        padding = self.not_a_point_embed.weight.expand(coords.shape[0], 1, -1)
        return torch.cat([points, padding], dim=1)

    def embed_mask(self, masks: torch.Tensor | None) -> torch.Tensor:
        """Dense embedding of mask prompts (B, 1, 256, 256) logits -> (B, embed_dim, 64, 64).

        Without a mask, returns the learned "no mask" vector as (1, embed_dim, 1, 1), which
        broadcasts over the batch and the grid.
        """
        if masks is None:
            return self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.mask_downscaling(masks)

    def forward(
        self, coords: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 2), (B, N)[, (B, 1, 256, 256)] -> sparse (B, N + 1, C), dense (B or 1, C, 64 or 1, 64 or 1)."""
        return self.embed_points(coords, labels), self.embed_mask(masks)


class Attention(nn.Module):
    """Multi-head attention with q/k/v projected down to ``embedding_dim // downsample_rate``.

    Inputs are (B, N, embedding_dim) token sets whose batch sizes may be 1 and B: batch-1
    keys/values are shared by every query set, batch-1 queries are broadcast.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        internal_dim = embedding_dim // downsample_rate
        self.q_proj = nn.Linear(embedding_dim, internal_dim)
        self.k_proj = nn.Linear(embedding_dim, internal_dim)
        self.v_proj = nn.Linear(embedding_dim, internal_dim)
        self.out_proj = nn.Linear(internal_dim, embedding_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (Bq, Nq, C), k and v (Bk, Nk, C) -> (max(Bq, Bk), Nq, C)."""
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        if k.shape[0] == 1 < q.shape[0]:
            # Shared keys: attend once with every batch's queries stacked into one sequence.
            b, n, _ = q.shape
            out = self._attend(q.reshape(1, b * n, -1), k, v).reshape(b, n, -1)
        else:
            batch = max(q.shape[0], k.shape[0])
            out = self._attend(q.expand(batch, -1, -1), k.expand(batch, -1, -1), v.expand(batch, -1, -1))
        return self.out_proj(out)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention per head: (B, Nq, D), (B, Nk, D), (B, Nk, D) -> (B, Nq, D)."""
        b, nq, dim = q.shape
        heads = self.num_heads
        q, k, v = (x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, nq, dim)


class TwoWayAttentionBlock(nn.Module):
    """Prompt-token self-attention, token->image attention, token MLP, image->token attention.

    Each step is residual + LayerNorm; positional encodings are re-added to the inputs of every
    attention (the first block's self-attention uses none and no residual).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B, Nt, C), keys (1 or B, HW, C), query_pe (B, Nt, C), key_pe (1, HW, C).

        Returns the updated queries (B, Nt, C) and keys (B, HW, C).
        """
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token->image attention."""

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, attention_downsample_rate, skip_first_layer_pe=i == 0
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_tokens: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_tokens (1 or B, HW, C), image_pe (1, HW, C), point_embedding (B, Nt, C).

        Returns the output tokens (B, Nt, C) and the updated image tokens (B, HW, C).
        """
        queries, keys = point_embedding, image_tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=image_pe)
        attn_out = self.final_attn_token_to_image(queries + point_embedding, keys + image_pe, keys)
        return self.norm_final_attn(queries + attn_out), keys


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
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
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_embeddings: torch.Tensor,
        dense_embeddings: torch.Tensor,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts against one image.

        image_embedding (1, C, h, w); image_pe (1, C, h, w); sparse_embeddings (B, N, C);
        dense_embeddings broadcastable to (B, C, h, w). Returns mask logits (B, M, 4h, 4w) and
        predicted IoU (B, M), with M = 3 (tokens 1-3) if ``multimask_output`` else 1 (token 0).
        """
        batch = sparse_embeddings.shape[0]
        height, width = image_embedding.shape[2:]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(batch, -1, -1), sparse_embeddings], dim=1)
        image_tokens = _to_tokens(image_embedding + dense_embeddings)
        hs, image_tokens = self.transformer(image_tokens, _to_tokens(image_pe), tokens)

        first, stop = (1, self.num_mask_tokens) if multimask_output else (0, 1)
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
