"""Export SAM's image encoder and prompt decoders to ONNX (`encoder.onnx`, `decoder.onnx`,
`predictor.onnx`).

The graphs, float32 in and out:

- encoder: `images` (1, 3, 1024, 1024), normalised and padded as `transforms.image_to_input` makes
  it -> `image_embeddings` (1, 256, 64, 64).
- decoder: `image_embeddings` (1, 256, 64, 64), `point_coords` (B, N, 2) xy in input-frame
  pixels, `point_labels` (B, N) (1 foreground, 0 background, -1 ignore) ->
  `low_res_logits` (B, 3, 256, 256), `iou_predictions` (B, 3). B (`prompts`) and N
  (`points`) are dynamic; the image embedding stays batch-1 and is shared by every prompt,
  as in `SamModel.decode`.
- predictor: the decoder's inputs with prompts as labelled points (1/0 points, 2/3 a box's
  corners, -1 a closing "not a point", nothing added) -> `low_res_logits` (B, 4, 256, 256),
  `iou_predictions` (B, 4): every mask token, for prompt jobs (`OnnxEngine.predict`).

The TorchScript exporter (`dynamo=False`) is used: it needs no `onnxscript`, and tracing keeps
the decoder's shared-embedding path with the prompt batch read from the inputs' shapes.
Opset 17 is the default: its `LayerNormalization` op reaches TensorRT as one normalisation
layer, which the TensorRT back-end can pin to fp32.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sam_batch.engines.backend import EngineError, LoadedModel, load_model
from sam_batch.engines.checkpoints import cache_dir
from sam_batch.engines.common import IMAGE_SIZE
from sam_batch.engines.registry import is_hq
from sam_batch.engines.sam import SamModel

DEFAULT_OPSET = 17
# the modules the graphs are traced from (beside this one): their source is part of the cache key
GRAPH_MODULES = (
    "sam",
    "tiny_vit",
    "image_encoder",
    "common",
    "prompt_encoder",
    "transformer",
    "mask_decoder",
    "onnx_export",
)
ENCODER_FILE, DECODER_FILE, PREDICTOR_FILE = "encoder.onnx", "decoder.onnx", "predictor.onnx"
EMBEDDING_SHAPE = (1, 256, 64, 64)
ENCODER_INPUTS, ENCODER_OUTPUTS = ("images",), ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels")
DECODER_OUTPUTS = ("low_res_logits", "iou_predictions")
MASKS_PER_PROMPT, LOW_RES_SIZE = 3, 256
PREDICTOR_OUTPUTS = ("low_res_logits", "iou_predictions")
ALL_MASKS = 4  # the predictor graph's masks per prompt: token 0 (single), then tokens 1-3 (multimask)
DECODER_DYNAMIC_AXES = {
    "point_coords": {0: "prompts", 1: "points"},
    "point_labels": {0: "prompts", 1: "points"},
    "low_res_logits": {0: "prompts"},
    "iou_predictions": {0: "prompts"},
}
# Traced with more than one prompt and point, so no dimension of 1 is folded into the graph.
TRACE_PROMPTS, TRACE_POINTS = 3, 2


def decoder_output_shapes(prompts: int) -> dict[str, tuple[int, ...]]:
    """The decoder graph's output shapes for a batch of `prompts`."""
    return {
        "low_res_logits": (prompts, MASKS_PER_PROMPT, LOW_RES_SIZE, LOW_RES_SIZE),
        "iou_predictions": (prompts, MASKS_PER_PROMPT),
    }


def predictor_output_shapes(prompts: int) -> dict[str, tuple[int, ...]]:
    """The predictor graph's output shapes for a batch of `prompts`."""
    return {"low_res_logits": (prompts, ALL_MASKS, LOW_RES_SIZE, LOW_RES_SIZE), "iou_predictions": (prompts, ALL_MASKS)}


@dataclass(frozen=True)
class OnnxFiles:
    """The exported graphs, in one folder."""

    encoder: Path
    decoder: Path
    predictor: Path

    @classmethod
    def in_folder(cls, folder: Path) -> OnnxFiles:
        return cls(folder / ENCODER_FILE, folder / DECODER_FILE, folder / PREDICTOR_FILE)

    def exist(self) -> bool:
        return self.encoder.is_file() and self.decoder.is_file() and self.predictor.is_file()


class EncoderGraph(nn.Module):
    """(1, 3, 1024, 1024) model input -> (1, 256, 64, 64) image embedding."""

    def __init__(self, model: SamModel) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)


class DecoderGraph(nn.Module):
    """Image embedding (1, 256, 64, 64), points (B, N, 2), labels (B, N) -> logits (B, 3, 256, 256), IoU (B, 3).

    `SamModel.decode`, with the image grid's positional encoding (1, 256, 64, 64) computed once
    here, in fp32, and stored in the graph as a constant instead of a sin/cos subgraph.
    """

    def __init__(self, model: SamModel) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.register_buffer("dense_pe", model.prompt_encoder.dense_pe().detach().clone())

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(point_coords, point_labels)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, multimask_output=True)


class PredictorGraph(DecoderGraph):
    """Image embedding (1, 256, 64, 64), labelled points (B, N, 2) and labels (B, N) -> logits
    (B, 4, 256, 256), IoU (B, 4): SAM's predictor for prompts written as labelled points
    (`transforms.labelled_points`: 1/0 points, 2/3 a box's corners, -1 the closing "not a
    point"), every mask token's output, the caller keeping token 0 or tokens 1-3. The
    decoder graph's modules and constant positional encoding, another forward."""

    def forward(
        self, image_embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse = self.prompt_encoder.embed_labelled_points(point_coords, point_labels)
        dense = self.prompt_encoder.embed_mask(None)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, multimask_output=None)


def export_onnx(
    model_type: str,
    checkpoint: str | None,
    out_dir: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxFiles:
    """Load `checkpoint` (None: the cached default of `model_type`) and export it into `out_dir`."""
    if is_hq(model_type):
        raise EngineError(f"ONNX export does not cover HQ-SAM ({model_type}) yet; it runs on engine.backend torch")
    return export_model(load_model(model_type, checkpoint, sha256).model, out_dir, opset)


def graph_source_digest() -> str:
    """16 hex digits of the sha256 of the `GRAPH_MODULES` source files, in that order."""
    digest = hashlib.sha256()
    for name in GRAPH_MODULES:
        digest.update(Path(__file__).with_name(f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def cached_onnx(loaded: LoadedModel, opset: int = DEFAULT_OPSET) -> OnnxFiles:
    """The ONNX pair of `loaded`, exported on first use into the weights cache.

    The folder is keyed by everything that changes the graphs: model type, checkpoint sha256,
    opset, the onnx and torch versions that wrote them, and the source of `GRAPH_MODULES` (so
    changed model code never reuses an old export). Concurrent first
    users (e.g. Ray actors) each export into a private folder and rename it into place; the
    first rename wins.
    """
    import onnx

    key = (
        f"{loaded.model_type}-{loaded.checkpoint_sha256[:16]}-opset{opset}-onnx{onnx.__version__}"
        f"-torch{torch.__version__}-code{graph_source_digest()}"
    )
    folder = cache_dir() / "onnx" / key
    files = OnnxFiles.in_folder(folder)
    if files.exist():
        return files
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}."))
    try:
        export_model(loaded.model, scratch, opset)
        scratch.chmod(0o755)
        try:
            os.rename(scratch, folder)
        except OSError:
            if not files.exist():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files


def export_model(model: SamModel, out_dir: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> OnnxFiles:
    """Write `encoder.onnx`, `decoder.onnx` and `predictor.onnx` for a loaded fp32 CPU `model`
    into `out_dir`; check each.

    Each file is written beside its final name and renamed into place once `onnx.checker`
    accepts it, so a reader never sees a half-written graph. Graphs over protobuf's 2 GB
    (`vit_h`'s encoder) get their weights in external data files beside them.
    """
    import onnx

    model = model.eval()
    files = OnnxFiles.in_folder(Path(out_dir))
    files.encoder.parent.mkdir(parents=True, exist_ok=True)
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    embedding = torch.zeros(EMBEDDING_SHAPE)
    coords = torch.linspace(0, IMAGE_SIZE - 1, TRACE_PROMPTS * TRACE_POINTS * 2).reshape(TRACE_PROMPTS, TRACE_POINTS, 2)
    labels = torch.ones(TRACE_PROMPTS, TRACE_POINTS)
    graphs = [
        (files.encoder, EncoderGraph(model), (image,), ENCODER_INPUTS, ENCODER_OUTPUTS, {}),
        (
            files.decoder,
            DecoderGraph(model),
            (embedding, coords, labels),
            DECODER_INPUTS,
            DECODER_OUTPUTS,
            DECODER_DYNAMIC_AXES,
        ),
        (
            files.predictor,
            PredictorGraph(model),
            (embedding, coords, labels),
            DECODER_INPUTS,
            PREDICTOR_OUTPUTS,
            DECODER_DYNAMIC_AXES,
        ),
    ]
    for path, module, args, inputs, outputs, dynamic_axes in graphs:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                # The tracer warns about shape-dependent Python branches; the decoder's are taken
                # the same way for every prompt batch (batch-1 image side, B prompts).
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(inputs),
                    output_names=list(outputs),
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
            onnx.checker.check_model(str(tmp), full_check=True)
            tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return files
