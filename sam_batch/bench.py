"""`sam-batch bench`: MobileSAM's reference generator and sam-batch side by side.

For each image, on the same pixels, weights, grid and thread count, one after the other:
1. the reference `SamAutomaticMaskGenerator` (output_mode "coco_rle"), run by a small driver
   script in its own environment (`.venv-ref`, made by `make bench-env`), never in ours;
2. sam-batch in this process: `build_engine` + `generate_masks` + `to_records`.

Each side times its own `generate` call (encoder, decoder, filters, RLE records; the model is
already loaded and the image already decoded). The report gives, per image, both times, their
ratio, the number of masks and the masks' agreement (recall and precision at IoU >= 0.9, mean
best IoU), as a Markdown table on stdout and, with `--write-doc`, as a dated section appended
to docs/benchmarks.md. Relative paths (images, `--ref-venv`, `--doc`) are taken from the
current directory, the checkout's root under `make bench`.
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
model = sam_model_registry[spec["model_type"]](checkpoint=spec["checkpoint"]).to("cpu").eval()
generator = SamAutomaticMaskGenerator(
    model, points_per_side=spec["points_per_side"], output_mode="coco_rle"
)
image = np.load(spec["pixels"])
start = time.perf_counter()
records = generator.generate(image)
seconds = time.perf_counter() - start
with open(spec["out"], "w") as f:
    json.dump({"seconds": seconds, "records": records}, f)
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
    return "\n".join([*lines, "", format_table(results), ""])


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


def run_reference(
    python: Path, pixels: Path, checkpoint: Path, *, model_type: str, points_per_side: int, threads: int
) -> tuple[Side, dict]:
    """Run the reference generator on the .npy `pixels` in a subprocess of `python`.

    Returns its side of the result and the versions it reports (torch, mobile_sam).
    """
    out = pixels.with_suffix(".reference.json")
    spec = {
        "model_type": model_type,
        "checkpoint": str(checkpoint),
        "points_per_side": points_per_side,
        "threads": threads,
        "pixels": str(pixels),
        "out": str(out),
    }
    driver = pixels.parent / "reference_driver.py"
    driver.write_text(REFERENCE_DRIVER)
    proc = subprocess.run(
        [str(python), "-I", str(driver), json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"the reference generator failed (exit {proc.returncode}): {last}")
    result = json.loads(out.read_text())
    return Side(result["seconds"], result["records"]), json.loads(proc.stdout.strip().splitlines()[-1])


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

    import torch

    from sam_batch.engines.backend import build_engine, set_cpu_threads
    from sam_batch.engines.checkpoints import resolve_checkpoint
    from sam_batch.pipeline.images import load_image

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    load_before = os.getloadavg()[0]
    threads = set_cpu_threads(args.threads)
    checkpoint = resolve_checkpoint(args.model, args.checkpoint, None, log=progress)
    engine = build_engine(args.model, str(checkpoint), device="cpu")
    results, versions = [], {}
    with tempfile.TemporaryDirectory(prefix="sam-batch-bench-") as tmp:
        for i, uri in enumerate(args.images):
            image = load_image(uri)
            pixels = Path(tmp) / f"image{i}.npy"
            np.save(pixels, image)
            reference, versions = run_reference(
                python, pixels, checkpoint,
                model_type=args.model, points_per_side=args.points_per_side, threads=threads,
            )
            progress(f"{uri}: reference {reference.seconds:.1f}s, {len(reference.records)} masks")
            ours = run_ours(engine, image, args.points_per_side)
            progress(f"{uri}: sam-batch {ours.seconds:.1f}s, {len(ours.records)} masks")
            results.append(ImageResult(Path(uri).name, image.shape[0], image.shape[1], reference, ours))
    print(format_table(results))
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
            results, machine,
            model_type=args.model,
            points_per_side=args.points_per_side,
            command=shlex.join(["sam-batch", "bench", *argv]),
            when=datetime.datetime.now(datetime.timezone.utc),
            note=args.note,
        )
        append_section(args.doc, section)
        print(f"appended to {args.doc}", file=sys.stderr)
    return 0
