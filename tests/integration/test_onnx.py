"""The ONNX export and the `onnx` back-end against the torch engine, on the real checkpoint and images (CPU).

Measured on the 2-core dev machine (2026-11-22, dog.jpg): embedding relative error 2.4e-6
(Frobenius); decode of 64 prompts max |Δ logits| 2.0e-4 (logits up to ~58), max |Δ IoU| 3.6e-6;
AMG recall/precision 1.0 against the torch engine (8×8 grid) and against the golden file (32×32).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_parity_golden import check_strict

from benchmarks.reference import agreement
from sam_batch.cli import main as cli_main
from sam_batch.engines.backend import EngineError, load_model, set_cpu_threads
from sam_batch.engines.factory import build_engine
from sam_batch.engines.hiera import MultiScaleBlock
from sam_batch.engines.image_encoder import Block as ViTBlock
from sam_batch.engines.onnx_backend import OnnxEngine
from sam_batch.engines.onnx_export import DEFAULT_OPSET, cached_onnx, decoder_output_shapes, graph_source_digest
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import load_image
from sam_batch.pipeline.params import AmgParams
from shared_data import IMAGES, load_golden

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
EMBEDDING_RTOL = 1e-4  # relative (Frobenius) error of the image embedding
LOGITS_ATOL, IOU_ATOL = 5e-3, 5e-4  # decoder outputs; logits reach ~100 in magnitude


@pytest.fixture(scope="module")
def engines():
    set_cpu_threads()
    return build_engine("vit_t", device="cpu"), build_engine("vit_t", device="cpu", backend="onnx")


@pytest.fixture(scope="module")
def dog() -> np.ndarray:
    return load_image(str(IMAGES / "dog.jpg"))


@pytest.fixture(scope="module")
def embeddings(engines, dog):
    torch_engine, onnx_engine = engines
    return torch_engine.encode(dog), onnx_engine.encode(dog)


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graphs_pass_the_checker_with_dynamic_prompt_axes(engines) -> None:
    files = engines[1].files
    for path in (files.encoder, files.decoder):
        onnx.checker.check_model(str(path), full_check=True)
    encoder, decoder = onnx.load(str(files.encoder)).graph, onnx.load(str(files.decoder)).graph
    assert {i.name: dims(i) for i in encoder.input} == {"images": [1, 3, 1024, 1024]}
    assert {i.name: dims(i) for i in decoder.input} == {
        "image_embeddings": [1, 256, 64, 64],
        "point_coords": ["prompts", "points", 2],
        "point_labels": ["prompts", "points"],
    }
    assert {o.name: dims(o) for o in decoder.output} == {
        "low_res_logits": ["prompts", 3, 256, 256],
        "iou_predictions": ["prompts", 3],
    }
    onnx.checker.check_model(str(files.predictor), full_check=True)
    predictor = onnx.load(str(files.predictor)).graph
    assert {i.name: dims(i) for i in predictor.input} == {i.name: dims(i) for i in decoder.input}
    assert {o.name: dims(o) for o in predictor.output} == {
        "low_res_logits": ["prompts", 4, 256, 256],
        "iou_predictions": ["prompts", 4],
    }


def test_a_change_to_the_model_code_is_a_new_export(tmp_path, monkeypatch) -> None:
    """The cache key follows the source the graphs are traced from, not a hand-bumped number."""
    from sam_batch.engines import onnx_export

    here = Path(onnx_export.__file__).parent
    for name in onnx_export.GRAPH_MODULES:
        shutil.copy(here / f"{name}.py", tmp_path / f"{name}.py")
    monkeypatch.setattr(onnx_export, "__file__", str(tmp_path / "onnx_export.py"))
    before = graph_source_digest()
    assert before == onnx_export.graph_source_digest()
    with open(tmp_path / "tiny_vit.py", "a") as module:
        module.write("\n# changed\n")
    assert graph_source_digest() != before


def test_graphs_are_cached_by_model_checkpoint_opset_versions_and_code(engines) -> None:
    files = engines[1].files
    code = graph_source_digest()
    assert len(code) == 16 and int(code, 16) >= 0
    assert files.encoder.parent.name == (
        f"vit_t-6dbb90523a35330f-opset{DEFAULT_OPSET}-onnx{onnx.__version__}-torch{torch.__version__}-code{code}"
    )
    stamp = files.decoder.stat().st_mtime_ns
    again = cached_onnx(load_model("vit_t"))
    assert again == files and files.decoder.stat().st_mtime_ns == stamp  # reused, not exported again


def test_sessions_take_torch_thread_count(engines) -> None:
    onnx_engine = engines[1]
    for graph in (onnx_engine.encoder, onnx_engine.decoder):
        options = graph.session.get_session_options()
        assert options.intra_op_num_threads == torch.get_num_threads()
        assert options.inter_op_num_threads == 1


def test_encoder_matches_torch(embeddings) -> None:
    ours, onnx_crop = embeddings
    assert onnx_crop.embedding.shape == (1, 256, 64, 64) and onnx_crop.embedding.dtype == torch.float32
    assert (onnx_crop.input_hw, onnx_crop.crop_hw) == (ours.input_hw, ours.crop_hw)
    error = (onnx_crop.embedding - ours.embedding).norm() / ours.embedding.norm()
    assert error < EMBEDDING_RTOL, float(error)


@pytest.mark.parametrize("n_prompts", [64, 1])
def test_decode_matches_torch(engines, embeddings, dog, n_prompts: int) -> None:
    torch_engine, onnx_engine = engines
    crop = embeddings[0]  # the same embedding into both decoders
    points = np.random.default_rng(n_prompts).uniform(0, 1, (n_prompts, 2)) * [dog.shape[1], dog.shape[0]]
    logits, iou = onnx_engine.decode(crop, points)
    expected_logits, expected_iou = torch_engine.decode(crop, points)
    assert logits.shape == (n_prompts, 3, 256, 256) and iou.shape == (n_prompts, 3)
    assert logits.dtype == iou.dtype == torch.float32
    torch.testing.assert_close(logits, expected_logits, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(iou, expected_iou, atol=IOU_ATOL, rtol=0)


@pytest.mark.parametrize("n_prompts, n_points", [(5, 3), (2, 7), (1, 2)])
def test_decoder_graph_takes_any_point_count(engines, embeddings, n_prompts: int, n_points: int) -> None:
    """Several points per prompt, foreground, background and ignored, against `SamModel.decode`."""
    torch_engine, onnx_engine = engines
    embedding = embeddings[0].embedding
    rng = np.random.default_rng(n_points)
    coords = torch.from_numpy(rng.uniform(0, 1024, (n_prompts, n_points, 2)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 2, (n_prompts, n_points)).astype(np.float32))
    labels[:, -1] = -1
    out = onnx_engine.decoder(
        decoder_output_shapes(n_prompts), image_embeddings=embedding, point_coords=coords, point_labels=labels
    )
    with torch.inference_mode():
        expected = torch_engine.model.decode(embedding, coords, labels)
    for got, want, atol in zip(out.values(), expected, (LOGITS_ATOL, IOU_ATOL)):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_amg_agrees_with_torch(engines, dog) -> None:
    torch_engine, onnx_engine = engines
    params = AmgParams(points_per_side=8)
    expected = to_records(generate_masks(torch_engine, dog, params))
    ours = to_records(generate_masks(onnx_engine, dog, params))
    found = agreement(ours, expected)
    assert expected and (found.recall, found.precision) == (1.0, 1.0), (len(ours), len(expected), found)


@pytest.mark.slow
def test_golden_parity_with_onnx(engines) -> None:
    """The reference generator's masks for dog.jpg at its full 32×32 grid, through the onnx
    back-end: strict-equal, as the torch engine's."""
    name = "dog.jpg.pps32.crop0.minarea0.json"
    golden = load_golden(name)
    image = load_image(str(IMAGES / golden["image"]))
    check_strict(name, to_records(generate_masks(engines[1], image, AmgParams(**golden["params"]))), "onnx back-end")


def test_export_onnx_command(tmp_path: Path, capsys) -> None:
    assert cli_main(["export-onnx", "vit_t", "-o", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / name) for name in ("encoder.onnx", "decoder.onnx", "predictor.onnx")]
    for path in printed:
        onnx.checker.check_model(path, full_check=True)


def test_onnx_backend_through_sam_batch_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = {
        "name": "onnx-backend",
        "input": {"uris": [str(IMAGES / "dog.jpg")]},
        "engine": {"backend": "onnx", "device": "cpu"},
        "amg": {"points_per_side": 4},
        "output": {"uri": str(out)},
        "run": {"executor": "local"},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    result = subprocess.run([SAM_BATCH, "run", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    (image,) = pq.read_table(out / "images").to_pylist()
    assert image["status"] == "ok" and image["n_masks"] > 0
    assert pq.read_table(out / "masks").num_rows == image["n_masks"]


def test_onnx_backend_is_fp32_only() -> None:
    with pytest.raises(EngineError, match="fp16 is not available with engine.backend onnx"):
        OnnxEngine.from_model(load_model("vit_t"), "cpu", "fp16")


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(lambda: ViTBlock(32, 2, window_size=14, grid_size=64), id="vit"),
        pytest.param(lambda: MultiScaleBlock(32, 32, 2, window=14, pool_queries=False), id="hiera"),
    ],
)
def test_windowed_attention_exports_where_the_window_does_not_divide_the_grid(tmp_path: Path, block) -> None:
    """vit_b/l/h's blocks and SAM 2.1's stage-3 blocks attend in 14 x 14 windows over a 64 x 64
    grid (padded to 70): the window count must export as a ceiling division (ONNX's integer Div
    truncates; the graph used to fail onnxruntime's shape checks)."""
    import onnxruntime

    module = block().eval()
    grid = torch.randn(1, 64, 64, 32)
    path = tmp_path / "block.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        expected = module(grid)
        torch.onnx.export(module, (grid,), str(path), dynamo=False, opset_version=DEFAULT_OPSET, input_names=["x"])
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": grid.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)
