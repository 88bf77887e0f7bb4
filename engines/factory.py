"""`build_engine`: a loaded SAM model in the engine of the job's `engine.backend`.

The one module that imports every back-end (`torch_backend`, `onnx_backend`,
`tensorrt_backend`, and SAM 2.1's `sam2_engine`); they import what they share from `backend`, never this module or each
other, so the engines' imports form a tree. The heavy optional packages (onnxruntime,
tensorrt) are imported only when an engine of theirs is built.
"""

from __future__ import annotations

from sam_batch.engines.backend import EngineError, load_model, pick_device
from sam_batch.engines.onnx_backend import OnnxEngine, sam2_onnx_networks
from sam_batch.engines.registry import BACKENDS
from sam_batch.engines.sam2 import Sam2Model
from sam_batch.engines.sam2_engine import Sam2Engine, Sam2Generator, Sam2Networks, TorchSam2Networks
from sam_batch.engines.tensorrt_backend import TensorRTEngine, require_tensorrt, sam2_tensorrt_networks
from sam_batch.engines.torch_backend import TorchEngine


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
    sam2_generator: Sam2Generator | None = None,
) -> TorchEngine | OnnxEngine | TensorRTEngine | Sam2Engine:
    """Resolve the checkpoint, load it strictly into a fresh model and wrap it in `backend`'s engine.

    `onnx` and `tensorrt` derive their graphs from the loaded weights on first use and cache them
    under the weights cache (see `engines.onnx_backend`, `engines.tensorrt_backend`).
    `layout` is the torch engine's (see `TorchEngine`). SAM 2.1 types get a `Sam2Engine` over
    `backend`'s networks (`layout` does not apply), serving the automatic generator as
    `sam2_generator` says (default: SAM 2's defaults).
    """
    if backend not in BACKENDS:
        raise EngineError(f"engine.backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        require_tensorrt(device)  # before loading any weights: name what is missing at once
    loaded = load_model(model_type, checkpoint, sha256, storage_options)
    if isinstance(loaded.model, Sam2Model):
        networks: Sam2Networks
        if backend == "onnx":
            networks = sam2_onnx_networks(loaded, device, precision)
        elif backend == "tensorrt":
            networks = sam2_tensorrt_networks(loaded, device, precision)
        else:
            networks = TorchSam2Networks(loaded.model, pick_device(device), precision)
        return Sam2Engine(networks, sam2_generator or Sam2Generator())
    if backend == "onnx":
        return OnnxEngine.from_model(loaded, device, precision)
    if backend == "tensorrt":
        return TensorRTEngine.from_model(loaded, device, precision)
    return TorchEngine(loaded.model, pick_device(device), precision, layout)
