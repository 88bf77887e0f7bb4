"""`sam-batch bench`: MobileSAM's reference generator and sam-batch side by side.

On the same pixels, weights and grid, one after the other, never at once:
1. per image, interleaved: the reference `SamAutomaticMaskGenerator` (output_mode "coco_rle")
   in a process of its own environment (`.venv-ref`, made by `make bench-env`, never ours),
   with `--threads` torch threads; then sam-batch in this process with as many threads
   (`build_engine` + `generate_masks` + `to_records`). Each times its `generate` call (encoder,
   decoder, filters, RLE records; the model loaded, the image decoded); the table gives both
   times, their ratio, the number of masks and their agreement (recall and precision at
   IoU >= 0.9, mean best IoU);
2. whole processes, start to exit: `sam-batch run` on a job over the same image files
   (interpreter, imports, the executor `run.executor: auto` picks (in process for a few images),
   reading, writing Parquet),
   then one reference process over all the images (interpreter, imports, model load, every
   `generate`): their wall times, the ratio, and the agreement of the masks `sam-batch run`
   wrote with the reference's. Markdown on stdout and, with `--write-doc`, a dated section
appended to docs/benchmarks.md. Relative paths (images, `--ref-venv`, `--doc`) are taken from
the current directory, the checkout's root under `make bench`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    from sam_batch.engines.backend import TorchEngine

MATCH_IOU = 0.9
DEFAULT_IMAGES = ("../shared/data/images/dog.jpg", "../shared/data/images/groceries.jpg")
DEFAULT_REF_VENV = ".venv-ref"
DEFAULT_DOC = "docs/benchmarks.md"
MODEL_TYPES = ("vit_t", "vit_b", "vit_l", "vit_h")

DOC_HEADER = """\
# Benchmarks

Written by `make bench` (`sam-batch bench --write-doc`), newest section last. Each run puts
MobileSAM's reference `SamAutomaticMaskGenerator` (its own environment, `.venv-ref`, made by
`make bench-env`) and sam-batch side by side on the same decoded pixels, the same checkpoint,
the same parameters and the same number of torch threads, one after the other, never at once.

- *reference s* / *sam-batch s*: wall time of one `generate` call (image encoder, all point
  batches, filters, NMS, COCO RLE records), with the model loaded and the image decoded.
- *whole process*: the reference's process over all the images (interpreter start, imports,
  model load, every `generate`) against `sam-batch run` on a job over the same files (the
  executor `run.executor: auto` picks: in process for a few images; reading, writing Parquet),
  start to exit; its agreement is that
  of the masks the run wrote, for the image that agrees least.
- *speed-up*: reference seconds / sam-batch seconds.
- *recall* / *precision*: share of the reference's masks found among ours / of ours found among
  the reference's, a match being a mask IoU >= 0.9; *mean best IoU*: the mean, over the
  reference's masks, of the best IoU any of ours reaches.
- *load*: the 1-minute load average before and after the run. Above the thread count, other
  processes shared the cores: the seconds are inflated, and unevenly, since the two sides run at
  different moments; read such a run's seconds and ratios as rough.
"""

# Runs in .venv-ref: argv[1] is a JSON spec, see `run_reference`. Prints one JSON object.
REFERENCE_DRIVER = """\
import json, sys, time
from importlib.metadata import version

import numpy as np
import torch
from mobile_sam import SamAutomaticMaskGenerator, sam_model_registry

spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
model = sam_model_registry[spec["model_type"]](checkpoint=spec["checkpoint"]).to(spec["device"]).eval()
generator = SamAutomaticMaskGenerator(
    model, points_per_side=spec["points_per_side"], output_mode="coco_rle"
)
if spec["warm_up"]:  # once, untimed: CUDA's kernels and allocator
    generator.generate(np.load(spec["images"][0][0]))
for pixels, out in spec["images"]:
    image = np.load(pixels)
    start = time.perf_counter()
    records = generator.generate(image)
    seconds = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump({"seconds": seconds, "records": records}, f)
    print(f"{pixels}: {seconds:.1f}s, {len(records)} masks", file=sys.stderr, flush=True)
print(json.dumps({"torch": torch.__version__, "mobile_sam": version("mobilesam-mirror"),
                  "threads": torch.get_num_threads()}))
"""


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
class ImageResult:
    """Both sides on one image."""

    image: str
    height: int
    width: int
    reference: Side
    ours: Side

    @property
    def speedup(self) -> float:
        """Reference seconds over ours."""
        return self.reference.seconds / self.ours.seconds

    @property
    def agreement(self) -> Agreement:
        """Agreement of our masks with the reference's."""
        return agreement(self.ours.records, self.reference.records)


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


def format_table(results: list[ImageResult]) -> str:
    """The per-image report as a Markdown table."""
    lines = [
        "| image | size | reference s | sam-batch s | speed-up | masks ref | masks ours "
        f"| recall@{MATCH_IOU} | precision@{MATCH_IOU} | mean best IoU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        a = r.agreement
        mean_iou = "n/a" if math.isnan(a.mean_best_iou) else f"{a.mean_best_iou:.4f}"
        lines.append(
            f"| {r.image} | {r.width}×{r.height} | {r.reference.seconds:.1f} | {r.ours.seconds:.1f} "
            f"| {r.speedup:.2f}× | {len(r.reference.records)} | {len(r.ours.records)} "
            f"| {a.recall:.3f} | {a.precision:.3f} | {mean_iou} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class WholeProcess:
    """The reference's process and `sam-batch run`'s over the same images: wall seconds, and
    the agreement of the masks the run wrote with the reference's, per image in `images` order."""

    reference_seconds: float
    ours_seconds: float
    agreements: list[Agreement]

    @property
    def speedup(self) -> float:
        return self.reference_seconds / self.ours_seconds


def format_whole_process(run: WholeProcess, n_images: int) -> str:
    """The whole-process comparison as a one-row Markdown table (worst image's agreement)."""
    recall = min(a.recall for a in run.agreements)
    precision = min(a.precision for a in run.agreements)
    return "\n".join([
        f"| whole process | images | reference s | `sam-batch run` s | speed-up | min recall@{MATCH_IOU} "
        f"| min precision@{MATCH_IOU} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| start to exit | {n_images} | {run.reference_seconds:.1f} | {run.ours_seconds:.1f} | {run.speedup:.2f}× "
        f"| {recall:.3f} | {precision:.3f} |",
    ])


@dataclass(frozen=True)
class Machine:
    """What the doc section says about where and how the run happened."""

    cores: int
    cpu_model: str
    threads: int
    torch_ours: str
    torch_reference: str
    mobile_sam: str
    load_before: float
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
    results: list[ImageResult],
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
        f"- load (1-min average) before / after: {machine.load_before:.2f} / {machine.load_after:.2f}",
    ]
    if note:
        lines.append(f"- note: {note}")
    lines += ["", format_table(results), ""]
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
    python: Path, pixels: list[Path], checkpoint: Path, *, model_type: str, points_per_side: int, threads: int,
    device: str = "cpu", warm_up: bool = False, isolated: bool = True, log=print,
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
    driver = pixels[0].parent / "reference_driver.py"
    driver.write_text(REFERENCE_DRIVER)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(python), *(["-I"] if isolated else []), str(driver), json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    check_exit(proc, _echo_lines(proc, proc.stderr, log), "the reference generator")
    stdout = proc.stdout.read()
    seconds = time.perf_counter() - started
    sides = [Side(**json.loads(out.read_text())) for out in outs]
    return sides, json.loads(stdout.strip().splitlines()[-1]), seconds


def write_run_job(
    workdir: Path, name: str, uris: list[str], *, model_type: str, checkpoint: str | None, points_per_side: int,
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

    from sam_batch.jobs.schema import normalise_uri

    job_file = write_run_job(workdir, "bench", uris, model_type=model_type, checkpoint=str(checkpoint),
                             points_per_side=points_per_side)
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sam_batch.cli", "run", str(job_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


def run_ours(engine: TorchEngine, image: np.ndarray, points_per_side: int) -> Side:
    """sam-batch's generator on `image`, timed like the reference's `generate`."""
    from sam_batch.pipeline.amg import generate_masks, to_records
    from sam_batch.pipeline.params import AmgParams

    params = AmgParams(points_per_side=points_per_side)
    start = time.perf_counter()
    records = to_records(generate_masks(engine, image, params))
    return Side(time.perf_counter() - start, records)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam-batch bench",
        description="MobileSAM's reference generator and sam-batch side by side on the same images.",
    )
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES), metavar="IMAGE",
                        help="image paths or fsspec URLs (default: dog.jpg and groceries.jpg from ../shared)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--model", default="vit_t", choices=MODEL_TYPES)
    parser.add_argument("--checkpoint", default=None,
                        help="path or URL of the weights both sides load (default: the cached default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all cores)")
    parser.add_argument("--ref-venv", type=Path, default=Path(DEFAULT_REF_VENV),
                        help=f"the reference environment (default: {DEFAULT_REF_VENV})")
    parser.add_argument("--no-whole-process", dest="whole_process", action="store_false",
                        help="skip the whole-process comparison with `sam-batch run`")
    parser.add_argument("--write-doc", action="store_true", help="append a dated section to --doc")
    parser.add_argument("--doc", type=Path, default=Path(DEFAULT_DOC), help=f"(default: {DEFAULT_DOC})")
    parser.add_argument("--note", default=None, help="a remark to add to the doc section")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `sam-batch bench`; returns the exit status.

    A leading `--` is dropped: `sam-batch bench -- --images ...` hands the options through
    the top-level parser, which would otherwise take an option-first tail as its own.
    """
    args = _parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    try:
        python = reference_python(args.ref_venv)
    except BenchError as error:
        print(f"sam-batch bench: {error}", file=sys.stderr)
        return 1
    try:
        return _bench(args, python, argv)
    except BenchError as error:
        print(f"sam-batch bench: {error}", file=sys.stderr)
        return 1


def _bench(args: argparse.Namespace, python: Path, argv: list[str]) -> int:
    """Both sides on every image, the report, and the doc section if asked."""
    import torch

    from sam_batch.engines.backend import build_engine, keep_freed_memory, set_cpu_threads
    from sam_batch.engines.checkpoints import resolve_checkpoint
    from sam_batch.pipeline.images import load_image

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    threads = set_cpu_threads(args.threads)
    keep_freed_memory()  # as a segmenting worker does
    checkpoint = resolve_checkpoint(args.model, args.checkpoint, None, log=progress)
    engine = build_engine(args.model, str(checkpoint), device="cpu")
    with tempfile.TemporaryDirectory(prefix="sam-batch-bench-") as tmp:
        images = [load_image(uri) for uri in args.images]
        pixels = save_pixels(images, Path(tmp))
        results, versions = [], {}
        for uri, image, path in zip(args.images, images, pixels):  # interleaved, so drifts in load hit both
            [reference], versions, _ = run_reference(
                python, [path], checkpoint, model_type=args.model, points_per_side=args.points_per_side,
                threads=threads, log=progress,
            )
            ours = run_ours(engine, image, args.points_per_side)
            progress(f"{uri}: reference {reference.seconds:.1f}s, {len(reference.records)} masks; "
                     f"sam-batch {ours.seconds:.1f}s, {len(ours.records)} masks")
            results.append(ImageResult(Path(uri).name, image.shape[0], image.shape[1], reference, ours))
        whole = None
        if args.whole_process:
            progress(f"whole processes: sam-batch run, then the reference generator, on {len(images)} images")
            written, run_seconds = run_pipeline(
                args.images, Path(tmp), model_type=args.model, checkpoint=checkpoint,
                points_per_side=args.points_per_side, log=progress,
            )
            references, _, reference_seconds = run_reference(
                python, pixels, checkpoint, model_type=args.model, points_per_side=args.points_per_side,
                threads=threads, log=progress,
            )
            whole = WholeProcess(
                reference_seconds, run_seconds,
                [agreement(written[uri], reference.records) for uri, reference in zip(args.images, references)],
            )
    print(format_table(results))
    if whole is not None:
        print()
        print(format_whole_process(whole, len(results)))
    if args.write_doc:
        machine = Machine(
            cores=len(os.sched_getaffinity(0)),
            cpu_model=cpu_model(),
            threads=threads,
            torch_ours=torch.__version__,
            torch_reference=versions["torch"],
            mobile_sam=versions["mobile_sam"],
            load_before=load_before,
            load_after=os.getloadavg()[0],
        )
        section = format_section(
            results, whole, machine,
            model_type=args.model,
            points_per_side=args.points_per_side,
            command=shlex.join(["sam-batch", "bench", *argv]),
            when=datetime.datetime.now(datetime.timezone.utc),
            note=args.note,
        )
        append_section(args.doc, section)
        print(f"appended to {args.doc}", file=sys.stderr)
    return 0
