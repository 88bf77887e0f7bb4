"""`python -m benchmarks.run_overhead`: what `sam-batch run` costs beyond the model, as a user times it.

Two comparisons, each in fresh `sam-batch run` processes whose variants alternate round by round
(A B, B A, ...):

1. *fixed cost*: a run over one `TINY_SIDE_PX`² image (dog.jpg shrunk) at `TINY_POINTS`² points,
   process start to exit (interpreter, imports, model load, the image, Parquet, exit), with
   `run.executor: auto` (one image: in process) and `run.executor: ray` (an embedded Ray, one
   segmenting actor). Issue #23's bar is `FIXED_COST_BAR_S` for the first.
2. *an image inside a run*: one photo at 32×32 points with `run.executor: local` and `ray`: each
   run's `stage_seconds.segment` from run.json (the image's tiles through the model and the
   generator, the model already built, the records and the write left out on both sides), and
   the run's own seconds. On Ray the image is segmented in a segmenting actor; in process, in the
   driver's process.

The 1-minute load average is read at every run's start and end and every `LOAD_SAMPLE_S` s in
between; a comparison whose runs saw it above the cores by more than `LOAD_MARGIN` is NOT VALID,
and the exit status is then `EXIT_SUSPECT`. Markdown on stdout.

    .venv/bin/python -m benchmarks.run_overhead [--rounds N] [--photo PATH] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.reference import (
    EXIT_SUSPECT,
    LOAD_MARGIN,
    LOAD_SAMPLE_S,
    MIN_ROUNDS,
    BenchError,
    LoadSampler,
    check_exit,
    cpu_model,
    load_is_valid,
    write_run_job,
)

TINY_SIDE_PX = 64
TINY_POINTS = 4
PHOTO_POINTS = 32
FIXED_COST_BAR_S = 5.0  # issue #23: a run over one tiny image, start to exit
ACTOR_BAR = 0.05  # issue #23: an image in a segmenting actor costs at most this much more than in process
DOG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "images" / "dog.jpg"
DEFAULT_PHOTO = Path(__file__).resolve().parents[1] / "tests" / "data" / "held_out" / "rocket.png"


@dataclass(frozen=True)
class RunTiming:
    """One `sam-batch run` process: its wall seconds (start to exit), run.json's executor,
    segment seconds and masks, and the highest 1-minute load read while it ran."""

    variant: str
    seconds: float
    executor: str
    segment_seconds: float
    masks: int
    max_load: float


@dataclass(frozen=True)
class Comparison:
    """Two variants of one job over the same rounds, in the order they ran."""

    title: str
    variants: tuple[str, str]
    runs: tuple[RunTiming, ...]
    cores: int

    def of(self, variant: str) -> list[RunTiming]:
        return [r for r in self.runs if r.variant == variant]

    def median(self, variant: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in self.of(variant))

    def ratio(self, field: str) -> float:
        """The second variant's median `field` over the first's."""
        first, second = self.variants
        return self.median(second, field) / self.median(first, field)

    @property
    def max_load(self) -> float:
        return max(r.max_load for r in self.runs)

    @property
    def valid(self) -> bool:
        return load_is_valid(self.max_load, self.cores)


def time_run(job_file: Path, variant: str, sampler: LoadSampler) -> RunTiming:
    """`sam-batch run job_file` in a fresh process over a fresh output, timed start to exit."""
    shutil.rmtree(job_file.parent / "out", ignore_errors=True)
    mark = sampler.sample()
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sam_batch.cli", "run", str(job_file)], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    max_load = sampler.max_since(mark)
    check_exit(proc, proc.stderr, f"sam-batch run ({variant})")
    summary = json.loads((job_file.parent / "out" / "run.json").read_text())
    return RunTiming(
        variant, seconds, summary["executor"], summary["stage_seconds"]["segment"], summary["masks"], max_load
    )


def compare(
    title: str, image: Path, points: int, executors: tuple[str, str], rounds: int, checkpoint: str | None, root: Path
) -> Comparison:
    """`rounds` runs of each executor on one image, alternating, the first executor first in even rounds."""
    jobs = {}
    for executor in executors:
        workdir = root / f"{title.split()[0]}-{executor}"
        workdir.mkdir(parents=True)
        jobs[executor] = write_run_job(
            workdir,
            "run-overhead",
            [str(image)],
            model_type="vit_t",
            checkpoint=checkpoint,
            points_per_side=points,
            run={"executor": executor},
        )
    sampler = LoadSampler()
    sampler.start()
    try:
        runs = []
        for index in range(rounds):
            for executor in executors if index % 2 == 0 else executors[::-1]:
                runs.append(time_run(jobs[executor], executor, sampler))
                print(f"  {title}, round {index}: {runs[-1]}", file=sys.stderr, flush=True)
    finally:
        sampler.stop()
    return Comparison(title, executors, tuple(runs), os.cpu_count() or 1)


def tiny_image(folder: Path) -> Path:
    """dog.jpg shrunk to TINY_SIDE_PX a side, as a JPEG in `folder`."""
    from PIL import Image

    path = folder / "tiny.jpg"
    Image.open(DOG).convert("RGB").resize((TINY_SIDE_PX, TINY_SIDE_PX)).save(path)
    return path


def format_comparison(comparison: Comparison, field: str, unit: str) -> list[str]:
    """A Markdown table of the rounds and a line of medians for `field` (RunTiming's), each
    variant's whole run beside it unless `field` is the whole run's seconds."""
    first, second = comparison.variants
    whole = field != "seconds"
    columns = [f"{first}: {unit}", *([f"{first}: whole run s"] * whole), f"{second}: {unit}"]
    columns += [f"{second}: whole run s"] * whole
    lines = [f"| round | {' | '.join(columns)} | max load |", "| ---: |" + " ---: |" * (len(columns) + 1)]
    for index, pair in enumerate(zip(comparison.of(first), comparison.of(second))):
        cells = [cell for run in pair for cell in [getattr(run, field), *([run.seconds] * whole)]]
        load = max(run.max_load for run in pair)
        lines.append(f"| {index} | {' | '.join(f'{cell:.2f}' for cell in cells)} | {load:.2f} |")
    validity = (
        "valid"
        if comparison.valid
        else f"NOT VALID (load {comparison.max_load:.2f} > {comparison.cores} cores + {LOAD_MARGIN})"
    )
    lines += [
        "",
        f"Medians: {first} {comparison.median(first, field):.2f} s, {second} {comparison.median(second, field):.2f} s "
        f"({second} / {first} = {comparison.ratio(field):.3f}); executors as run.json names them: "
        f"{', '.join(sorted({r.executor for r in comparison.runs}))}; masks "
        f"{', '.join(str(m) for m in sorted({r.masks for r in comparison.runs}))}; {validity}.",
    ]
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help=f"rounds per comparison (at least {MIN_ROUNDS})")
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="the photo of the second comparison")
    parser.add_argument("--checkpoint", default=None, help="the vit_t weights (default: the cached default)")
    parser.add_argument("--no-photo", dest="photo_runs", action="store_false", help="the fixed cost only")
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds: at least {MIN_ROUNDS}")
    root = Path(tempfile.mkdtemp(prefix="run-overhead-"))
    try:
        fixed = compare(
            "fixed cost", tiny_image(root), TINY_POINTS, ("auto", "ray"), args.rounds, args.checkpoint, root
        )
        photo = None
        if args.photo_runs:
            photo = compare(
                "photo in a run", args.photo, PHOTO_POINTS, ("local", "ray"), args.rounds, args.checkpoint, root
            )
    except BenchError as error:
        print(f"benchmarks.run_overhead: {error}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        f"machine: {os.cpu_count()} cores, {cpu_model()}; vit_t; load sampled every {LOAD_SAMPLE_S:.0f} s",
        "",
        f"Fixed cost: one {TINY_SIDE_PX}×{TINY_SIDE_PX} image at {TINY_POINTS}×{TINY_POINTS} points, start to exit "
        f"(bar {FIXED_COST_BAR_S:.0f} s for `auto`)",
        "",
        *format_comparison(fixed, "seconds", "s"),
    ]
    comparisons = [fixed]
    if photo is not None:
        comparisons.append(photo)
        lines += [
            "",
            f"An image inside a run: {args.photo.name} at {PHOTO_POINTS}×{PHOTO_POINTS} points, run.json's "
            f"segment seconds (bar: Ray at most {ACTOR_BAR:.0%} above in process)",
            "",
            *format_comparison(photo, "segment_seconds", "segment s"),
        ]
    print("\n".join(lines))
    return 0 if all(c.valid for c in comparisons) else EXIT_SUSPECT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
