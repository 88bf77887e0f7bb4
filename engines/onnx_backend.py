"""`engine.backend: onnx` — SAM's exported encoder and decoder graphs on onnxruntime.

The engine has `TorchEngine`'s interface and contract: crops in, `CropEmbedding` with a
(1, 256, 64, 64) float32 embedding, decode to low-resolution logits (B, 3, 256, 256) and IoUs
(B, 3) as float32 torch tensors on the engine's device, upscaling in torch. The graphs come
from `onnx_export.cached_onnx` (exported on first use, cached under the weights cache).
HQ-SAM's graphs (an encoder with an `hq_features` output) also give the crop its HQ features
(1, 32, 256, 256) and decode one mask a prompt: logits (B, 1, 256, 256), IoUs (B, 1). SAM 2.1's
graphs run behind `Sam2Engine` (`sam2_onnx_networks`).

Inputs and outputs are bound to torch tensors through onnxruntime's IOBinding, on the CPU as on
a GPU (CUDAExecutionProvider, from the `onnxruntime-gpu` package), so results never take a
detour through the host. fp32 only: for fp16/bf16 use the torch or tensorrt back-ends.
"""

from __future__ import annotations

import numpy as np
import torch

from sam_batch.engines.backend import CropEmbedding, EngineError, Graph, LoadedModel, prompt_batch, upscale_logits
from sam_batch.engines.onnx_export import (
    DEFAULT_OPSET,
    HQ_FEATURES,
    OnnxFiles,
    cached_onnx,
    crop_inputs,
    decoder_output_shapes,
    encoder_output_shapes,
    predictor_masks,
    predictor_output_shapes,
    sam2_encoder_output_shapes,
)
from sam_batch.engines.registry import precision_refusal
from sam_batch.engines.sam2_engine import GraphSam2Networks
from sam_batch.engines.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    image_to_input,
    labelled_points,
    resize_longest_side,
    scale_coords,
)

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as error:
        raise EngineError(f"engine.backend onnx needs onnxruntime: pip install 'sam-batch[onnx]' ({error})") from None
    return onnxruntime


def onnx_device(device: str) -> torch.device:
    """`auto` → the first CUDA GPU when torch sees one and onnxruntime has its CUDA provider, else the CPU."""
    providers = _onnxruntime().get_available_providers()
    gpu = torch.cuda.is_available() and CUDA in providers
    if device == "auto":
        return torch.device("cuda" if gpu else "cpu")
    if device.startswith("cuda") and not gpu:
        raise EngineError(
            f"engine.device {device!r} with engine.backend onnx needs a CUDA GPU and onnxruntime's "
            f"CUDAExecutionProvider (pip install onnxruntime-gpu); found: GPU visible to torch: "
            f"{torch.cuda.is_available()}, onnxruntime providers: {', '.join(providers)}"
        )
    return torch.device(device)


class OnnxSession:
    """One graph on onnxruntime, run on torch tensors of one device (float32 in and out)."""

    def __init__(self, path: str, device: torch.device, threads: int) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Between runs the pipeline's torch code needs the same cores: do not spin-wait on them.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if device.type == "cuda":
            providers: list = [(CUDA, {"device_id": device.index or 0}), CPU]
        else:
            providers = [CPU]
        self.session = ort.InferenceSession(path, options, providers=providers)
        self.output_names = tuple(output.name for output in self.session.get_outputs())
        self.device = device

    def __call__(self, outputs: dict[str, tuple[int, ...]], **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on `inputs` (made float32 on the device) into new tensors of the given `outputs` shapes."""
        binding = self.session.io_binding()
        index = self.device.index or 0
        inputs = {name: tensor.to(self.device, torch.float32).contiguous() for name, tensor in inputs.items()}
        for name, tensor in inputs.items():
            binding.bind_input(name, self.device.type, index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        results = {}
        for name, shape in outputs.items():
            out = torch.empty(shape, dtype=torch.float32, device=self.device)
            binding.bind_output(name, self.device.type, index, np.float32, shape, out.data_ptr())
            results[name] = out
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        self.session.run_with_iobinding(binding)  # returns once the outputs are written
        return results


def sam2_onnx_networks(
    loaded: LoadedModel, device: str = "auto", precision: str = "fp32", opset: int = DEFAULT_OPSET
) -> GraphSam2Networks:
    """SAM 2.1's graphs of a loaded model on onnxruntime, exported on first use (`cached_onnx`)."""
    _check_precision(precision)
    target = onnx_device(device)
    files = cached_onnx(loaded, opset)
    threads = torch.get_num_threads()
    encoder, decoder = (OnnxSession(str(path), target, threads) for path in (files.encoder, files.decoder))

    def make_predictor() -> Graph:
        return _graph(OnnxSession(str(files.predictor), target, threads))

    return GraphSam2Networks(
        lambda **inputs: encoder(sam2_encoder_output_shapes(), **inputs), _graph(decoder), make_predictor, target
    )


def _graph(session: OnnxSession) -> Graph:
    """A SAM 2.1 decoding session as a `Graph`: its outputs shaped for the prompts given."""

    def run(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return session(predictor_output_shapes(len(inputs["point_coords"])), **inputs)

    return run


def _check_precision(precision: str) -> None:
    refusal = precision_refusal("onnx", precision)
    if refusal is not None:
        raise EngineError(f"engine.precision: {refusal}")


class OnnxEngine:
    """SAM on onnxruntime: the encoder and decoder graphs, fp32, CPU or CUDA. `hq`: the graphs
    are HQ-SAM's (read from the encoder graph's outputs)."""

    def __init__(self, files: OnnxFiles, device: torch.device, threads: int | None = None) -> None:
        """`threads`: intra-op threads per graph; default torch's (see `backend.set_cpu_threads`)."""
        threads = threads or torch.get_num_threads()
        self.device = device
        self.files = files
        self.encoder = OnnxSession(str(files.encoder), device, threads)
        self.decoder = OnnxSession(str(files.decoder), device, threads)
        self.predictor = OnnxSession(str(files.predictor), device, threads)
        self.hq = HQ_FEATURES in self.encoder.output_names
        self.pixel_mean = torch.tensor(PIXEL_MEAN).reshape(3, 1, 1)
        self.pixel_std = torch.tensor(PIXEL_STD).reshape(3, 1, 1)
        self.mask_threshold = 0.0
        self.min_prompt_batch = prompt_batch(device)
        self.concurrent_batches = 1  # onnxruntime spreads one call over its own threads
        self.windowed_upscale = device.type == "cpu"  # its outputs are written on its device

    @classmethod
    def from_model(
        cls, loaded: LoadedModel, device: str = "auto", precision: str = "fp32", opset: int = DEFAULT_OPSET
    ) -> OnnxEngine:
        """The engine of a loaded model, its graphs exported on first use (see `cached_onnx`)."""
        _check_precision(precision)
        target = onnx_device(device)
        return cls(cached_onnx(loaded, opset), target)

    def encode(self, crop: np.ndarray) -> CropEmbedding:
        """Encode one uint8 crop (h, w, 3) into its image embedding (1, 256, 64, 64), and for
        HQ-SAM its HQ features (1, 32, 256, 256)."""
        crop_hw = (crop.shape[0], crop.shape[1])
        resized = resize_longest_side(crop)
        batch = image_to_input(resized, self.pixel_mean, self.pixel_std)
        out = self.encoder(encoder_output_shapes(self.hq), images=batch)
        hq_features = out[HQ_FEATURES] if self.hq else None
        input_hw = (resized.shape[0], resized.shape[1])
        return CropEmbedding(out["image_embeddings"], input_hw, crop_hw, hq_features=hq_features)

    def decode(
        self, crop: CropEmbedding, points: np.ndarray, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode single-point prompts (B, 2) xy in crop pixels.

        Returns low-resolution logits (B, M, 256, 256) and predicted IoUs (B, M), fp32, on the
        device: M = 3, or 1 for HQ-SAM (`SamModel.decode`).
        `min_iou` is accepted for the engine interface; the graph computes every mask anyway.
        Coordinates are scaled to the input frame in float64, then handed to the graph as float32.
        """
        coords = torch.from_numpy(scale_coords(points.astype(np.float64), crop.crop_hw))[:, None, :]
        labels = torch.ones((len(points), 1))
        out = self.decoder(
            decoder_output_shapes(len(points), self.hq),
            **crop_inputs(crop, self.hq),
            point_coords=coords,
            point_labels=labels,
        )
        return out["low_res_logits"], out["iou_predictions"]

    def predict(
        self,
        crop: CropEmbedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`TorchEngine.predict` through the predictor graph: prompts as labelled points in the
        input frame; of its outputs a prompt keeps what `onnx_export.predictor_masks` picks (SAM:
        token 0, or tokens 1-3 with `multimask`; HQ-SAM: one mask)."""
        coords, tags = labelled_points(points, labels, boxes)
        out = self.predictor(
            predictor_output_shapes(len(coords), self.hq),
            **crop_inputs(crop, self.hq),
            point_coords=torch.from_numpy(scale_coords(coords, crop.crop_hw)),
            point_labels=torch.from_numpy(tags),
        )
        return predictor_masks(out["low_res_logits"], out["iou_predictions"], multimask, self.hq)

    def upscale(self, crop: CropEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Logits (K, 256, 256) → logits (K, h, w) at the crop's original size."""
        return upscale_logits(crop, low_res)
