"""The SAM model in ``sam_batch.engines``: checkpoint loading, golden embeddings, and parity with
the official ``segment_anything`` modeling code (a test-only dependency) on shared weights."""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sam_batch.engines.image_encoder import VIT_CONFIGS, ImageEncoderViT, ViTConfig
from sam_batch.engines.point_decoder import PointDecoder
from sam_batch.engines.sam import MODEL_TYPES, SamModel, build_sam
from sam_batch.engines.transforms import (
    image_to_input,
    labelled_points,
    preprocess_shape,
    resize_longest_side,
    scale_coords,
)
from shared_data import SHARED

CHECKPOINT = SHARED / "models" / "mobile_sam.pt"
needs_shared_data = pytest.mark.skipif(not CHECKPOINT.exists(), reason=f"test data {SHARED} not present")


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm())


def _fill_random(module: nn.Module, seed: int) -> None:
    """Overwrite every floating tensor of the state dict with seeded noise, scale 1/sqrt(last dim) (0.5 for
    vectors), so that zero-initialised tensors (relative positions, biases, LayerNorm) matter in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point() and tensor.device.type != "meta":
                scale = tensor.shape[-1] ** -0.5 if tensor.ndim > 1 else 0.5
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def official() -> types.SimpleNamespace:
    """``segment_anything``'s model code. It imports torchvision only for its generator's NMS and for
    resizing; where torchvision is absent, inert stubs stand in while it is imported."""
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment_anything (test dependency) is not installed")
    stubs: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        packages = ["", ".ops", ".ops.boxes", ".transforms", ".transforms.functional"]
        stubs = {f"torchvision{name}": types.ModuleType(f"torchvision{name}") for name in packages}
        boxes, functional = stubs["torchvision.ops.boxes"], stubs["torchvision.transforms.functional"]
        boxes.batched_nms = boxes.box_area = functional.resize = functional.to_pil_image = None
    with mock.patch.dict(sys.modules, stubs):
        from segment_anything.build_sam import sam_model_registry
        from segment_anything.modeling import ImageEncoderViT
        from segment_anything.predictor import SamPredictor
        from segment_anything.utils.transforms import ResizeLongestSide
    return types.SimpleNamespace(
        registry=sam_model_registry,
        ImageEncoderViT=ImageEncoderViT,
        SamPredictor=SamPredictor,
        ResizeLongestSide=ResizeLongestSide,
    )


@pytest.fixture(scope="module")
def mobile_sam() -> SamModel:
    model = build_sam("vit_t")
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True), strict=True)
    return model


@pytest.fixture(scope="module")
def official_vit_b(official: types.SimpleNamespace) -> nn.Module:
    model = official.registry["vit_b"]().eval()
    _fill_random(model, seed=0)
    return model


# 1. Checkpoint loading ------------------------------------------------------------------------


@needs_shared_data
def test_mobile_sam_checkpoint_loads_strict() -> None:
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    model = build_sam("vit_t")
    model.load_state_dict(state, strict=True)
    ours = model.state_dict()
    assert set(ours) == set(state)
    assert all(ours[key].shape == value.shape for key, value in state.items())
    assert not model.training


def test_build_sam_rejects_unknown_type() -> None:
    assert MODEL_TYPES[:8] == ("vit_t", "vit_b", "vit_l", "vit_h", "vit_t_hq", "vit_b_hq", "vit_l_hq", "vit_h_hq")
    for unknown in ("vit_x", "vit_x_hq", "sam2.1_hiera_t"):
        with pytest.raises(ValueError, match=unknown):
            build_sam(unknown)


# 2. Golden embeddings -------------------------------------------------------------------------


@needs_shared_data
@pytest.mark.parametrize("name", ["dog", "truck"])
def test_mobile_sam_embedding_matches_golden(mobile_sam: SamModel, name: str) -> None:
    image = np.asarray(Image.open(SHARED / "data" / "images" / f"{name}.jpg").convert("RGB"))
    golden = torch.from_numpy(np.load(SHARED / "golden" / f"{name}.jpg.embedding.npy"))
    resized = resize_longest_side(image)
    assert max(resized.shape[:2]) == 1024
    embedding = mobile_sam.embed(image_to_input(resized, mobile_sam.pixel_mean, mobile_sam.pixel_std))
    assert embedding.shape == (1, 256, 64, 64)
    assert _rel_err(embedding[0], golden) <= 1e-4


# Preprocessing vs the reference transforms ----------------------------------------------------


@pytest.mark.parametrize("hw", [(534, 800), (1200, 1800), (770, 769), (1024, 768), (7, 3000)])
def test_preprocess_shape_and_coords_match_reference(official: types.SimpleNamespace, hw: tuple[int, int]) -> None:
    reference = official.ResizeLongestSide(1024)
    assert preprocess_shape(*hw) == reference.get_preprocess_shape(*hw, 1024)
    coords = np.random.default_rng(0).uniform(0, max(hw), size=(5, 1, 2))
    np.testing.assert_array_equal(scale_coords(coords, hw), reference.apply_coords(coords, hw))


@needs_shared_data
def test_image_to_input_matches_reference_preprocess(official_vit_b: nn.Module) -> None:
    image = np.asarray(Image.open(SHARED / "data" / "images" / "dog.jpg").convert("RGB"))
    resized = resize_longest_side(image)
    model = build_sam("vit_b")
    theirs = official_vit_b.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None])
    assert torch.equal(image_to_input(resized, model.pixel_mean, model.pixel_std), theirs)


# 3. Architecture parity with segment_anything (ViT-B/L/H, prompt encoder, mask decoder) --------


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_state_dict_loads_strict(official: types.SimpleNamespace, model_type: str) -> None:
    """Every key and shape of the official model, on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        theirs = official.registry[model_type]()
        ours = build_sam(model_type)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)


def test_vit_encoder_forward_matches_official(official: types.SimpleNamespace) -> None:
    """The whole ViT encoder forward on a 1024 input, at reduced width and depth (3 blocks, one global)."""
    config = ViTConfig(embed_dim=64, depth=3, num_heads=2, global_attn_indexes=(1,))
    ours = ImageEncoderViT(config).eval()
    theirs = official.ImageEncoderViT(
        depth=3,
        embed_dim=64,
        num_heads=2,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(1,),
    ).eval()
    _fill_random(theirs, seed=1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        embedding = ours(images)
        assert embedding.shape == (2, 256, 64, 64)
        assert _rel_err(embedding, theirs(images)) <= 1e-5


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_vit_blocks_match_official(official: types.SimpleNamespace, model_type: str) -> None:
    """At full size: patch embedding, the first windowed and the first global block, and the neck, on 1024 input.

    Only those parts get real (random) weights; the rest of both models stays on the meta device.
    """
    blocks = [0, VIT_CONFIGS[model_type].global_attn_indexes[0]]
    with torch.device("meta"):
        theirs = official.registry[model_type]().image_encoder
        ours = build_sam(model_type).image_encoder
    for module in [theirs.patch_embed, theirs.neck] + [theirs.blocks[i] for i in blocks]:
        module.to_empty(device="cpu")
    theirs.pos_embed = nn.Parameter(torch.empty_like(theirs.pos_embed, device="cpu"))
    _fill_random(theirs, seed=2)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)

    def partial_forward(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        x = encoder.patch_embed(images) + encoder.pos_embed
        for i in blocks:
            x = encoder.blocks[i](x)
        return encoder.neck(x.permute(0, 3, 1, 2))

    images = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert _rel_err(partial_forward(ours, images), partial_forward(theirs, images)) <= 1e-5


def test_prompt_encoder_and_mask_decoder_match_official(official_vit_b: nn.Module) -> None:
    ours = build_sam("vit_b")
    ours.load_state_dict(official_vit_b.state_dict(), strict=True)
    generator = torch.Generator().manual_seed(4)
    batch, points = 3, 3
    coords = torch.rand(batch, points, 2, generator=generator) * 1024
    labels = torch.randint(-1, 2, (batch, points), generator=generator)
    masks = torch.randn(batch, 1, 256, 256, generator=generator)
    embedding = torch.randn(1, 256, 64, 64, generator=generator)
    with torch.inference_mode():
        for mask_input in (None, masks):
            sparse, dense = ours.prompt_encoder(coords, labels, mask_input)
            their_sparse, their_dense = official_vit_b.prompt_encoder((coords, labels), None, mask_input)
            torch.testing.assert_close(sparse, their_sparse, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(dense.expand_as(their_dense), their_dense, rtol=1e-5, atol=1e-5)
            image_pe = ours.prompt_encoder.dense_pe()
            torch.testing.assert_close(image_pe, official_vit_b.prompt_encoder.get_dense_pe(), rtol=0, atol=1e-6)
            for multimask in (True, False):
                logits, iou = ours.mask_decoder(embedding, image_pe, sparse, dense, multimask)
                their_logits, their_iou = official_vit_b.mask_decoder(
                    embedding, image_pe, their_sparse, their_dense, multimask
                )
                assert logits.shape == their_logits.shape == (batch, 3 if multimask else 1, 256, 256)
                torch.testing.assert_close(logits, their_logits, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(iou, their_iou, rtol=1e-4, atol=1e-4)


# 4. Decode parity with SamPredictor on the real weights ----------------------------------------


@needs_shared_data
def test_decode_matches_official_predictor(official: types.SimpleNamespace, mobile_sam: SamModel) -> None:
    """``SamModel.decode`` == ``SamPredictor.predict_torch(multimask, logits)``'s low-res output, with
    MobileSAM's prompt encoder and mask decoder in an official Sam (its image encoder is unused)."""
    reference = official.registry["vit_b"]().eval()
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    decoder_state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
    assert not reference.load_state_dict(decoder_state, strict=False).unexpected_keys
    predictor = official.SamPredictor(reference)
    embedding = torch.from_numpy(np.load(SHARED / "golden" / "dog.jpg.embedding.npy"))[None]
    predictor.features, predictor.is_image_set = embedding, True
    predictor.original_size, predictor.input_size = (534, 800), preprocess_shape(534, 800)

    # Float64 coordinates, as the reference generator makes them.
    grid = (np.arange(3) + 0.5) / 3
    points = np.stack(np.meshgrid(grid * 800, grid * 534), axis=-1).reshape(-1, 2)
    coords = torch.as_tensor(scale_coords(points, (534, 800)))[:, None, :]
    labels = torch.ones(len(points), 1, dtype=torch.int)
    labels[::4] = 0

    logits, iou = mobile_sam.decode(embedding, coords, labels)
    with torch.inference_mode():
        _, their_iou, their_logits = predictor.predict_torch(coords, labels, multimask_output=True, return_logits=True)
    assert logits.shape == (9, 3, 256, 256) and iou.shape == (9, 3)
    torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(iou, their_iou, atol=1e-4, rtol=1e-5)


# 5. The point decoder: the mask decoder rearranged, against SamModel.decode ------------------------


def _grid_prompts(n: int, hw: tuple[int, int] = (534, 800)) -> tuple[torch.Tensor, torch.Tensor]:
    """n single foreground points spread over an image of size hw, in input-frame pixels (float64)."""
    points = np.random.default_rng(n).uniform(0, 1, (n, 2)) * [hw[1], hw[0]]
    return torch.as_tensor(scale_coords(points, hw))[:, None, :], torch.ones(n, 1, dtype=torch.int64)


def _point_decoder(model: SamModel, **kwargs) -> PointDecoder:
    return PointDecoder(model.prompt_encoder, model.mask_decoder, **kwargs)


@needs_shared_data
@pytest.mark.parametrize(("chunk", "tile"), [(2, 512), (3, 1024), (5, 4096)])
def test_point_decoder_matches_the_model_on_real_weights(mobile_sam: SamModel, chunk: int, tile: int) -> None:
    """Same logits and IoUs as `SamModel.decode` (the reference's arithmetic) on the golden dog
    embedding, for chunks that do and do not divide the batch and tiles from a few rows to all."""
    embedding = torch.from_numpy(np.load(SHARED / "golden" / "dog.jpg.embedding.npy"))[None]
    coords, labels = _grid_prompts(7)
    decoder = _point_decoder(mobile_sam, chunk=chunk, tile=tile)
    logits, iou = decoder.decode(decoder.image_side(embedding), coords, labels)
    want_logits, want_iou = mobile_sam.decode(embedding, coords, labels)
    assert logits.shape == (7, 3, 256, 256) and iou.shape == (7, 3)
    torch.testing.assert_close(iou, want_iou, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, want_logits, atol=2e-3, rtol=1e-5)  # logits reach ~100
    assert ((logits > 0) != (want_logits > 0)).float().mean() < 1e-5


@needs_shared_data
def test_point_decoder_matches_the_model_on_random_weights(mobile_sam: SamModel) -> None:
    """Every weight random (LayerNorm gains and biases, attention biases included), so no term of
    the folded and low-rank forms can vanish by accident; background points too."""
    model = build_sam("vit_t")
    model.load_state_dict(mobile_sam.state_dict())
    _fill_random(model.mask_decoder, seed=3)
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(4))
    coords, labels = _grid_prompts(4)
    labels[1] = 0
    decoder = _point_decoder(model, chunk=3, tile=1024)
    logits, iou = decoder.decode(decoder.image_side(embedding), coords, labels)
    want_logits, want_iou = model.decode(embedding, coords, labels)
    scale = want_logits.abs().max()
    torch.testing.assert_close(iou, want_iou, atol=1e-4 * want_iou.abs().max(), rtol=0)
    torch.testing.assert_close(logits / scale, want_logits / scale, atol=1e-5, rtol=0)


@torch.inference_mode()
def _predictor_reference(model: SamModel, embedding, coords, labels, multimask: bool):
    """The mask decoder as the predictor runs it: all four tokens, then the kept ones."""
    encoder = model.prompt_encoder
    sparse = encoder.embed_labelled_points(coords, labels)
    return model.mask_decoder(embedding, encoder.dense_pe(), sparse, encoder.embed_mask(None), multimask)


@needs_shared_data
@pytest.mark.parametrize("random_weights", [False, True], ids=["mobile_sam", "random"])
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("shape", ["box", "points", "box and points"], ids=lambda shape: shape.replace(" ", "_"))
def test_point_decoder_predicts_as_the_mask_decoder(
    mobile_sam: SamModel, random_weights: bool, multimask: bool, shape: str
) -> None:
    """The predictor's prompts (labelled points: 1/0 points, a box's corners 2/3, the -1 pad of a
    prompt without a box) through `PointDecoder.predict`: the mask decoder's logits and IoUs for
    the single mask (token 0) or the three (tokens 1-3), on the dog embedding with the real
    weights and on a random one with every decoder weight random."""
    model, embedding = mobile_sam, torch.from_numpy(np.load(SHARED / "golden" / "dog.jpg.embedding.npy"))[None]
    if random_weights:
        model = build_sam("vit_t")
        model.load_state_dict(mobile_sam.state_dict())
        _fill_random(model.mask_decoder, seed=5)
        embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(6))
    rng = np.random.default_rng(7)
    n = 5
    points = rng.uniform(0, 1, (n, 2, 2)) * 1024 if "points" in shape else None
    point_labels = np.array([[1, 0]] * n) if points is not None else None
    corners = np.sort(rng.uniform(0, 1, (n, 2, 2)) * 1024, axis=1)
    boxes = corners.reshape(n, 4) if "box" in shape else None
    coords, tags = labelled_points(points, point_labels, boxes)
    coords_t, tags_t = torch.as_tensor(coords, dtype=torch.float32), torch.as_tensor(tags)
    decoder = _point_decoder(model, chunk=2, tile=1024)
    logits, iou = decoder.predict(decoder.image_side(embedding), coords_t, tags_t, multimask)
    want_logits, want_iou = _predictor_reference(model, embedding, coords_t, tags_t, multimask)
    outputs = 3 if multimask else 1
    assert logits.shape == (n, outputs, 256, 256) and iou.shape == (n, outputs)
    scale = want_logits.abs().max()
    torch.testing.assert_close(iou, want_iou, atol=1e-4 * max(1.0, float(want_iou.abs().max())), rtol=0)
    torch.testing.assert_close(logits / scale, want_logits / scale, atol=2e-5, rtol=0)


@needs_shared_data
def test_point_decoder_skips_prompts_below_min_iou(mobile_sam: SamModel) -> None:
    """With min_iou, a prompt whose three IoUs are all at or below it has zero logits; the
    others, and every IoU, are what a full decode gives."""
    embedding = torch.from_numpy(np.load(SHARED / "golden" / "dog.jpg.embedding.npy"))[None]
    coords, labels = _grid_prompts(6)
    decoder = _point_decoder(mobile_sam, chunk=2)
    side = decoder.image_side(embedding)
    full_logits, full_iou = decoder.decode(side, coords, labels)
    min_iou = float(full_iou.max(1).values.median())  # about half the prompts pass
    logits, iou = decoder.decode(side, coords, labels, min_iou=min_iou)
    passing = (full_iou > min_iou).any(1)
    assert 0 < int(passing.sum()) < len(passing)
    torch.testing.assert_close(iou, full_iou)
    torch.testing.assert_close(logits[passing], full_logits[passing])
    assert not logits[~passing].any()


KEEP_FREED_MEMORY = """
import resource, threading
import numpy as np
from sam_batch.engines.backend import keep_freed_memory

def churn(rounds):  # blocks of 1-30 MiB, as a decode batch allocates and frees them
    for _ in range(rounds):
        for mib in (3, 30, 8, 20, 1, 12):
            block = np.ones(mib * 2**20 // 8)
            del block

def on_two_threads(rounds):
    threads = [threading.Thread(target=churn, args=(rounds,)) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]

assert keep_freed_memory()
on_two_threads(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
on_two_threads(10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_cpu_worker_keeps_the_memory_it_frees() -> None:
    """After `keep_freed_memory`, blocks freed on any thread are reused, not faulted in again:
    20 rounds of 74 MiB over two threads fault in under 1% of their pages. (This checks the options are in
    force; their effect on a real image, fewer page faults and seconds, is in docs/benchmarks.md.)"""
    import resource
    import subprocess

    result = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Without the options each round faults its 74 MiB in again: 20 x 74 MiB of pages. With them,
    # none but the few a busy machine's memory reclaim (e.g. DAMON) takes back and faults in.
    faults_without = 20 * 74 * 2**20 // resource.getpagesize()
    assert int(result.stdout) < faults_without // 100, result.stdout
