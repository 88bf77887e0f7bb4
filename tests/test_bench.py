"""`sam-batch bench` without the reference environment: mask agreement, the report, the doc
section, and the one-line refusal when `.venv-ref` is missing."""

from __future__ import annotations

import datetime
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sam_batch.bench import (
    DOC_HEADER,
    Agreement,
    ImageResult,
    Machine,
    Side,
    WholeProcess,
    agreement,
    append_section,
    format_section,
    format_table,
    format_whole_process,
    main,
    run_pipeline,
)
from sam_batch.pipeline.rle import encode_rle


def record(mask: np.ndarray) -> dict:
    """A coco_rle record holding only what the agreement reads."""
    return {"segmentation": encode_rle(mask)}


def box(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (20, 30)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_identical_sets_agree_fully() -> None:
    masks = [record(box(0, 10, 0, 10)), record(box(10, 20, 5, 25))]
    assert agreement(masks, masks) == Agreement(recall=1.0, precision=1.0, mean_best_iou=1.0)


def test_agreement_counts_matches_at_iou_09() -> None:
    big = box(0, 10, 0, 10)  # 100 px
    slightly_smaller = box(0, 10, 0, 9)  # 90 px inside it: IoU 0.9, a match
    half = box(0, 10, 0, 5)  # IoU 0.5 with big: no match
    elsewhere = box(12, 20, 20, 30)
    reference = [record(big), record(elsewhere)]
    ours = [record(slightly_smaller), record(half), record(box(15, 20, 0, 5))]
    result = agreement(ours, reference)
    assert result.recall == pytest.approx(1 / 2)  # big found, elsewhere not
    assert result.precision == pytest.approx(1 / 3)  # only slightly_smaller matches
    assert result.mean_best_iou == pytest.approx((0.9 + 0.0) / 2)


def test_agreement_accepts_bytes_counts() -> None:
    rle = encode_rle(box(2, 8, 2, 8))
    as_bytes = {"segmentation": {"size": rle["size"], "counts": rle["counts"].encode()}}
    assert agreement([as_bytes], [{"segmentation": rle}]).recall == 1.0


def test_agreement_with_empty_sides() -> None:
    some = [record(box(0, 5, 0, 5))]
    assert agreement([], some) == Agreement(recall=0.0, precision=1.0, mean_best_iou=0.0)
    missing_reference = agreement(some, [])
    assert (missing_reference.recall, missing_reference.precision) == (1.0, 0.0)
    assert math.isnan(missing_reference.mean_best_iou)


def example_result() -> ImageResult:
    masks = [record(box(0, 10, 0, 10)), record(box(10, 20, 5, 25))]
    return ImageResult(
        image="dog.jpg", height=20, width=30,
        reference=Side(seconds=150.0, records=masks), ours=Side(seconds=60.0, records=masks[:1]),
    )


def test_table_reports_seconds_ratio_counts_and_agreement() -> None:
    lines = format_table([example_result()]).splitlines()
    assert lines[0].startswith("| image | size | reference s | sam-batch s | speed-up | masks ref | masks ours")
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["dog.jpg", "30×20", "150.0", "60.0", "2.50×", "2", "1", "0.500", "1.000", "0.5000"]


def test_doc_section_names_machine_versions_command_and_date(tmp_path: Path) -> None:
    machine = Machine(
        cores=2, cpu_model="AMD EPYC", threads=2, torch_ours="2.13.0+cpu", torch_reference="2.14.1",
        mobile_sam="1.0.0", load_before=1.5, load_after=3.25,
    )
    whole = WholeProcess(reference_seconds=320.0, ours_seconds=80.0, agreements=[Agreement(1.0, 0.99, 0.98)])
    section = format_section(
        [example_result()], whole, machine, model_type="vit_t", points_per_side=32,
        command="sam-batch bench --write-doc", when=datetime.datetime(2025, 1, 2, 3, 4),
        note="other work ran meanwhile",
    )
    assert section.startswith("## 2025-01-02 03:04 UTC — vit_t, 32×32 points, 2 threads\n")
    for expected in ("2 cores (`nproc`), AMD EPYC", "torch 2.14.1", "mobilesam-mirror 1.0.0",
                     "torch 2.13.0+cpu", "`sam-batch bench --write-doc`", "1.50 / 3.25",
                     "note: other work ran meanwhile", "| dog.jpg |", "| start to exit | 1 | 320.0 | 80.0 | 4.00× |"):
        assert expected in section
    doc = tmp_path / "docs" / "benchmarks.md"
    append_section(doc, section)
    append_section(doc, section)
    text = doc.read_text()
    assert text.startswith(DOC_HEADER.splitlines()[0]) and text.count(DOC_HEADER) == 1
    assert text.count("## 2025-01-02 03:04 UTC") == 2


def test_missing_reference_env_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ref-venv", str(tmp_path / ".venv-ref")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert "make bench-env" in captured.err and ".venv-ref" in captured.err


def test_cli_missing_reference_env(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sam_batch.cli", "bench", "--", "--ref-venv", str(tmp_path / "nowhere")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"sam-batch bench: the reference environment {tmp_path / 'nowhere'} is missing: run `make bench-env` first"
    ]


def test_whole_process_row_reports_the_worst_image() -> None:
    run = WholeProcess(300.0, 60.0, [Agreement(1.0, 0.98, 0.99), Agreement(0.97, 1.0, 0.95)])
    lines = format_whole_process(run, 2).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| whole process | images | reference s | `sam-batch run` s")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["start to exit", "2", "300.0", "60.0", "5.00×", "0.970", "0.980"]


def test_run_pipeline_times_sam_batch_run_and_reads_its_masks(tmp_path: Path, shared_images: Path) -> None:
    """The whole-process side for real: `sam-batch run` on two images (a 2x2 grid), its masks
    read back per image as the URIs were given (relative ones included)."""
    from conftest import MOBILE_SAM

    images = [str(shared_images / "dog.jpg"), os.path.relpath(shared_images / "truck.jpg")]
    lines: list[str] = []
    records, seconds = run_pipeline(
        images, tmp_path, model_type="vit_t", checkpoint=MOBILE_SAM, points_per_side=2, log=lines.append
    )
    assert seconds > 0 and set(records) == set(images)
    assert all(records[uri] for uri in images)
    assert all(set(r) == {"segmentation"} and r["segmentation"]["size"] for uri in images for r in records[uri])
    assert any("images: 2 ok, 0 error" in line for line in lines)


def test_profile_times_every_stage_of_one_image(shared_images: Path) -> None:
    from sam_batch.bench_profile import STAGES, profile_image
    from sam_batch.pipeline import amg, held_masks

    before = {name: getattr(amg, name) for name in ("_stable_masks", "box_nms", "encode_rle")}
    boxes_before = held_masks.masks_to_boxes
    result = profile_image(str(shared_images / "truck.jpg"), threads=1, points_per_side=4)
    assert result["masks"] > 0 and result["threads"] == 1
    assert set(STAGES) <= set(result) and result["generate"] >= result["decode"] > 0
    assert all(getattr(amg, name) is f for name, f in before.items())  # unwrapped again
    assert held_masks.masks_to_boxes is boxes_before
