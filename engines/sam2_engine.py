"""`Sam2Engine`: SAM 2.1 (`sam2.1_hiera_*`) behind the engine interface the pipeline talks to
(`encode`, `decode`, `predict`, `upscale`; see `backend`), with `SAM2ImagePredictor`'s frames.

A crop is resized to 1024 x 1024 without keeping its aspect (`Sam2Model.input`); prompts in crop
pixels go to that frame in float32 as the official transforms take them (x / w * 1024, y / h *
1024); low-resolution logits come back to the crop's size in one bilinear interpolation. The
decoder is the model's, batched, on the CPU and the GPU alike; fp32, or autocast on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sam_batch.engines.backend import GPU_PROMPT_BATCH, TORCH_DTYPES, CropEmbedding, EngineError, allow_tf32
from sam_batch.engines.common import IMAGE_SIZE
from sam_batch.engines.sam2 import Sam2Model

MASK_INPUT_LIMIT = 32.0  # low-resolution logits fed back as a mask prompt are clamped to +-this


@dataclass(frozen=True)
class Sam2Generator:
    """What SAM 2's automatic generator adds to SAM's parameters (`SAM2AutomaticMaskGenerator`):

    multimask_output: the three multimask outputs a point, or one (token 0's mask, or the best of
    the three where it is unstable); use_m2m: every mask decoded once more from its point with its
    own low-resolution logits as the mask prompt, one mask each, before the filters;
    mask_threshold: the logit a pixel must exceed (and the stability score's centre).
    """

    multimask_output: bool = True
    use_m2m: bool = False
    mask_threshold: float = 0.0


class Sam2Engine:
    """SAM 2.1 on one device at one precision (fp32 on the CPU); `generator` sets how `decode`
    serves the automatic generator (`Sam2Generator`)."""

    def __init__(
        self,
        model: Sam2Model,
        device: torch.device,
        precision: str = "fp32",
        generator: Sam2Generator = Sam2Generator(),
    ) -> None:
        if precision != "fp32" and device.type != "cuda":
            raise EngineError(f"engine.precision: {precision} needs a GPU; use fp32 on the CPU")
        self.device = device
        self.dtype = TORCH_DTYPES[precision]
        allow_tf32(precision == "tf32")
        self.model = model.to(device).eval()
        self.generator = generator
        self.mask_threshold = generator.mask_threshold
        self.min_prompt_batch = GPU_PROMPT_BATCH if device.type == "cuda" else 1
        self.windowed_upscale = False
        self.concurrent_batches = 1

    @torch.inference_mode()
    def encode(self, crop: np.ndarray) -> CropEmbedding:
        """Encode one uint8 crop (h, w, 3): its embedding and high-resolution features."""
        crop_hw = (crop.shape[0], crop.shape[1])
        images = self.model.input(torch.tensor(crop, device=self.device))
        with self.autocast():
            embedding, (s0, s1) = self.model.embed(images)
        high_res = (s0.float(), s1.float())
        return CropEmbedding(embedding.float(), (IMAGE_SIZE, IMAGE_SIZE), crop_hw, high_res_features=high_res)

    @torch.inference_mode()
    def decode(
        self, crop: CropEmbedding, points: np.ndarray, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's single-point prompts (B, 2) xy in crop pixels -> low-resolution logits
        (B, M, 256, 256) and IoU (B, M), fp32 on the device: M = 3 with the generator's
        `multimask_output`, else 1; with its `use_m2m`, each of the B M masks refined (`_refine`).
        `min_iou` is accepted for the interface and not used (every logit is computed)."""
        coords = self._to_frame(torch.as_tensor(points, dtype=torch.float32, device=self.device), crop)[:, None]
        labels = torch.ones((len(points), 1), dtype=torch.int32, device=self.device)
        logits, iou = self._decode(crop, coords, labels, self.generator.multimask_output)
        if not self.generator.use_m2m:
            return logits, iou
        per_mask, chunk = logits.shape[1], len(points)
        coords, labels, flat = (
            coords.repeat_interleave(per_mask, 0),
            labels.repeat_interleave(per_mask, 0),
            logits.flatten(0, 1),
        )
        parts = [
            self._refine(
                crop, coords[start : start + chunk], labels[start : start + chunk], flat[start : start + chunk]
            )
            for start in range(0, len(flat), chunk)
        ]  # B prompts a call, as the official generator refines a batch's masks
        refined, refined_iou = (torch.cat(part) for part in zip(*parts))
        return refined.reshape(logits.shape), refined_iou.reshape(iou.shape)

    @torch.inference_mode()
    def predict(
        self,
        crop: CropEmbedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """B prompts of one shape as `SAM2ImagePredictor.predict` takes them: points (B, N, 2) xy
        in crop pixels with labels (B, N), and/or boxes (B, 4) XYXY. A box's corners come first
        (labels 2, 3), then the points. Returns logits (B, M, 256, 256) and IoU (B, M), M = 3
        with `multimask`, else 1."""
        parts, tags = [], []
        batch = len(points) if points is not None else len(boxes)
        if boxes is not None:
            parts.append(torch.as_tensor(np.asarray(boxes), dtype=torch.float32).reshape(-1, 2, 2))
            tags.append(torch.tensor([[2, 3]], dtype=torch.int32).repeat(batch, 1))
        if points is not None:
            parts.append(torch.as_tensor(np.asarray(points), dtype=torch.float32))
            tags.append(torch.as_tensor(np.asarray(labels)).to(torch.int32))
        coords = self._to_frame(torch.cat(parts, 1).to(self.device), crop)
        return self._decode(crop, coords, torch.cat(tags, 1).to(self.device), multimask)

    def _refine(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor, low_res: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's mask-to-mask refinement: each point (K, 1, 2) in the model's frame again, with
        its mask's low-resolution logits (K, 256, 256), clamped as the predictor returns them, as
        the mask prompt; one mask each -> logits (K, 1, 256, 256) and IoU (K, 1)."""
        mask_input = low_res.clamp(-MASK_INPUT_LIMIT, MASK_INPUT_LIMIT)[:, None]
        return self._decode(crop, coords, labels, False, mask_input)

    def upscale(self, crop: CropEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Logits (K, 256, 256) -> logits (K, h, w) at the crop's size (one bilinear interpolation)."""
        return F.interpolate(low_res[:, None], crop.crop_hw, mode="bilinear", align_corners=False)[:, 0]

    def autocast(self):
        """The autocast context of the engine's precision (off at fp32)."""
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _decode(
        self,
        crop: CropEmbedding,
        coords: torch.Tensor,
        labels: torch.Tensor,
        multimask: bool,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits, iou = self.model.decode(
                crop.embedding, crop.high_res_features, coords, labels, multimask, mask_input
            )
        return logits.float(), iou.float()

    @staticmethod
    def _to_frame(xy: torch.Tensor, crop: CropEmbedding) -> torch.Tensor:
        """xy (..., 2) float32 in crop pixels -> the model's 1024 x 1024 frame, as SAM2Transforms."""
        height, width = crop.crop_hw
        xy = xy.clone()
        xy[..., 0] = xy[..., 0] / width
        xy[..., 1] = xy[..., 1] / height
        return xy * IMAGE_SIZE
