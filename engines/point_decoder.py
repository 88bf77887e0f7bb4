"""SAM's mask decoder for many prompts on one image: the same arithmetic, less work.

`MaskDecoder.forward` runs every prompt through the full two-way transformer on (N, C) =
(4096, 256) image tokens. Automatic mask generation sends 1,024 prompts per crop, so the
image-side work dominates (3.6 GFLOP a prompt, memory-bound). Exact rearrangements cut it,
without changing what is computed (only the order of fp32 roundings):

1. **Once per crop** (`ImageSide`): the image tokens plus the no-mask embedding, their
   positional encoding, the first block's image-side projections (token-to-image keys and
   values, image-to-token queries), and every later projection of the crop's own part of the
   image tokens (below), none of which depends on the prompt.
2. **Image tokens in low rank.** After an image-to-token attention, a pixel's token is the
   crop's token plus a mix of 56 vectors (8 heads × 7 prompt tokens, the attention's values
   through its output projection), weighted by that pixel's 56 attention weights; a LayerNorm
   then scales and shifts it. So every image token the transformer makes is, per pixel,
   a scalar times the crop's (centred) token, plus the pixel's weights times a prompt's 56
   vectors, plus constants. Nothing of size (N, C) is made per prompt:
   - a projection of the tokens (a later attention's keys, values or queries) is the crop
     part's projection, made once per crop, plus the 56 vectors' projections, mixed per pixel;
   - a score against a projected token folds the query into the 56 projected vectors
     (56 numbers per query), so it costs 56 multiply-adds per pixel and query;
   - a LayerNorm's variance is the squared norm of the centred token: the crop part's norm
     (once per crop), the cross terms (the crop against each attention's output projection,
     per head, once per crop, times the per-head values) and the quadratic form of the weights
     in the 56 vectors' Gram matrix.
   Softmax ignores terms that are the same for every pixel (a token-to-image key bias) and its
   weights sum to one, so value biases pass straight through. The final attention runs only for
   the 4 tokens read after it (IoU and the three multimask tokens).
3. **The first upscaling layer in low rank.** The 2×2 transposed convolution is linear, so it
   is applied once per crop to the crop's part of the final tokens and, per prompt, to the 113
   vectors that mix into them; each pixel combines them with its own weights and LayerNorm scales.

The prompts are the generator's single points (`decode`) or the predictor's labelled points
(`predict`: points, a box's corners); only the number of prompt tokens T changes, and which
tokens are read after the transformer (the multimask tokens 1-3, or token 0 alone).

The prompt tokens' work up to block 2's token-to-image attention reads no image token a prompt
changes, so it runs for all prompts of a call at once (large matrix products); the rest runs
`chunk` prompts at a time, its per-pixel arrays (H T, N) per prompt. With `min_iou`, prompts
whose three predicted IoUs are all at or below it skip the upscaling (their logits are zero:
the IoU filter drops them before anything reads them).

Shapes: B prompts, T tokens (IoU, 4 mask tokens, the prompt's: 7 for a single point and its
padding, or a box's two corners), C = 256, N = 4096 image
tokens (64 × 64), heads H = 8 of D = 16 in the cross attentions (H T = 56), M = 3 multimask
outputs. Notation (also in the code): s the crop's tokens centred over C; g1, b1 and g2, b2 the
gains and biases of the two blocks' image LayerNorms (norm4); s~ = s g1 centred again, and
b1c = b1 centred; w1, w2 (B, H T, N) the two image-to-token attention weights; r1, r2 (B, N) the
two LayerNorms' 1/std. Then block 1's image tokens are x1 = r1 z + b1 with
z = s g1 + w1 (A1c g1), and block 2's are x2 = r1 r2 (s~ + w1 A1t) g2 + r2 (b1c + w2 A2c) g2 + b2,
where A1, A2 (B, H T, C) are the mixed vectors, A1c, A2c them centred over C, A1t = A1c g1 centred.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayAttention

# The tokens read after the transformer: the IoU token, then the mask tokens of the masks kept.
MULTIMASK_OUTPUTS = (0, 2, 3, 4)  # mask tokens 1-3, SAM's three masks
SINGLE_OUTPUTS = (0, 1)  # mask token 0, SAM's single mask


@dataclass(frozen=True)
class ImageSide:
    """The prompt-independent part of decoding one crop (notation of the module notes).

    t2i_k, t2i_v: (1, H, N, D) block 1's token-to-image keys (src + pe) and values (src);
    i2t_q: (H, D, N) block 1's image-to-token queries (src + pe), scaled by 1/sqrt(D);
    cross1, cross1_g, cross2: the crop against the mixed vectors of block 1's and block 2's
    image-to-token attentions, per head: (H, D + 1, N) s through block 1's output projection
    with the row s.bo1, (H, D + 2, N) s~ g1 through it with the rows (s~ g1).bo1 and sum(s~ g1),
    (H, D + 1, N) s~ through block 2's with the row s~.bo2 (bo1, bo2: the output biases);
    keys2, queries2, keys3: (2, H, D, N) the crop part (s g1, s g1, s~ g2) and the constant part
    (pe + b1, pe + b1 with the query bias, pe + b2) of block 2's token-to-image keys, its
    image-to-token queries and the final attention's keys;
    values2, values3: (H, N, D) block 2's and the final attention's values of s g1 and s~ g2;
    norms: (3, N) per pixel |s|^2, |s~|^2 and s~.b1c;
    upscale: (N, 4 C/4) the first transposed convolution of s~ g2 (no bias), block order (a, b, C/4).
    """

    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    cross1: torch.Tensor
    cross1_g: torch.Tensor
    cross2: torch.Tensor
    keys2: torch.Tensor
    queries2: torch.Tensor
    keys3: torch.Tensor
    values2: torch.Tensor
    values3: torch.Tensor
    norms: torch.Tensor
    upscale: torch.Tensor


@dataclass(frozen=True)
class _SideWeights:
    """What `PointDecoder.image_side` multiplies the crop by: every projection it makes, stacked
    per input into one (rows, C) matrix, and the parts that depend on the weights alone.

    src (3 H D, C) with src_constant (3 H D, N): block 1's token-to-image keys and values and
    image-to-token queries (scaled) of src + pe; s (H (D + 1) + 3 H D, C): cross1 per head, then
    the crop parts of keys2, queries2 and values2 (g1 folded in); st (H (D + 2) + H (D + 1) + 2 H D + 1, C):
    cross1_g and cross2 per head, the crop parts of keys3 and values3 (g2 folded in), and b1c;
    upscale (C, 4 C/4): the first transposed convolution with g2 folded in; *_constant (H, D, N):
    the constant parts of keys2, queries2 and keys3. *_rows: the row counts to split products by.
    """

    src: torch.Tensor
    src_constant: torch.Tensor
    src_rows: list[int]
    s: torch.Tensor
    s_rows: list[int]
    st: torch.Tensor
    st_rows: list[int]
    upscale: torch.Tensor
    keys2_constant: torch.Tensor
    queries2_constant: torch.Tensor
    keys3_constant: torch.Tensor
    g1: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, decoder: PointDecoder) -> _SideWeights:
        heads = decoder.heads
        first, second = decoder.blocks
        final = decoder.decoder.transformer.final_attn_token_to_image
        (g1, b1), (g2, b2) = _affine(first.norm4), _affine(second.norm4)
        t2i1, i2t1 = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        t2i2, i2t2 = second.cross_attn_token_to_image, second.cross_attn_image_to_token
        o1, bo1 = i2t1.out_proj.weight.T, i2t1.out_proj.bias  # (H D, C), (C,)
        o2, bo2 = i2t2.out_proj.weight.T, i2t2.out_proj.bias
        pe = decoder.prompts.dense_pe()[0].flatten(1)  # (C, N)

        def head_rows(weight: torch.Tensor, *rows: torch.Tensor) -> torch.Tensor:
            """(H D, C) -> (H (D + len(rows)), C): each head's D rows followed by `rows` (C,)."""
            return torch.cat(
                [weight.view(heads, -1, weight.shape[1]), *(r.expand(heads, 1, -1) for r in rows)], 1
            ).flatten(0, 1)

        def constant(linear: torch.nn.Linear, shift: torch.Tensor, bias: bool) -> torch.Tensor:  # -> (H, D, N)
            out = linear.weight @ (pe + shift[:, None])
            return (out + linear.bias[:, None] if bias else out).view(heads, -1, pe.shape[1])

        scale = _scale(i2t1)
        src = [t2i1.k_proj.weight, t2i1.v_proj.weight, i2t1.q_proj.weight * scale]
        src_constant = torch.cat(
            [
                t2i1.k_proj.weight @ pe + t2i1.k_proj.bias[:, None],
                t2i1.v_proj.bias[:, None].expand(-1, pe.shape[1]),
                (i2t1.q_proj.weight @ pe + i2t1.q_proj.bias[:, None]) * scale,
            ]
        )
        s = [head_rows(o1, bo1), t2i2.k_proj.weight * g1, i2t2.q_proj.weight * g1, t2i2.v_proj.weight * g1]
        st = [
            head_rows(o1 * g1, bo1 * g1, g1),
            head_rows(o2, bo2),
            final.k_proj.weight * g2,
            final.v_proj.weight * g2,
            _centred(b1)[None],
        ]
        return cls(
            src=torch.cat(src),
            src_constant=src_constant.contiguous(),
            src_rows=[len(w) for w in src],
            s=torch.cat(s),
            s_rows=[len(w) for w in s],
            st=torch.cat(st),
            st_rows=[len(w) for w in st],
            upscale=(decoder.up1_weight * g2).T.contiguous(),
            keys2_constant=constant(t2i2.k_proj, b1, bias=False),
            queries2_constant=constant(i2t2.q_proj, b1, bias=True),
            keys3_constant=constant(final.k_proj, b2, bias=False),
            g1=g1.detach(),
        )


class PointDecoder:
    """Decodes B prompts against one crop's `ImageSide` (see the module notes).

    chunk: prompts decoded together; tile: image tokens per step of the upscaling. Matrices
    derived from the weights are made here, so make the decoder after the weights are loaded.
    """

    def __init__(
        self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, chunk: int = 2, tile: int = 512
    ) -> None:
        width = prompt_encoder.image_embedding_size[1]
        if tile % width:
            raise ValueError(f"tile: {tile} image tokens is not a whole number of rows of {width}")
        self.prompts = prompt_encoder
        self.decoder = mask_decoder
        self.chunk = chunk
        self.tile = tile
        self.blocks = tuple(mask_decoder.transformer.layers)
        self.heads = self.blocks[0].cross_attn_image_to_token.num_heads
        up1, norm, _, up2, _ = mask_decoder.output_upscaling
        self.up1_weight = up1.weight.permute(2, 3, 1, 0).reshape(-1, up1.weight.shape[0])  # (4 C/4, C) rows (a, b, c)
        self.up1_bias = up1.bias.repeat(4)
        self.up_norm = norm
        self.up2_weight = up2.weight.permute(2, 3, 1, 0).reshape(-1, up2.weight.shape[0])  # (4 C/8, C/4)
        self.up2_bias = up2.bias.repeat(4)
        self.side_weights = _SideWeights.of(self)

    @torch.inference_mode()
    def image_side(self, embedding: torch.Tensor) -> ImageSide:
        """(1, C, 64, 64) image embedding -> its `ImageSide`: four matrix products, of src, s
        and s~ (as (C, N) columns) with the stacked weights of `_SideWeights`."""
        weights, heads = self.side_weights, self.heads
        src = (embedding + self.prompts.embed_mask(None))[0].flatten(1)  # (C, N)
        s = _centred(src, dim=0)
        st = _centred(s * weights.g1[:, None], dim=0)
        n = src.shape[1]

        def by_head(rows: torch.Tensor) -> torch.Tensor:  # (H D', N) -> (H, D', N)
            return rows.view(heads, -1, n)

        def by_pixel(rows: torch.Tensor) -> torch.Tensor:  # (H D, N) -> (H, N, D)
            return by_head(rows).transpose(1, 2).contiguous()

        of_src = torch.addmm(weights.src_constant, weights.src, src).split(weights.src_rows)
        of_s = torch.mm(weights.s, s).split(weights.s_rows)
        of_st = torch.mm(weights.st, st).split(weights.st_rows)
        t2i_k, t2i_v, i2t_q = of_src
        cross1, keys2, queries2, values2 = of_s
        cross1_g, cross2, keys3, values3, st_b1c = of_st
        return ImageSide(
            t2i_k=by_pixel(t2i_k)[None],
            t2i_v=by_pixel(t2i_v)[None],
            i2t_q=by_head(i2t_q),
            cross1=by_head(cross1),
            cross1_g=by_head(cross1_g),
            cross2=by_head(cross2),
            keys2=torch.stack([by_head(keys2), weights.keys2_constant]),
            queries2=torch.stack([by_head(queries2), weights.queries2_constant]),
            keys3=torch.stack([by_head(keys3), weights.keys3_constant]),
            values2=by_pixel(values2),
            values3=by_pixel(values3),
            norms=torch.stack([(s * s).sum(0), (st * st).sum(0), st_b1c[0]]),
            upscale=torch.mm(st.T, weights.upscale),
        )

    @torch.inference_mode()
    def decode(
        self, side: ImageSide, coords: torch.Tensor, labels: torch.Tensor, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Single-point prompts, as the generator sends them: coords (B, N, 2) xy in input-frame
        pixels, labels (B, N) -> the three multimask outputs, logits (B, 3, 256, 256) and IoU
        (B, 3). With `min_iou`, prompts whose three IoUs are all at or below it get zero logits."""
        sparse = self.prompts.embed_points(coords, labels)
        return self._decode(side, self._tokens(sparse), MULTIMASK_OUTPUTS, min_iou)

    @torch.inference_mode()
    def predict(
        self, side: ImageSide, coords: torch.Tensor, labels: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts as the predictor's labelled points (`PromptEncoder.embed_labelled_points`):
        coords (B, N, 2) xy in input-frame pixels, labels (B, N) -> logits (B, M, 256, 256) and
        IoU (B, M), M = 3 with `multimask` (mask tokens 1-3), else 1 (mask token 0)."""
        sparse = self.prompts.embed_labelled_points(coords, labels)
        return self._decode(side, self._tokens(sparse), MULTIMASK_OUTPUTS if multimask else SINGLE_OUTPUTS, None)

    def _decode(
        self, side: ImageSide, tokens: torch.Tensor, outputs: tuple[int, ...], min_iou: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, C) -> logits (B, M, 256, 256) and IoU (B, M) of the mask tokens in
        `outputs` (M = len(outputs) - 1), `chunk` prompts at a time."""
        opening = self._token_opening(side, tokens)
        size = side.upscale.shape[0]
        masks = [token - 1 for token in outputs[1:]]  # their rows of the IoU head's output
        logits = side.upscale.new_empty((len(tokens), len(masks), 16 * size))  # raster order, rows of 4 * 64
        ious = []
        for start in range(0, len(tokens), self.chunk):
            part = slice(start, start + self.chunk)
            out_tokens, parts = self._transformer(side, tokens[part], opening.select(part), outputs)
            iou = self.decoder.iou_prediction_head(out_tokens[:, 0])[:, masks]
            ious.append(iou)
            passing = (iou > min_iou).any(1) if min_iou is not None else torch.ones_like(iou[:, 0], dtype=torch.bool)
            if passing.all():
                logits[part] = self._mask_logits(side, out_tokens, parts, masks)
                continue
            logits[start + torch.nonzero(~passing)[:, 0]] = 0
            if passing.any():
                index = torch.nonzero(passing)[:, 0]
                logits[start + index] = self._mask_logits(side, out_tokens[index], parts.select(index), masks)
        return logits.unflatten(-1, (4 * int(size**0.5), -1)), torch.cat(ious)

    def _tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """The decoder's input tokens (B, T, C): IoU token, mask tokens, the prompts' `sparse` (B, T - 5, C)."""
        output_tokens = torch.cat([self.decoder.iou_token.weight, self.decoder.mask_tokens.weight])
        return torch.cat([output_tokens.expand(len(sparse), -1, -1), sparse], dim=1)

    def _token_opening(self, side: ImageSide, tokens: torch.Tensor) -> _TokenOpening:
        """The prompt tokens' work up to block 2's token-to-image attention (block 1's token side,
        its image-to-token keys and values, block 2's self-attention), which needs no image token
        a prompt changes: all B prompts at once."""
        first, second = self.blocks
        heads = self.heads
        queries = first.norm1(first.self_attn(tokens, tokens, tokens))
        queries = first.norm2(queries + _attend_shared(first.cross_attn_token_to_image, queries + tokens, side))
        queries = first.norm3(queries + first.mlp(queries))
        i2t = first.cross_attn_image_to_token
        keys1, values1 = _heads(i2t.k_proj(queries + tokens), heads), _heads(i2t.v_proj(queries), heads)
        vectors1 = _mixed_vectors(i2t, values1)
        q = queries + tokens
        queries = second.norm1(queries + second.self_attn(q, q, queries))
        t2i = second.cross_attn_token_to_image
        queries2 = _heads(t2i.q_proj(queries + tokens), heads) * _scale(t2i)
        return _TokenOpening(queries, keys1, values1, vectors1.mean(-1, keepdim=True), _centred(vectors1), queries2)

    def _transformer(
        self, side: ImageSide, tokens: torch.Tensor, opening: _TokenOpening, outputs: tuple[int, ...]
    ) -> tuple[torch.Tensor, _UpscaleParts]:
        """The rest of the two-way transformer on B prompts' tokens (B, T, C), image tokens in low
        rank (notation of the module notes).

        Returns the output tokens that are read, `outputs` (B, len(outputs), C), and what the
        first upscaling layer needs of the final image tokens.
        """
        first, second = self.blocks
        final = self.decoder.transformer
        heads, width = self.heads, self.up1_weight.shape[1]  # H; C, the LayerNorms' width
        t2i, i2t = second.cross_attn_token_to_image, second.cross_attn_image_to_token
        attn = final.final_attn_token_to_image
        (g1, b1), (g2, b2) = _affine(first.norm4), _affine(second.norm4)
        b1c = _centred(b1)
        sq_s, sq_st, st_b1c = side.norms
        a1c, q2, values1 = opening.vectors1, opening.queries2, opening.values1
        a1g = a1c * g1
        one = values1.new_full((*values1.shape[:3], 1), 1 / heads)  # each head's share of an output bias
        # block 1's image-to-token attention (weights w1) and norm (1/std r1)
        w1 = _softmax_over_tokens(_per_head(opening.keys1, side.i2t_q), heads)  # (B, H T, N)
        n_mixed = w1.shape[1]
        left = torch.cat([a1c @ a1c.mT, _folded(q2, a1g @ t2i.k_proj.weight.T, heads)], dim=1)
        gram1_w1, scores = (left @ w1).split(n_mixed, dim=1)
        cross1 = _per_head(torch.cat([values1, one], -1), side.cross1)  # s . A1c
        r1 = torch.rsqrt((sq_s + torch.add(gram1_w1, cross1, alpha=2).mul_(w1).sum(1)) / width + first.norm4.eps)
        # block 2's token-to-image attention: x1 + pe the keys, x1 the values
        weighted = torch.softmax(_scores_(scores, q2, side.keys2, r1), dim=-1).mul_(r1[:, None])  # (B, H T, N)
        mixed = _per_head_values(weighted, side.values2)
        mixed += _heads_of(weighted @ w1.mT, heads) @ _heads(a1g @ t2i.v_proj.weight.T, heads)
        mixed += _head_vector(t2i.v_proj(b1), heads)
        queries = second.norm2(opening.queries + t2i.out_proj(_merge_heads(mixed)))
        queries = second.norm3(queries + second.mlp(queries))
        # block 2's image-to-token attention (x1 + pe the queries; weights w2) and norm (r2)
        i2t_keys = _heads(i2t.k_proj(queries + tokens), heads) * _scale(i2t)
        i2t_values = _heads(i2t.v_proj(queries), heads)
        a2 = _mixed_vectors(i2t, i2t_values)
        a2c, a1t = _centred(a2), _centred(a1g)
        queries, tokens = queries[:, outputs], tokens[:, outputs]  # the final attention's other rows go unread
        q3 = _heads(attn.q_proj(queries + tokens), heads) * _scale(attn)  # (B, H, 4, D)
        n_out = q3.shape[1] * q3.shape[2]
        a1t_g2, a2c_g2, b1c_g2 = a1t * g2, a2c * g2, b1c * g2
        k_weight, v_weight = attn.k_proj.weight.T, attn.v_proj.weight.T
        left = torch.cat(
            [
                _folded(i2t_keys, a1g @ i2t.q_proj.weight.T, heads),
                a1t @ a1t.mT,
                a2 @ a1t.mT,
                _folded(q3, a1t_g2 @ k_weight, heads),
                (a1t @ b1c)[:, None],
            ],
            dim=1,
        )
        scores, gram_t_w1, cross2, scores3, b1c_w1 = (left @ w1).split([n_mixed] * 3 + [n_out, 1], dim=1)
        w2 = _softmax_over_tokens(_scores_(scores, i2t_keys, side.queries2, r1), heads)
        cross1_g = _per_head(
            torch.cat([values1, one, -_heads_of(opening.vectors1_mean, heads)], -1), side.cross1_g
        )  # s~ . A1t
        sq_zc = sq_st + torch.add(gram_t_w1, cross1_g, alpha=2).mul_(w1).sum(1)
        _add_per_head_(cross2, torch.cat([i2t_values, one], -1), side.cross2)  # zc . A2c
        left = torch.cat([a2c @ a2c.mT, _folded(q3, a2c_g2 @ k_weight, heads), (a2c @ b1c)[:, None]], dim=1)
        bias = left.new_zeros((len(left), left.shape[1], 1))  # the final scores' b1c g2 term
        bias[:, n_mixed : n_mixed + n_out] = _fold_vector(q3, b1c_g2 @ k_weight, heads)
        gram2_w2, scores3_w2, b1c_w2 = torch.baddbmm(bias, left, w2).split([n_mixed, n_out, 1], dim=1)
        sq_y2 = (  # |y2c|^2 = |r1 zc + b1c + w2 A2c|^2
            r1 * r1 * sq_zc
            + 2 * r1 * (st_b1c + b1c_w1[:, 0])
            + cross2.mul_(2 * r1[:, None]).add_(gram2_w2).mul_(w2).sum(1)
            + 2 * b1c_w2[:, 0]
            + (b1c * b1c).sum()
        )
        r2 = torch.rsqrt(sq_y2 / width + second.norm4.eps)
        r12 = r1 * r2
        # the final token-to-image attention, for the tokens read: x2 + pe the keys, x2 the values
        scores = _scores_(scores3, q3, side.keys3, r12).addcmul_(scores3_w2, r2[:, None])
        probabilities = torch.softmax(scores, dim=-1)
        weighted, weighted2 = probabilities * r12[:, None], probabilities.mul_(r2[:, None])
        mixed = _per_head_values(weighted, side.values3)
        mixed += _heads_of(weighted @ w1.mT, heads) @ _heads(a1t_g2 @ v_weight, heads)
        mixed += _heads_of(weighted2 @ w2.mT, heads) @ _heads(a2c_g2 @ v_weight, heads)
        mixed += _heads_of(weighted2.sum(-1, keepdim=True), heads) * _head_vector(b1c_g2 @ v_weight, heads)
        mixed += _head_vector(attn.v_proj(b2), heads)
        queries = final.norm_final_attn(queries + attn.out_proj(_merge_heads(mixed)))
        basis = torch.cat([a1t_g2, a2c_g2, b1c_g2.expand(len(a2c), 1, -1)], dim=1) @ self.up1_weight.T
        return queries, _UpscaleParts(w1, w2, r12, r2, basis)

    def _mask_logits(
        self, side: ImageSide, tokens: torch.Tensor, parts: _UpscaleParts, masks: list[int]
    ) -> torch.Tensor:
        """Output tokens (K, 1 + M, C): the IoU token, then mask tokens `masks` (M indexes among
        the 4), and their image tokens' parts -> logits (K, M, N * 16) in raster order (4 h rows
        of 4 w), a tile (whole rows of the token grid) at a time."""
        hyper = torch.stack(
            [self.decoder.output_hypernetworks_mlps[mask](tokens[:, 1 + i]) for i, mask in enumerate(masks)],
            dim=1,
        )  # (K, M, C/8), the mask tokens' rows of the hypernetwork
        size = side.upscale.shape[0]
        width = int(size**0.5)
        offset = self.blocks[1].norm4.bias @ self.up1_weight.T + self.up1_bias
        norm = self.up_norm
        out = side.upscale.new_empty((len(tokens), hyper.shape[1], 16 * size))
        rows = out.view(*out.shape[:2], width, 2, 2, 4 * width)  # (K, M, y, a, a', 4 x + 2 b + b')
        for tile in self._tiles(size):
            scale, coefficients = parts.coefficients(tile)
            x = torch.addcmul(offset, side.upscale[tile], scale).baddbmm_(coefficients, parts.basis)
            x = x.view(len(x), -1, width, 2, 2, x.shape[-1] // 4)  # (K, y, x, a, b, C/4)
            x = torch.ops.aten.gelu_(F.layer_norm(x, norm.weight.shape, norm.weight, norm.bias, norm.eps))
            y_rows = slice(tile.start // width, tile.stop // width)
            for a2, (weight, bias) in enumerate(zip(self.up2_weight.chunk(2), self.up2_bias.chunk(2))):
                z = torch.ops.aten.gelu_(F.linear(x, weight, bias))  # (K, y, x, a, b, (b', C/8))
                logits = hyper @ z.view(len(z), -1, hyper.shape[-1]).transpose(1, 2)  # (K, M, (y, x, a, b, b'))
                logits = logits.view(*logits.shape[:2], -1, width, 2, 2, 2).transpose(3, 4)  # (K, M, y, a, x, b, b')
                rows[:, :, y_rows, :, a2].unflatten(-1, (width, 2, 2)).copy_(logits)
        return out

    def _tiles(self, size: int) -> list[slice]:
        """Slices of `tile` image tokens (a multiple of the grid's width, so whole rows)."""
        return [slice(start, min(start + self.tile, size)) for start in range(0, size, self.tile)]


@dataclass(frozen=True)
class _TokenOpening:
    """`PointDecoder._token_opening` for B prompts: queries (B, T, C) after block 2's
    self-attention; keys1, values1 (B, H, T, D) block 1's image-to-token keys and values;
    vectors1_mean (B, H T, 1) and vectors1 (B, H T, C) the mean over C of the mixed vectors A1
    and A1c (A1 centred); queries2 (B, H, T, D) block 2's token-to-image queries, scaled."""

    queries: torch.Tensor
    keys1: torch.Tensor
    values1: torch.Tensor
    vectors1_mean: torch.Tensor
    vectors1: torch.Tensor
    queries2: torch.Tensor

    def select(self, part: slice) -> _TokenOpening:
        return _TokenOpening(*(getattr(self, field.name)[part] for field in fields(self)))


@dataclass
class _UpscaleParts:
    """Per pixel, what mixes the final image tokens x2 (module notes): B prompts, N pixels.

    weights1, weights2: (B, H T, N) the two image-to-token attention weights w1, w2;
    scale1, scale2: (B, N) r1 r2 and r2; basis: (B, 2 H T + 1, 4 C/4) the first transposed
    convolution of A1t g2, A2c g2 and b1c g2 (no bias).
    """

    weights1: torch.Tensor
    weights2: torch.Tensor
    scale1: torch.Tensor
    scale2: torch.Tensor
    basis: torch.Tensor

    def select(self, index: torch.Tensor) -> _UpscaleParts:
        return _UpscaleParts(*(getattr(self, field.name)[index] for field in fields(self)))

    def coefficients(self, tile: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """For the pixels of `tile`: r1 r2 (B, n, 1), the crop part's scale, and every basis
        row's coefficient (B, n, 2 H T + 1)."""
        scale1, scale2 = self.scale1[:, None, tile], self.scale2[:, None, tile]
        rows = [self.weights1[:, :, tile] * scale1, self.weights2[:, :, tile] * scale2, scale2]
        return scale1.transpose(1, 2), torch.cat(rows, dim=1).transpose(1, 2)


def _affine(norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    return norm.weight, norm.bias


def _centred(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x less its mean over `dim`."""
    return x - x.mean(dim, keepdim=True)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, H D) -> (..., H, N, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _head_vector(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(H D,) -> (H, 1, D), to add to (B, H, T, D)."""
    return x.reshape(heads, 1, -1)


def _heads_of(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H T, ...) -> (B, H, T, ...)."""
    return x.unflatten(1, (heads, -1))


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H D)."""
    return x.transpose(1, 2).flatten(2)


def _scale(attention: TwoWayAttention) -> float:
    return (attention.q_proj.out_features // attention.num_heads) ** -0.5


def _softmax_over_tokens(scores: torch.Tensor, heads: int) -> torch.Tensor:
    """Image-to-token scores (B, H, T, N) or (B, H T, N) -> weights (B, H T, N), softmax over T."""
    batch, n = scores.shape[0], scores.shape[-1]
    return torch.softmax(scores.reshape(batch, heads, -1, n), dim=2).flatten(1, 2)


def _attend_shared(attention: TwoWayAttention, queries: torch.Tensor, side: ImageSide) -> torch.Tensor:
    """The first block's token-to-image attention: B prompts' queries (B, T, C) against the
    crop's precomputed keys and values, all prompts in one sequence. -> (B, T, C)."""
    batch, n_tokens, _ = queries.shape
    q = _heads(attention.q_proj(queries).reshape(1, batch * n_tokens, -1), attention.num_heads)
    out = F.scaled_dot_product_attention(q, side.t2i_k, side.t2i_v)  # (1, H, B T, D)
    return attention.out_proj(out.transpose(1, 2).reshape(batch, n_tokens, -1))


def _mixed_vectors(attention: TwoWayAttention, values: torch.Tensor) -> torch.Tensor:
    """An image-to-token attention's per-head values (B, H, T, D) through its output projection:
    the vectors (B, H T, C) an image token's weights mix. Each carries 1/H of the output bias,
    since each head's weights sum to one."""
    heads = attention.num_heads
    o_weight = attention.out_proj.weight.unflatten(1, (heads, -1))  # (C, H, D)
    vectors = torch.einsum("bhtd,chd->bhtc", values, o_weight) + attention.out_proj.bias / heads
    return vectors.flatten(1, 2)


def _per_head(x: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """Per-head vectors x (B, H, T, K) against the crop's (H, K, N) -> (B, H T, N)."""
    heads, _, n = crop.shape
    out = crop.new_empty((len(x), heads * x.shape[2], n))
    for b, view in enumerate(out.view(len(x), heads, -1, n)):
        torch.bmm(x[b], crop, out=view)
    return out


def _add_per_head_(out: torch.Tensor, x: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """out (B, H T, N) += per-head vectors x (B, H, T, K) against the crop's (H, K, N), in place."""
    heads, _, n = crop.shape
    for b in range(len(out)):
        out[b].view(heads, -1, n).baddbmm_(x[b], crop)
    return out


def _per_head_values(weights: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """Weights over the pixels (B, H T, N) times the crop's per-head values (H, N, D) -> (B, H, T, D)."""
    heads, n, dim = crop.shape
    out = crop.new_empty((len(weights), heads, weights.shape[1] // heads, dim))
    for b in range(len(weights)):
        torch.bmm(weights[b].view(heads, -1, n), crop, out=out[b])
    return out


def _folded(x: torch.Tensor, vectors: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head queries (B, H, T, D) scored against J projected vectors (B, J, H D) -> (B, H T, J)."""
    return (x @ _heads(vectors, heads).transpose(-1, -2)).flatten(1, 2)


def _fold_vector(x: torch.Tensor, vector: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head queries (B, H, T, D) scored against one projected vector (H D,) -> (B, H T, 1)."""
    return (x * _head_vector(vector, heads)).sum(-1).flatten(1)[..., None]


def _scores_(mixed: torch.Tensor, x: torch.Tensor, crop: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Scores (B, H T, N) of per-head queries x (B, H, T, D) against image tokens that project to
    `scale` (B, N) times (the crop part `crop[0]` plus a per-prompt mix), plus the constant part
    `crop[1]`; crop (2, H, D, N). `mixed` holds the queries' scores against the mix and becomes
    the scores, in place."""
    _add_per_head_(mixed, x, crop[0]).mul_(scale[:, None])
    return _add_per_head_(mixed, x, crop[1])
