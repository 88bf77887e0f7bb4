"""The names a job, the CLI and the checkpoints share: model types, back-ends, precisions.

Torch-free, so that the job schema and the CLI can read them without importing a model.
"""

from __future__ import annotations

from typing import Literal, get_args

ModelType = Literal["vit_t", "vit_b", "vit_l", "vit_h"]
Backend = Literal["torch", "onnx", "tensorrt"]
Precision = Literal["fp32", "tf32", "fp16", "bf16"]

MODEL_TYPES: tuple[str, ...] = get_args(ModelType)
BACKENDS: tuple[str, ...] = get_args(Backend)
PRECISIONS: tuple[str, ...] = get_args(Precision)
