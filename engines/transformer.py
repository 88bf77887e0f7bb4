"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Part of the mask decoder (``mask_decoder.transformer.*`` keys of the SAM and MobileSAM
checkpoints). Prompt tokens are (B, Nt, 256); image tokens are (1 or B, 64 * 64, 256): the
image side stays batch-1 and broadcasts until the first image-to-token attention makes it
prompt-specific. The arithmetic is the reference's; only the order of fp32 roundings differs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLPBlock

TokenMLP = Callable[[int, int], nn.Module]  # (dim, hidden) -> the blocks' token MLP


def _relu_mlp_block(dim: int, hidden: int) -> nn.Module:
    return MLPBlock(dim, hidden, act=nn.ReLU)


class TwoWayAttention(nn.Module):
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
        token_mlp: TokenMLP,
    ) -> None:
        super().__init__()
        self.self_attn = TwoWayAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = TwoWayAttention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = token_mlp(embedding_dim, mlp_dim)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = TwoWayAttention(embedding_dim, num_heads, attention_downsample_rate)
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
    """Stack of :class:`TwoWayAttentionBlock` plus a final token->image attention.

    `token_mlp` (dim, hidden) makes each block's token MLP: SAM's `MLPBlock` (``mlp.lin1``,
    ``mlp.lin2``) by default; SAM 2 names the same two ReLU layers ``mlp.layers.0/1``.
    """

    def __init__(
        self,
        depth: int = 2,
        embedding_dim: int = 256,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        attention_downsample_rate: int = 2,
        token_mlp: TokenMLP | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                attention_downsample_rate,
                skip_first_layer_pe=i == 0,
                token_mlp=token_mlp or _relu_mlp_block,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = TwoWayAttention(embedding_dim, num_heads, attention_downsample_rate)
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
