"""`python -m benchmarks.reference`: MobileSAM's reference generator and sam-batch side by side.

On the same pixels, weights and grid, one after the other, never at once:
1. per image, in at least 2 rounds (`--rounds`), the order of the sides flipping every round
   (reference then ours, ours then reference, ...): the reference `SamAutomaticMaskGenerator`
   (output_mode "coco_rle") in a process of its own environment (`.venv-ref`, made by
   `make bench-env`, never ours), with `--threads` torch threads, and sam-batch in this process
   with as many threads (`build_engine` + `generate_masks` + `to_records`). Each times its
   `generate` call (encoder, decoder, filters, RLE records; the model loaded, the image decoded);
   the table gives each side's median over the rounds, their ratio, the number of masks and their
   agreement (recall and precision at IoU >= 0.9, mean best IoU), and a second table every round;
2. whole processes, start to exit: `sam-batch run` on a job over the same image files
   (interpreter, imports, the executor `run.executor: auto` picks (in process for a few images),
   reading, writing Parquet),
   then one reference process over all the images (interpreter, imports, model load, every
   `generate`): their wall times, the ratio, and the agreement of the masks `sam-batch run`
   wrote with the reference's.
The 1-minute load average is read before, every `LOAD_SAMPLE_S` s during and after the run: a
ratio whose measurement saw it above the thread count (whole process: the cores) by more than
`LOAD_MARGIN` is NOT VALID.
Each side's median is compared with its quiet baseline in the doc (`## Quiet baselines`): more
than `DRIFT_LIMIT` away is DRIFTED. Either makes the exit status `EXIT_SUSPECT`. Markdown on
stdout and, with `--write-doc`, a dated section appended to docs/benchmarks.md. Relative paths
(images, `--ref-venv`, `--doc`) are taken from the current directory, the checkout's root under
`make bench`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

from sam_batch.engines.registry import MODEL_TYPES

if TYPE_CHECKING:
    from sam_batch.engines.torch_backend import TorchEngine

MATCH_IOU = 0.9
# dog and groceries have golden files; rocket (640×427) and coffee (600×400) are scikit-image
# photos the project was not tuned on (tests/data/held_out).
DEFAULT_IMAGES = (
    "../shared/data/images/dog.jpg",
    "../shared/data/images/groceries.jpg",
    "tests/data/held_out/rocket.png",
    "tests/data/held_out/coffee.png",
)
MIN_ROUNDS = 2  # rounds per image; each round runs both sides, the order flipping every round
LOAD_SAMPLE_S = 5.0  # s between samples of the 1-minute load average while the bench runs
LOAD_MARGIN = 0.25  # the load a bench's own processes add beyond its threads, allowed (below, "Quiet baselines")
DRIFT_LIMIT = 0.15  # a side's median more than this far from its quiet baseline (relative) is flagged
EXIT_SUSPECT = 3  # exit status when a ratio is NOT VALID or a side drifted from its baseline
BASELINES_HEADING = "## Quiet baselines"
BASELINE_COLUMNS = ("image", "points per side", "threads", "side", "seconds", "CPU model", "measured")
SIDES = ("reference", "sam-batch")
DEFAULT_REF_VENV = ".venv-ref"
DEFAULT_DOC = "docs/benchmarks.md"

DOC_HEADER = """\
# Benchmarks

Written by `make bench` (`python -m benchmarks.reference --write-doc`), newest section last. Each run puts
MobileSAM's reference `SamAutomaticMaskGenerator` (its own environment, `.venv-ref`, made by
`make bench-env`) and sam-batch side by side on the same decoded pixels, the same checkpoint,
the same parameters and the same number of torch threads, one after the other, never at once.
Sections dated before 2026-12-04 12:00 UTC name the commands of their day: `sam-batch bench`,
`bench-memory`, `bench-gpu`, `bench-export` and `python -m sam_batch.bench_*` are now the
modules of the checkout's `benchmarks/` (README, *Benchmarks*).

- *reference s* / *sam-batch s*: the median, over the image's rounds, of the wall time of one
  `generate` call (image encoder, all point batches, filters, NMS, COCO RLE records), with the
  model loaded and the image decoded. Each image runs at least 2 rounds; each round runs both
  sides, the reference first in even rounds and sam-batch first in odd ones (R S, S R, ...), so a
  machine that speeds up or slows down meanwhile weighs on both; every round's seconds are listed.
- *whole process*: the reference's process over all the images (interpreter start, imports,
  model load, every `generate`) against `sam-batch run` on a job over the same files (the
  executor `run.executor` picks: until 2026-12-04 an embedded Ray with segmenting actors over all
  the cores; since, `auto`: in process for a few images; reading, writing Parquet), start to
  exit, once each; its agreement is that of the masks the run wrote, for the image that agrees
  least.
- *speed-up*: reference seconds / sam-batch seconds.
- *recall* / *precision*: share of the reference's masks found among ours / of ours found among
  the reference's, a match being a mask IoU >= 0.9; *mean best IoU*: the mean, over the
  reference's masks, of the best IoU any of ours reaches.
- *load*: the 1-minute load average (`os.getloadavg()`), read before the run, every 5 s during
  it and after it. *max load* is the highest reading from the start to the end of a ratio's
  measurement. A ratio whose max load exceeded the thread count (for the whole process: the
  cores, which `sam-batch run` uses all of) is printed *NOT VALID*: other processes shared the
  cores, the seconds are inflated, and unevenly, since the two sides run at different moments.
  The bench's own processes count in the load (Ray's too), so a valid run needs a machine that
  is otherwise idle.
- *vs baseline*: each side's median against its quiet baseline (below) for the same image,
  points per side, threads and CPU model; more than 15% either way is flagged *DRIFTED*: the
  machine, or the code, is not what it was when the baseline was measured, and the ratio is not
  comparable with earlier ones. *no baseline* where the table has no row.
- `python -m benchmarks.reference` exits with status 3 when any ratio is NOT VALID or any side DRIFTED (after
  printing, and writing the section with `--write-doc`), so `make bench` fails; only valid
  ratios of sides within 15% of their baselines are quoted elsewhere (README).

## Quiet baselines

Each side's `generate` seconds on a quiet machine, which `python -m benchmarks.reference` reads (the table
under this heading, these columns). Add a row by hand from a run whose ratio was valid and whose
other side was within 15% of its baseline (the bench prints such rows for sides that have
none); replace a sam-batch row when the code's speed changes, measured side by side.

| image | points per side | threads | side | seconds | CPU model | measured |
| --- | ---: | ---: | --- | ---: | --- | --- |
"""

REFERENCE_DRIVER = Path(__file__).with_name("reference_driver.py")  # run by the reference's Python


class BenchError(RuntimeError):
    """The benchmark cannot run (reference environment missing or failing)."""


@dataclass(frozen=True)
class Agreement:
    """How two mask sets agree: recall and precision at `MATCH_IOU`, mean best IoU.

    recall: share of reference masks with a match among ours (1.0 when there are none);
    precision: share of our masks with a match in the reference (1.0 when there are none);
    mean_best_iou: mean over reference masks of their best IoU with ours (nan without any).
    """

    recall: float
    precision: float
    mean_best_iou: float


@dataclass(frozen=True)
class Side:
    """One side's run on one image: `generate` seconds and its coco_rle records."""

    seconds: float
    records: list[dict]


@dataclass(frozen=True)
class Round:
    """One round on one image: both sides, in the order given by `reference_first`, and the
    highest 1-minute load average read from the round's start to its end."""

    reference: Side
    ours: Side
    reference_first: bool
    max_load: float


def load_is_valid(max_load: float, limit: int) -> bool:
    """Whether a measurement is valid: the 1-minute load never exceeded `limit` (threads or cores)
    by more than `LOAD_MARGIN`, what the bench's own Python threads and OpenMP's spinning workers
    add on an otherwise idle machine; any other process busy a quarter of the time or more adds as much."""
    return max_load <= limit + LOAD_MARGIN


def relative_drift(seconds: float, baseline_seconds: float) -> float:
    """How far `seconds` is from the baseline, as a fraction of it (+0.5: 50% slower)."""
    return seconds / baseline_seconds - 1.0


def is_drifted(drift: float | None) -> bool:
    """Whether a side's drift from its baseline exceeds `DRIFT_LIMIT` either way (None: no baseline)."""
    return drift is not None and abs(drift) > DRIFT_LIMIT


@dataclass(frozen=True)
class ImageTiming:
    """Both sides on one image over its rounds; `threads` is the load limit of its validity, the
    baselines (s) are the quiet ones for this image, grid, thread count and CPU, if any."""

    image: str
    height: int
    width: int
    rounds: tuple[Round, ...]
    threads: int
    reference_baseline: float | None = None
    ours_baseline: float | None = None

    @property
    def reference(self) -> Side:
        """The reference's first round (its records; `reference_seconds` is the median)."""
        return self.rounds[0].reference

    @property
    def ours(self) -> Side:
        """Our first round (its records; `ours_seconds` is the median)."""
        return self.rounds[0].ours

    @property
    def reference_seconds(self) -> float:
        """Median over the rounds of the reference's seconds."""
        return statistics.median(r.reference.seconds for r in self.rounds)

    @property
    def ours_seconds(self) -> float:
        """Median over the rounds of our seconds."""
        return statistics.median(r.ours.seconds for r in self.rounds)

    @property
    def speedup(self) -> float:
        """Median reference seconds over our median seconds."""
        return self.reference_seconds / self.ours_seconds

    @property
    def max_load(self) -> float:
        """Highest 1-minute load average read during any round."""
        return max(r.max_load for r in self.rounds)

    @property
    def valid(self) -> bool:
        """Whether the load stayed within the thread count throughout."""
        return load_is_valid(self.max_load, self.threads)

    @property
    def reference_drift(self) -> float | None:
        """The reference median's drift from its baseline (None without one)."""
        return (
            None if self.reference_baseline is None else relative_drift(self.reference_seconds, self.reference_baseline)
        )

    @property
    def ours_drift(self) -> float | None:
        """Our median's drift from its baseline (None without one)."""
        return None if self.ours_baseline is None else relative_drift(self.ours_seconds, self.ours_baseline)

    @property
    def drifted(self) -> bool:
        """Whether either side drifted more than `DRIFT_LIMIT` from its baseline."""
        return is_drifted(self.reference_drift) or is_drifted(self.ours_drift)

    @property
    def agreement(self) -> Agreement:
        """Agreement of our masks with the reference's (first round of each)."""
        return agreement(self.ours.records, self.reference.records)


def alternate_rounds(
    rounds: int, reference: Callable[[], Side], ours: Callable[[], Side], sampler: LoadSampler
) -> tuple[Round, ...]:
    """Run both sides `rounds` times, the reference first in even rounds and ours first in odd
    ones (R S, S R, ...), reading the load at each round's start and end (and `sampler`'s
    background readings in between)."""
    if rounds < MIN_ROUNDS:
        raise BenchError(f"at least {MIN_ROUNDS} rounds per image, not {rounds}")
    done = []
    for index in range(rounds):
        mark = sampler.sample()
        reference_first = index % 2 == 0
        if reference_first:
            theirs, mine = reference(), ours()
        else:
            mine, theirs = ours(), reference()
        done.append(Round(theirs, mine, reference_first, sampler.max_since(mark)))
    return tuple(done)


def one_minute_load() -> float:
    """The 1-minute load average (`os.getloadavg()`)."""
    return os.getloadavg()[0]


class LoadSampler:
    """Readings of the 1-minute load average: on demand (`sample`) and, between `start` and
    `stop`, every `interval_s` seconds on a daemon thread."""

    def __init__(self, read_load: Callable[[], float] = one_minute_load, interval_s: float = LOAD_SAMPLE_S) -> None:
        self._read_load = read_load
        self._interval_s = interval_s
        self._readings: list[float] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> int:
        """Read the load now; returns the reading's index, a mark for `max_since`."""
        load = self._read_load()
        with self._lock:
            self._readings.append(load)
            return len(self._readings) - 1

    def max_since(self, mark: int) -> float:
        """Read the load now; the highest reading from index `mark` on, this one included."""
        self.sample()
        with self._lock:
            return max(self._readings[mark:])

    @property
    def readings(self) -> list[float]:
        """Every reading so far, in order."""
        with self._lock:
            return list(self._readings)

    def start(self) -> None:
        """Start reading every `interval_s` s on a daemon thread."""
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background readings (waits for the thread)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            self.sample()


@dataclass(frozen=True)
class Baseline:
    """A quiet baseline: one side's `generate` seconds for an image, grid, thread count and CPU,
    and when it was measured (free text, e.g. the doc section's date)."""

    image: str
    points_per_side: int
    threads: int
    side: str
    seconds: float
    cpu_model: str
    measured: str


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_baselines(doc_text: str) -> list[Baseline]:
    """The rows of the table under `BASELINES_HEADING` (none without the heading); BenchError for a
    table whose columns are not `BASELINE_COLUMNS` or a row that does not parse."""
    lines = doc_text.splitlines()
    if BASELINES_HEADING not in lines:
        return []
    body = lines[lines.index(BASELINES_HEADING) + 1 :]
    table_start = next((i for i, line in enumerate(body) if line.startswith("|") or line.startswith("## ")), len(body))
    table = []
    for line in body[table_start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    if not table:
        return []
    if tuple(_cells(table[0])) != BASELINE_COLUMNS:
        raise BenchError(f"the quiet baselines' columns are not {' | '.join(BASELINE_COLUMNS)}: {table[0]}")
    return [_parse_baseline_row(line) for line in table[2:]]


def _parse_baseline_row(line: str) -> Baseline:
    cells = _cells(line)
    try:
        image, points, threads, side, seconds, cpu, measured = cells
        baseline = Baseline(image, int(points), int(threads), side, float(seconds), cpu, measured)
    except ValueError as error:
        raise BenchError(f"a quiet baseline row does not parse ({error}): {line}") from None
    if side not in SIDES or baseline.seconds <= 0:
        raise BenchError(f"a quiet baseline row names a side other than {' or '.join(SIDES)} or no seconds: {line}")
    return baseline


def find_baseline(
    baselines: list[Baseline], image: str, *, points_per_side: int, threads: int, side: str, cpu: str
) -> float | None:
    """The baseline seconds for this image, grid, thread count, side and CPU model, or None."""
    for b in baselines:
        if (b.image, b.points_per_side, b.threads, b.side, b.cpu_model) == (image, points_per_side, threads, side, cpu):
            return b.seconds
    return None


def format_baseline_row(baseline: Baseline) -> str:
    """One row of the quiet baselines table."""
    return (
        f"| {baseline.image} | {baseline.points_per_side} | {baseline.threads} | {baseline.side} "
        f"| {baseline.seconds:.1f} | {baseline.cpu_model} | {baseline.measured} |"
    )


def missing_baselines(results: list[ImageTiming], *, points_per_side: int, cpu: str, measured: str) -> list[Baseline]:
    """Baselines this run could seed: for each valid image, each side without one, provided the
    other side, if it has a baseline, did not drift."""
    found = []
    for r in results:
        if not r.valid:
            continue
        for side, seconds, own, other in (
            ("reference", r.reference_seconds, r.reference_baseline, r.ours_drift),
            ("sam-batch", r.ours_seconds, r.ours_baseline, r.reference_drift),
        ):
            if own is None and not is_drifted(other):
                found.append(Baseline(r.image, points_per_side, r.threads, side, seconds, cpu, measured))
    return found


def _as_rle(segmentation: dict) -> dict:
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def agreement(ours: list[dict], reference: list[dict], match_iou: float = MATCH_IOU) -> Agreement:
    """Compare two lists of coco_rle records (each with a `segmentation` RLE) by mask IoU."""
    if not ours or not reference:
        return Agreement(
            recall=float(not reference),
            precision=float(not ours),
            mean_best_iou=0.0 if reference else math.nan,
        )
    iou = np.asarray(
        mask_utils.iou(
            [_as_rle(r["segmentation"]) for r in ours],
            [_as_rle(r["segmentation"]) for r in reference],
            [0] * len(reference),
        )
    ).reshape(len(ours), len(reference))
    best_for_reference, best_for_ours = iou.max(axis=0), iou.max(axis=1)
    return Agreement(
        recall=float((best_for_reference >= match_iou).mean()),
        precision=float((best_for_ours >= match_iou).mean()),
        mean_best_iou=float(best_for_reference.mean()),
    )


def read_golden(path: Path) -> dict:
    """A golden file (`image`, `shape`, `params`, `masks`) with each mask's fields parsed from the
    strings they are stored as (`segmentation`, `bbox`, ...) into Python values."""
    data = json.loads(path.read_text())
    data["masks"] = [{k: _parse_field(v) for k, v in record.items()} for record in data["masks"]]
    return data


def _parse_field(value):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # Python reprs, single-quoted
        return json.loads(value.replace("'", '"'))


def _speedup_cell(speedup: float, valid: bool) -> str:
    return f"{speedup:.2f}×" if valid else f"{speedup:.2f}× NOT VALID"


def _drift_cell(drift: float | None) -> str:
    if drift is None:
        return "no baseline"
    return f"{drift:+.1%}" + (" DRIFTED" if is_drifted(drift) else "")


def format_table(results: list[ImageTiming]) -> str:
    """The per-image report as a Markdown table: medians over the rounds, validity, drift."""
    lines = [
        "| image | size | reference s | sam-batch s | speed-up | max load | reference vs baseline "
        f"| sam-batch vs baseline | masks ref | masks ours | recall@{MATCH_IOU} | precision@{MATCH_IOU} "
        "| mean best IoU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        a = r.agreement
        mean_iou = "n/a" if math.isnan(a.mean_best_iou) else f"{a.mean_best_iou:.4f}"
        lines.append(
            f"| {r.image} | {r.width}×{r.height} | {r.reference_seconds:.1f} | {r.ours_seconds:.1f} "
            f"| {_speedup_cell(r.speedup, r.valid)} | {r.max_load:.2f} | {_drift_cell(r.reference_drift)} "
            f"| {_drift_cell(r.ours_drift)} | {len(r.reference.records)} | {len(r.ours.records)} "
            f"| {a.recall:.3f} | {a.precision:.3f} | {mean_iou} |"
        )
    return "\n".join(lines)


def format_rounds(results: list[ImageTiming]) -> str:
    """Every round's seconds as a Markdown table, in the order they ran."""
    lines = [
        "| image | round | order | reference s | sam-batch s | max load |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        for index, one in enumerate(r.rounds):
            order = "reference, sam-batch" if one.reference_first else "sam-batch, reference"
            lines.append(
                f"| {r.image} | {index + 1} | {order} | {one.reference.seconds:.1f} | {one.ours.seconds:.1f} "
                f"| {one.max_load:.2f} |"
            )
    return "\n".join(lines)


def verdict(results: list[ImageTiming], whole: WholeProcess | None) -> list[str]:
    """One line per NOT VALID ratio and per drifted image; empty when every figure holds."""
    lines = [
        f"NOT VALID: {r.image}: 1-minute load reached {r.max_load:.2f}, above {r.threads} threads + {LOAD_MARGIN}"
        for r in results
        if not r.valid
    ]
    if whole is not None and not whole.valid:
        lines.append(
            f"NOT VALID: whole process: 1-minute load reached {whole.max_load:.2f}, above {whole.cores} cores + "
            f"{LOAD_MARGIN}"
        )
    lines += [
        f"DRIFTED: {r.image}: reference {_drift_cell(r.reference_drift)}, sam-batch {_drift_cell(r.ours_drift)} "
        f"against the quiet baselines (limit ±{DRIFT_LIMIT:.0%})"
        for r in results
        if r.drifted
    ]
    return lines


@dataclass(frozen=True)
class WholeProcess:
    """The reference's process and `sam-batch run`'s over the same images: wall seconds, and
    the agreement of the masks the run wrote with the reference's, per image in `images` order;
    the highest 1-minute load read while they ran and the cores it is held against."""

    reference_seconds: float
    ours_seconds: float
    agreements: list[Agreement]
    max_load: float
    cores: int

    @property
    def speedup(self) -> float:
        return self.reference_seconds / self.ours_seconds

    @property
    def valid(self) -> bool:
        """Whether the load stayed within the cores (`sam-batch run` uses all of them)."""
        return load_is_valid(self.max_load, self.cores)


def format_whole_process(run: WholeProcess, n_images: int) -> str:
    """The whole-process comparison as a one-row Markdown table (worst image's agreement)."""
    recall = min(a.recall for a in run.agreements)
    precision = min(a.precision for a in run.agreements)
    return "\n".join(
        [
            f"| whole process | images | reference s | `sam-batch run` s | speed-up | max load "
            f"| min recall@{MATCH_IOU} "
            f"| min precision@{MATCH_IOU} |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| start to exit | {n_images} | {run.reference_seconds:.1f} | {run.ours_seconds:.1f} "
            f"| {_speedup_cell(run.speedup, run.valid)} | {run.max_load:.2f} | {recall:.3f} | {precision:.3f} |",
        ]
    )


@dataclass(frozen=True)
class Machine:
    """What the doc section says about where and how the run happened (loads: 1-minute averages)."""

    cores: int
    cpu_model: str
    threads: int
    torch_ours: str
    torch_reference: str
    mobile_sam: str
    load_before: float
    load_max: float
    load_after: float


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_section(
    results: list[ImageTiming],
    whole: WholeProcess | None,
    machine: Machine,
    *,
    model_type: str,
    points_per_side: int,
    command: str,
    when: datetime.datetime,
    note: str | None = None,
) -> str:
    """One dated Markdown section for docs/benchmarks.md."""
    lines = [
        f"## {when:%Y-%m-%d %H:%M} UTC — {model_type}, {points_per_side}×{points_per_side} points, "
        f"{machine.threads} threads",
        "",
        f"- machine: {machine.cores} cores (`nproc`), {machine.cpu_model}",
        f"- reference: mobilesam-mirror {machine.mobile_sam}, torch {machine.torch_reference} (`.venv-ref`)",
        f"- sam-batch: torch {machine.torch_ours}",
        f"- command: `{command}`",
        f"- load (1-min average) before / max during / after: {machine.load_before:.2f} / "
        f"{machine.load_max:.2f} / {machine.load_after:.2f}",
    ]
    if note:
        lines.append(f"- note: {note}")
    lines += [f"- {line}" for line in verdict(results, whole) or ["every ratio valid, no side drifted"]]
    lines += ["", format_table(results), "", format_rounds(results), ""]
    if whole is not None:
        lines += [format_whole_process(whole, len(results)), ""]
    return "\n".join(lines)


def append_section(doc: Path, section: str) -> None:
    """Append a section to the benchmarks doc, creating it with its header if missing."""
    text = doc.read_text() if doc.exists() else DOC_HEADER
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n\n" + section)


def reference_python(ref_venv: Path) -> Path:
    """The reference environment's interpreter; BenchError when the environment is missing."""
    python = ref_venv / "bin" / "python"
    if not python.exists():
        raise BenchError(f"the reference environment {ref_venv} is missing: run `make bench-env` first")
    return python


def save_pixels(images: list[np.ndarray], folder: Path) -> list[Path]:
    """Each image (H, W, 3) uint8 as `folder`/image{i}.npy, the reference driver's input."""
    paths = [folder / f"image{i}.npy" for i in range(len(images))]
    for path, image in zip(paths, images):
        np.save(path, image)
    return paths


def run_reference(
    python: Path,
    pixels: list[Path],
    checkpoint: Path,
    *,
    model_type: str,
    points_per_side: int,
    threads: int,
    device: str = "cpu",
    warm_up: bool = False,
    isolated: bool = True,
    log=print,
) -> tuple[list[Side], dict, float]:
    """The reference generator on every .npy of `pixels`, in one subprocess of `python`.

    On `device`, after one untimed `generate` with `warm_up`; `isolated` runs `python -I`
    (its own environment only), else it sees this process's PYTHONPATH.
    Returns its side per image, the versions it reports (torch, mobile_sam) and the process's
    wall time in s (interpreter start, imports, model load, every `generate`).
    """
    outs = [p.with_suffix(".reference.json") for p in pixels]
    spec = {
        "model_type": model_type,
        "checkpoint": str(checkpoint),
        "points_per_side": points_per_side,
        "threads": threads,
        "device": device,
        "warm_up": warm_up,
        "images": [[str(p), str(o)] for p, o in zip(pixels, outs)],
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(python), *(["-I"] if isolated else []), str(REFERENCE_DRIVER), json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    check_exit(proc, _echo_lines(proc, proc.stderr, log), "the reference generator")
    stdout = proc.stdout.read()
    seconds = time.perf_counter() - started
    sides = [Side(**json.loads(out.read_text())) for out in outs]
    return sides, json.loads(stdout.strip().splitlines()[-1]), seconds


def write_run_job(
    workdir: Path,
    name: str,
    uris: list[str],
    *,
    model_type: str,
    checkpoint: str | None,
    points_per_side: int,
    **sections: dict,
) -> Path:
    """workdir/job.yaml: a job over `uris` writing into workdir/out; `sections` add job sections
    (`engine`, `raster`, `run`, ...). Returns its path."""
    import yaml

    job = {
        "name": name,
        "input": {"uris": list(uris)},
        "model": {"type": model_type, "checkpoint": checkpoint},
        "amg": {"points_per_side": points_per_side},
        "output": {"uri": str(workdir / "out")},
        **sections,
    }
    job_file = workdir / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    return job_file


def run_pipeline(
    uris: list[str], workdir: Path, *, model_type: str, checkpoint: Path, points_per_side: int, log=print
) -> tuple[dict[str, list[dict]], float]:
    """`sam-batch run` as a process on a job over `uris`, written under `workdir`.

    Returns the masks it wrote per image URI (coco_rle-like records, in mask order) and the
    process's wall time in s.
    """
    import pyarrow.parquet as pq

    from sam_batch.jobs.job_rules import normalise_uri

    job_file = write_run_job(
        workdir, "bench", uris, model_type=model_type, checkpoint=str(checkpoint), points_per_side=points_per_side
    )
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sam_batch.cli", "run", str(job_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    check_exit(proc, _echo_lines(proc, proc.stdout, log), "sam-batch run")
    seconds = time.perf_counter() - started
    rows = pq.read_table(workdir / "out" / "masks", columns=["image_uri", "mask_id", "segmentation"]).to_pylist()
    by_listed = {normalise_uri(uri): uri for uri in uris}  # the run lists local paths absolute
    records: dict[str, list[dict]] = {uri: [] for uri in uris}
    for row in sorted(rows, key=lambda r: (r["image_uri"], r["mask_id"])):
        records[by_listed[row["image_uri"]]].append({"segmentation": row["segmentation"]})
    return records, seconds


def check_exit(proc: subprocess.Popen | subprocess.CompletedProcess, output: str, what: str) -> None:
    """BenchError with the last line `proc` wrote, if it failed."""
    if proc.returncode != 0:
        last = (output.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{what} failed (exit {proc.returncode}): {last}")


def _echo_lines(proc: subprocess.Popen, stream, log) -> str:
    """Pass each line of `stream` to `log` as `proc` writes it, wait for `proc`; the lines read."""
    lines = []
    for line in stream:
        lines.append(line)
        log(f"  | {line.rstrip()}")
    proc.wait()
    return "".join(lines)


def run_ours(engine: TorchEngine, image: np.ndarray, points_per_side: int, **thresholds: float) -> Side:
    """sam-batch's generator on `image` (at `thresholds` where given, else the defaults), timed
    like the reference's `generate`."""
    from sam_batch.pipeline.amg import generate_masks, to_records
    from sam_batch.pipeline.params import AmgParams

    params = AmgParams(points_per_side=points_per_side, **thresholds)
    start = time.perf_counter()
    records = to_records(generate_masks(engine, image, params))
    return Side(time.perf_counter() - start, records)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reference",
        description="MobileSAM's reference generator and sam-batch side by side on the same images.",
    )
    parser.add_argument(
        "--images",
        nargs="+",
        default=list(DEFAULT_IMAGES),
        metavar="IMAGE",
        help="image paths or fsspec URLs (default: dog.jpg and groceries.jpg from ../shared, "
        "rocket.png and coffee.png from tests/data/held_out)",
    )
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument(
        "--rounds",
        type=int,
        default=MIN_ROUNDS,
        help=f"rounds per image, both sides each, order alternating (at least {MIN_ROUNDS})",
    )
    parser.add_argument("--model", default="vit_t", choices=MODEL_TYPES)
    parser.add_argument(
        "--checkpoint", default=None, help="path or URL of the weights both sides load (default: the cached default)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all cores)")
    parser.add_argument(
        "--ref-venv",
        type=Path,
        default=Path(DEFAULT_REF_VENV),
        help=f"the reference environment (default: {DEFAULT_REF_VENV})",
    )
    parser.add_argument(
        "--no-whole-process",
        dest="whole_process",
        action="store_false",
        help="skip the whole-process comparison with `sam-batch run`",
    )
    parser.add_argument("--write-doc", action="store_true", help="append a dated section to --doc")
    parser.add_argument("--doc", type=Path, default=Path(DEFAULT_DOC), help=f"(default: {DEFAULT_DOC})")
    parser.add_argument("--note", default=None, help="a remark to add to the doc section")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `python -m benchmarks.reference`; returns the exit status: 0, 1 when the bench cannot run,
    `EXIT_SUSPECT` when a ratio is NOT VALID or a side drifted from its baseline.

    A leading `--` is dropped: `python -m benchmarks.reference -- --images ...` hands the options through
    the top-level parser, which would otherwise take an option-first tail as its own.
    """
    parser = _parser()
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds: at least {MIN_ROUNDS}")
    try:
        python = reference_python(args.ref_venv)
    except BenchError as error:
        print(f"benchmarks.reference: {error}", file=sys.stderr)
        return 1
    try:
        return _bench(args, python, argv)
    except BenchError as error:
        print(f"benchmarks.reference: {error}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace, python: Path, argv: list[str]) -> int:
    """Both sides on every image, the report, and the doc section if asked."""
    import torch

    from sam_batch.engines.backend import keep_freed_memory, set_cpu_threads
    from sam_batch.engines.checkpoints import resolve_checkpoint
    from sam_batch.engines.factory import build_engine
    from sam_batch.pipeline.images import load_image

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sampler = LoadSampler()
    first = sampler.sample()
    load_before = sampler.readings[first]
    sampler.start()
    try:
        threads = set_cpu_threads(args.threads)
        keep_freed_memory()  # as a segmenting worker does
        checkpoint = resolve_checkpoint(args.model, args.checkpoint, None, log=progress)
        engine = build_engine(args.model, str(checkpoint), device="cpu")
        baselines = parse_baselines(args.doc.read_text()) if args.doc.exists() else []
        cpu = cpu_model()
        with tempfile.TemporaryDirectory(prefix="sam-batch-bench-") as tmp:
            images = [load_image(uri) for uri in args.images]
            pixels = save_pixels(images, Path(tmp))
            results, versions = [], {}
            for uri, image, path in zip(args.images, images, pixels):

                def reference(path: Path = path, uri: str = uri) -> Side:
                    [side], found, _ = run_reference(
                        python,
                        [path],
                        checkpoint,
                        model_type=args.model,
                        points_per_side=args.points_per_side,
                        threads=threads,
                        log=progress,
                    )
                    versions.update(found)
                    progress(f"{uri}: reference {side.seconds:.1f}s, {len(side.records)} masks")
                    return side

                def ours(image: np.ndarray = image, uri: str = uri) -> Side:
                    side = run_ours(engine, image, args.points_per_side)
                    progress(f"{uri}: sam-batch {side.seconds:.1f}s, {len(side.records)} masks")
                    return side

                name = Path(uri).name
                lookup = dict(points_per_side=args.points_per_side, threads=threads, cpu=cpu)
                results.append(
                    ImageTiming(
                        name,
                        image.shape[0],
                        image.shape[1],
                        alternate_rounds(args.rounds, reference, ours, sampler),
                        threads,
                        reference_baseline=find_baseline(baselines, name, side="reference", **lookup),
                        ours_baseline=find_baseline(baselines, name, side="sam-batch", **lookup),
                    )
                )
            whole = None
            if args.whole_process:
                whole = _whole_process(args, python, checkpoint, pixels, threads, sampler, Path(tmp), progress)
        last = sampler.sample()
        load_after = sampler.readings[last]
    finally:
        sampler.stop()
    when = datetime.datetime.now(datetime.timezone.utc)
    print(format_table(results))
    print()
    print(format_rounds(results))
    if whole is not None:
        print()
        print(format_whole_process(whole, len(results)))
    seeds = missing_baselines(
        results,
        points_per_side=args.points_per_side,
        cpu=cpu,
        measured=f"{when:%Y-%m-%d %H:%M} UTC `python -m benchmarks.reference`",
    )
    if seeds:
        print(f"\nRows this run could add under {BASELINES_HEADING!r} in {args.doc} (sides without a baseline):")
        print("\n".join(format_baseline_row(b) for b in seeds))
    if args.write_doc:
        machine = Machine(
            cores=len(os.sched_getaffinity(0)),
            cpu_model=cpu,
            threads=threads,
            torch_ours=torch.__version__,
            torch_reference=versions["torch"],
            mobile_sam=versions["mobile_sam"],
            load_before=load_before,
            load_max=max(sampler.readings),
            load_after=load_after,
        )
        section = format_section(
            results,
            whole,
            machine,
            model_type=args.model,
            points_per_side=args.points_per_side,
            command=shlex.join(["python", "-m", "benchmarks.reference", *argv]),
            when=when,
            note=args.note,
        )
        append_section(args.doc, section)
        print(f"appended to {args.doc}", file=sys.stderr)
    problems = verdict(results, whole)
    for line in problems:
        print(f"benchmarks.reference: {line}", file=sys.stderr)
    return EXIT_SUSPECT if problems else 0


def _whole_process(
    args: argparse.Namespace,
    python: Path,
    checkpoint: Path,
    pixels: list[Path],
    threads: int,
    sampler: LoadSampler,
    workdir: Path,
    progress: Callable[[str], None],
) -> WholeProcess:
    """`sam-batch run`, then the reference's process, over every image; the load held against the cores."""
    progress(f"whole processes: sam-batch run, then the reference generator, on {len(pixels)} images")
    mark = sampler.sample()
    written, run_seconds = run_pipeline(
        args.images,
        workdir,
        model_type=args.model,
        checkpoint=checkpoint,
        points_per_side=args.points_per_side,
        log=progress,
    )
    references, _, reference_seconds = run_reference(
        python,
        pixels,
        checkpoint,
        model_type=args.model,
        points_per_side=args.points_per_side,
        threads=threads,
        log=progress,
    )
    return WholeProcess(
        reference_seconds,
        run_seconds,
        [agreement(written[uri], reference.records) for uri, reference in zip(args.images, references)],
        max_load=sampler.max_since(mark),
        cores=len(os.sched_getaffinity(0)),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
