"""`python -m benchmarks.ray_memory`: peak memory of a real Ray run over 100 and then 1,000 small images.

For each image count, the benchmark writes that many small JPEGs (random crops of the photos
in `--source`, resized to 64–128 px a side, the same seed every time), a job over them on the
Ray executor (a coarse point grid, so the run is bound by I/O and the image encoder), and runs
`sam-batch run` on it as a separate driver process. While it runs, a thread samples every
process under the driver — the embedded Ray's raylet and GCS, the segmenting actors, the
workers of the read and commit tasks — every `--interval` s, and keeps each one's peak
resident memory (Linux's `VmHWM`, the kernel's own high-water mark, so a spike between two
samples is not missed) and the Ray task names it was seen running.

The report gives, per kind of process, the peak RSS at each image count; flat figures mean
that memory does not grow with the archive. With `--write-doc` it is appended to
docs/benchmarks.md as a dated section.
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
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks.reference import DEFAULT_DOC, append_section, cpu_model

DEFAULT_SOURCE = "../shared/data/images"
DEFAULT_COUNTS = (100, 1000)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
MIB = 2**20

# Kinds of process, in report order. A Ray worker is named by the Ray tasks it was seen running.
DRIVER = "driver (`sam-batch run`)"
ACTOR = "segmenting actor"
CPU_TASKS = "open/read/finish/commit task worker"
IDLE = "Ray worker, never seen busy"
KINDS = (DRIVER, ACTOR, CPU_TASKS, IDLE, "raylet", "gcs_server", "other Ray process")
CPU_TASK_NAMES = {"open_image", "read_tile", "_finish", "_commit"}


@dataclass
class ProcessPeak:
    """One process under the driver: its command, the Ray task names it was seen running
    (`open_image`, `IDLE`, …), and its peak RSS in bytes."""

    pid: int
    is_driver: bool
    command: str
    tasks: set[str] = field(default_factory=set)
    peak_rss: int = 0

    @property
    def kind(self) -> str:
        """What the process is, one of `KINDS`."""
        busy = self.tasks - {"IDLE"}
        if self.is_driver:
            return DRIVER
        if any(t.startswith("SegmenterActor") for t in busy):
            return ACTOR
        if busy & CPU_TASK_NAMES:
            return CPU_TASKS
        if busy:
            return "other Ray process"  # Ray's own agents
        name = Path(self.command.split()[0]).name if self.command else ""
        if name in ("raylet", "gcs_server"):
            return name
        if self.tasks or "default_worker.py" in self.command:
            return IDLE
        return "other Ray process"


class TreeSampler:
    """Samples the driver and all its descendants every `interval` s, on a thread of its own."""

    def __init__(self, driver_pid: int, interval: float) -> None:
        import psutil

        self.psutil = psutil
        self.driver = psutil.Process(driver_pid)
        self.interval = interval
        self.peaks: dict[int, ProcessPeak] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """One pass over the tree; processes that end meanwhile are skipped."""
        try:
            processes = [self.driver, *self.driver.children(recursive=True)]
        except self.psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                cmdline = process.cmdline()
                rss = _peak_rss(process)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, ProcessLookupError):
                continue
            peak = self.peaks.setdefault(process.pid, ProcessPeak(process.pid, process.pid == self.driver.pid, ""))
            peak.command = " ".join(cmdline)  # the latest: a process first seen between fork and exec has its parent's
            peak.peak_rss = max(peak.peak_rss, rss)
            task = _ray_task(cmdline)
            if task:
                peak.tasks.add(task)


def _peak_rss(process) -> int:
    """The kernel's high-water mark of the process's RSS in bytes (its current RSS off Linux)."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


def _ray_task(cmdline: list[str]) -> str | None:
    """`open_image` from a Ray worker's title `ray::open_image`; None for other processes."""
    first = cmdline[0] if cmdline else ""
    return first[len("ray::") :].split()[0].rstrip("()") if first.startswith("ray::") else None


@dataclass(frozen=True)
class RunMemory:
    """One benchmark run: image count, wall seconds, the run record and every process's peak."""

    n_images: int
    seconds: float
    record: dict
    processes: list[ProcessPeak]

    def by_kind(self) -> dict[str, list[int]]:
        """Peak RSS in bytes of each process, grouped by kind, largest first."""
        groups: dict[str, list[int]] = defaultdict(list)
        for p in self.processes:
            groups[p.kind].append(p.peak_rss)
        return {kind: sorted(groups[kind], reverse=True) for kind in KINDS if kind in groups}


def make_images(folder: Path, count: int, source: Path, seed: int = 0) -> list[Path]:
    """`count` JPEGs of random crops of the photos in `source`, 64–128 px a side."""
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {source}")
    pictures = [Image.open(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        picture = pictures[i % len(pictures)]
        side = int(rng.integers(min(picture.size) // 4, min(picture.size) + 1))
        x, y = int(rng.integers(0, picture.width - side + 1)), int(rng.integers(0, picture.height - side + 1))
        size = (int(rng.integers(64, 129)), int(rng.integers(64, 129)))
        path = folder / f"img-{i:05d}.jpg"
        picture.crop((x, y, x + side, y + side)).resize(size, Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def run_once(work: Path, n_images: int, args: argparse.Namespace) -> RunMemory:
    """Images, a job, and one sampled `sam-batch run` over them."""
    images = work / "images"
    make_images(images, n_images, args.source)
    job = {
        "name": f"bench-memory-{n_images}",
        "input": {"uris": [str(images / "*.jpg")]},
        "output": {"uri": str(work / "out")},
        "amg": {"points_per_side": args.points_per_side},
        "run": {"executor": "ray", "shard_size": args.shard_size},
    }
    job_path = work / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    sam_batch = str(Path(sys.executable).parent / "sam-batch")
    started = time.perf_counter()
    with open(work / "run.log", "wb") as log_file:
        driver = subprocess.Popen([sam_batch, "run", str(job_path)], stdout=log_file, stderr=subprocess.STDOUT)
        with TreeSampler(driver.pid, args.interval) as sampler:
            returncode = driver.wait()
    seconds = time.perf_counter() - started
    if returncode != 0:
        tail = (work / "run.log").read_text().strip().splitlines()[-1:]
        raise RuntimeError(f"sam-batch run exited {returncode}: {' '.join(tail)}")
    record = json.loads((work / "out" / "run.json").read_text())
    return RunMemory(n_images, seconds, record, list(sampler.peaks.values()))


def format_report(runs: list[RunMemory]) -> str:
    """Per kind of process, the peak RSS at each image count, as a Markdown table.

    Each cell: the largest peak in MiB, then every process's peak when there are several.
    """
    kinds = [k for k in KINDS if any(k in run.by_kind() for run in runs)]
    header = "| process | " + " | ".join(f"peak RSS, {run.n_images} images (MiB)" for run in runs) + " |"
    lines = [header, "| --- |" + " ---: |" * len(runs)]
    for kind in kinds:
        cells = []
        for run in runs:
            peaks = [round(b / MIB) for b in run.by_kind().get(kind, [])]
            cells.append(
                "—" if not peaks else f"{peaks[0]}" + (f" ({', '.join(map(str, peaks))})" if len(peaks) > 1 else "")
            )
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append(
        "| *wall s / images per s* | "
        + " | ".join(f"{run.seconds:.0f} s / {run.n_images / run.seconds:.2f}" for run in runs)
        + " |"
    )
    lines.append(
        "| *images ok / error, masks* | "
        + " | ".join(f"{r.record['images_ok']} / {r.record['images_error']}, {r.record['masks']}" for r in runs)
        + " |"
    )
    return "\n".join(lines)


def format_section(runs: list[RunMemory], args: argparse.Namespace, command: str, load: tuple[float, float]) -> str:
    """One dated Markdown section for docs/benchmarks.md."""
    when = datetime.datetime.now(datetime.timezone.utc)
    lines = [
        f"## {when:%Y-%m-%d %H:%M} UTC — memory: Ray executor over "
        + " and ".join(f"{run.n_images:,}" for run in runs)
        + " small images",
        "",
        f"- machine: {len(os.sched_getaffinity(0))} cores (`nproc`), {cpu_model()}, "
        f"{_total_memory_gib():.0f} GiB memory",
        f"- command: `{command}`",
        f"- job: embedded Ray, vit_t on CPU, {args.points_per_side}×{args.points_per_side} points, "
        f"shard_size {args.shard_size}; JPEG crops of the photos in `{args.source}`, 64–128 px a side",
        f"- measured: each process's `VmHWM` (peak resident set), sampled every {args.interval} s over the "
        "driver's process tree; RSS counts the shared pages a process touched (torch's libraries, "
        "Ray's object store), so figures are not additive",
        f"- load (1-min average) before / after: {load[0]:.2f} / {load[1]:.2f}",
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    return "\n".join([*lines, "", format_report(runs), ""])


def _total_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ray_memory",
        description="Peak memory of the driver and every Ray worker over 100 and 1,000 small images.",
    )
    parser.add_argument(
        "--counts",
        nargs="+",
        type=int,
        default=list(DEFAULT_COUNTS),
        metavar="N",
        help="image counts, one run each (default: 100 1000)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(DEFAULT_SOURCE),
        help=f"folder of photos to crop the images from (default: {DEFAULT_SOURCE})",
    )
    parser.add_argument("--points-per-side", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples (default: 0.1)")
    parser.add_argument("--write-doc", action="store_true", help="append a dated section to --doc")
    parser.add_argument("--doc", type=Path, default=Path(DEFAULT_DOC), help=f"(default: {DEFAULT_DOC})")
    parser.add_argument("--note", default=None, help="a remark to add to the doc section")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `python -m benchmarks.ray_memory`; returns the exit status."""
    args = _parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    load_before = os.getloadavg()[0]
    runs = []
    for n_images in args.counts:
        with tempfile.TemporaryDirectory(prefix=f"sam-batch-bench-memory-{n_images}-") as tmp:
            try:
                runs.append(run_once(Path(tmp), n_images, args))
            except (OSError, RuntimeError) as error:
                print(f"benchmarks.ray_memory: {error}", file=sys.stderr)
                return 1
        print(f"{n_images} images: {runs[-1].seconds:.0f} s\n{format_report(runs[-1:])}", file=sys.stderr, flush=True)
    print(format_report(runs))
    if args.write_doc:
        command = shlex.join(["sam-batch", "bench-memory", *argv])
        append_section(args.doc, format_section(runs, args, command, (load_before, os.getloadavg()[0])))
        print(f"appended to {args.doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
