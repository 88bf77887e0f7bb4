"""SAM 2.1 for images (`sam2.1_hiera_t/s/b+/l`): the Hiera encoder, SAM's prompt encoder and SAM
2's mask decoder, as `SAM2ImagePredictor` runs them on one image.

Frames: the image is resized, without keeping its aspect, to 1024 x 1024 and normalised
(`sam2_input`); prompts are xy in that frame; low-resolution logits (256 x 256) cover it,
and are brought to the image's size by one bilinear interpolation. The image embedding is the
encoder's stride-16 level plus ``no_mem_embed`` (what the tracker adds on a frame without
memory); the two finer levels go through the decoder's ``conv_s0``/``conv_s1`` once per image.

Parameter names are those of the official ``sam2.1_hiera_*.pt`` (its ``model`` entry), which
load with ``strict=True``. The video tracker's modules (memory attention and encoder, object
pointers, their embeddings) are carried as `VideoOnly` so that they load, and never run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import EMBED_CHANNELS, IMAGE_SIZE, LayerNorm2d
from .hiera import HIERA_CONFIGS, Sam2ImageEncoder
from .mask_decoder import HeadMLP
from .prompt_encoder import PromptEncoder
from .sam2_decoder import Sam2MaskDecoder

SAM2_MEAN = (0.485, 0.456, 0.406)  # of images scaled to [0, 1]
SAM2_STD = (0.229, 0.224, 0.225)
MEMORY_DIM = 64  # the video memory's width
NUM_MASKMEM = 7  # memory frames
MEMORY_LAYERS, FUSER_LAYERS, MLP_HIDDEN = 4, 2, 2048


class _MemoryAttentionLayer(nn.Module):
    """The names and shapes of one memory-attention layer (never run)."""

    def __init__(self) -> None:
        super().__init__()
        c = EMBED_CHANNELS
        self.self_attn = _attention(c, c)
        self.cross_attn_image = _attention(c, MEMORY_DIM)
        self.linear1, self.linear2 = nn.Linear(c, MLP_HIDDEN), nn.Linear(MLP_HIDDEN, c)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)


def _attention(dim: int, kv_dim: int) -> nn.Module:
    attention = nn.Module()
    attention.q_proj, attention.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    attention.k_proj, attention.v_proj = nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
    return attention


class _FuserLayer(nn.Module):
    """The names and shapes of one memory-encoder fuser block (never run)."""

    def __init__(self) -> None:
        super().__init__()
        c = EMBED_CHANNELS
        self.gamma = nn.Parameter(torch.zeros(c))
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = LayerNorm2d(c)
        self.pwconv1, self.pwconv2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)


def _mask_downsampler() -> nn.Sequential:
    """The memory encoder's mask downsampler's layout: conv, norm, activation, four times, then a conv."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((1, 4), (4, 16), (16, 64), (64, EMBED_CHANNELS)):
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), LayerNorm2d(c_out), nn.GELU()]
    layers.append(nn.Conv2d(EMBED_CHANNELS, EMBED_CHANNELS, 1))
    return nn.Sequential(*layers)


class VideoOnly(nn.Module):
    """What the official checkpoints hold for the video tracker, by name and shape: loaded
    (``strict=True``), never run. Attached to `Sam2Model` under the official names."""

    def __init__(self) -> None:
        super().__init__()
        c = EMBED_CHANNELS
        self.memory_attention = nn.Module()
        self.memory_attention.layers = nn.ModuleList(_MemoryAttentionLayer() for _ in range(MEMORY_LAYERS))
        self.memory_attention.norm = nn.LayerNorm(c)
        self.memory_encoder = nn.Module()
        self.memory_encoder.mask_downsampler = nn.Module()
        self.memory_encoder.mask_downsampler.encoder = _mask_downsampler()
        self.memory_encoder.pix_feat_proj = nn.Conv2d(c, c, 1)
        self.memory_encoder.fuser = nn.Module()
        self.memory_encoder.fuser.layers = nn.ModuleList(_FuserLayer() for _ in range(FUSER_LAYERS))
        self.memory_encoder.out_proj = nn.Conv2d(c, MEMORY_DIM, 1)
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)
        self.obj_ptr_proj = HeadMLP(c, c, c, 3)
        self.obj_ptr_tpos_proj = nn.Linear(c, MEMORY_DIM)
        self.maskmem_tpos_enc = nn.Parameter(torch.zeros(NUM_MASKMEM, 1, 1, MEMORY_DIM))
        self.no_mem_pos_enc = nn.Parameter(torch.zeros(1, 1, c))
        self.no_obj_ptr = nn.Parameter(torch.zeros(1, c))
        self.no_obj_embed_spatial = nn.Parameter(torch.zeros(1, MEMORY_DIM))


class Sam2Model(nn.Module):
    """SAM 2.1's image path (see the module notes). `embed` an image, then `decode` prompts on it."""

    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.model_type = model_type
        self.image_encoder = Sam2ImageEncoder(HIERA_CONFIGS[model_type])
        self.sam_prompt_encoder = PromptEncoder()
        self.sam_mask_decoder = Sam2MaskDecoder()
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, EMBED_CHANNELS))
        video = VideoOnly()
        for name, module in list(video.named_children()):
            self.add_module(name, module)
        for name, parameter in list(video.named_parameters(recurse=False)):
            self.register_parameter(name, parameter)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Model inputs (N, 3, 1024, 1024) -> image embeddings (N, 256, 64, 64) and the decoder's
        high-resolution features ((N, 32, 256, 256), (N, 64, 128, 128))."""
        s4, s8, s16 = self.image_encoder(images)
        decoder = self.sam_mask_decoder
        embedding = s16 + self.no_mem_embed.reshape(1, -1, 1, 1)
        return embedding, (decoder.conv_s0(s4), decoder.conv_s1(s8))

    @torch.no_grad()
    def decode(
        self,
        embedding: torch.Tensor,
        high_res: tuple[torch.Tensor, torch.Tensor],
        coords: torch.Tensor,
        labels: torch.Tensor,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts as labelled points, as `SAM2ImagePredictor._predict` passes them: coords
        (B, N, 2) xy in the 1024 frame, labels (B, N) (1/0 points, 2/3 a box's corners; the
        closing padding point is added here); mask_input (B, 1, 256, 256) logits or None.
        Returns every mask token's low-resolution logits (B, 4, 256, 256) and IoU (B, 4)
        (`sam2_decoder.select_masks` keeps a prompt's)."""
        sparse, dense = self.sam_prompt_encoder(coords, labels, mask_input)
        image_pe = self.sam_prompt_encoder.dense_pe()
        return self.sam_mask_decoder(embedding, image_pe, sparse, dense, high_res)


def sam2_input(image: torch.Tensor) -> torch.Tensor:
    """A uint8 image (H, W, 3) -> SAM 2.1's input (1, 3, 1024, 1024) float32 on its device:
    scaled to [0, 1], resized bilinearly with antialiasing to 1024 x 1024, normalised (as
    `SAM2Transforms`)."""
    x = image.permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SAM2_MEAN, device=x.device).reshape(3, 1, 1)
    std = torch.tensor(SAM2_STD, device=x.device).reshape(3, 1, 1)
    return (x - mean) / std


def build_sam2(model_type: str) -> Sam2Model:
    """A randomly initialised SAM 2.1 of `model_type` (a key of `HIERA_CONFIGS`), in eval mode."""
    if model_type not in HIERA_CONFIGS:
        raise ValueError(f"unknown SAM 2.1 model type {model_type!r}; expected one of {tuple(HIERA_CONFIGS)}")
    return Sam2Model(model_type).eval()
