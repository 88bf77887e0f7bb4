"""The names a job, the CLI and the checkpoints share: model types, back-ends, precisions.

Torch-free, so that the job schema and the CLI can read them without importing a model.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelType = Literal[
    "vit_t",
    "vit_b",
    "vit_l",
    "vit_h",
    "vit_t_hq",
    "vit_b_hq",
    "vit_l_hq",
    "vit_h_hq",
    "sam2.1_hiera_t",
    "sam2.1_hiera_s",
    "sam2.1_hiera_b+",
    "sam2.1_hiera_l",
]
Backend = Literal["torch", "onnx", "tensorrt"]
Precision = Literal["fp32", "tf32", "fp16", "bf16"]

MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
BACKENDS: tuple[str, ...] = get_args(Backend)
PRECISIONS: tuple[str, ...] = get_args(Precision)
HQ_SUFFIX = "_hq"  # HQ-SAM: the base type's encoder, HQ-SAM's decoder
SAM2_PREFIX = "sam2.1_"  # SAM 2.1's image model (Hiera encoder)


def is_hq(model_type: str) -> bool:
    """Whether `model_type` is an HQ-SAM type (`vit_h_hq`, ...)."""
    return model_type.endswith(HQ_SUFFIX)


def is_sam2(model_type: str) -> bool:
    """Whether `model_type` is a SAM 2.1 type (`sam2.1_hiera_t`, ...)."""
    return model_type.startswith(SAM2_PREFIX)


def precision_refusal(backend: str, precision: str) -> str | None:
    """Why `backend` cannot run at `precision` (onnx is fp32 only), or None where it can; the
    job schema and the onnx engine both say it."""
    if backend == "onnx" and precision != "fp32":
        return f"{precision} is not available with engine.backend onnx; use fp32"
    return None
