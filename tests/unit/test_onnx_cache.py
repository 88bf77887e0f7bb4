"""The ONNX cache folder (`onnx_export.cached_onnx`) with the export stubbed: concurrent first
users share one folder, and a folder that lost a graph is exported again, not a lasting error."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sam_batch.engines import onnx_export
from sam_batch.engines.backend import LoadedModel


@pytest.fixture
def exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A weights cache in `tmp_path` and `export_model` writing three stub graphs; the folders it wrote."""
    monkeypatch.setenv("SAM_BATCH_CACHE", str(tmp_path))
    written: list[Path] = []

    def export(model, out_dir, opset=onnx_export.DEFAULT_OPSET) -> onnx_export.OnnxFiles:
        files = onnx_export.OnnxFiles.in_folder(Path(out_dir))
        for path in (files.encoder, files.decoder, files.predictor):
            path.write_text("graph")
        written.append(Path(out_dir))
        return files

    monkeypatch.setattr(onnx_export, "export_model", export)
    return written


def test_concurrent_first_users_share_one_folder(exports: list[Path]) -> None:
    loaded = LoadedModel(None, "sam2.1_hiera_t", "ab" * 32)
    found: list[onnx_export.OnnxFiles] = []
    threads = [threading.Thread(target=lambda: found.append(onnx_export.cached_onnx(loaded))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 4 and len({files.encoder.parent for files in found}) == 1 and found[0].exist()
    assert os.listdir(found[0].encoder.parent.parent) == [found[0].encoder.parent.name]  # no scratch left


def test_another_checkpoint_gets_another_folder(exports: list[Path]) -> None:
    first = onnx_export.cached_onnx(LoadedModel(None, "sam2.1_hiera_t", "ab" * 32))
    other = onnx_export.cached_onnx(LoadedModel(None, "sam2.1_hiera_t", "cd" * 32))
    assert first.encoder.parent != other.encoder.parent


def test_a_folder_missing_a_graph_is_exported_again(exports: list[Path]) -> None:
    loaded = LoadedModel(None, "sam2.1_hiera_t", "ab" * 32)
    files = onnx_export.cached_onnx(loaded)
    files.predictor.unlink()  # a graph deleted from the cache
    again = onnx_export.cached_onnx(loaded)
    assert again == files and again.exist() and len(exports) == 2
    assert os.listdir(files.encoder.parent.parent) == [files.encoder.parent.name]  # nothing set aside is left
