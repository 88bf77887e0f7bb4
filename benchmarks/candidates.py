"""`python -m benchmarks.candidates`: what `output.candidates` costs and what `sam-batch refilter` saves.

Each round runs, as separate `sam-batch` processes on the same photos, one after another:
*plain* (`sam-batch run`, candidates off), *candidates* (the same job with `output.candidates:
true`), *refilter* (`sam-batch refilter` of that output at new thresholds) and *re-run* (`sam-batch
run` afresh at those thresholds: what refilter replaces). Rounds repeat the four so that a
change in the machine's load falls on all of them; the figures are medians over rounds. Each
process is timed whole (model load included) and by its images' `seconds` (the images table).
Storage is the bytes of each table's committed files. The refilter's and the re-run's masks
are compared (they must be equal), and so are plain's and candidates'.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

SAM_BATCH = [sys.executable, "-m", "sam_batch.cli"]  # as installed, or from a PYTHONPATH (a lent GPU machine)
SIDES = ("plain", "candidates", "refilter", "re-run")
DEFAULT_SETTINGS = ("pred_iou_thresh=0.8", "stability_score_thresh=0.9", "min_mask_region_area=100")


def run_round(images: list[str], points_per_side: int, settings: list[str], folder: Path) -> dict[str, dict]:
    """The four sides once, in order: {side: {"wall_s", "image_s", "masks"}} and the outputs."""
    amg = {"points_per_side": points_per_side}
    changed = {**amg, **{key: yaml.safe_load(value) for key, value in (s.split("=", 1) for s in settings)}}
    outs = {side: folder / side for side in SIDES}
    commands = {
        "plain": ["run", _job(folder, "plain", images, amg, outs["plain"], False)],
        "candidates": ["run", _job(folder, "candidates", images, amg, outs["candidates"], True)],
        "refilter": ["refilter", str(outs["candidates"]), *[a for s in settings for a in ("--set", f"amg.{s}")]]
        + ["-o", str(outs["refilter"])],
        "re-run": ["run", _job(folder, "re-run", images, changed, outs["re-run"], False)],
    }
    found = {}
    for side, args in commands.items():
        started = time.perf_counter()
        subprocess.run([*SAM_BATCH, *args], check=True, capture_output=True, text=True)
        images_table = pq.read_table(outs[side] / "images")
        found[side] = {
            "wall_s": time.perf_counter() - started,
            "image_s": sum(images_table.column("seconds").to_pylist()),
            "masks": _masks(outs[side]),
            "bytes": {t: _bytes(outs[side] / t) for t in ("masks", "images", "candidates")},
        }
    return found


def _job(folder: Path, name: str, images: list[str], amg: dict, out: Path, candidates: bool) -> str:
    path = folder / f"{name}.yaml"
    job = {
        "name": "bench-candidates",
        "input": {"uris": images},
        "amg": amg,
        "output": {"uri": str(out), "candidates": candidates},
        "run": {"executor": "local"},
    }
    path.write_text(yaml.safe_dump(job))
    return str(path)


def _masks(out: Path) -> list[dict]:
    return sorted(pq.read_table(out / "masks").to_pylist(), key=lambda r: (r["image_uri"], r["mask_id"]))


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet")) if folder.exists() else 0


def report(rounds: list[dict], n_images: int, command: str, load: tuple[float, float]) -> str:
    """A markdown section body: medians per side, storage per image, the checks."""
    lines = [
        f"Command: `{command}`. {len(rounds)} rounds, {n_images} images; 1-minute load average "
        f"{load[0]:.1f} at the start and {load[1]:.1f} at the end on 2 cores shared with other work, "
        "so the seconds are this machine's at that moment, not the code's speed; compare sides "
        "within a round.",
        "",
        "| side | process s (median) | s per image (images' seconds, median) | masks |",
        "| --- | ---: | ---: | ---: |",
    ]
    for side in SIDES:
        wall = statistics.median(r[side]["wall_s"] for r in rounds)
        per_image = statistics.median(r[side]["image_s"] for r in rounds) / n_images
        lines.append(f"| {side} | {wall:.1f} | {per_image:.2f} | {len(rounds[0][side]['masks'])} |")
    first = rounds[0]
    kib = {t: first["candidates"]["bytes"][t] / 1024 / n_images for t in ("masks", "images", "candidates")}
    equal_refilter = all(r["refilter"]["masks"] == r["re-run"]["masks"] for r in rounds)
    equal_plain = all(r["plain"]["masks"] == r["candidates"]["masks"] for r in rounds)
    lines += [
        "",
        f"Storage per image (zstd Parquet): masks {kib['masks']:.1f} KiB, images {kib['images']:.1f} KiB, "
        f"candidates {kib['candidates']:.1f} KiB (×{kib['candidates'] / max(kib['masks'], 1e-9):.1f} the masks).",
        f"Masks: refilter == re-run in every round: {equal_refilter}; candidates on == off: {equal_plain}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.candidates", description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", required=True, help="photos to segment")
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--set", dest="settings", action="append", help="refilter's amg KEY=VALUE (repeatable)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    images = [str(Path(p).resolve()) for p in args.images]
    settings = args.settings or list(DEFAULT_SETTINGS)
    load_start = os.getloadavg()[0]
    command = shlex.join(["python", "-m", "benchmarks.candidates", *(argv if argv is not None else sys.argv[1:])])
    rounds = []
    for number in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-candidates-") as folder:
            rounds.append(run_round(images, args.points_per_side, settings, Path(folder)))
        print(f"after round {number + 1}:", flush=True)  # the report so far, should a later round not end
        print(report(rounds, len(images), command, (load_start, os.getloadavg()[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
