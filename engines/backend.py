"""What every engine back-end shares: its errors, the crop embedding, devices and precisions.

An engine owns a SAM model on one device at one precision. The pipeline hands it uint8 crops
and prompt points in crop pixels; it hands back low-resolution mask logits and predicted IoUs,
and upsamples the logits it is asked to keep back to crop pixels. Everything stays on the
engine's device, so the per-pixel filtering in `pipeline.amg` runs where the logits are.

The back-ends (`torch_backend`, `onnx_backend`, `tensorrt_backend`) import this module;
`factory.build_engine` picks one. Here too: loading a checkpoint into a model (`load_model`)
and the process settings a worker makes before it segments (threads, malloc, TF32).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sam_batch.engines.checkpoints import KNOWN_CHECKPOINTS, load_state_dict, resolve_checkpoint, sha256_file
from sam_batch.engines.common import IMAGE_SIZE
from sam_batch.engines.point_decoder import ImageSide
from sam_batch.engines.registry import is_sam2
from sam_batch.engines.sam import SamModel, build_sam
from sam_batch.engines.sam2 import Sam2Model, build_sam2

# the dtype each precision computes in; tf32 is fp32 with TensorFloat-32 matrix products and
# convolutions on the GPUs that have them (fp32 means full fp32: TF32 is turned off)
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# an exported graph on a runtime: float tensors by input name in, float32 tensors by output name
# out, on one device (`tensorrt_backend.TrtGraph`, or onnxruntime behind the same call)
Graph = Callable[..., dict[str, torch.Tensor]]
GPU_PROMPT_BATCH = 256  # prompts per decode call on a GPU (`min_prompt_batch`); the CPU takes any
LOAD_ERROR_CHARS = 240  # the most of torch's strict-load error a one-line EngineError quotes


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


def autocast(device: torch.device, dtype: torch.dtype):
    """torch's autocast context computing in `dtype` on `device`'s type (off for float32)."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def tf32_settings() -> dict[str, object]:
    """The TF32 switches as `allow_tf32` sets them, for reports."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return {
            "tf32_matmul": torch.backends.cuda.matmul.fp32_precision,
            "tf32_cudnn_conv": torch.backends.cudnn.conv.fp32_precision,
        }
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
    hq_features: (1, 32, 256, 256) on the engine's device for HQ-SAM models (None otherwise).
    high_res_features: SAM 2's decoder's two finer levels, (1, 32, 256, 256) and (1, 64, 128, 128)
    (None for SAM 1 models).
    """

    embedding: torch.Tensor
    input_hw: tuple[int, int]
    crop_hw: tuple[int, int]
    image_side: ImageSide | None = None
    hq_features: torch.Tensor | None = None
    high_res_features: tuple[torch.Tensor, torch.Tensor] | None = None


def pick_device(device: str) -> torch.device:
    """`auto` → the first CUDA GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"engine.device: {device!r} asked for, but no CUDA GPU is visible")
    return torch.device(device)


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

    model: SamModel | Sam2Model
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
    model = build_sam2(model_type) if is_sam2(model_type) else build_sam(model_type)
    try:
        model.load_state_dict(load_state_dict(path), strict=True)
    except RuntimeError as error:
        raise EngineError(f"{path}: does not fit model {model_type}: {_load_error_detail(error)}") from None
    known = KNOWN_CHECKPOINTS.get(model_type)
    if sha256 is not None:  # resolve_checkpoint verified it
        digest = sha256.lower()
    elif checkpoint is None and known is not None and known.sha256 is not None:  # verified on fetch
        digest = known.sha256
    else:
        digest = sha256_file(path)
    return LoadedModel(model, model_type, digest)


def _load_error_detail(error: RuntimeError, limit: int = LOAD_ERROR_CHARS) -> str:
    """torch's strict-load error in one line: its first detail ("Missing key(s) in state_dict:
    ...", "Unexpected key(s) ...", "size mismatch ..."), cut at `limit` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 else lines[0] if lines else "the weights do not load"
    return detail if len(detail) <= limit else detail[: limit - 1] + "…"


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
