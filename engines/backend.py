"""The engine interface the pipeline talks to: encode a crop, decode prompt batches.

An engine owns a SAM model on one device at one precision. The pipeline hands it uint8 crops
and prompt points in crop pixels; it hands back low-resolution mask logits and predicted IoUs,
and upsamples the logits it is asked to keep back to crop pixels. Everything stays on the
engine's device, so the per-pixel filtering in `pipeline.amg` runs where the logits are.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from sam_batch.engines.registry import BACKENDS
from sam_batch.engines.checkpoints import KNOWN_CHECKPOINTS, load_state_dict, resolve_checkpoint, sha256_file
from sam_batch.engines.point_decoder import ImageSide, PointDecoder
from sam_batch.engines.common import IMAGE_SIZE
from sam_batch.engines.sam import SamModel, build_sam
from sam_batch.engines.transforms import image_to_input, resize_longest_side, scale_coords

if TYPE_CHECKING:
    from sam_batch.engines.onnx_backend import OnnxEngine
    from sam_batch.engines.tensorrt_backend import TensorRTEngine

# the dtype each precision computes in; tf32 is fp32 with TensorFloat-32 matrix products and
# convolutions on the GPUs that have them (fp32 means full fp32: TF32 is turned off)
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LAYOUTS = ("cpu", "gpu")  # how a TorchEngine lays out the work (see TorchEngine)
# batches decoded at once on the CPU: each holds the GIL for its Python between operators
# (about a tenth of its time), so beyond a few threads more cores go to each batch instead
MAX_CONCURRENT_BATCHES = 4
GPU_PROMPT_BATCH = 256  # prompts per decode call on a GPU (`min_prompt_batch`); the CPU takes any


def prompt_batch(device: torch.device) -> int:
    """The fewest prompts per decode call that keep `device` busy (see `pipeline.amg.Engine`)."""
    return GPU_PROMPT_BATCH if device.type == "cuda" else 1


def allow_tf32(allowed: bool) -> None:
    """Let CUDA matrix products and cuDNN convolutions of fp32 tensors use TensorFloat-32
    (process-wide torch switches; PyTorch's own default allows it for convolutions). Through
    `fp32_precision` where torch has it (2.9 on), else the older `allow_tf32` flags; the two
    must not be mixed in one process, so read them back with `tf32_settings`."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        mode = "tf32" if allowed else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = allowed
        torch.backends.cudnn.allow_tf32 = allowed


def tf32_settings() -> dict[str, object]:
    """The TF32 switches as `allow_tf32` sets them, for reports."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {"tf32_matmul": torch.backends.cuda.matmul.fp32_precision,
                "tf32_cudnn_conv": torch.backends.cudnn.conv.fp32_precision}
    return {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn_conv": torch.backends.cudnn.allow_tf32}


class EngineError(RuntimeError):
    """The engine cannot be built as asked (missing back-end, device or weights)."""


@dataclass(frozen=True)
class CropEmbedding:
    """One encoded crop.

    embedding: (1, 256, 64, 64) on the engine's device.
    input_hw: the crop's size after resizing its longest side to 1024 (before padding).
    crop_hw: the crop's size in original pixels.
    image_side: the decoder's prompt-independent work on it, for engines that decode with
    `engines.point_decoder` (None otherwise).
    """

    embedding: torch.Tensor
    input_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    image_side: ImageSide | None = None


def pick_device(device: str) -> torch.device:
    """`auto` → the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"engine.device: {device!r} asked for, but no CUDA GPU is visible")
    return torch.device(device)


class TorchEngine:
    """SAM in PyTorch (eager) on one device, in one of two layouts of the work (`LAYOUTS`):

    - cpu: prompts through `engines.point_decoder` (the decoder's arithmetic with the
      prompt-independent work done once per crop), several batches at once, each kept mask
      brought to full size only over its window, on the host; fp32 only.
    - gpu: the model's batched decoder, at least `GPU_PROMPT_BATCH` prompts a call, masks
      brought to full size a chunk at a time on the device; fp32, tf32, fp16 or bf16 (autocast).

    `layout` None takes the device's own (gpu on CUDA, cpu otherwise); the gpu layout runs on
    the CPU too, which is how the tests hold it to the golden files without a GPU.
    `precision` sets torch's process-wide TF32 switches: on for tf32, off otherwise.
    """

    def __init__(self, model: SamModel, device: torch.device, precision: str = "fp32", layout: str | None = None) -> None:
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
            PointDecoder(self.model.prompt_encoder, self.model.mask_decoder) if self.layout == "cpu" else None
        )

    @torch.inference_mode()
    def encode(self, crop: np.ndarray) -> CropEmbedding:
        """Encode one uint8 crop (h, w, 3) into its image embedding."""
        crop_hw = (crop.shape[0], crop.shape[1])
        resized = resize_longest_side(crop)
        batch = image_to_input(resized, self.model.pixel_mean.cpu(), self.model.pixel_std.cpu())
        with self.autocast():
            embedding = self.model.embed(batch.to(self.device)).float()
        side = self.point_decoder.image_side(embedding) if self.point_decoder is not None else None
        return CropEmbedding(embedding, (resized.shape[0], resized.shape[1]), crop_hw, side)

    @torch.inference_mode()
    def decode(
        self, crop: CropEmbedding, points: np.ndarray, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode single-point prompts (B, 2) xy in crop pixels.

        Returns low-resolution logits (B, 3, 256, 256) and predicted IoUs (B, 3), fp32, on the device.
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
            logits, iou = self.model.decode(crop.embedding, coords_t, labels)
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
        if self.dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.dtype)


def upscale_logits(crop: CropEmbedding, low_res: torch.Tensor) -> torch.Tensor:
    """Logits (K, 256, 256) → logits (K, h, w) at the crop's original size, on their device.

    As SAM does it: bilinear to the 1024 input frame, cut the padding, bilinear to the crop.
    """
    masks = F.interpolate(low_res[:, None], (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    masks = masks[..., : crop.input_hw[0], : crop.input_hw[1]]
    masks = F.interpolate(masks, crop.crop_hw, mode="bilinear", align_corners=False)
    return masks[:, 0]


@dataclass(frozen=True)
class LoadedModel:
    """A model with its weights loaded, and what identifies those weights (for derived caches)."""

    model: SamModel
    model_type: str
    checkpoint_sha256: str


def load_model(
    model_type: str,
    checkpoint: str | None = None,
    sha256: str | None = None,
    storage_options: dict | None = None,
) -> LoadedModel:
    """Resolve the checkpoint and load it strictly into a fresh fp32 model on the CPU."""
    path: Path = resolve_checkpoint(model_type, checkpoint, sha256, storage_options)
    model = build_sam(model_type)
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise EngineError(f"{path}: does not fit model {model_type}: {first_line}") from None
    known = KNOWN_CHECKPOINTS.get(model_type)
    if sha256 is not None:  # resolve_checkpoint verified it
        digest = sha256.lower()
    elif checkpoint is None and known is not None and known.sha256 is not None:  # verified on fetch
        digest = known.sha256
    else:
        digest = sha256_file(path)
    return LoadedModel(model, model_type, digest)


def build_engine(
    model_type: str,
    checkpoint: str | None = None,
    sha256: str | None = None,
    *,
    backend: str = "torch",
    device: str = "auto",
    precision: str = "fp32",
    storage_options: dict | None = None,
    layout: str | None = None,
) -> TorchEngine | OnnxEngine | TensorRTEngine:
    """Resolve the checkpoint, load it strictly into a fresh model and wrap it in `backend`'s engine.

    `onnx` and `tensorrt` derive their graphs from the loaded weights on first use and cache them
    under the weights cache (see `engines.onnx_backend`, `engines.tensorrt_backend`).
    `layout` is the torch engine's (see `TorchEngine`).
    """
    if backend not in BACKENDS:
        raise EngineError(f"engine.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from sam_batch.engines.tensorrt_backend import require_tensorrt

        require_tensorrt(device)  # before loading any weights: name what is missing at once
    loaded = load_model(model_type, checkpoint, sha256, storage_options)
    if backend == "onnx":
        from sam_batch.engines.onnx_backend import OnnxEngine

        return OnnxEngine.from_model(loaded, device, precision)
    if backend == "tensorrt":
        from sam_batch.engines.tensorrt_backend import TensorRTEngine

        return TensorRTEngine.from_model(loaded, device, precision)
    return TorchEngine(loaded.model, pick_device(device), precision, layout)


# glibc malloc's options (mallopt(3)): keep freed memory in the process for the next allocation,
# instead of giving it back to the system and faulting it in again (page by page) the next time
MALLOC_OPTIONS = (
    (-1, 2**30),  # M_TRIM_THRESHOLD: give back the heap's free top only beyond 1 GiB
    (-2, 64 * 2**20),  # M_TOP_PAD: grow the heap 64 MiB at a time
    (-3, 32 * 2**20),  # M_MMAP_THRESHOLD: blocks below 32 MiB (glibc's maximum) come from the heap
)


def keep_freed_memory() -> bool:
    """Set `MALLOC_OPTIONS` in this process (a worker that segments on the CPU); False where the
    C library has no `mallopt` (not glibc) or refuses one.

    A 32x32 image allocates and frees gigabytes in blocks of megabytes; with glibc's defaults
    many go back to the system when freed, and each new one is faulted in again.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = [mallopt(option, value) == 1 for option, value in MALLOC_OPTIONS]  # each one tried
    return all(applied)


def set_cpu_threads(n_threads: int | None = None) -> int:
    """Give torch `n_threads` intra-op threads (default: all cores this process may use)."""
    n = n_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n
