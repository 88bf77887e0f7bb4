"""`python -m benchmarks.reference` without the reference environment: mask agreement, the alternating rounds
and their medians, the load rule (NOT VALID), the drift from quiet baselines, the report, the doc
section, and the one-line refusal when `.venv-ref` is missing. Timing sides and the load are
fakes: no timed assertions."""

from __future__ import annotations

import datetime
import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from benchmarks.reference import (
    DEFAULT_IMAGES,
    DOC_HEADER,
    Agreement,
    Baseline,
    BenchError,
    ImageTiming,
    LoadSampler,
    Machine,
    Round,
    Side,
    WholeProcess,
    agreement,
    alternate_rounds,
    append_section,
    find_baseline,
    format_baseline_row,
    format_rounds,
    format_section,
    format_table,
    format_whole_process,
    main,
    missing_baselines,
    parse_baselines,
    verdict,
)
from sam_batch.pipeline.rle import encode_rle
from shared_data import REPO, TEST_DATA


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


def example_result(
    *, max_load: float = 1.5, reference_baseline: float | None = None, ours_baseline: float | None = None
) -> ImageTiming:
    """dog.jpg over two rounds: the reference 140 and 160 s (median 150), ours 50 and 70 s (60)."""
    masks = [record(box(0, 10, 0, 10)), record(box(10, 20, 5, 25))]
    rounds = (
        Round(Side(140.0, masks), Side(50.0, masks[:1]), reference_first=True, max_load=1.0),
        Round(Side(160.0, masks), Side(70.0, masks[:1]), reference_first=False, max_load=max_load),
    )
    return ImageTiming(
        "dog.jpg", 20, 30, rounds, threads=2, reference_baseline=reference_baseline, ours_baseline=ours_baseline
    )


def test_table_reports_medians_ratio_load_drift_counts_and_agreement() -> None:
    lines = format_table([example_result(reference_baseline=145.0)]).splitlines()
    assert lines[0].startswith(
        "| image | size | reference s | sam-batch s | speed-up | max load | reference vs baseline"
    )
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == [
        "dog.jpg",
        "30×20",
        "150.0",
        "60.0",
        "2.50×",
        "1.50",
        "+3.4%",
        "no baseline",
        "2",
        "1",
        "0.500",
        "1.000",
        "0.5000",
    ]


class FakeLoad:
    """A load average that reads `values` in turn (the last one thereafter)."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def __call__(self) -> float:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def test_rounds_alternate_the_order_and_report_the_medians() -> None:
    calls: list[str] = []
    seconds = {"reference": iter([100.0, 300.0, 200.0, 110.0]), "ours": iter([10.0, 30.0, 20.0, 11.0])}

    def side(name: str):
        def run() -> Side:
            calls.append(name)
            return Side(next(seconds[name]), [])

        return run

    rounds = alternate_rounds(4, side("reference"), side("ours"), LoadSampler(FakeLoad(0.5)))
    assert calls == ["reference", "ours", "ours", "reference", "reference", "ours", "ours", "reference"]
    assert [r.reference_first for r in rounds] == [True, False, True, False]
    result = ImageTiming("x.png", 1, 1, rounds, threads=2)
    assert (result.reference_seconds, result.ours_seconds) == (155.0, 15.5)  # of 4: mean of the middle two
    assert result.speedup == 10.0
    rows = format_rounds([result]).splitlines()[2:]
    assert [c.strip() for c in rows[1].strip("|").split("|")] == [
        "x.png",
        "2",
        "sam-batch, reference",
        "300.0",
        "30.0",
        "0.50",
    ]


def test_fewer_than_two_rounds_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BenchError):
        alternate_rounds(1, lambda: Side(1.0, []), lambda: Side(1.0, []), LoadSampler(FakeLoad(0.0)))
    with pytest.raises(SystemExit):
        main(["--rounds", "1", "--ref-venv", str(tmp_path)])
    assert "--rounds: at least 2" in capsys.readouterr().err


def test_a_round_keeps_the_highest_load_read_during_it() -> None:
    # each round reads the load at its start and end; the sampler's background readings fall in between
    sampler = LoadSampler(FakeLoad(0.4, 1.9, 0.3, 2.6, 1.0))
    rounds = alternate_rounds(2, lambda: Side(100.0, []), lambda: Side(20.0, []), sampler)
    assert [r.max_load for r in rounds] == [1.9, 2.6]
    result = ImageTiming("x.png", 1, 1, rounds, threads=2)
    assert result.max_load == 2.6 and not result.valid
    assert ImageTiming("x.png", 1, 1, rounds, threads=3).valid


def test_load_sampler_reads_in_the_background_until_stopped() -> None:
    enough = threading.Event()
    reads: list[float] = []

    def read() -> float:
        reads.append(1.0)
        if len(reads) >= 3:
            enough.set()
        return float(len(reads))

    sampler = LoadSampler(read, interval_s=0.001)
    mark = sampler.sample()
    sampler.start()
    assert enough.wait(timeout=30)
    sampler.stop()
    count = len(sampler.readings)
    assert count >= 3 and sampler.max_since(mark) == count + 1
    assert len(reads) == count + 1  # nothing read after stop but the explicit reading


def test_a_loaded_run_prints_not_valid() -> None:
    result = example_result(max_load=2.5)  # above its 2 threads
    cells = [c.strip() for c in format_table([result]).splitlines()[2].strip("|").split("|")]
    assert cells[4] == "2.50× NOT VALID" and cells[5] == "2.50"
    whole = WholeProcess(300.0, 60.0, [Agreement(1.0, 1.0, 1.0)], max_load=2.3, cores=2)
    assert "5.00× NOT VALID" in format_whole_process(whole, 1)
    assert verdict([result], whole) == [
        "NOT VALID: dog.jpg: 1-minute load reached 2.50, above 2 threads + 0.25",
        "NOT VALID: whole process: 1-minute load reached 2.30, above 2 cores + 0.25",
    ]
    assert verdict([example_result(max_load=2.25)], None) == []  # at the limit (threads + LOAD_MARGIN): valid


def test_drift_beyond_15_percent_either_way_is_flagged() -> None:
    within = example_result(reference_baseline=150.0 / 1.149, ours_baseline=60.0 / 0.851)
    assert not within.drifted and verdict([within], None) == []
    slow_reference = example_result(reference_baseline=100.0)  # the median, 150 s, is 50% slower
    assert slow_reference.drifted and slow_reference.reference_drift == pytest.approx(0.5)
    cells = [c.strip() for c in format_table([slow_reference]).splitlines()[2].strip("|").split("|")]
    assert cells[6] == "+50.0% DRIFTED" and cells[4] == "2.50×"
    fast_ours = example_result(ours_baseline=80.0)  # 60 s against 80: 25% faster
    assert fast_ours.drifted
    assert verdict([fast_ours], None) == [
        "DRIFTED: dog.jpg: reference no baseline, sam-batch -25.0% DRIFTED against the quiet baselines (limit ±15%)"
    ]


BASELINES_DOC = """# Benchmarks

## Quiet baselines

Some words.

| image | points per side | threads | side | seconds | CPU model | measured |
| --- | ---: | ---: | --- | ---: | --- | --- |
| dog.jpg | 32 | 2 | reference | 166.0 | AMD EPYC | 2026-12-01 11:59 UTC `make bench` |
| dog.jpg | 4 | 2 | sam-batch | 3.5 | AMD EPYC | by hand |

## 2026-12-01 11:59 UTC — vit_t, 32×32 points, 2 threads

| image | size | reference s |
| --- | --- | ---: |
| dog.jpg | 800×534 | 166.0 |
"""


def test_baselines_parse_from_their_block_only() -> None:
    baselines = parse_baselines(BASELINES_DOC)
    assert baselines == [
        Baseline("dog.jpg", 32, 2, "reference", 166.0, "AMD EPYC", "2026-12-01 11:59 UTC `make bench`"),
        Baseline("dog.jpg", 4, 2, "sam-batch", 3.5, "AMD EPYC", "by hand"),
    ]
    assert format_baseline_row(baselines[0]) == BASELINES_DOC.splitlines()[8]
    key = dict(points_per_side=32, threads=2, side="reference", cpu="AMD EPYC")
    assert find_baseline(baselines, "dog.jpg", **key) == 166.0
    assert find_baseline(baselines, "dog.jpg", **{**key, "threads": 1}) is None
    assert find_baseline(baselines, "dog.jpg", **{**key, "cpu": "Intel Xeon"}) is None
    assert find_baseline(baselines, "groceries.jpg", **key) is None
    assert parse_baselines("# Benchmarks\n\n## 2026 — no baselines here\n") == []
    assert parse_baselines(DOC_HEADER) == []  # the header's table has no rows yet


def test_the_projects_doc_carries_the_rules_and_the_seeded_baselines() -> None:
    text = (REPO / "docs" / "benchmarks.md").read_text()
    assert text.startswith(DOC_HEADER.split("## Quiet baselines")[0])
    references = {
        b.image: b.seconds
        for b in parse_baselines(text)
        if (b.points_per_side, b.threads, b.side) == (32, 2, "reference")
    }
    assert references == {"dog.jpg": 166.0, "groceries.jpg": 162.2, "rocket.png": 138.8, "coffee.png": 135.3}
    ours = {b.image: b.seconds for b in parse_baselines(text) if b.side == "sam-batch"}
    assert ours == {"rocket.png": 14.9, "coffee.png": 13.8}


@pytest.mark.parametrize(
    "bad",
    [
        "| dog.jpg | 32 | 2 | reference | fast | AMD EPYC | x |",
        "| dog.jpg | 32 | 2 | theirs | 166.0 | AMD EPYC | x |",
        "| dog.jpg | 32 | 2 | reference | 166.0 | AMD EPYC |",
    ],
)
def test_a_baseline_row_that_does_not_parse_is_an_error(bad: str) -> None:
    lines = BASELINES_DOC.splitlines()
    lines[9] = bad
    with pytest.raises(BenchError, match="quiet baseline row"):
        parse_baselines("\n".join(lines))


def test_baselines_with_other_columns_are_an_error() -> None:
    with pytest.raises(BenchError, match="columns"):
        parse_baselines(BASELINES_DOC.replace("| CPU model |", "| cpu |"))


def test_a_valid_run_offers_rows_for_sides_without_a_baseline() -> None:
    seeds = missing_baselines(
        [example_result(reference_baseline=150.0)], points_per_side=32, cpu="AMD EPYC", measured="today"
    )
    assert seeds == [Baseline("dog.jpg", 32, 2, "sam-batch", 60.0, "AMD EPYC", "today")]
    assert (
        missing_baselines([example_result(reference_baseline=100.0)], points_per_side=32, cpu="c", measured="t") == []
    )  # the reference drifted: nothing to seed from
    assert missing_baselines([example_result(max_load=3.0)], points_per_side=32, cpu="c", measured="t") == []


def test_default_images_add_two_held_out_photos() -> None:
    names = [Path(p).name for p in DEFAULT_IMAGES]
    assert names[:2] == ["dog.jpg", "groceries.jpg"]
    held_out = [TEST_DATA / "held_out" / name for name in names[2:]]
    assert len(held_out) == 2 and all(p.exists() and Path(f"{p}.json").exists() for p in held_out)


def test_doc_section_names_machine_versions_command_date_and_verdict(tmp_path: Path) -> None:
    machine = Machine(
        cores=2,
        cpu_model="AMD EPYC",
        threads=2,
        torch_ours="2.13.0+cpu",
        torch_reference="2.14.1",
        mobile_sam="1.0.0",
        load_before=1.5,
        load_max=2.75,
        load_after=3.25,
    )
    whole = WholeProcess(320.0, 80.0, [Agreement(1.0, 0.99, 0.98)], max_load=1.5, cores=2)
    section = format_section(
        [example_result(max_load=2.75)],
        whole,
        machine,
        model_type="vit_t",
        points_per_side=32,
        command="python -m benchmarks.reference --write-doc",
        when=datetime.datetime(2025, 1, 2, 3, 4),
        note="other work ran meanwhile",
    )
    assert section.startswith("## 2025-01-02 03:04 UTC — vit_t, 32×32 points, 2 threads\n")
    for expected in (
        "2 cores (`nproc`), AMD EPYC",
        "torch 2.14.1",
        "mobilesam-mirror 1.0.0",
        "torch 2.13.0+cpu",
        "`python -m benchmarks.reference --write-doc`",
        "1.50 / 2.75 / 3.25",
        "note: other work ran meanwhile",
        "| dog.jpg |",
        "2.50× NOT VALID",
        "- NOT VALID: dog.jpg: 1-minute load reached 2.75, above 2 threads + 0.25",
        "| dog.jpg | 2 | sam-batch, reference | 160.0 | 70.0 | 2.75 |",
        "| start to exit | 1 | 320.0 | 80.0 | 4.00× | 1.50 |",
    ):
        assert expected in section
    quiet = format_section(
        [example_result()],
        None,
        machine,
        model_type="vit_t",
        points_per_side=32,
        command="c",
        when=datetime.datetime(2025, 1, 2, 3, 4),
    )
    assert "- every ratio valid, no side drifted" in quiet
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
        [sys.executable, "-m", "benchmarks.reference", "--", "--ref-venv", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"benchmarks.reference: the reference environment {tmp_path / 'nowhere'} is missing: run `make bench-env` first"
    ]


def test_whole_process_row_reports_the_worst_image() -> None:
    run = WholeProcess(300.0, 60.0, [Agreement(1.0, 0.98, 0.99), Agreement(0.97, 1.0, 0.95)], max_load=1.25, cores=2)
    lines = format_whole_process(run, 2).splitlines()
    assert len(lines) == 3 and lines[0].startswith("| whole process | images | reference s | `sam-batch run` s")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["start to exit", "2", "300.0", "60.0", "5.00×", "1.25", "0.970", "0.980"]
