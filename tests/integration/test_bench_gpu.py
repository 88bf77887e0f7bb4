"""`python -m benchmarks.gpu_check` on the CPU: every phase runs and reports, so the GPU check a lent
machine runs (deploy/gpu-check.sh) is known to work before any device time is spent on it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu_check import MeasuredModel, agreement_row, format_report, golden_records
from sam_batch.pipeline.rle import encode_rle
from shared_data import GOLDEN, REPO

REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"


def bench_gpu(out: Path, *options: str) -> list[dict]:
    """Run `python -m benchmarks.gpu_check` as a process on the CPU; its results, in order."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--out", str(out), *options],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_every_phase_runs_and_reports_on_the_cpu(tmp_path: Path, shared_images: Path) -> None:
    rows = bench_gpu(
        tmp_path / "out",
        "--images",
        str(shared_images / "dog.jpg"),
        "--models",
        "vit_t",
        "vit_t:random",
        "--precisions",
        "fp32",
        "fp16",
        "--points-per-side",
        "4",
        "--repeats",
        "1",
        "--run-images",
        "3",
        "--run-precision",
        "fp32",
        "--encoder-batches",
        "2",
        "--profile",
        "fp32",
        "--compile",
        "fp32",
        "--compile-backend",
        "eager",
        "--prompts",
        str(GOLDEN / "prompts"),
        "--prompt-boxes",
        "4",
        "--budget-s",  # every phase starts even on a loaded machine
        "800",
    )
    by_phase: dict[str, list[dict]] = {}
    for row in rows:
        by_phase.setdefault(row["phase"], []).append(row)

    assert by_phase["environment"][0]["device"] == "cpu"
    generated = {(row["model"], row["precision"]): row for row in by_phase["generate"]}
    assert set(generated) == {("vit_t", "fp32"), ("vit_t (random weights)", "fp32")}
    assert generated["vit_t", "fp32"]["images"]["dog.jpg"]["masks"] > 0
    assert generated["vit_t", "fp32"]["images_per_second"] > 0
    # fp16 needs a GPU: each fp16 phase fails on its own, in one line, and the rest go on
    failed = {row["what"]: row["error"] for row in by_phase["failed"]}
    assert set(failed) == {
        f"{phase} {model} fp16" for phase in ("generate", "encoder") for model in ("vit_t", "vit_t (random weights)")
    } | {"prompts vit_t fp16"}
    assert all("fp16 needs a GPU" in error for error in failed.values())

    run = by_phase["run"][0]
    assert (run["images"], run["images_ok"], run["images_error"]) == (3, 3, 0)
    assert run["masks"] == 3 * generated["vit_t", "fp32"]["images"]["dog.jpg"]["masks"]

    assert [(row["model"], row["images_per_call"]) for row in by_phase["encoder"]] == [
        ("vit_t", 2),
        ("vit_t (random weights)", 2),
    ]
    assert all(row["ms_per_image"] > 0 for row in by_phase["encoder"])

    profile = {row["model"]: row for row in by_phase["profile"]}
    stages = profile["vit_t"]["seconds"]
    assert set(stages) == {"encode", "decode", "upsample+stability", "boxes", "nms", "rle", "generate"}
    assert sum(s for stage, s in stages.items() if stage != "generate") <= stages["generate"] * 1.01
    assert profile["vit_t"]["masks"] == generated["vit_t", "fp32"]["images"]["dog.jpg"]["masks"]

    compiled = {row["model"]: row for row in by_phase["compile"]}
    assert compiled["vit_t"]["images"]["dog.jpg"]["masks"] == generated["vit_t", "fp32"]["images"]["dog.jpg"]["masks"]
    agreements = {row["compared"]: row for row in by_phase["agreement"]}
    assert agreements["compiled vs eager fp32"]["min_recall"] == 1.0
    assert agreements["compiled vs eager fp32"]["min_precision"] == 1.0
    assert "skipped" not in by_phase
    (prompts,) = by_phase["prompts"]  # dog.jpg's 36 reference prompts, then 4 random boxes
    assert (prompts["prompts"], prompts["boxes"]) == (36, 4)
    assert prompts["min_iou"] >= 0.99 and prompts["max_score_delta"] <= 1e-4

    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count("| generate |") == 2 and report.count("| encoder |") == 2
    assert report.count("| profile |") == 2
    assert "| run | vit_t | fp32 |" in report and "| compile | vit_t | fp32 |" in report
    assert "| prompts | vit_t | fp32 |" in report


def test_no_phase_starts_once_the_budget_is_spent(tmp_path: Path, shared_images: Path) -> None:
    rows = bench_gpu(
        tmp_path / "out",
        "--images",
        str(shared_images / "dog.jpg"),
        "--budget-s",
        "0",
        "--run-images",
        "2",
        "--profile",
        "fp16",
        "--compile",
        "fp16",
    )
    skipped = [row["what"] for row in rows if row["phase"] == "skipped"]
    assert [row["phase"] for row in rows] == ["environment"] + ["skipped"] * len(skipped)
    assert skipped == [
        "generate vit_t fp32",
        "generate vit_t fp16",
        "generate vit_t bf16",
        "run",
        "profile vit_t fp16",
        "encoder vit_t fp32",
        "encoder vit_t fp16",
        "encoder vit_t bf16",
        "compile vit_t fp16",
    ]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_PYTHON.exists(), reason="needs the reference environment (make bench-env)")
def test_the_reference_phase_times_mobile_sam_beside_ours(tmp_path: Path, shared_images: Path) -> None:
    rows = bench_gpu(
        tmp_path / "out",
        "--images",
        str(shared_images / "dog.jpg"),
        str(shared_images / "groceries.jpg"),
        "--precisions",
        "fp32",
        "--points-per-side",
        "4",
        "--repeats",
        "1",
        "--run-images",
        "0",
        "--encoder-batches",
        "--reference",
        "--reference-python",
        str(REFERENCE_PYTHON),
        "--prompts",
        str(GOLDEN / "prompts"),
        "--prompt-boxes",
        "3",
        "--prompts-per-image",
        "2",
    )
    reference = next(row for row in rows if row["phase"] == "reference")
    assert set(reference["images"]) == {"dog.jpg", "groceries.jpg"}
    against = next(row for row in rows if row["phase"] == "agreement")
    assert against["compared"] == "fp32 vs the reference fp32 (cpu)"
    assert (against["min_recall"], against["min_precision"]) == (1.0, 1.0)
    assert against["reference_seconds_over_ours"] > 0
    # the reference predictor loops over the same 3 boxes, then 2 on each photo: the same scores
    (prompts,) = [row for row in rows if row["phase"] == "prompts"]
    assert (prompts["boxes"], prompts["many_boxes"]) == (3, 4)
    assert prompts["reference_boxes_per_second"] > 0 and prompts["reference_many_per_second"] > 0
    assert prompts["reference_boxes_max_score_delta"] <= 1e-4 and prompts["reference_many_max_score_delta"] <= 1e-4


def test_golden_files_are_found_only_for_the_parameters_they_were_made_with() -> None:
    found = golden_records(GOLDEN, ["dog.jpg", "truck.jpg", "no-such.jpg"], 32)
    assert set(found) == {"dog.jpg", "truck.jpg"}
    assert len(found["dog.jpg"]) == len(json.loads((GOLDEN / "dog.jpg.pps32.crop0.minarea0.json").read_text())["masks"])
    assert golden_records(GOLDEN, ["truck.jpg"], 16) == {}  # truck's 16x16 golden has a crop layer
    assert golden_records(None, ["dog.jpg"], 32) == {}


def test_agreement_rows_hold_the_worst_image() -> None:
    full, top = encode_rle(np.ones((2, 2), bool)), encode_rle(np.array([[1, 1], [0, 0]], bool))
    ours = {"a.jpg": [{"segmentation": full}], "b.jpg": [{"segmentation": full}, {"segmentation": top}]}
    theirs = {"a.jpg": [{"segmentation": full}], "b.jpg": [{"segmentation": full}]}
    row = agreement_row("x vs y", "vit_t", ours, theirs)
    assert (row["min_recall"], row["min_precision"]) == (1.0, 0.5)
    assert row["images"]["b.jpg"]["masks"] == [2, 1]
    assert "min recall 1.0, min precision 0.5 over 2 images" in format_report([row])


def test_model_specs_parse_random_and_seeded_weights_and_refuse_anything_else() -> None:
    assert MeasuredModel.parse("vit_h:random") == MeasuredModel("vit_h", True)
    assert MeasuredModel.parse("vit_t").label == "vit_t"
    assert MeasuredModel.parse("sam2.1_hiera_t:seeded") == MeasuredModel("sam2.1_hiera_t", False, seeded=True)
    with pytest.raises(argparse.ArgumentTypeError, match="MODEL:random or MODEL:seeded"):
        MeasuredModel.parse("vit_h:ones")
    with pytest.raises(argparse.ArgumentTypeError, match="seeded weights are made for vit_t_hq, sam2.1_hiera_t only"):
        MeasuredModel.parse("vit_h:seeded")


@pytest.mark.slow
def test_hq_sam_and_sam2_run_with_seeded_weights(tmp_path: Path, shared_images: Path) -> None:
    """The kit's other model families: generate with masks that follow the points (MobileSAM's
    weights where they are SAM's), fp16 failing alone on the CPU, no comparison with MobileSAM's
    golden files, and no other phase."""
    rows = bench_gpu(
        tmp_path / "out",
        "--images",
        str(shared_images / "dog.jpg"),
        "--golden",
        str(GOLDEN),
        "--models",
        "vit_t_hq:seeded",
        "sam2.1_hiera_t:seeded",
        "--precisions",
        "fp32",
        "fp16",
        "--points-per-side",
        "4",
        "--repeats",
        "1",
        "--run-images",
        "0",
        "--profile",
        "fp32",
        "--encoder-batches",
        "1",
        "--budget-s",
        "800",
    )
    by_phase: dict[str, list[dict]] = {}
    for row in rows:
        by_phase.setdefault(row["phase"], []).append(row)
    hq, sam2 = "vit_t_hq (seeded weights)", "sam2.1_hiera_t (seeded weights)"
    generated = {(row["model"], row["precision"]): row for row in by_phase["generate"]}
    assert set(generated) == {(hq, "fp32"), (sam2, "fp32")}
    assert all(row["images"]["dog.jpg"]["masks"] > 1 for row in generated.values())
    assert generated[sam2, "fp32"]["pred_iou_thresh"] == 0.56  # the tests' thresholds for these weights
    failed = {row["what"]: row["error"] for row in by_phase["failed"]}
    assert set(failed) == {f"generate {hq} fp16", f"generate {sam2} fp16"}
    assert all("fp16 needs a GPU" in error for error in failed.values())
    assert "agreement" not in by_phase  # MobileSAM's golden masks are not these models'
    assert set(by_phase) == {"environment", "generate", "failed"}
