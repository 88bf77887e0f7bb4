"""`engine.backend: torch` — SAM in PyTorch (eager), the default engine.

The engine interface the pipeline talks to (see `backend`): encode a crop, decode prompt
batches (the generator's single points, `decode`; the predictor's boxes and points,
`predict`), upscale the logits it keeps. In the cpu layout prompts go through
`engines.point_decoder`; in the gpu layout through the model's batched decoder.
"""

from __future__ import annotations

import numpy as np
import torch

from sam_batch.engines.backend import (
    GPU_PROMPT_BATCH,
    TORCH_DTYPES,
    CropEmbedding,
    EngineError,
    allow_tf32,
    autocast,
    upscale_logits,
)
from sam_batch.engines.point_decoder import PointDecoder
from sam_batch.engines.sam import SamModel
from sam_batch.engines.transforms import image_to_input, labelled_points, resize_longest_side, scale_coords

LAYOUTS = ("cpu", "gpu")  # how a TorchEngine lays out the work (see TorchEngine)
# batches decoded at once on the CPU: each holds the GIL for its Python between operators
# (about a tenth of its time), so beyond a few threads more cores go to each batch instead
MAX_CONCURRENT_BATCHES = 4


class TorchEngine:
    """SAM in PyTorch (eager) on one device, in one of two layouts of the work (`LAYOUTS`):

    - cpu: prompts through `engines.point_decoder` (the decoder's arithmetic with the
      prompt-independent work done once per crop), several batches at once, each kept mask
      brought to full size only over its window, on the host; fp32 only.
    - gpu: the model's batched decoder, at least `GPU_PROMPT_BATCH` prompts a call, masks
      brought to full size a chunk at a time on the device; fp32, tf32, fp16 or bf16 (autocast).

    `layout` None takes the device's own (gpu on CUDA, cpu otherwise); the gpu layout runs on
    the CPU too, which is how the tests hold it to the golden files without a GPU. An HQ-SAM
    model decodes with the model's batched decoder in both layouts (no point decoder), with the
    crop's HQ features made at `encode`.
    `precision` sets torch's process-wide TF32 switches: on for tf32, off otherwise.
    """

    def __init__(
        self, model: SamModel, device: torch.device, precision: str = "fp32", layout: str | None = None
    ) -> None:
        self.layout = layout or ("gpu" if device.type == "cuda" else "cpu")
        if self.layout not in LAYOUTS:
            raise EngineError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.layout == "cpu" and device.type != "cpu":
            raise EngineError(f"the cpu layout runs on the CPU only, not on {device}")
        if precision != "fp32" and self.layout == "cpu":
            raise EngineError(f"engine.precision: {precision} needs a GPU; use fp32 on the CPU")
        self.device = device
        self.dtype = TORCH_DTYPES[precision]
        allow_tf32(precision == "tf32")
        self.model = model.to(device).eval()
        self.mask_threshold = 0.0
        self.min_prompt_batch = GPU_PROMPT_BATCH if self.layout == "gpu" else 1
        self.windowed_upscale = self.layout == "cpu"
        self.point_decoder = (
            PointDecoder(self.model.prompt_encoder, self.model.mask_decoder)
            if self.layout == "cpu" and not self.model.hq
            else None
        )

    @torch.inference_mode()
    def encode(self, crop: np.ndarray) -> CropEmbedding:
        """Encode one uint8 crop (h, w, 3) into its image embedding."""
        crop_hw = (crop.shape[0], crop.shape[1])
        resized = resize_longest_side(crop)
        batch = image_to_input(resized, self.model.pixel_mean.cpu(), self.model.pixel_std.cpu())
        hq_features = None
        with self.autocast():
            if self.model.hq:
                embedding, hq_features = self.model.embed_hq(batch.to(self.device))
                hq_features = hq_features.float()
            else:
                embedding = self.model.embed(batch.to(self.device))
        embedding = embedding.float()
        side = self.point_decoder.image_side(embedding) if self.point_decoder is not None else None
        return CropEmbedding(embedding, (resized.shape[0], resized.shape[1]), crop_hw, side, hq_features)

    @torch.inference_mode()
    def decode(
        self, crop: CropEmbedding, points: np.ndarray, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode single-point prompts (B, 2) xy in crop pixels.

        Returns low-resolution logits (B, M, 256, 256) and predicted IoUs (B, M), fp32, on the
        device: M = 3, or 1 for HQ-SAM (`SamModel.decode`).
        With `min_iou`, the CPU path may skip the logits of prompts whose three IoUs are all at
        or below it (left at zero): use it only when such masks are dropped anyway.
        """
        coords = scale_coords(points.astype(np.float64), crop.crop_hw)
        # float64 until the positional encoding, as the reference generator passes them
        coords_t = torch.as_tensor(coords, dtype=torch.float64, device=self.device)[:, None, :]
        labels = torch.ones((len(points), 1), dtype=torch.int64, device=self.device)
        if self.point_decoder is not None and crop.image_side is not None:
            return self.point_decoder.decode(crop.image_side, coords_t, labels, min_iou)
        with self.autocast():
            logits, iou = self.model.decode(crop.embedding, coords_t, labels, crop.hq_features)
        return logits.float(), iou.float()

    @torch.inference_mode()
    def predict(
        self,
        crop: CropEmbedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode B prompts of one shape as SAM's predictor does (`SamPredictor.predict`).

        points: (B, N, 2) xy in crop pixels with labels (B, N) 1 or 0, or None; boxes: (B, 4)
        XYXY in crop pixels, or None. Coordinates go to the input frame in float64 and to the
        model in float32, as the predictor passes them. Returns low-resolution logits (B, M,
        256, 256) and predicted IoUs (B, M), fp32 on the device: M = 3 with `multimask`, else 1
        (HQ-SAM: always 1, the best of the three or token 0, plus the HQ token's mask).
        In the cpu layout through `PointDecoder.predict` (the same arithmetic, less work).
        """
        coords, labels = labelled_points(points, labels, boxes)
        coords_t = torch.as_tensor(scale_coords(coords, crop.crop_hw), dtype=torch.float32, device=self.device)
        labels_t = torch.as_tensor(labels, device=self.device)
        if self.point_decoder is not None and crop.image_side is not None:
            return self.point_decoder.predict(crop.image_side, coords_t, labels_t, multimask)
        encoder = self.model.prompt_encoder
        with self.autocast():
            sparse = encoder.embed_labelled_points(coords_t, labels_t)
            logits, iou = self.model.decode_sparse(
                crop.embedding, sparse, encoder.embed_mask(None), multimask, crop.hq_features
            )
        return logits.float(), iou.float()

    def upscale(self, crop: CropEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Logits (K, 256, 256) → logits (K, h, w) at the crop's original size."""
        return upscale_logits(crop, low_res)

    @property
    def concurrent_batches(self) -> int:
        """Prompt batches to decode at once (see `pipeline.amg.Engine`): in the cpu layout one
        per torch thread of the calling thread, up to `MAX_CONCURRENT_BATCHES`; else 1."""
        if self.point_decoder is None:
            return 1
        return min(torch.get_num_threads(), MAX_CONCURRENT_BATCHES)

    def autocast(self):
        """The autocast context of the engine's precision (off at fp32)."""
        return autocast(self.device, self.dtype)
