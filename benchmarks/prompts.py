"""`python -m benchmarks.prompts`: prompts/s of sam-batch's prompt jobs and of MobileSAM's
reference `SamPredictor` looping over the same box prompts, side by side in one run.

Two cases (sizes are options):
- *one image*: `--boxes` box prompts (default 1,000) on one image (`--one-image`);
- *many images*: `--per-image` boxes (default 10) on each of `--n-images` images (default 100),
  the photos of `--photos` cycled when there are fewer (each copy a file of its own, a symlink,
  so that `sam-batch run` lists it as another input).
Boxes are drawn from a seeded RNG (`--seed`) inside each image, multimask off. Per case, one
after the other, never at once:
1. the reference, in a process of its own environment (`.venv-ref`, `prompts_reference_driver`):
   `set_image` once per image, then `predict` per box, with `--threads` torch threads, the
   model loaded and the pixels decoded (one untimed image and box first); its whole process
   (interpreter, imports, model load, loop) is timed too;
2. sam-batch in this process: `pipeline.prompts.segment_prompts` per image with a loaded
   engine and as many threads, on the same decoded pixels (one untimed call first);
3. `sam-batch run` on a job over the same files with a prompts Parquet table of the same
   boxes, start to exit (interpreter, imports, model load, decoding, writing Parquet).
Each side's prompts/s is prompts / seconds; the speed-up is sam-batch's prompts/s over the
reference loop's. max |Δ score| compares every prompt's predicted IoU between the reference and
the in-process side (the same prompts, the same masks). The 1-minute load average is read
before, every 5 s during and after: a case whose load went above the threads by more than `LOAD_MARGIN` is NOT VALID and
the exit status is 3. Markdown on stdout; `--write-doc` appends a dated section to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import numpy as np

from benchmarks.reference import (
    DEFAULT_DOC,
    DEFAULT_REF_VENV,
    EXIT_SUSPECT,
    LOAD_MARGIN,
    BenchError,
    LoadSampler,
    append_section,
    check_exit,
    cpu_model,
    load_is_valid,
    reference_python,
)

SHARED_IMAGES = "../shared/data/images"
DEFAULT_ONE_IMAGE = f"{SHARED_IMAGES}/dog.jpg"
DEFAULT_PHOTOS = tuple(
    f"{SHARED_IMAGES}/{name}"
    for name in (
        "dog.jpg",
        "groceries.jpg",
        "picture1.jpg",
        "picture2.jpg",
        "dogs.jpg",
        "truck.jpg",
        "389225main_sw_1965_1024.jpg",
        "app_assets_picture4.jpg",
    )
)
REFERENCE_DRIVER = Path(__file__).with_name("prompts_reference_driver.py")
MIN_SIDE = 0.05  # a box's sides: uniform between these shares of the image's
MAX_SIDE = 0.5


@dataclass(frozen=True)
class Case:
    """One case: its name, and the images (paths, as listed) with the boxes of each."""

    name: str
    images: list[tuple[str, list[list[float]]]]

    @property
    def n_prompts(self) -> int:
        return sum(len(boxes) for _, boxes in self.images)


@dataclass(frozen=True)
class CaseResult:
    """A case's seconds: the reference's loop and whole process, sam-batch in process and
    `sam-batch run`; the highest load seen, max |Δ score| between the reference and in process."""

    case: Case
    reference_loop: float
    reference_process: float
    ours_in_process: float
    ours_run: float
    max_load: float
    max_score_delta: float


def random_boxes(rng: np.random.Generator, width: int, height: int, n: int) -> list[list[float]]:
    """`n` XYXY boxes of whole pixels inside a (height, width) image, sides between `MIN_SIDE`
    and `MAX_SIDE` of the image's."""
    boxes = []
    for _ in range(n):
        w = rng.uniform(MIN_SIDE, MAX_SIDE) * width
        h = rng.uniform(MIN_SIDE, MAX_SIDE) * height
        x0 = rng.uniform(0, width - w)
        y0 = rng.uniform(0, height - h)
        boxes.append([float(round(x0)), float(round(y0)), float(round(x0 + w)), float(round(y0 + h))])
    return boxes


def run_reference(
    python: Path,
    case: Case,
    pixels: dict[str, Path],
    checkpoint: Path,
    *,
    model_type: str,
    threads: int,
    device: str = "cpu",
    isolated: bool = True,
) -> tuple[dict, float]:
    """The reference loop over the case in one `python` process on `device` (`-I` when
    `isolated`; else with this environment's PYTHONPATH, as on the GPU kit); its JSON and wall
    time (s)."""
    spec = {
        "model_type": model_type,
        "checkpoint": str(checkpoint),
        "threads": threads,
        "device": device,
        "pixels": sorted({str(pixels[path]) for path, _ in case.images}),
        "images": [[str(pixels[path]), boxes] for path, boxes in case.images],
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [str(python), *(["-I"] if isolated else []), "-W", "ignore", str(REFERENCE_DRIVER), json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    check_exit(proc, proc.stderr, "the reference predictor")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def photo_plan(image: np.ndarray, prompts: list):
    """The `PromptPlan` of `prompts` on a photo (h, w, 3): one window, the photo whole, as
    `raster.tiling: auto` keeps it."""
    from sam_batch.pipeline.prompts import plan_prompts

    height, width = image.shape[:2]
    return plan_prompts(prompts, width, height, None, None, max(height, width), 0, 0)


def segment_photo(engine, image: np.ndarray, prompts: list) -> list:
    """`segment_prompts` of `prompts` on a photo as one window (`photo_plan`): its `PromptMask`s."""
    from sam_batch.pipeline.prompts import segment_prompts
    from sam_batch.pipeline.rasters import ArrayScene

    return segment_prompts(engine, ArrayScene(image), photo_plan(image, prompts), False, lambda: None)


def run_in_process(engine, case: Case, decoded: dict[str, np.ndarray]) -> tuple[float, list[float]]:
    """`segment_photo` per image of the case; seconds and scores."""
    from sam_batch.pipeline.prompts import Prompt

    def segment(image: np.ndarray, boxes: list[list[float]]) -> list[float]:
        prompts = [Prompt(str(i), tuple(box), (), (), False) for i, box in enumerate(boxes)]
        return [m.mask.iou for m in segment_photo(engine, image, prompts)]

    first, boxes = case.images[0]
    segment(decoded[first], boxes[:1])  # untimed: the first call's allocations
    scores: list[float] = []
    start = time.perf_counter()
    for path, boxes in case.images:
        scores += segment(decoded[path], boxes)
    return time.perf_counter() - start, scores


def run_job(case: Case, workdir: Path, checkpoint: Path, model_type: str) -> float:
    """`sam-batch run` over the case's files with its boxes as a prompts Parquet; wall time (s)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    workdir.mkdir(parents=True)
    rows = [
        {"image_uri": os.path.abspath(path), "prompt_id": f"{n}-{i}", "box": box}
        for n, (path, boxes) in enumerate(case.images)
        for i, box in enumerate(boxes)
    ]
    pq.write_table(pa.Table.from_pylist(rows), workdir / "prompts.parquet")
    job = {
        "name": f"bench-prompts-{case.name.replace(' ', '-')}",
        "input": {"uris": [os.path.abspath(path) for path, _ in case.images]},
        "prompts": {"uri": str(workdir / "prompts.parquet"), "multimask_output": False},
        "model": {"type": model_type, "checkpoint": str(checkpoint)},
        "output": {"uri": str(workdir / "out")},
    }
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sam_batch.cli", "run", str(workdir / "job.yaml")],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    check_exit(proc, proc.stdout + proc.stderr, "sam-batch run")
    written = pq.read_table(workdir / "out" / "masks", columns=["prompt_id"]).num_rows
    images = pq.read_table(workdir / "out" / "images", columns=["image_id"]).num_rows
    if (written, images) != (case.n_prompts, len(case.images)):  # links as listed, not resolved: each an image
        raise BenchError(
            f"sam-batch run wrote {written} masks on {images} images for {case.n_prompts} prompts on {len(case.images)}"
        )
    return seconds


def make_cases(args: argparse.Namespace, folder: Path) -> list[Case]:
    """The two cases; the many-images case's files are symlinks in `folder` to the photos cycled."""
    from PIL import Image

    rng = np.random.default_rng(args.seed)

    def size(path: str) -> tuple[int, int]:
        with Image.open(path) as image:
            return image.size

    one = Case("one image", [(args.one_image, random_boxes(rng, *size(args.one_image), args.boxes))])
    links = []
    for n, photo in enumerate(islice(cycle(args.photos), args.n_images)):
        link = folder / f"{n:04d}-{Path(photo).name}"
        link.symlink_to(Path(photo).resolve())
        links.append((str(link), photo))
    many = Case("many images", [(link, random_boxes(rng, *size(photo), args.per_image)) for link, photo in links])
    return [one, many]


def rate(prompts: int, seconds: float) -> str:
    return f"{prompts / seconds:.1f}"


def format_table(results: list[CaseResult], threads: int) -> str:
    lines = [
        "| case | prompts | images | reference loop s | reference prompts/s | sam-batch in process s | "
        "sam-batch prompts/s | speed-up | `sam-batch run` s | run prompts/s | reference process s | "
        "reference process prompts/s | max \\|Δ score\\| | max load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        n = r.case.n_prompts
        speedup = r.reference_loop / r.ours_in_process
        valid = "" if load_is_valid(r.max_load, threads) else " NOT VALID"
        lines.append(
            f"| {r.case.name} | {n} | {len(r.case.images)} | {r.reference_loop:.1f} | {rate(n, r.reference_loop)} | "
            f"{r.ours_in_process:.1f} | {rate(n, r.ours_in_process)} | {speedup:.2f}×{valid} | {r.ours_run:.1f} | "
            f"{rate(n, r.ours_run)} | {r.reference_process:.1f} | {rate(n, r.reference_process)} | "
            f"{r.max_score_delta:.1g} | {r.max_load:.2f} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.prompts",
        description="prompts/s: sam-batch's prompt jobs and MobileSAM's SamPredictor on the same boxes.",
    )
    parser.add_argument("--one-image", default=DEFAULT_ONE_IMAGE, help=f"(default: {DEFAULT_ONE_IMAGE})")
    parser.add_argument("--boxes", type=int, default=1000, help="box prompts on the one image (default: 1000)")
    parser.add_argument(
        "--photos", nargs="+", default=list(DEFAULT_PHOTOS), help="photos cycled for the many-images case"
    )
    parser.add_argument("--n-images", type=int, default=100, help="images of the many-images case (default: 100)")
    parser.add_argument("--per-image", type=int, default=10, help="box prompts per image there (default: 10)")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint", default=None, help="the weights both sides load (default: the cached)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all cores)")
    parser.add_argument("--ref-venv", type=Path, default=Path(DEFAULT_REF_VENV))
    parser.add_argument("--no-run", dest="run", action="store_false", help="skip the `sam-batch run` side")
    parser.add_argument("--write-doc", action="store_true", help="append a dated section to --doc")
    parser.add_argument("--doc", type=Path, default=Path(DEFAULT_DOC))
    parser.add_argument("--note", default=None, help="a remark to add to the doc section")
    return parser


def main(argv: list[str]) -> int:
    """Entry point; 0, 1 when the bench cannot run, `EXIT_SUSPECT` when a case is NOT VALID."""
    args = _parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    try:
        return _bench(args, reference_python(args.ref_venv), argv)
    except BenchError as error:
        print(f"benchmarks.prompts: {error}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace, python: Path, argv: list[str]) -> int:
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
    results: list[CaseResult] = []
    try:
        threads = set_cpu_threads(args.threads)
        keep_freed_memory()  # as a segmenting worker does
        checkpoint = resolve_checkpoint(args.model, args.checkpoint, None, log=progress)
        engine = build_engine(args.model, str(checkpoint), device="cpu")
        with tempfile.TemporaryDirectory(prefix="sam-batch-bench-prompts-") as tmp:
            folder = Path(tmp)
            (folder / "links").mkdir()
            cases = make_cases(args, folder / "links")
            decoded: dict[str, np.ndarray] = {}  # by path as listed; a photo's copies share its pixels
            pixels: dict[str, Path] = {}  # the .npy the reference loads, one per photo
            by_photo: dict[str, tuple[np.ndarray, Path]] = {}
            for path in {path for case in cases for path, _ in case.images}:
                photo = str(Path(path).resolve())
                if photo not in by_photo:
                    by_photo[photo] = (load_image(photo), folder / f"pixels{len(by_photo)}.npy")
                    np.save(by_photo[photo][1], by_photo[photo][0])
                decoded[path], pixels[path] = by_photo[photo]
            versions = {}
            for number, case in enumerate(cases):
                progress(f"{case.name}: {case.n_prompts} prompts on {len(case.images)} images")
                mark = sampler.sample()
                found, reference_process = run_reference(
                    python, case, pixels, checkpoint, model_type=args.model, threads=threads
                )
                versions = found
                progress(f"  reference loop {found['seconds']:.1f}s, process {reference_process:.1f}s")
                ours, scores = run_in_process(engine, case, decoded)
                progress(f"  sam-batch in process {ours:.1f}s")
                run_s = float("nan")
                if args.run:
                    run_s = run_job(case, folder / f"run{number}", checkpoint, args.model)
                    progress(f"  sam-batch run {run_s:.1f}s")
                delta = max(abs(a - b) for a, b in zip(scores, found["scores"], strict=True))
                results.append(
                    CaseResult(case, found["seconds"], reference_process, ours, run_s, sampler.max_since(mark), delta)
                )
        last = sampler.sample()
        load_after = sampler.readings[last]
        load_max = max(sampler.readings)
    finally:
        sampler.stop()
    when = datetime.datetime.now(datetime.timezone.utc)
    table = format_table(results, threads)
    print(table)
    invalid = [r.case.name for r in results if not load_is_valid(r.max_load, threads)]
    if args.write_doc:
        photos = len(set(args.photos))
        lines = [
            f"## {when:%Y-%m-%d %H:%M} UTC — prompts/s: box prompts, sam-batch and the reference predictor",
            "",
            f"- machine: {len(os.sched_getaffinity(0))} cores (`nproc`), {cpu_model()}; "
            f"{threads} torch threads each side",
            f"- reference: MobileSAM `SamPredictor` (mobilesam-mirror {versions['mobile_sam']}, torch "
            f"{versions['torch']}, `.venv-ref`); sam-batch: torch {torch.__version__}",
            f"- command: `{shlex.join(['python', '-m', 'benchmarks.prompts', *argv])}`",
            f"- one image: {args.boxes} boxes on {Path(args.one_image).name}; many images: {args.per_image} boxes on "
            f"each of {args.n_images} images, {photos} photos cycled; boxes seeded ({args.seed}), multimask off",
            f"- load (1-min average) before / max / after: {load_before:.2f} / {load_max:.2f} / {load_after:.2f}",
        ]
        if args.note:
            lines.append(f"- note: {args.note}")
        if invalid:
            lines.append(f"- NOT VALID (load above {threads} threads + {LOAD_MARGIN}): {', '.join(invalid)}")
        append_section(args.doc, "\n".join([*lines, "", table, ""]))
        progress(f"appended to {args.doc}")
    for name in invalid:
        print(f"benchmarks.prompts: {name}: NOT VALID, the load went above {threads} + {LOAD_MARGIN}", file=sys.stderr)
    return EXIT_SUSPECT if invalid else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
