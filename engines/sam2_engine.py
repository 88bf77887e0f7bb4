"""`Sam2Engine`: SAM 2.1 (`sam2.1_hiera_*`) behind the engine interface the pipeline talks to
(`encode`, `decode`, `predict`, `upscale`; see `backend`), with `SAM2ImagePredictor`'s frames.

A crop is resized to 1024 x 1024 without keeping its aspect (`sam2_input`); prompts in crop
pixels go to that frame in float32 as the official transforms take them (x / w * 1024, y / h *
1024); low-resolution logits come back to the crop's size in one bilinear interpolation.

The networks run behind `Sam2Networks`: in PyTorch (`TorchSam2Networks`: the model's batched
decoder on the CPU and the GPU alike; fp32, or autocast on a GPU), or as the exported graphs on
onnxruntime or TensorRT (`GraphSam2Networks`). They give every mask token's output; the engine
keeps what SAM 2's predictor keeps (`sam2_decoder.select_masks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from sam_batch.engines.backend import (
    TORCH_DTYPES,
    CropEmbedding,
    EngineError,
    Graph,
    allow_tf32,
    autocast,
    prompt_batch,
)
from sam_batch.engines.common import IMAGE_SIZE, LOW_RES_SIZE
from sam_batch.engines.onnx_export import HIGH_RES_FEATURES
from sam_batch.engines.sam2 import Sam2Model, sam2_input
from sam_batch.engines.sam2_decoder import select_masks

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


class Sam2Networks(Protocol):
    """SAM 2.1's encoder and decoder on one device. Shapes: images (1, 3, 1024, 1024) as
    `sam2_input` makes them; coords (B, N, 2) xy in that frame, labels (B, N) (1/0 points, 2/3 a
    box's corners; the padding point is added by the networks); mask_input (B, 1, 256, 256)
    logits. Decoding gives every mask token's logits (B, 4, 256, 256) and IoU (B, 4), fp32."""

    device: torch.device

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """-> image embedding (1, 256, 64, 64), high-resolution features ((1, 32, 256, 256), (1, 64, 128, 128))."""
        ...

    def decode(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's prompts, without a mask prompt."""
        ...

    def predict(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor's prompts (a prompt job's, or m2m's with a mask prompt)."""
        ...


class TorchSam2Networks:
    """`Sam2Networks` in PyTorch (eager): the model on one device at one precision (fp32 on the
    CPU; tf32, fp16 or bf16 through autocast on a GPU)."""

    def __init__(self, model: Sam2Model, device: torch.device, precision: str = "fp32") -> None:
        if precision != "fp32" and device.type != "cuda":
            raise EngineError(f"engine.precision: {precision} needs a GPU; use fp32 on the CPU")
        self.device = device
        self.dtype = TORCH_DTYPES[precision]
        allow_tf32(precision == "tf32")
        self.model = model.to(device).eval()

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        with autocast(self.device, self.dtype):
            embedding, (s0, s1) = self.model.embed(images)
        return embedding.float(), (s0.float(), s1.float())

    def decode(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(crop, coords, labels, None)

    @torch.inference_mode()
    def predict(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.dtype):
            logits, iou = self.model.decode(crop.embedding, crop.high_res_features, coords, labels, mask_input)
        return logits.float(), iou.float()


class GraphSam2Networks:
    """`Sam2Networks` as SAM 2.1's exported graphs (`onnx_export`) on onnxruntime or TensorRT:
    the encoder, the decoder (the generator's points), and the predictor (prompts with an
    optional mask prompt), made by `make_predictor` on first use. Prompts go `max_prompts` a
    call (None: all at once); a prompt of more than `max_predictor_points` labelled points is
    refused (None: any)."""

    def __init__(
        self,
        encoder: Graph,
        decoder: Graph,
        make_predictor: Callable[[], Graph],
        device: torch.device,
        max_prompts: int | None = None,
        max_predictor_points: int | None = None,
    ) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.max_predictor_points = max_predictor_points
        self.make_predictor = make_predictor
        self.predictor: Graph | None = None
        self.device = device
        self.max_prompts = max_prompts

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out = self.encoder(images=images)
        return out["image_embeddings"], (out[HIGH_RES_FEATURES[0]], out[HIGH_RES_FEATURES[1]])

    def decode(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._in_chunks(self.decoder, self._image(crop), point_coords=coords, point_labels=labels)

    def predict(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor, mask_input: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The predictor graph; without a mask prompt it is given zeros and `has_mask_input` 0."""
        if self.max_predictor_points is not None and coords.shape[1] > self.max_predictor_points:
            raise EngineError(
                f"engine.backend tensorrt takes SAM 2.1 prompts of at most {self.max_predictor_points} labelled "
                f"points (the points, plus 2 for a box); this one has {coords.shape[1]}: use torch or onnx"
            )
        if self.predictor is None:
            self.predictor = self.make_predictor()
        image = {**self._image(crop), "has_mask_input": torch.ones(1) if mask_input is not None else torch.zeros(1)}
        if mask_input is None:
            mask_input = torch.zeros((len(coords), 1, LOW_RES_SIZE, LOW_RES_SIZE), device=coords.device)
        return self._in_chunks(self.predictor, image, point_coords=coords, point_labels=labels, mask_input=mask_input)

    @staticmethod
    def _image(crop: CropEmbedding) -> dict[str, torch.Tensor]:
        """The graphs' inputs of one encoded crop: its embedding and high-resolution features."""
        return {"image_embeddings": crop.embedding, **dict(zip(HIGH_RES_FEATURES, crop.high_res_features))}

    def _in_chunks(
        self, graph: Graph, image: dict[str, torch.Tensor], **prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`graph` on the crop's `image` inputs and `prompts` (tensors of B prompts each),
        `max_prompts` prompts a call: logits and IoUs, concatenated."""
        logits, iou = [], []
        batch = len(prompts["point_coords"])
        step = self.max_prompts or batch
        for start in range(0, batch, step):
            chunk = {name: tensor[start : start + step] for name, tensor in prompts.items()}
            out = graph(**image, **chunk)
            logits.append(out["low_res_logits"])
            iou.append(out["iou_predictions"])
        return torch.cat(logits), torch.cat(iou)


class Sam2Engine:
    """SAM 2.1 through `networks`; `generator` sets how `decode` serves the automatic generator
    (`Sam2Generator`)."""

    def __init__(self, networks: Sam2Networks, generator: Sam2Generator = Sam2Generator()) -> None:
        self.networks = networks
        self.device = networks.device
        self.generator = generator
        self.mask_threshold = generator.mask_threshold
        self.min_prompt_batch = prompt_batch(self.device)
        self.windowed_upscale = False
        self.concurrent_batches = 1

    @torch.inference_mode()
    def encode(self, crop: np.ndarray) -> CropEmbedding:
        """Encode one uint8 crop (h, w, 3): its embedding and high-resolution features."""
        crop_hw = (crop.shape[0], crop.shape[1])
        images = sam2_input(torch.tensor(crop, device=self.device))
        embedding, high_res = self.networks.embed(images)
        return CropEmbedding(embedding, (IMAGE_SIZE, IMAGE_SIZE), crop_hw, high_res_features=high_res)

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
        logits, iou = select_masks(*self.networks.decode(crop, coords, labels), self.generator.multimask_output)
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
        out = self.networks.predict(crop, coords, torch.cat(tags, 1).to(self.device), None)
        return select_masks(*out, multimask)

    def _refine(
        self, crop: CropEmbedding, coords: torch.Tensor, labels: torch.Tensor, low_res: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2's mask-to-mask refinement: each point (K, 1, 2) in the model's frame again, with
        its mask's low-resolution logits (K, 256, 256), clamped as the predictor returns them, as
        the mask prompt; one mask each -> logits (K, 1, 256, 256) and IoU (K, 1)."""
        mask_input = low_res.clamp(-MASK_INPUT_LIMIT, MASK_INPUT_LIMIT)[:, None]
        return select_masks(*self.networks.predict(crop, coords, labels, mask_input), False)

    def upscale(self, crop: CropEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Logits (K, 256, 256) -> logits (K, h, w) at the crop's size (one bilinear interpolation)."""
        return F.interpolate(low_res[:, None], crop.crop_hw, mode="bilinear", align_corners=False)[:, 0]

    @staticmethod
    def _to_frame(xy: torch.Tensor, crop: CropEmbedding) -> torch.Tensor:
        """xy (..., 2) float32 in crop pixels -> the model's 1024 x 1024 frame, as SAM2Transforms."""
        height, width = crop.crop_hw
        xy = xy.clone()
        xy[..., 0] = xy[..., 0] / width
        xy[..., 1] = xy[..., 1] / height
        return xy * IMAGE_SIZE
