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

HQ-SAM types (`*_hq`) add the crop's HQ features, fixed-shape (1, 32, 256, 256):

- encoder: `images` -> `image_embeddings` and `hq_features` (`SamModel.embed_hq`).
- decoder: the decoder's inputs and `hq_features` -> `low_res_logits` (B, 1, 256, 256),
  `iou_predictions` (B, 1): one mask a prompt, as `SamModel.decode` makes it.
- predictor: the predictor's inputs and `hq_features` -> `low_res_logits` (B, 5, 256, 256) of
  mask tokens 0-3 and the HQ token, `iou_predictions` (B, 4) of tokens 0-3; `predictor_masks`
  combines them as `HqMaskDecoder` does, with or without multimask.

SAM 2.1 types (`sam2.1_hiera_*`) work in their 1024 x 1024 frame (`sam2_engine`), and every
decoding graph gives every mask token's output, `sam2_decoder.select_masks` keeping a prompt's:

- encoder: `images` (1, 3, 1024, 1024) as `sam2.sam2_input` makes it -> `image_embeddings` (1,
  256, 64, 64) (with ``no_mem_embed``), `high_res_feats_0` (1, 32, 256, 256), `high_res_feats_1`
  (1, 64, 128, 128) (`Sam2Model.embed`).
- decoder: those three, `point_coords` (B, N, 2), `point_labels` (B, N) (1/0 points, 2/3 a box's
  corners; the padding point is added in the graph) -> `low_res_logits` (B, 4, 256, 256),
  `iou_predictions` (B, 4).
- predictor: the decoder's inputs and a mask prompt, `mask_input` (B, 1, 256, 256) logits with
  `has_mask_input` (1,) (1: use it, 0: SAM's "no mask" embedding instead) -> the same outputs:
  prompt jobs (0) and SAM 2's mask-to-mask refinement (1).

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

from sam_batch.engines.backend import CropEmbedding, EngineError, LoadedModel, load_model
from sam_batch.engines.checkpoints import cache_dir
from sam_batch.engines.common import IMAGE_SIZE, LOW_RES_SIZE
from sam_batch.engines.hq_decoder import HQ_CHANNELS, select_sam_output
from sam_batch.engines.prompt_encoder import PromptEncoder
from sam_batch.engines.sam import SamModel
from sam_batch.engines.sam2 import Sam2Model

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
    "hq_decoder",
    "hiera",
    "sam2",
    "sam2_decoder",
    "onnx_export",
)
ENCODER_FILE, DECODER_FILE, PREDICTOR_FILE = "encoder.onnx", "decoder.onnx", "predictor.onnx"
EMBEDDING_SHAPE = (1, 256, 64, 64)
ENCODER_INPUTS, ENCODER_OUTPUTS = ("images",), ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels")
DECODER_OUTPUTS = ("low_res_logits", "iou_predictions")
MASKS_PER_PROMPT = 3
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
# HQ-SAM's graphs: the HQ features, an encoder output and a fixed-shape decoder and predictor input
HQ_FEATURES = "hq_features"
HQ_FEATURES_SHAPE = (1, HQ_CHANNELS, LOW_RES_SIZE, LOW_RES_SIZE)
HQ_ENCODER_OUTPUTS = (*ENCODER_OUTPUTS, HQ_FEATURES)
HQ_DECODER_INPUTS = (*DECODER_INPUTS, HQ_FEATURES)
HQ_MASKS_PER_PROMPT = 1  # the HQ decoder graph's one mask a prompt
HQ_TOKEN = ALL_MASKS  # the HQ predictor graph's logits: mask tokens 0-3, then the HQ token's (its IoUs: tokens 0-3)
# SAM 2.1's graphs: the encoder's finer levels, decoder and predictor inputs; outputs as SAM's predictor graph's
HIGH_RES_FEATURES = ("high_res_feats_0", "high_res_feats_1")
SAM2_HIGH_RES_SHAPES = {HIGH_RES_FEATURES[0]: (1, 32, 256, 256), HIGH_RES_FEATURES[1]: (1, 64, 128, 128)}
SAM2_ENCODER_OUTPUTS = (*ENCODER_OUTPUTS, *HIGH_RES_FEATURES)
SAM2_DECODER_INPUTS = ("image_embeddings", *HIGH_RES_FEATURES, "point_coords", "point_labels")
SAM2_PREDICTOR_INPUTS = (*SAM2_DECODER_INPUTS, "mask_input", "has_mask_input")
SAM2_PREDICTOR_DYNAMIC_AXES = {**DECODER_DYNAMIC_AXES, "mask_input": {0: "prompts"}}


def sam2_encoder_output_shapes() -> dict[str, tuple[int, ...]]:
    """SAM 2.1's encoder graph's output shapes: the embedding and the two finer levels."""
    return {"image_embeddings": EMBEDDING_SHAPE, **SAM2_HIGH_RES_SHAPES}


def encoder_output_shapes(hq: bool = False) -> dict[str, tuple[int, ...]]:
    """The encoder graph's output shapes: the embedding, and for HQ-SAM the HQ features."""
    shapes = {"image_embeddings": EMBEDDING_SHAPE}
    return {**shapes, HQ_FEATURES: HQ_FEATURES_SHAPE} if hq else shapes


def decoder_output_shapes(prompts: int, hq: bool = False) -> dict[str, tuple[int, ...]]:
    """The decoder graph's output shapes for a batch of `prompts`: 3 masks a prompt, HQ-SAM's 1."""
    masks = HQ_MASKS_PER_PROMPT if hq else MASKS_PER_PROMPT
    return {"low_res_logits": (prompts, masks, LOW_RES_SIZE, LOW_RES_SIZE), "iou_predictions": (prompts, masks)}


def predictor_output_shapes(prompts: int, hq: bool = False) -> dict[str, tuple[int, ...]]:
    """The predictor graph's output shapes for a batch of `prompts`: logits of the 4 mask tokens
    (HQ-SAM: and the HQ token's, 5) and the 4 mask tokens' IoUs."""
    logits = HQ_TOKEN + 1 if hq else ALL_MASKS
    return {"low_res_logits": (prompts, logits, LOW_RES_SIZE, LOW_RES_SIZE), "iou_predictions": (prompts, ALL_MASKS)}


def crop_inputs(crop: CropEmbedding, hq: bool) -> dict[str, torch.Tensor]:
    """The decoder's and predictor's inputs of one encoded crop: `image_embeddings` (1, 256, 64,
    64), and for HQ-SAM's graphs `hq_features` (1, 32, 256, 256)."""
    if not hq:
        return {"image_embeddings": crop.embedding}
    if crop.hq_features is None:
        raise EngineError("HQ-SAM's graphs need the crop's hq_features: encode it with an HQ-SAM engine")
    return {"image_embeddings": crop.embedding, HQ_FEATURES: crop.hq_features}


def predictor_masks(
    logits: torch.Tensor, iou: torch.Tensor, multimask: bool, hq: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a prompt keeps of the predictor graph's outputs, as `TorchEngine.predict` returns it.

    SAM: logits (B, 4, 256, 256), IoU (B, 4) -> token 0's (B, 1, ...), or tokens 1-3's (B, 3,
    ...) with `multimask`. HQ-SAM: logits (B, 5, 256, 256), IoU (B, 4) -> one mask (B, 1, 256,
    256) and its IoU (B, 1): the mask token `select_sam_output` picks plus the HQ token's.
    """
    if not hq:
        kept = slice(1, ALL_MASKS) if multimask else slice(0, 1)
        return logits[:, kept], iou[:, kept]
    sam_iou, token = select_sam_output(iou, multimask)
    sam_logits = logits[torch.arange(logits.shape[0], device=logits.device), token]
    return (sam_logits + logits[:, HQ_TOKEN])[:, None], sam_iou[:, None]


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


class HqEncoderGraph(nn.Module):
    """(1, 3, 1024, 1024) model input -> image embedding (1, 256, 64, 64) and HQ features (1, 32,
    256, 256): `SamModel.embed_hq`."""

    def __init__(self, model: SamModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.embed_hq(images)


class DecoderGraph(nn.Module):
    """Image embedding (1, 256, 64, 64), points (B, N, 2), labels (B, N) -> logits (B, 3, 256, 256), IoU (B, 3).

    `SamModel.decode`, with the image grid's positional encoding (1, 256, 64, 64) computed once
    here, in fp32, and stored in the graph as a constant instead of a sin/cos subgraph.
    """

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("dense_pe", prompt_encoder.dense_pe().detach().clone())

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
        sparse, dense = self.prompt_encoder(point_coords, point_labels, pad=False)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, multimask_output=None)


class HqDecoderGraph(DecoderGraph):
    """HQ-SAM: the decoder graph's inputs and HQ features (1, 32, 256, 256) -> logits (B, 1, 256,
    256), IoU (B, 1): `SamModel.decode`'s one mask a prompt (SAM's best of three plus the HQ
    token's)."""

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(point_coords, point_labels)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, True, hq_features)


class HqPredictorGraph(DecoderGraph):
    """HQ-SAM: the predictor graph's inputs and HQ features (1, 32, 256, 256) -> logits (B, 5,
    256, 256) of mask tokens 0-3 and the HQ token, IoU (B, 4) of tokens 0-3: every output of
    `HqMaskDecoder`, which `predictor_masks` combines."""

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(point_coords, point_labels, pad=False)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, None, hq_features)


class Sam2EncoderGraph(nn.Module):
    """SAM 2.1: (1, 3, 1024, 1024) model input -> image embedding (1, 256, 64, 64) and the
    high-resolution features (1, 32, 256, 256), (1, 64, 128, 128): `Sam2Model.embed`."""

    def __init__(self, model: Sam2Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding, (s0, s1) = self.model.embed(images)
        return embedding, s0, s1


class Sam2DecoderGraph(DecoderGraph):
    """SAM 2.1: image embedding and high-resolution features, points (B, N, 2) and labels (B, N)
    -> every mask token's logits (B, 4, 256, 256) and IoU (B, 4): `Sam2Model.decode` without a
    mask prompt; the decoder graph's constant positional encoding, another forward."""

    def forward(
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.prompt_encoder(point_coords, point_labels)
        high_res = (high_res_feats_0, high_res_feats_1)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, high_res)


class Sam2PredictorGraph(Sam2DecoderGraph):
    """SAM 2.1: the decoder graph's inputs, `mask_input` (B, 1, 256, 256) and `has_mask_input`
    (1,) -> the same outputs, the dense prompt being the mask's embedding where `has_mask_input`
    is 1 and "no mask" where it is 0 (each exact: the other term is multiplied by 0)."""

    def forward(
        self,
        image_embeddings: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, mask_dense = self.prompt_encoder(point_coords, point_labels, mask_input)
        has_mask = has_mask_input.reshape(1, 1, 1, 1)
        dense = has_mask * mask_dense + (1 - has_mask) * self.prompt_encoder.embed_mask(None)
        high_res = (high_res_feats_0, high_res_feats_1)
        return self.mask_decoder(image_embeddings, self.dense_pe, sparse, dense, high_res)


def export_onnx(
    model_type: str,
    checkpoint: str | None,
    out_dir: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    opset: int = DEFAULT_OPSET,
) -> OnnxFiles:
    """Load `checkpoint` (None: the cached default of `model_type`) and export it into `out_dir`."""
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
            if not files.exist() and folder.is_dir():
                _replace_incomplete(folder, scratch, files)
            elif not files.exist():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return files


def _replace_incomplete(folder: Path, scratch: Path, files: OnnxFiles) -> None:
    """Put the export in `scratch` in place of `folder`, a cache folder that lacks a graph (one
    deleted from the cache): the stale folder is set aside and removed. A concurrent user that
    puts a complete folder there first wins, as in `cached_onnx`."""
    stale = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.stale."))
    try:
        os.rename(folder, stale / "old")
        os.rename(scratch, folder)
    except OSError:
        if not files.exist():
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def export_model(model: SamModel | Sam2Model, out_dir: str | os.PathLike[str], opset: int = DEFAULT_OPSET) -> OnnxFiles:
    """Write `encoder.onnx`, `decoder.onnx` and `predictor.onnx` for a loaded fp32 CPU `model`
    (SAM's graphs, HQ-SAM's for an HQ model, SAM 2.1's for a `Sam2Model`) into `out_dir`; check each.

    Each file is written beside its final name and renamed into place once `onnx.checker`
    accepts it, so a reader never sees a half-written graph. Graphs over protobuf's 2 GB
    (`vit_h`'s encoder) get their weights in external data files beside them.
    """
    model = model.eval()
    files = OnnxFiles.in_folder(Path(out_dir))
    files.encoder.parent.mkdir(parents=True, exist_ok=True)
    for path, graph in zip((files.encoder, files.decoder, files.predictor), graph_specs(model)):
        _export_graph(path, graph, opset)
    return files


@dataclass(frozen=True)
class GraphSpec:
    """One graph to trace: its module, example inputs, input and output names, dynamic axes."""

    module: nn.Module
    args: tuple[torch.Tensor, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


def graph_specs(model: SamModel | Sam2Model) -> tuple[GraphSpec, GraphSpec, GraphSpec]:
    """The encoder, decoder and predictor graphs of `model`, SAM's, HQ-SAM's or SAM 2.1's (see the module notes)."""
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    embedding = torch.zeros(EMBEDDING_SHAPE)
    coords = torch.linspace(0, IMAGE_SIZE - 1, TRACE_PROMPTS * TRACE_POINTS * 2).reshape(TRACE_PROMPTS, TRACE_POINTS, 2)
    labels = torch.ones(TRACE_PROMPTS, TRACE_POINTS)
    if isinstance(model, Sam2Model):
        parts = (model.sam_prompt_encoder, model.sam_mask_decoder)
        high_res = tuple(torch.zeros(shape) for shape in SAM2_HIGH_RES_SHAPES.values())
        prompts = (embedding, *high_res, coords, labels)
        mask = (torch.zeros(TRACE_PROMPTS, 1, LOW_RES_SIZE, LOW_RES_SIZE), torch.ones(1))
        return (
            GraphSpec(Sam2EncoderGraph(model), (image,), ENCODER_INPUTS, SAM2_ENCODER_OUTPUTS, {}),
            GraphSpec(Sam2DecoderGraph(*parts), prompts, SAM2_DECODER_INPUTS, DECODER_OUTPUTS, DECODER_DYNAMIC_AXES),
            GraphSpec(
                Sam2PredictorGraph(*parts),
                (*prompts, *mask),
                SAM2_PREDICTOR_INPUTS,
                PREDICTOR_OUTPUTS,
                SAM2_PREDICTOR_DYNAMIC_AXES,
            ),
        )
    parts = (model.prompt_encoder, model.mask_decoder)
    if model.hq:
        prompts = (embedding, coords, labels, torch.zeros(HQ_FEATURES_SHAPE))
        return (
            GraphSpec(HqEncoderGraph(model), (image,), ENCODER_INPUTS, HQ_ENCODER_OUTPUTS, {}),
            GraphSpec(HqDecoderGraph(*parts), prompts, HQ_DECODER_INPUTS, DECODER_OUTPUTS, DECODER_DYNAMIC_AXES),
            GraphSpec(HqPredictorGraph(*parts), prompts, HQ_DECODER_INPUTS, PREDICTOR_OUTPUTS, DECODER_DYNAMIC_AXES),
        )
    prompts = (embedding, coords, labels)
    return (
        GraphSpec(EncoderGraph(model), (image,), ENCODER_INPUTS, ENCODER_OUTPUTS, {}),
        GraphSpec(DecoderGraph(*parts), prompts, DECODER_INPUTS, DECODER_OUTPUTS, DECODER_DYNAMIC_AXES),
        GraphSpec(PredictorGraph(*parts), prompts, DECODER_INPUTS, PREDICTOR_OUTPUTS, DECODER_DYNAMIC_AXES),
    )


def _export_graph(path: Path, graph: GraphSpec, opset: int) -> None:
    """Trace `graph` into `path` through a temporary file beside it, checked before it is renamed."""
    import onnx

    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about shape-dependent Python branches; the decoder's are taken
            # the same way for every prompt batch (batch-1 image side, B prompts).
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # HQ-SAM's decoder indexes its chosen mask token, never a negative index
            warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
            torch.onnx.export(
                graph.module,
                graph.args,
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=list(graph.inputs),
                output_names=list(graph.outputs),
                dynamic_axes=graph.dynamic_axes,
                do_constant_folding=True,
            )
        onnx.checker.check_model(str(tmp), full_check=True)
        tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
