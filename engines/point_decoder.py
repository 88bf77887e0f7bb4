"""SAM's mask decoder for many single-point prompts on one image: the same arithmetic, less work.

`MaskDecoder.forward` runs every prompt through the full two-way transformer on (HW, C) =
(4096, 256) image tokens. Automatic mask generation sends 1,024 prompts per crop, so the
image-side work dominates (3.6 GFLOP a prompt, memory-bound). Three exact rearrangements cut
it, without changing what is computed (only the order of fp32 roundings):

1. **Once per crop** (`ImageSide`): the image tokens plus the no-mask embedding, their
   positional encoding, and the first layer's image-side projections (token-to-image keys and
   values, image-to-token queries), which do not depend on the prompt.
2. **Projections folded into the few prompt tokens.** An attention between the 7 prompt
   tokens and the 4096 image tokens never needs the image side projected: a token-to-image
   query is folded into the key weights (q Wk) and scored against the raw image tokens, and the
   softmax-weighted sum of the raw tokens is projected afterwards (rows of the weights sum to
   one, so the value bias passes through); an image-to-token attention folds the query weights
   into the 7 keys (Wq^T k) and the output projection into the 7 values (v Wo^T). Each
   (4096 × 256) × (256 × 128) projection becomes a (4096 × 256) × (256 × 56) product (8 heads
   × 7 tokens); the final attention runs only for the 4 tokens read after it (IoU and the three
   multimask tokens). The key bias is dropped: it adds the same number to every score of a
   query, and softmax ignores it.
3. **The first upscaling layer in low rank.** The image tokens leaving the transformer are the
   crop's tokens plus two attention updates, each a mix of 56 vectors per prompt, through two
   LayerNorms. The 2×2 transposed convolution is linear, so it is applied once per crop to the
   crop's tokens (scaled by the two LayerNorms' gains) and, per prompt, to those 112 vectors
   and four constant directions; each pixel combines them with its own LayerNorm statistics.

Prompts run `chunk` at a time so their (4096, 256) working tensors stay in the CPU's cache.
With `min_iou`, prompts whose three predicted IoUs are all at or below it skip the upscaling
(their logits stay zero: the IoU filter drops them before anything reads them).

Shapes: B prompts, T = 7 tokens (IoU, 4 mask tokens, point, padding), C = 256, HW = 4096,
heads H = 8 of D = 16 in the cross attentions, M = 3 multimask outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .prompt_decoder import Attention, MaskDecoder, PromptEncoder

OUTPUTS = [0, 2, 3, 4]  # the tokens read after the transformer: IoU, mask tokens 1-3 (multimask)


@dataclass(frozen=True)
class ImageSide:
    """The prompt-independent part of decoding one crop.

    src, pe: (HW, C) image tokens (+ no-mask embedding) and their positional encoding;
    t2i_k, t2i_v: (1, H, HW, D) the first block's token-to-image keys and values;
    i2t_q: (H, D, HW) the first block's image-to-token queries, scaled by 1/sqrt(D);
    upscale: (HW, 4 C/4) the first transposed convolution of src * gamma1 * gamma2 (no bias),
    in block order (a, b, C/4).
    """

    src: torch.Tensor
    pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    upscale: torch.Tensor


class PointDecoder:
    """Decodes B single-point prompts against one crop's `ImageSide` (see the module notes).

    chunk: prompts decoded together; tile: image tokens per step of the per-pixel passes.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, chunk: int = 2, tile: int = 512) -> None:
        width = prompt_encoder.image_embedding_size[1]
        if tile % width:
            raise ValueError(f"tile: {tile} image tokens is not a whole number of rows of {width}")
        self.prompts = prompt_encoder
        self.decoder = mask_decoder
        self.chunk = chunk
        self.tile = tile
        self.blocks = tuple(mask_decoder.transformer.layers)
        up1, norm, _, up2, _ = mask_decoder.output_upscaling
        self.up1_weight = up1.weight.permute(2, 3, 1, 0).reshape(-1, up1.weight.shape[0])  # (4 C/4, C) rows (a, b, c)
        self.up1_bias = up1.bias.repeat(4)
        self.up_norm = norm
        self.up2_weight = up2.weight.permute(2, 3, 1, 0).reshape(-1, up2.weight.shape[0])  # (4 C/8, C/4)
        self.up2_bias = up2.bias.repeat(4)

    @torch.inference_mode()
    def image_side(self, embedding: torch.Tensor) -> ImageSide:
        """(1, C, 64, 64) image embedding -> its `ImageSide`."""
        src = (embedding + self.prompts.embed_mask(None))[0].flatten(1).T.contiguous()
        pe = self.prompts.dense_pe()[0].flatten(1).T.contiguous()
        first, second = self.blocks
        keys_with_pe = src + pe
        t2i = first.cross_attn_token_to_image
        i2t = first.cross_attn_image_to_token
        t2i_k = _heads(t2i.k_proj(keys_with_pe), t2i.num_heads)[None]
        t2i_v = _heads(t2i.v_proj(src), t2i.num_heads)[None]
        i2t_q = (_heads(i2t.q_proj(keys_with_pe), i2t.num_heads) * _scale(i2t)).transpose(1, 2).contiguous()
        upscale = (src * first.norm4.weight * second.norm4.weight) @ self.up1_weight.T
        return ImageSide(src, pe, t2i_k, t2i_v, i2t_q, upscale)

    @torch.inference_mode()
    def decode(
        self, side: ImageSide, coords: torch.Tensor, labels: torch.Tensor, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (B, N, 2) xy in input-frame pixels, labels (B, N) -> logits (B, M, 256, 256), IoU (B, M)."""
        tokens = self._tokens(coords, labels)
        size = side.src.shape[0]
        logits = side.src.new_zeros((len(tokens), 3, 16 * size))  # raster order, rows of 4 * 64
        ious = []
        for start in range(0, len(tokens), self.chunk):
            out_tokens, parts = self._transformer(side, tokens[start : start + self.chunk])
            iou = self.decoder.iou_prediction_head(out_tokens[:, 0])[:, 1:]  # the multimask IoUs
            ious.append(iou)
            passing = (iou > min_iou).any(1) if min_iou is not None else torch.ones_like(iou[:, 0], dtype=torch.bool)
            if passing.all():
                logits[start : start + len(iou)] = self._mask_logits(side, out_tokens, parts)
            elif passing.any():
                index = torch.nonzero(passing)[:, 0]
                logits[start + index] = self._mask_logits(side, out_tokens[index], parts.select(index))
        return logits.unflatten(-1, (4 * int(size**0.5), -1)), torch.cat(ious)

    def _tokens(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's input tokens (B, T, C): IoU token, mask tokens, point embeddings."""
        sparse = self.prompts.embed_points(coords, labels)
        output_tokens = torch.cat([self.decoder.iou_token.weight, self.decoder.mask_tokens.weight])
        return torch.cat([output_tokens.expand(len(sparse), -1, -1), sparse], dim=1)

    def _tiles(self, size: int) -> list[slice]:
        """Slices of `tile` image tokens (a multiple of the grid's width, so whole rows)."""
        return [slice(start, min(start + self.tile, size)) for start in range(0, size, self.tile)]

    def _transformer(self, side: ImageSide, tokens: torch.Tensor) -> tuple[torch.Tensor, _UpscaleParts]:
        """The two-way transformer on B prompts' tokens (B, T, C).

        The image tokens go through it a tile of pixels at a time, in two passes (each block's
        image-to-token update, then the next token-to-image scores), and are never kept whole
        but in one (B, HW, C) buffer. Returns the output tokens that are read, `OUTPUTS` (B, 4, C),
        and what the first upscaling layer needs of the image tokens.
        """
        first, second = self.blocks
        final = self.decoder.transformer
        batch, size = len(tokens), side.src.shape[0]
        # block 1, token side: self-attention without positional encoding or residual
        queries = first.norm1(first.self_attn(tokens, tokens, tokens))
        queries = first.norm2(queries + _attend_shared(first.cross_attn_token_to_image, queries + tokens, side))
        queries = first.norm3(queries + first.mlp(queries))
        i2t1 = first.cross_attn_image_to_token
        keys1 = _heads(i2t1.k_proj(queries + tokens), i2t1.num_heads)  # (B, H, T, D)
        vectors1 = _update_vectors(i2t1, queries)
        # block 2, self-attention; its token-to-image queries folded into the key weights
        q = queries + tokens
        queries = second.norm1(queries + second.self_attn(q, q, queries))
        t2i = second.cross_attn_token_to_image
        folded_t2i = _fold_token_queries(t2i, queries + tokens)
        # pass 1: block 1's image update and norm, block 2's token-to-image scores
        parts = _UpscaleParts.empty(batch, vectors1.shape[1], size, side.src)
        image = side.src.new_empty((batch, size, side.src.shape[1]))
        scores = side.src.new_empty((batch, folded_t2i.shape[1], size))
        for tile in self._tiles(size):
            weights = _softmax_over_tokens(keys1 @ side.i2t_q[:, :, tile], i2t1.num_heads)
            x, mean, rstd = _layer_norm(torch.baddbmm(side.src[tile], weights.transpose(1, 2), vectors1), first.norm4)
            image[:, tile], parts.weights1[:, :, tile] = x, weights
            parts.mean1[:, tile], parts.rstd1[:, tile] = mean[..., 0], rstd[..., 0]
            torch.bmm(folded_t2i, (x + side.pe[tile]).transpose(1, 2), out=scores[:, :, tile])
        queries = second.norm2(queries + _token_output(t2i, torch.softmax(scores, dim=-1) @ image))
        queries = second.norm3(queries + second.mlp(queries))
        i2t2 = second.cross_attn_image_to_token
        folded_i2t, bias_i2t = _fold_image_queries(i2t2, queries + tokens)
        vectors2 = _update_vectors(i2t2, queries)
        attn = final.final_attn_token_to_image
        queries, tokens = queries[:, OUTPUTS], tokens[:, OUTPUTS]  # the final attention's other rows go unread
        folded_final = _fold_token_queries(attn, queries + tokens)
        scores = scores[:, : folded_final.shape[1]]
        # pass 2: block 2's image update and norm (over block 1's, in place), the final scores
        for tile in self._tiles(size):
            previous = image[:, tile]
            weights = _softmax_over_tokens(torch.baddbmm(bias_i2t, folded_i2t, (previous + side.pe[tile]).transpose(1, 2)), i2t2.num_heads)
            x, mean, rstd = _layer_norm(torch.baddbmm(previous, weights.transpose(1, 2), vectors2), second.norm4)
            image[:, tile], parts.weights2[:, :, tile] = x, weights
            parts.mean2[:, tile], parts.rstd2[:, tile] = mean[..., 0], rstd[..., 0]
            torch.bmm(folded_final, (x + side.pe[tile]).transpose(1, 2), out=scores[:, :, tile])
        queries = final.norm_final_attn(queries + _token_output(attn, torch.softmax(scores, dim=-1) @ image))
        parts.basis = self._upscale_basis(vectors1, vectors2)
        return queries, parts

    def _upscale_basis(self, vectors1: torch.Tensor, vectors2: torch.Tensor) -> torch.Tensor:
        """The first transposed convolution of every per-prompt direction of the image tokens.

        With P the attention weights (HW, H T), A their vectors (H T, C) (output bias
        included), m and r a LayerNorm's mean and 1/std per pixel, g and beta its affine:
        keys1 = r1 (src + P1 A1 - m1) g1 + beta1, keys2 = r2 (keys1 + P2 A2 - m2) g2 + beta2, so
        keys2 = r1 r2 src g1 g2 + r1 r2 P1 (A1 g1 g2) + r2 P2 (A2 g2) - r1 r2 m1 g1 g2
        + r2 beta1 g2 - r2 m2 g2 + beta2. Returns those directions' convolutions (B, 2 H T + 3, 4 C/4),
        in the order of `_UpscaleParts.coefficients`.
        """
        first, second = self.blocks
        g1, g2 = first.norm4.weight, second.norm4.weight
        constants = torch.stack([g1 * g2, first.norm4.bias * g2, g2]).expand(len(vectors1), -1, -1)
        return torch.cat([vectors1 * (g1 * g2), vectors2 * g2, constants], dim=1) @ self.up1_weight.T

    def _mask_logits(self, side: ImageSide, tokens: torch.Tensor, parts: _UpscaleParts) -> torch.Tensor:
        """Output tokens (K, 4, C) and their image tokens' parts -> logits (K, M, HW * 16) in raster
        order (4 h rows of 4 w), a tile (whole rows of the token grid) at a time."""
        hyper = torch.stack(
            [self.decoder.output_hypernetworks_mlps[i](tokens[:, i]) for i in range(1, tokens.shape[1])],
            dim=1,
        )  # (K, M, C/8), the mask tokens' rows of the hypernetwork
        size, width = side.src.shape[0], int(side.src.shape[0] ** 0.5)
        offset = self.blocks[1].norm4.bias @ self.up1_weight.T + self.up1_bias
        norm = self.up_norm
        out = side.src.new_empty((len(tokens), hyper.shape[1], 16 * size))
        rows = out.view(*out.shape[:2], width, 2, 2, 4 * width)  # (K, M, y, a, a', 4 x + 2 b + b')
        for tile in self._tiles(size):
            scale, coefficients = parts.coefficients(tile)
            x = torch.addcmul(offset, side.upscale[tile], scale).baddbmm_(coefficients, parts.basis)
            x = x.view(len(x), -1, width, 2, 2, x.shape[-1] // 4)  # (K, y, x, a, b, C/4)
            x = torch.ops.aten.gelu_(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
            x = x.transpose(2, 3).contiguous()  # (K, y, a, x, b, C/4)
            y_rows = slice(tile.start // width, tile.stop // width)
            for a2, (weight, bias) in enumerate(zip(self.up2_weight.chunk(2), self.up2_bias.chunk(2))):
                z = torch.ops.aten.gelu_(F.linear(x, weight, bias))  # (K, y, a, x, b, (b', C/8))
                logits = hyper @ z.view(len(z), -1, hyper.shape[-1]).transpose(1, 2)  # (K, M, (y, a, x, b, b'))
                rows[:, :, y_rows, :, a2] = logits.view(*logits.shape[:2], -1, 2, 4 * width)
        return out


@dataclass
class _UpscaleParts:
    """Per pixel, what makes the final image tokens out of the crop's: B prompts, HW pixels.

    weights1, weights2: (B, H T, HW) the two image-to-token attention weights; mean1, rstd1,
    mean2, rstd2: (B, HW) the two LayerNorms' statistics; basis: (B, 2 H T + 3, 4 C/4).
    """

    weights1: torch.Tensor
    weights2: torch.Tensor
    mean1: torch.Tensor
    rstd1: torch.Tensor
    mean2: torch.Tensor
    rstd2: torch.Tensor
    basis: torch.Tensor | None = None

    @classmethod
    def empty(cls, batch: int, mixed: int, size: int, like: torch.Tensor) -> _UpscaleParts:
        weights = [like.new_empty((batch, mixed, size)) for _ in range(2)]
        return cls(*weights, *(like.new_empty((batch, size)) for _ in range(4)))

    def select(self, index: torch.Tensor) -> _UpscaleParts:
        fields = (self.weights1, self.weights2, self.mean1, self.rstd1, self.mean2, self.rstd2, self.basis)
        return _UpscaleParts(*(f[index] for f in fields))

    def coefficients(self, tile: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """For the pixels of `tile`: r1 r2 (B, n, 1), and every basis row's coefficient (B, n, 2 H T + 3)."""
        r12 = (self.rstd1[:, tile] * self.rstd2[:, tile])[:, None]
        r2 = self.rstd2[:, tile][:, None]
        rows = [
            self.weights1[:, :, tile] * r12,
            self.weights2[:, :, tile] * r2,
            -self.mean1[:, tile][:, None] * r12,
            r2,
            -self.mean2[:, tile][:, None] * r2,
        ]
        return r12.transpose(1, 2), torch.cat(rows, dim=1).transpose(1, 2)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, H D) -> (..., H, N, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _scale(attention: Attention) -> float:
    return (attention.q_proj.out_features // attention.num_heads) ** -0.5


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over C, with its per-row mean and 1/std (..., 1)."""
    return torch.native_layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _softmax_over_tokens(scores: torch.Tensor, heads: int) -> torch.Tensor:
    """Image-to-token scores (B, H, T, n) or (B, H T, n) -> weights (B, H T, n), softmax over T."""
    batch, n = scores.shape[0], scores.shape[-1]
    return torch.softmax(scores.reshape(batch, heads, -1, n), dim=2).flatten(1, 2)


def _attend_shared(attention: Attention, queries: torch.Tensor, side: ImageSide) -> torch.Tensor:
    """The first block's token-to-image attention: B prompts' queries (B, T, C) against the
    crop's precomputed keys and values, all prompts in one sequence. -> (B, T, C)."""
    batch, n_tokens, _ = queries.shape
    q = _heads(attention.q_proj(queries).reshape(1, batch * n_tokens, -1), attention.num_heads)
    out = F.scaled_dot_product_attention(q, side.t2i_k, side.t2i_v)  # (1, H, B T, D)
    return attention.out_proj(out.transpose(1, 2).reshape(batch, n_tokens, -1))


def _fold_token_queries(attention: Attention, queries: torch.Tensor) -> torch.Tensor:
    """Token-to-image queries (B, T, C) folded into the key weights: (B, H T, C), scaled.

    Scoring them against raw image tokens gives the attention's scores less the key bias's
    share, which is the same for every image token of a query, so softmax is unchanged.
    """
    heads = attention.num_heads
    q = _heads(attention.q_proj(queries), heads) * _scale(attention)  # (B, H, T, D)
    k_weight = attention.k_proj.weight.unflatten(0, (heads, -1))  # (H, D, C)
    return torch.einsum("bhtd,hdc->bhtc", q, k_weight).flatten(1, 2)


def _token_output(attention: Attention, mixed: torch.Tensor) -> torch.Tensor:
    """Token-to-image output from the softmax-weighted sums of raw image tokens (B, H T, C) -> (B, T, C).

    The value projection comes after the sum: the weights of each query sum to one.
    """
    heads = attention.num_heads
    v_weight = attention.v_proj.weight.unflatten(0, (heads, -1))  # (H, D, C)
    out = torch.einsum("bhtc,hdc->bthd", mixed.unflatten(1, (heads, -1)), v_weight).flatten(2)
    return attention.out_proj(out + attention.v_proj.bias)


def _fold_image_queries(attention: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-to-token keys (tokens (B, T, C)) folded into the query weights.

    Returns (B, H T, C) and the query bias's share (B, H T, 1): scores (B, H T, n) of image
    tokens x (B, n, C) are `bias + folded @ x^T`.
    """
    heads = attention.num_heads
    keys = _heads(attention.k_proj(tokens), heads) * _scale(attention)  # (B, H, T, D)
    q_weight = attention.q_proj.weight.unflatten(0, (heads, -1))  # (H, D, C)
    folded = torch.einsum("bhtd,hdc->bhtc", keys, q_weight).flatten(1, 2)
    bias = torch.einsum("bhtd,hd->bht", keys, attention.q_proj.bias.unflatten(0, (heads, -1))).flatten(1)
    return folded, bias[..., None]


def _update_vectors(attention: Attention, values: torch.Tensor) -> torch.Tensor:
    """Image-to-token values (tokens (B, T, C)) through the output projection: (B, H T, C).

    An image token's update is its attention weights (H T) times these vectors; each carries
    1/H of the output bias, since each head's weights sum to one.
    """
    heads = attention.num_heads
    v = _heads(attention.v_proj(values), heads)  # (B, H, T, D)
    o_weight = attention.out_proj.weight.unflatten(1, (heads, -1))  # (C, H, D)
    vectors = torch.einsum("bhtd,chd->bhtc", v, o_weight) + attention.out_proj.bias / heads
    return vectors.flatten(1, 2)
