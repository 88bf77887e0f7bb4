"""`engine.backend: tensorrt` — TensorRT engines built from the exported ONNX graphs.

The encoder graph is static ((1, 3, 1024, 1024) -> (1, 256, 64, 64)); the decoder's prompt
batch and point count get one optimisation profile (`DecoderProfile`), and so does the
predictor graph's (`PREDICTOR_PROFILE`), which prompt jobs use and which is built on their
first prompt, never for an automatic job. fp16/bf16 use
TensorRT 10's weakly typed builder flags with precision constraints: normalisation, softmax
and reduction layers, and the prompt encoder's Fourier positional encoding of the point
coordinates, stay fp32 (`pinned_to_fp32`). fp32 engines are built without TF32.

HQ-SAM's graphs (see `onnx_export`) build the same way: the encoder's second output and the
decoder's and predictor's `hq_features` input (1, 32, 256, 256) are fixed-shape, as the image
embedding is, so the profiles cover the prompts alone; the decoder gives one mask a prompt and
`onnx_export.predictor_masks` combines the predictor's outputs. SAM 2.1's graphs run behind
`Sam2Engine` (`sam2_tensorrt_networks`): the encoder's finer levels are fixed-shape too, and the
predictor's `mask_input` (B, 1, 256, 256) follows the prompt batch (`SAM2_PREDICTOR_PROFILE`).

Built plans are cached under the weights cache, keyed by the ONNX folder (model type,
checkpoint sha256, opset, exporter versions), the graph, precision, GPU name and compute
capability, TensorRT version and the profile (`plan_name`). Inputs and outputs are torch
CUDA tensors, run on torch's current stream, so the pipeline's filtering stays on the GPU.

Where TensorRT or a CUDA GPU is missing, `require_tensorrt` raises one `EngineError` that
names what is missing, before any weights are loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sam_batch.engines.backend import (
    GPU_PROMPT_BATCH,
    CropEmbedding,
    EngineError,
    Graph,
    LoadedModel,
    pick_device,
    upscale_logits,
)
from sam_batch.engines.checkpoints import cache_dir
from sam_batch.engines.common import LOW_RES_SIZE
from sam_batch.engines.onnx_export import DEFAULT_OPSET, HQ_FEATURES, cached_onnx, crop_inputs, predictor_masks
from sam_batch.engines.sam2_engine import GraphSam2Networks
from sam_batch.engines.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    image_to_input,
    labelled_points,
    resize_longest_side,
    scale_coords,
)

log = logging.getLogger("sam_batch")

INSTALL_HINT = "pip install tensorrt-cu12"
# Layer types (trt.LayerType names) whose arithmetic must not drop to fp16: LayerNorm
# (NORMALIZATION from opset 17's LayerNormalization), SOFTMAX, and REDUCE (means, sums).
FP32_LAYER_TYPES = frozenset({"NORMALIZATION", "SOFTMAX", "REDUCE"})
# Layer names (from the ONNX node names) kept fp32: the points' positional encoding, whose
# sin/cos arguments reach ~±20 rad, where fp16 would move a prompt by pixels.
FP32_NAME_PARTS = ("prompt_encoder/",)
LOW_PRECISION_FLAGS = {"fp16": "FP16", "bf16": "BF16"}
WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class DecoderProfile:
    """The decoder's optimisation profile: prompt batch B and points per prompt N, (min, opt, max)."""

    min_prompts: int = 1
    opt_prompts: int = 256
    max_prompts: int = 1024
    opt_points: int = 1
    max_points: int = 16
    mask_input: bool = False  # the graph takes a mask prompt a prompt (SAM 2.1's predictor)

    def __post_init__(self) -> None:
        if not 1 <= self.min_prompts <= self.opt_prompts <= self.max_prompts:
            raise ValueError(f"need 1 <= min_prompts <= opt_prompts <= max_prompts: {self}")
        if not 1 <= self.opt_points <= self.max_points:
            raise ValueError(f"need 1 <= opt_points <= max_points: {self}")

    def shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shapes of each dynamic decoder input, as `IOptimizationProfile.set_shape` takes them
        (the fixed-shape image inputs need none)."""
        low, opt, high = (self.min_prompts, 1), (self.opt_prompts, self.opt_points), (self.max_prompts, self.max_points)
        shapes = {
            "point_coords": ((*low, 2), (*opt, 2), (*high, 2)),
            "point_labels": (low, opt, high),
        }
        if self.mask_input:
            mask = (1, LOW_RES_SIZE, LOW_RES_SIZE)
            shapes["mask_input"] = ((low[0], *mask), (opt[0], *mask), (high[0], *mask))
        return shapes


# The predictor graph's profile: a prompt job's decoder calls (64 prompts, `pipeline.prompts`),
# each prompt as labelled points: its points, then a box's two corners or one pad point.
PREDICTOR_PROFILE = DecoderProfile(opt_prompts=64, opt_points=2, max_points=64)
# SAM 2.1's predictor graph: the same prompts with a mask prompt each (zeros for prompt jobs)
SAM2_PREDICTOR_PROFILE = replace(PREDICTOR_PROFILE, mask_input=True)


def pinned_to_fp32(layer_type: str, layer_name: str) -> bool:
    """Whether a layer (its `trt.LayerType` name and its name) keeps fp32 in a low-precision engine."""
    return layer_type in FP32_LAYER_TYPES or any(part in layer_name for part in FP32_NAME_PARTS)


def check_precision(precision: str, trt_version: str) -> None:
    """fp32 builds everywhere; fp16/bf16 need TensorRT 10's weakly typed flags (dropped in 11)."""
    if precision == "fp32":
        return
    if precision not in LOW_PRECISION_FLAGS:
        raise EngineError(f"engine.precision: {precision!r} is not one of fp32, {', '.join(LOW_PRECISION_FLAGS)}")
    if int(trt_version.split(".")[0]) >= 11:
        raise EngineError(
            f"engine.precision {precision} with engine.backend tensorrt needs TensorRT 10 (found {trt_version}, "
            f"which has no weakly typed fp16/bf16 builds): pip install 'tensorrt-cu12<11', or use fp32"
        )


def plan_name(
    graph: str,
    precision: str,
    gpu_name: str,
    capability: tuple[int, int],
    trt_version: str,
    profile: DecoderProfile | None,
) -> str:
    """File name of a cached plan inside its ONNX folder's plan directory (see `cached_plan`)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    shapes = hashlib.sha256(repr(profile).encode()).hexdigest()[:10] if profile else "static"
    return f"{graph}-{precision}-{gpu}-sm{capability[0]}{capability[1]}-trt{trt_version}-{shapes}.plan"


def require_tensorrt(device: str):
    """The `tensorrt` module, or one `EngineError` naming what is missing (package, GPU)."""
    found = []
    try:
        import tensorrt as trt
    except ImportError as error:
        trt = None
        found.append(f"no `tensorrt` package ({error})")
    if device == "cpu":
        found.append("engine.device is cpu")
    elif not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        found.append(f"no CUDA GPU visible to torch {torch.__version__} ({build})")
    if found:
        raise EngineError(
            f"engine.backend tensorrt needs the `tensorrt` package ({INSTALL_HINT}) and a CUDA GPU; "
            f"found: {'; '.join(found)}"
        )
    return trt


def build_plan(trt, onnx_path: Path, precision: str, profile: DecoderProfile | None) -> bytes:
    """Parse one ONNX graph and build a serialised TensorRT engine for the current GPU."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if profile is not None:
        shapes = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes().items():
            shapes.set_shape(name, low, opt, high)
        config.add_optimization_profile(shapes)
    if precision == "fp32":
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(getattr(trt.BuilderFlag, LOW_PRECISION_FLAGS[precision]))
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_layers(trt, network)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build an engine from {onnx_path} ({precision}); see its log above")
    return bytes(plan)


def _pin_layers(trt, network) -> int:
    """Set fp32 precision and output types on the float layers `pinned_to_fp32` selects; returns how many."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not pinned_to_fp32(layer.type.name, layer.name) or any(t.dtype != trt.float32 for t in outputs):
            continue  # shape, index and boolean layers keep their types
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    log.info("TensorRT: %d of %d layers pinned to fp32", pinned, network.num_layers)
    return pinned


def cached_plan(trt, onnx_path: Path, precision: str, device: torch.device, profile: DecoderProfile | None) -> bytes:
    """The plan for `onnx_path` on `device`'s GPU, built on first use and cached (atomic rename)."""
    name = plan_name(
        onnx_path.stem,
        precision,
        torch.cuda.get_device_name(device),
        torch.cuda.get_device_capability(device),
        trt.__version__,
        profile,
    )
    path = cache_dir() / "tensorrt" / onnx_path.parent.name / name
    if path.is_file():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("TensorRT: building %s (minutes, once per GPU model and version)", path)
    plan = build_plan(trt, onnx_path, precision, profile)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(plan)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return plan


class TrtGraph:
    """One deserialised engine and its execution context, run on torch CUDA tensors."""

    def __init__(self, trt, plan: bytes, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run on float32 `inputs`; returns the outputs by name, float32, on the device."""
        inputs = {name: t.to(self.device, torch.float32).contiguous() for name, t in inputs.items()}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            results[name] = out
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise EngineError("TensorRT: execute_async_v3 failed")
        return {name: out.float() for name, out in results.items()}


def sam2_tensorrt_networks(
    loaded: LoadedModel,
    device: str = "auto",
    precision: str = "fp32",
    profile: DecoderProfile = DecoderProfile(),
    opset: int = DEFAULT_OPSET,
) -> GraphSam2Networks:
    """SAM 2.1's graphs of a loaded model as TensorRT engines on `device`, built on first use
    (the predictor's on the first prompt job or m2m refinement)."""
    encoder, decoder, make_predictor, target = trt_graphs(
        loaded, device, precision, profile, SAM2_PREDICTOR_PROFILE, opset
    )
    return GraphSam2Networks(
        encoder, decoder, make_predictor, target, profile.max_prompts, SAM2_PREDICTOR_PROFILE.max_points
    )


def trt_graphs(
    loaded: LoadedModel,
    device: str,
    precision: str,
    profile: DecoderProfile,
    predictor_profile: DecoderProfile,
    opset: int,
) -> tuple[TrtGraph, TrtGraph, Callable[[], TrtGraph], torch.device]:
    """A loaded model's encoder and decoder engines on `device` (built on first use, cached),
    the function that makes its predictor engine, and the device."""
    trt = require_tensorrt(device)
    check_precision(precision, trt.__version__)
    target = pick_device(device)
    files = cached_onnx(loaded, opset)
    encoder = TrtGraph(trt, cached_plan(trt, files.encoder, precision, target, None), target)
    decoder = TrtGraph(trt, cached_plan(trt, files.decoder, precision, target, profile), target)

    def make_predictor() -> TrtGraph:
        return TrtGraph(trt, cached_plan(trt, files.predictor, precision, target, predictor_profile), target)

    return encoder, decoder, make_predictor, target


class TensorRTEngine:
    """SAM as TensorRT engines on one CUDA GPU: the encoder, the decoder, and for prompt jobs
    the predictor, made by `make_predictor` on first use.

    The graphs are any callables that take float tensors by input name and return float32
    tensors by output name on `device` (`TrtGraph`). `hq`: they are HQ-SAM's graphs."""

    def __init__(
        self,
        encoder: Graph,
        decoder: Graph,
        device: torch.device,
        max_prompts: int,
        make_predictor: Callable[[], Graph],
        max_predictor_points: int = PREDICTOR_PROFILE.max_points,
        hq: bool = False,
    ) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.hq = hq
        self.device = device
        self.max_prompts = max_prompts
        self.make_predictor = make_predictor
        self.max_predictor_points = max_predictor_points
        self.predictor: Graph | None = None
        self.pixel_mean = torch.tensor(PIXEL_MEAN).reshape(3, 1, 1)
        self.pixel_std = torch.tensor(PIXEL_STD).reshape(3, 1, 1)
        self.mask_threshold = 0.0
        self.min_prompt_batch = min(max_prompts, GPU_PROMPT_BATCH)
        self.concurrent_batches = 1
        self.windowed_upscale = False  # its logits stay on the GPU

    @classmethod
    def from_model(
        cls,
        loaded: LoadedModel,
        device: str = "auto",
        precision: str = "fp32",
        profile: DecoderProfile = DecoderProfile(),
        opset: int = DEFAULT_OPSET,
    ) -> TensorRTEngine:
        """Engines for a loaded model on `device`, from its cached ONNX graphs; built on first use."""
        graphs = trt_graphs(loaded, device, precision, profile, PREDICTOR_PROFILE, opset)
        encoder, decoder, make_predictor, target = graphs
        return cls(encoder, decoder, target, profile.max_prompts, make_predictor, hq=loaded.model.hq)

    def encode(self, crop: np.ndarray) -> CropEmbedding:
        """Encode one uint8 crop (h, w, 3) into its image embedding (1, 256, 64, 64) on the GPU,
        and for HQ-SAM its HQ features (1, 32, 256, 256)."""
        crop_hw = (crop.shape[0], crop.shape[1])
        resized = resize_longest_side(crop)
        out = self.encoder(images=image_to_input(resized, self.pixel_mean, self.pixel_std))
        hq_features = out[HQ_FEATURES] if self.hq else None
        input_hw = (resized.shape[0], resized.shape[1])
        return CropEmbedding(out["image_embeddings"], input_hw, crop_hw, hq_features=hq_features)

    def decode(
        self, crop: CropEmbedding, points: np.ndarray, min_iou: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode single-point prompts (B, 2) xy in crop pixels, in chunks of the profile's max batch.

        Returns low-resolution logits (B, M, 256, 256) and predicted IoUs (B, M), fp32, on the GPU:
        M = 3, or 1 for HQ-SAM. `min_iou` is accepted for the engine interface; the engine
        computes every mask anyway.
        """
        coords = torch.from_numpy(scale_coords(points.astype(np.float64), crop.crop_hw))[:, None, :]
        return self._in_chunks(self.decoder, crop, coords, torch.ones(coords.shape[:2]))

    def predict(
        self,
        crop: CropEmbedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`TorchEngine.predict` through the predictor engine, in chunks of the profile's max
        batch: prompts as labelled points in the input frame; of its outputs a prompt keeps what
        `onnx_export.predictor_masks` picks (SAM: token 0, or tokens 1-3 with `multimask`;
        HQ-SAM: one mask). Returns logits (B, 1 or 3, 256, 256) and IoUs (B, 1 or 3), fp32, on
        the GPU. A prompt of more labelled points (its points, plus 2 for a box or 1 without)
        than the profile's maximum is an `EngineError`."""
        coords, tags = labelled_points(points, labels, boxes)
        if coords.shape[1] > self.max_predictor_points:
            raise EngineError(
                f"engine.backend tensorrt takes prompts of at most {self.max_predictor_points} labelled points "
                f"(the points, plus 2 for a box or 1 without); this one has {coords.shape[1]}: use torch or onnx"
            )
        if self.predictor is None:
            self.predictor = self.make_predictor()
        scaled = torch.from_numpy(scale_coords(coords, crop.crop_hw))
        logits, iou = self._in_chunks(self.predictor, crop, scaled, torch.from_numpy(tags))
        return predictor_masks(logits, iou, multimask, self.hq)

    def _in_chunks(
        self,
        graph: Graph,
        crop: CropEmbedding,
        coords: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`graph` (the decoder or the predictor) on prompts coords (B, N, 2) in the input frame
        and labels (B, N), `max_prompts` at a time: its logits and IoUs, concatenated."""
        logits, iou = [], []
        image = crop_inputs(crop, self.hq)
        for start in range(0, len(coords), self.max_prompts):
            out = graph(
                **image,
                point_coords=coords[start : start + self.max_prompts],
                point_labels=labels[start : start + self.max_prompts],
            )
            logits.append(out["low_res_logits"])
            iou.append(out["iou_predictions"])
        return torch.cat(logits), torch.cat(iou)

    def upscale(self, crop: CropEmbedding, low_res: torch.Tensor) -> torch.Tensor:
        """Logits (K, 256, 256) → logits (K, h, w) at the crop's original size."""
        return upscale_logits(crop, low_res)
