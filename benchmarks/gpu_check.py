"""`python -m benchmarks.gpu_check`: what only a GPU can show, as one prepared, time-boxed run.

Made for a short loan of a GPU machine: `make gpu-kit` packs the weights, images, golden files
and missing wheels into `.gpu-kit/`, and `deploy/gpu-check.sh` runs this there (see
docs/benchmarks.md, "Measuring on a GPU"). Phases, in this order:

1. generate: per model and precision, `generate_masks` + `to_records` on every image (after
   one untimed warm-up image), best of `--repeats`: seconds per image, images/s, masks, peak
   GPU memory; the masks of fp16/bf16 against fp32 on the same device, and of fp32 against the
   golden files (MobileSAM's reference generator, fp32 on a CPU) where one fits the parameters.
2. reference (with `--reference`): MobileSAM's own generator, fp32, on the same device and
   images (after one warm-up): seconds per image; ours at each precision against it, in masks
   and in time.
3. run: `sam-batch run` as a process (`run.executor: local`, `engine.precision`
   `--run-precision`) over the images, copied until there are `--run-images`, with
   `raster.tile_size` above every image's size (so none is tiled, as in the reference): wall
   seconds, the run's own images/s and masks.
4. profile (`--profile PRECISION ...`): seconds per stage (encoder, decoder, upsampling and
   stability, boxes, NMS, RLE; `image_stages.stage_seconds`) summed over the images, the device
   synchronised around each stage.
5. encoder: the image encoder alone on each of `--encoder-batches` images per call (random
   inputs): ms per image, to show what several images per encoder call would gain.
6. compile (`--compile PRECISION ...`): generate again with the image encoder and the mask
   decoder under `torch.compile`: the first call's seconds, seconds per image, agreement with
   the eager masks.
7. prompts (`--prompts FOLDER`, per precision): the predictor's path on the reference
   predictor's prompt files (masks and scores against theirs, prompts/s), then
   `--prompt-boxes` random boxes on one photo; with `--reference` also MobileSAM's
   `SamPredictor` looping over those boxes and over `--prompts-per-image` boxes on each image,
   beside ours (prompts/s of each side).

`MODEL[:random|:seeded]` in `--models`: `vit_t` loads the checkpoint (the cached default or
`--checkpoint`); `vit_h:random` builds the model with random weights, for timing alone: its
masks are meaningless, so no agreement is reported for it, and its filters see other numbers
of masks than real weights would give. `vit_t_hq:seeded` and `sam2.1_hiera_t:seeded` (the
families whose weights cannot be had here) take MobileSAM's checkpoint for what they share with
SAM and seeded noise for the rest, as the tests make them (`tests/seeded_checkpoints.py`), so
that their masks follow the points: their fp16/bf16 masks are compared with their fp32 ones,
at the thresholds the tests use for them (`SEEDED_THRESHOLDS`, in the generate rows). They run
the generate phase only, so that the phases after it keep the time box's time.

Each result is appended to OUT/results.jsonl as soon as it is measured and OUT/report.md is
rewritten from them, so a run cut short still returns what it measured; no phase starts once
`--budget-s` seconds have passed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.reference import agreement, check_exit, read_golden, write_run_job

GOLDEN_NAME = "{image}.pps{points}.crop0.minarea0.json"
RUN_TIMEOUT_S = 300  # the run phase's process, so a hung run cannot take a lent machine's whole time


# the types `MODEL:seeded` builds (`seeded_model`), and the thresholds their generate phase runs
# at: the tests' for these weights (few of their masks reach the defaults' predicted IoU and stability)
SEEDED_THRESHOLDS = {
    "vit_t_hq": {"stability_score_thresh": 0.85},
    "sam2.1_hiera_t": {"pred_iou_thresh": 0.56, "stability_score_thresh": 0.35},
}
SEEDED_TYPES = tuple(SEEDED_THRESHOLDS)


@dataclass(frozen=True)
class MeasuredModel:
    """A model to measure: its type, and whether it loads the checkpoint, random weights, or
    seeded ones (`seeded_model`)."""

    model_type: str
    random_weights: bool
    seeded: bool = False

    @classmethod
    def parse(cls, text: str) -> MeasuredModel:
        model_type, _, weights = text.partition(":")
        if weights not in ("", "random", "seeded"):
            raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL, MODEL:random or MODEL:seeded")
        if weights == "seeded" and model_type not in SEEDED_TYPES:
            raise argparse.ArgumentTypeError(f"{text!r}: seeded weights are made for {', '.join(SEEDED_TYPES)} only")
        return cls(model_type, weights == "random", weights == "seeded")

    @property
    def label(self) -> str:
        weights = " (random weights)" if self.random_weights else " (seeded weights)" if self.seeded else ""
        return f"{self.model_type}{weights}"

    @property
    def sam2(self) -> bool:
        from sam_batch.engines.registry import is_sam2

        return is_sam2(self.model_type)


@dataclass(frozen=True)
class Measured:
    """One generate measurement: best seconds and records per image name."""

    seconds: dict[str, float]
    records: dict[str, list[dict]]


class Results:
    """The results so far: appended to OUT/results.jsonl one by one, OUT/report.md rewritten."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.jsonl").write_text("")

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        (self.out / "report.md").write_text(format_report(self.rows))
        print(json.dumps(row), flush=True)


class Budget:
    """Seconds since the start, against the time box within which phases may start."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def spent(self) -> bool:
        return time.perf_counter() - self.started >= self.seconds


def environment(device: str) -> dict:
    """torch, CUDA and the device, for the report's header."""
    import torch

    row = {
        "phase": "environment",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "torch_threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        from sam_batch.engines.backend import tf32_settings

        row |= tf32_settings()  # as torch starts; each engine then sets them for its precision
        props = torch.cuda.get_device_properties(device)
        row |= {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        }
    return row


class Engines:
    """TorchEngines on one device, over one model per spec, loaded (or randomly initialised,
    seeded) once: every precision runs on the same weights, cast by autocast."""

    def __init__(self, device: str, checkpoint: str | None) -> None:
        self.device = device
        self.checkpoint = checkpoint
        self.models: dict[MeasuredModel, object] = {}

    def engine(self, spec: MeasuredModel, precision: str, *, fresh: bool = False):
        """An engine at `precision`; `fresh` builds its own model (to change its modules)."""
        from sam_batch.engines.backend import pick_device
        from sam_batch.engines.sam2_engine import Sam2Engine, TorchSam2Networks
        from sam_batch.engines.torch_backend import TorchEngine

        model = None if fresh else self.models.get(spec)
        if model is None:
            model = self._build(spec)
            if not fresh:
                self.models[spec] = model
        if spec.sam2:
            return Sam2Engine(TorchSam2Networks(model, pick_device(self.device), precision))
        return TorchEngine(model, pick_device(self.device), precision)

    def _build(self, spec: MeasuredModel):
        import torch

        from sam_batch.engines.backend import load_model
        from sam_batch.engines.checkpoints import resolve_checkpoint
        from sam_batch.engines.sam import build_sam
        from sam_batch.engines.sam2 import build_sam2

        if spec.seeded:
            return seeded_model(spec.model_type, resolve_checkpoint("vit_t", self.checkpoint, None))
        if not spec.random_weights:
            return load_model(spec.model_type, self.checkpoint).model
        torch.manual_seed(0)
        return build_sam2(spec.model_type) if spec.sam2 else build_sam(spec.model_type)


def seeded_model(model_type: str, mobile_sam: Path):
    """`model_type` (one of `SEEDED_TYPES`) with MobileSAM's weights for what it shares with SAM
    and seeded noise for the rest, written and loaded as the tests' checkpoints are
    (`seeded_checkpoints`: in tests/ of a checkout, beside the package in the GPU kit)."""
    from sam_batch.engines.backend import load_model

    tests = Path(__file__).resolve().parents[1] / "tests"
    if tests.is_dir() and str(tests) not in sys.path:
        sys.path.insert(0, str(tests))
    from seeded_checkpoints import write_hq_checkpoint, write_sam2_checkpoint

    write = write_sam2_checkpoint if model_type == "sam2.1_hiera_t" else write_hq_checkpoint
    with tempfile.TemporaryDirectory(prefix="seeded-") as folder:
        return load_model(model_type, str(write(Path(folder) / f"{model_type}.pt", mobile_sam))).model


class GpuMemory:
    """Peak memory allocated by torch on a CUDA device between `reset` and `peak_mib` (None on a CPU)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def time_generate(
    engine,
    images: dict[str, np.ndarray],
    points_per_side: int,
    repeats: int,
    thresholds: dict[str, float] | None = None,
) -> tuple[dict, dict]:
    """Best-of-`repeats` seconds and the records of each image (the first run's), after one
    warm-up; the generator at `thresholds` where given, else at its defaults."""
    from benchmarks.reference import run_ours

    thresholds = thresholds or {}
    run_ours(engine, next(iter(images.values())), points_per_side, **thresholds)  # kernels, caches, allocator
    seconds, records = {}, {}
    for name, image in images.items():
        runs = [run_ours(engine, image, points_per_side, **thresholds) for _ in range(repeats)]
        seconds[name] = min(run.seconds for run in runs)
        records[name] = runs[0].records
    return seconds, records


def generate_row(spec: MeasuredModel, precision: str, seconds: dict, records: dict, memory: GpuMemory) -> dict:
    """One generate result: per image seconds and masks, images/s over them, peak memory."""
    return {
        "phase": "generate",
        "model": spec.label,
        "precision": precision,
        "images": {name: {"seconds": round(s, 4), "masks": len(records[name])} for name, s in seconds.items()},
        "images_per_second": round(len(seconds) / sum(seconds.values()), 3),
        "peak_gpu_mib": memory.peak_mib(),
    }


def agreement_row(compared: str, model: str, ours: dict, theirs: dict) -> dict:
    """Agreement per image of `ours` with `theirs` (records per image name), and the lowest of each."""
    per_image = {name: agreement(ours[name], theirs[name]) for name in ours if name in theirs}
    return {
        "phase": "agreement",
        "model": model,
        "compared": compared,
        "images": {
            name: {
                "recall": round(a.recall, 4),
                "precision": round(a.precision, 4),
                "mean_iou": round(a.mean_best_iou, 4),
                "masks": [len(ours[name]), len(theirs[name])],
            }
            for name, a in per_image.items()
        },
        "min_recall": round(min((a.recall for a in per_image.values()), default=float("nan")), 4),
        "min_precision": round(min((a.precision for a in per_image.values()), default=float("nan")), 4),
    }


def golden_records(golden_dir: Path | None, names: list[str], points_per_side: int) -> dict[str, list[dict]]:
    """The reference's records per image name, from the golden files made with these parameters."""
    from sam_batch.pipeline.params import AmgParams

    found = {}
    for name in names:
        path = golden_dir / GOLDEN_NAME.format(image=name, points=points_per_side) if golden_dir else None
        if path is not None and path.exists():
            golden = read_golden(path)
            if AmgParams(**golden["params"]) == AmgParams(points_per_side=points_per_side):
                found[name] = golden["masks"]
    return found


def encoder_rows(
    spec: MeasuredModel, engine, precision: str, device: str, batches: list[int], calls: int = 3
) -> Iterator[dict]:
    """ms per image of the image encoder alone (random inputs), on each of `batches` images per call."""
    import torch

    memory = GpuMemory(device)
    for batch in batches:
        inputs = torch.randn(batch, 3, 1024, 1024, device=engine.device)
        memory.reset()
        with torch.inference_mode(), engine.autocast():
            for _ in range(2):
                engine.model.embed(inputs)
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(calls):
                engine.model.embed(inputs)
            _synchronize(device)
        per_image = (time.perf_counter() - started) / (calls * batch)
        yield {
            "phase": "encoder",
            "model": spec.label,
            "precision": precision,
            "images_per_call": batch,
            "ms_per_image": round(per_image * 1000, 3),
            "peak_gpu_mib": memory.peak_mib(),
        }


def compile_engine(engine, backend: str) -> None:
    """Put the engine's image encoder and mask decoder under `torch.compile` (compiled at first call)."""
    import torch

    engine.model.image_encoder = torch.compile(engine.model.image_encoder, backend=backend)
    engine.model.mask_decoder = torch.compile(engine.model.mask_decoder, backend=backend)


def run_row(
    uris: list[Path],
    workdir: Path,
    *,
    checkpoint: str | None,
    device: str,
    precision: str,
    points_per_side: int,
    copies: int,
) -> dict:
    """`sam-batch run` (in-process executor) as a process over `copies` images made of `uris`."""
    inputs = workdir / "inputs"
    inputs.mkdir(parents=True)
    listed = []
    for i in range(copies):
        source = uris[i % len(uris)]
        listed.append(str(inputs / f"{i:04d}-{source.name}"))
        shutil.copyfile(source, listed[-1])
    job_file = write_run_job(
        workdir,
        "bench-gpu",
        listed,
        model_type="vit_t",
        checkpoint=checkpoint,
        points_per_side=points_per_side,
        engine={"device": device, "precision": precision},
        raster={"tile_size": 8192},
        run={"executor": "local"},
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sam_batch.cli", "run", str(job_file)],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    wall = time.perf_counter() - started
    check_exit(proc, proc.stderr, "sam-batch run")  # a failure is the phase's one-line `failed` row
    record = json.loads((workdir / "out" / "run.json").read_text())
    return {
        "phase": "run",
        "precision": precision,
        "images": copies,
        "process_seconds": round(wall, 2),
        "process_images_per_second": round(copies / wall, 3),
        "run_images_per_second": record["images_per_second"],
        "images_ok": record["images_ok"],
        "images_error": record["images_error"],
        "masks": record["masks"],
        "stage_seconds": record["stage_seconds"],
    }


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Session:
    """One bench-gpu run: the phases in order, each result added as it is measured, none
    started once the budget is spent, a failed one recorded without losing the others."""

    def __init__(self, args: argparse.Namespace, results: Results) -> None:
        from sam_batch.pipeline.images import load_image

        self.args = args
        self.results = results
        self.budget = Budget(args.budget_s)
        self.engines = Engines(args.device, args.checkpoint)
        self.images = {Path(uri).name: load_image(uri) for uri in args.images}
        self.golden = golden_records(args.golden, list(self.images), args.points_per_side)
        self.predictor_reference: dict[str, dict] = {}  # the reference predictor's JSON per prompts case
        self.eager: dict[tuple[MeasuredModel, str], Measured] = {}  # generate's, for the agreements

    def measure(self) -> None:
        args = self.args
        self.results.add(environment(args.device))
        for spec in args.models:
            for precision in args.precisions:
                self._phase(f"generate {spec.label} {precision}", self.generate, spec, precision)
        if args.reference:
            self._phase("reference", self.reference)
        if args.run_images:
            self._phase("run", self.run)
        timed = [spec for spec in args.models if not spec.seeded]  # seeded models: the generate phase only
        for spec in timed:
            for precision in args.profile:
                self._phase(f"profile {spec.label} {precision}", self.profile, spec, precision)
        for spec in timed if args.encoder_batches else []:
            for precision in args.precisions:
                self._phase(f"encoder {spec.label} {precision}", self.encoder, spec, precision)
        for spec in timed:
            for precision in args.compile:
                self._phase(f"compile {spec.label} {precision}", self.compiled, spec, precision)
        for precision in args.precisions if args.prompts else []:
            self._phase(f"prompts vit_t {precision}", self.prompts, precision)

    def _phase(self, name: str, step: Callable[..., None], *step_args) -> None:
        if self.budget.spent():
            self.results.add(
                {"phase": "skipped", "what": name, "reason": f"the {self.args.budget_s:.0f} s budget was spent"}
            )
            return
        try:
            step(*step_args)
        except Exception as error:  # noqa: BLE001 - one failed phase must not lose the others
            self.results.add({"phase": "failed", "what": name, "error": f"{type(error).__name__}: {error}"[:500]})

    def generate(self, spec: MeasuredModel, precision: str) -> None:
        engine = self.engines.engine(spec, precision)
        memory = GpuMemory(self.args.device)
        memory.reset()
        thresholds = SEEDED_THRESHOLDS[spec.model_type] if spec.seeded else {}
        seconds, records = time_generate(engine, self.images, self.args.points_per_side, self.args.repeats, thresholds)
        self.results.add(generate_row(spec, precision, seconds, records, memory) | thresholds)
        self.eager[spec, precision] = Measured(seconds, records)
        if spec.random_weights:
            return
        device = self.args.device
        if precision == "fp32" and self.golden and spec.model_type == "vit_t":
            self._agreement(f"{device} fp32 vs the reference (golden, CPU fp32)", spec, records, self.golden)
        if precision != "fp32" and (spec, "fp32") in self.eager:
            self._agreement(f"{precision} vs fp32 ({device})", spec, records, self.eager[spec, "fp32"].records)

    def reference(self) -> None:
        """MobileSAM's own generator (fp32) on the same device and images, against ours at each precision."""
        reference = run_reference_on(self.images, self.args)
        self.results.add(
            {
                "phase": "reference",
                "model": "vit_t",
                "precision": "fp32",
                "images": {
                    n: {"seconds": round(s, 4), "masks": len(reference.records[n])}
                    for n, s in reference.seconds.items()
                },
                "images_per_second": round(len(self.images) / sum(reference.seconds.values()), 3),
            }
        )
        for (spec, precision), ours in self.eager.items():
            if spec == MeasuredModel("vit_t", False):
                row = agreement_row(
                    f"{precision} vs the reference fp32 ({self.args.device})",
                    spec.label,
                    ours.records,
                    reference.records,
                )
                row["reference_seconds_over_ours"] = round(
                    sum(reference.seconds.values()) / sum(ours.seconds.values()), 2
                )
                self.results.add(row)

    def run(self) -> None:
        args = self.args
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            self.results.add(
                run_row(
                    [Path(uri) for uri in args.images],
                    Path(tmp),
                    checkpoint=args.checkpoint,
                    device=args.device,
                    precision=args.run_precision,
                    points_per_side=args.points_per_side,
                    copies=args.run_images,
                )
            )

    def profile(self, spec: MeasuredModel, precision: str) -> None:
        from benchmarks.image_stages import stage_seconds
        from benchmarks.reference import run_ours

        engine = self.engines.engine(spec, precision)
        run_ours(engine, next(iter(self.images.values())), self.args.points_per_side)  # warm-up
        totals: Counter[str] = Counter()
        masks = 0
        for image in self.images.values():
            seconds, n_masks = stage_seconds(
                engine, image, self.args.points_per_side, lambda: _synchronize(self.args.device)
            )
            totals.update(seconds)
            masks += n_masks
        self.results.add(
            {
                "phase": "profile",
                "model": spec.label,
                "precision": precision,
                "images": len(self.images),
                "masks": masks,
                "seconds": {stage: round(s, 4) for stage, s in totals.items()},
            }
        )

    def encoder(self, spec: MeasuredModel, precision: str) -> None:
        engine = self.engines.engine(spec, precision)
        for row in encoder_rows(spec, engine, precision, self.args.device, self.args.encoder_batches):
            self.results.add(row)

    def compiled(self, spec: MeasuredModel, precision: str) -> None:
        engine = self.engines.engine(spec, precision, fresh=True)
        started = time.perf_counter()
        compile_engine(engine, self.args.compile_backend)
        memory = GpuMemory(self.args.device)
        memory.reset()
        seconds, records = time_generate(engine, self.images, self.args.points_per_side, self.args.repeats)
        row = generate_row(spec, precision, seconds, records, memory)
        row |= {
            "phase": "compile",
            "backend": self.args.compile_backend,
            "compile_and_timing_seconds": round(time.perf_counter() - started, 2),
        }
        self.results.add(row)
        if not spec.random_weights and (spec, precision) in self.eager:
            self._agreement(f"compiled vs eager {precision}", spec, records, self.eager[spec, precision].records)

    def prompts(self, precision: str) -> None:
        """The predictor's path (`pipeline.prompts`) on the reference predictor's prompt files
        whose image is among --images: its masks against the reference's (min IoU, max
        |Δ score|) and prompts/s (best of --repeats after a warm-up), then --prompt-boxes
        seeded random boxes on the largest of those images, one encoding for all."""
        engine = self.engines.engine(MeasuredModel("vit_t", False), precision)
        files = sorted(self.args.prompts.glob("*.prompts.json"))
        cases = [
            (f.name.removesuffix(".prompts.json"), f)
            for f in files
            if f.name.removesuffix(".prompts.json") in self.images
        ]
        if not cases:
            raise ValueError(f"no prompt file in {self.args.prompts} is for one of --images")
        worst_iou, worst_score, seconds, n_prompts = 1.0, 0.0, 0.0, 0
        for name, path in cases:
            reference = json.loads(path.read_text())["prompts"]
            prompts = [_prompt(p) for p in reference]
            masks, took = time_prompts(engine, self.images[name], prompts, self.args.repeats, self.args.device)
            seconds, n_prompts = seconds + took, n_prompts + len(prompts)
            for index, p in enumerate(reference):
                mine = sorted((m for m in masks if m.prompt == index), key=lambda m: m.mask_index)
                for mask, rle, score in zip(mine, p["masks"], p["scores"], strict=True):
                    worst_iou = min(worst_iou, _iou(mask.mask, rle))
                    worst_score = max(worst_score, abs(mask.mask.iou - score))
        name = max((name for name, _ in cases), key=lambda n: self.images[n].shape[0] * self.images[n].shape[1])
        boxes = _random_boxes(self.images[name].shape[:2], self.args.prompt_boxes)
        box_masks, boxes_seconds = time_prompts(engine, self.images[name], boxes, self.args.repeats, self.args.device)
        row = {
            "phase": "prompts",
            "model": "vit_t",
            "precision": precision,
            "prompts": n_prompts,
            "min_iou": round(worst_iou, 5),
            "max_score_delta": float(f"{worst_score:.3g}"),
            "prompts_per_second": round(n_prompts / seconds, 1),
            "boxes": len(boxes),
            "boxes_per_second": round(len(boxes) / boxes_seconds, 1),
        }
        if self.args.reference:
            row |= self._reference_prompts(engine, {name: boxes}, box_masks)
        self.results.add(row)

    def _reference_prompts(self, engine, one_image: dict[str, list], box_masks: list) -> dict:
        """MobileSAM's `SamPredictor` (fp32, on --device, in --reference-python) looping over the
        same random boxes, then over --prompts-per-image boxes on each of --images, beside ours:
        prompts/s of each and max |Δ score| (ours at this precision against its fp32). The
        reference runs once, for the first precision; later ones reuse its figures."""
        per_image = {n: _random_boxes(image.shape[:2], self.args.prompts_per_image) for n, image in self.images.items()}
        many_masks, many_seconds = time_prompts_per_image(engine, self.images, per_image, self.args.device)
        cases = {"boxes": (one_image, box_masks), "many": (per_image, many_masks)}
        if not self.predictor_reference:
            self.predictor_reference = self._run_reference_predictor({key: boxes for key, (boxes, _) in cases.items()})
        found = {}
        for key, (boxes, masks) in cases.items():
            reference = self.predictor_reference[key]
            scores = [m.mask.iou for m in masks]
            found[f"reference_{key}_per_second"] = round(sum(map(len, boxes.values())) / reference["seconds"], 1)
            found[f"reference_{key}_max_score_delta"] = float(
                f"{max(abs(a - b) for a, b in zip(scores, reference['scores'], strict=True)):.3g}"
            )
        n_many = sum(len(boxes) for boxes in per_image.values())
        return found | {"many_boxes": n_many, "many_per_second": round(n_many / many_seconds, 1)}

    def _run_reference_predictor(self, cases: dict[str, dict[str, list]]) -> dict[str, dict]:
        """The reference driver's JSON for each case (its box prompts by image name), the images
        saved once for all of them."""
        import torch

        from benchmarks.prompts import Case, run_reference
        from benchmarks.reference import save_pixels
        from sam_batch.engines.checkpoints import resolve_checkpoint

        checkpoint = resolve_checkpoint("vit_t", self.args.checkpoint, None)
        found = {}
        with tempfile.TemporaryDirectory(prefix="bench-gpu-predictor-") as tmp:
            pixels = dict(zip(self.images, save_pixels(list(self.images.values()), Path(tmp))))
            for key, boxes in cases.items():
                case = Case(key, [(n, [list(p.box) for p in prompts]) for n, prompts in boxes.items()])
                found[key], _ = run_reference(
                    Path(self.args.reference_python),
                    case,
                    pixels,
                    checkpoint,
                    model_type="vit_t",
                    threads=torch.get_num_threads(),
                    device=self.args.device,
                    isolated=False,
                )
        return found

    def _agreement(self, compared: str, spec: MeasuredModel, ours: dict, theirs: dict) -> None:
        self.results.add(agreement_row(compared, spec.label, ours, theirs))


def time_prompts(engine, image: np.ndarray, prompts: list, repeats: int, device: str) -> tuple[list, float]:
    """The masks of `prompts` on `image` (one window: the photo whole) and the best of
    `repeats` seconds, after one warm-up, the device synchronised."""
    from benchmarks.prompts import photo_plan
    from sam_batch.pipeline.prompts import segment_prompts
    from sam_batch.pipeline.rasters import ArrayScene

    plan = photo_plan(image, prompts)
    scene = ArrayScene(image)
    segment_prompts(engine, scene, plan, False, lambda: None)
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        masks = segment_prompts(engine, scene, plan, False, lambda: None)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return masks, best


def time_prompts_per_image(
    engine, images: dict[str, np.ndarray], boxes: dict[str, list], device: str
) -> tuple[list, float]:
    """Each image's `boxes` (one window: the photo whole) one image after the other, as the
    reference predictor loops: the masks in image order and the seconds of one pass after a
    warm-up on the first image's first box, the device synchronised."""
    from benchmarks.prompts import segment_photo

    first = next(iter(boxes))
    segment_photo(engine, images[first], boxes[first][:1])
    _synchronize(device)
    started = time.perf_counter()
    masks = [mask for name, prompts in boxes.items() for mask in segment_photo(engine, images[name], prompts)]
    _synchronize(device)
    return masks, time.perf_counter() - started


def _prompt(reference: dict):
    """A reference prompt file's prompt as a `pipeline.prompts.Prompt`."""
    from sam_batch.pipeline.prompts import Prompt

    box = tuple(reference["box"]) if reference["box"] is not None else None
    points = tuple(tuple(p) for p in reference["points"] or [])
    return Prompt(
        reference["prompt_id"], box, points, tuple(reference["point_labels"] or []), reference["multimask_output"]
    )


def _random_boxes(image_hw: tuple[int, int], count: int) -> list:
    """`count` box prompts of seeded random place and size (8 to a third of the image a side)."""
    from sam_batch.pipeline.prompts import Prompt

    height, width = image_hw
    rng = np.random.default_rng(0)
    sides = rng.uniform(8, [width / 3, height / 3], size=(count, 2))
    corners = rng.uniform(0, 1, size=(count, 2)) * ([width, height] - sides)
    return [
        Prompt(f"r{i}", (x, y, x + w, y + h), (), (), False)
        for i, ((x, y), (w, h)) in enumerate(zip(corners.tolist(), sides.tolist()))
    ]


def _reference_prompts_detail(row: dict) -> str:
    """The prompts row's reference side, when it was measured."""
    if "reference_boxes_per_second" not in row:
        return ""
    return (
        f" (reference predictor {row['reference_boxes_per_second']}); {row['many_boxes']} boxes over the images: "
        f"{row['many_per_second']} boxes/s (reference {row['reference_many_per_second']}); max |Δ score| against "
        f"it {max(row['reference_boxes_max_score_delta'], row['reference_many_max_score_delta'])}"
    )


def _iou(mask, rle: dict) -> float:
    """IoU of a placed `SceneMask` with a full-image COCO RLE mask."""
    from sam_batch.pipeline.rle import decode_rle

    reference = decode_rle(rle).astype(bool)
    placed = np.zeros_like(reference)
    height, width = mask.pixels.shape
    placed[mask.y0 : mask.y0 + height, mask.x0 : mask.x0 + width] = mask.pixels
    union = (placed | reference).sum()
    return float((placed & reference).sum() / union) if union else 1.0


def run_reference_on(images: dict[str, np.ndarray], args: argparse.Namespace) -> Measured:
    """MobileSAM's generator (fp32) in `args.reference_python` on `args.device`, one warm-up first."""
    import torch

    from benchmarks.reference import run_reference, save_pixels
    from sam_batch.engines.checkpoints import resolve_checkpoint

    checkpoint = resolve_checkpoint("vit_t", args.checkpoint, None)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-reference-") as tmp:
        pixels = save_pixels(list(images.values()), Path(tmp))
        sides, _, _ = run_reference(
            Path(args.reference_python),
            pixels,
            checkpoint,
            model_type="vit_t",
            points_per_side=args.points_per_side,
            threads=torch.get_num_threads(),
            device=args.device,
            warm_up=True,
            isolated=False,
            log=lambda line: None,
        )
    return Measured(
        {n: side.seconds for n, side in zip(images, sides)}, {n: side.records for n, side in zip(images, sides)}
    )


def format_report(rows: list[dict]) -> str:
    """Markdown of the results so far: one table per phase."""
    lines = ["# bench-gpu", ""]
    for row in rows:
        if row["phase"] == "environment":
            lines.append("- " + ", ".join(f"{k}: {v}" for k, v in row.items() if k != "phase"))
    lines += [
        "",
        "| phase | model | precision | images/s | peak GPU MiB | detail |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        phase = row["phase"]
        if phase in ("generate", "compile", "reference"):
            per_image = ", ".join(f"{n} {v['seconds']:.3f} s / {v['masks']} masks" for n, v in row["images"].items())
            lines.append(
                f"| {phase} | {row['model']} | {row['precision']} | {row['images_per_second']} | "
                f"{row.get('peak_gpu_mib', '')} | {per_image} |"
            )
        elif phase == "agreement":
            speedup = (
                f", reference s / ours {row['reference_seconds_over_ours']}"
                if "reference_seconds_over_ours" in row
                else ""
            )
            lines.append(
                f"| agreement | {row['model']} | {row['compared']} | | | min recall {row['min_recall']}, "
                f"min precision {row['min_precision']} over {len(row['images'])} images{speedup} |"
            )
        elif phase == "profile":
            stages = ", ".join(f"{stage} {s:.3f} s" for stage, s in row["seconds"].items())
            lines.append(
                f"| profile | {row['model']} | {row['precision']} | | | {row['images']} images, "
                f"{row['masks']} masks: {stages} |"
            )
        elif phase == "encoder":
            lines.append(
                f"| encoder | {row['model']} | {row['precision']} | {1000 / row['ms_per_image']:.1f} | "
                f"{row['peak_gpu_mib']} | {row['images_per_call']} per call: {row['ms_per_image']} ms per image |"
            )
        elif phase == "run":
            lines.append(
                f"| run | vit_t | {row['precision']} | {row['process_images_per_second']} (process), "
                f"{row['run_images_per_second']} (run) | | {row['images_ok']} of {row['images']} images ok, "
                f"{row['masks']} masks, "
                f"{row['process_seconds']} s |"
            )
        elif phase == "prompts":
            lines.append(
                f"| prompts | {row['model']} | {row['precision']} | | | {row['prompts']} reference prompts: "
                f"min IoU {row['min_iou']}, max |Δ score| {row['max_score_delta']}, {row['prompts_per_second']} "
                f"prompts/s; {row['boxes']} random boxes on one image: {row['boxes_per_second']} boxes/s"
                + _reference_prompts_detail(row)
                + " |"
            )
        elif phase in ("skipped", "failed"):
            lines.append(f"| {phase} | | | | | {row.get('what', '')} {row.get('error', row.get('reason', ''))} |")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", required=True, help="image files (photos)")
    parser.add_argument("--golden", type=Path, help="the folder of golden files, for fp32 parity")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl and report.md")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--models",
        nargs="+",
        type=MeasuredModel.parse,
        default=[MeasuredModel("vit_t", False)],
        help="MODEL, MODEL:random, or MODEL:seeded for vit_t_hq and sam2.1_hiera_t (default: vit_t)",
    )
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16"])
    parser.add_argument("--checkpoint", help="weights for models without :random (default: the cached default)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--reference", action="store_true", help="also time MobileSAM's generator on --device, in --reference-python"
    )
    parser.add_argument(
        "--reference-python",
        default=sys.executable,
        help="a Python that imports mobile_sam (default: this one, with its PYTHONPATH)",
    )
    parser.add_argument("--run-images", type=int, default=64, help="images in the `sam-batch run` phase (0: skip)")
    parser.add_argument("--run-precision", default="fp16")
    parser.add_argument(
        "--encoder-batches",
        nargs="*",
        type=int,
        default=[1, 4, 8],
        help="images per encoder call in the encoder phase (none: skip it)",
    )
    parser.add_argument(
        "--profile",
        nargs="*",
        default=[],
        metavar="PRECISION",
        help="also time each stage, the device synchronised around it, at these precisions",
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        default=[],
        metavar="PRECISION",
        help="also measure under torch.compile at these precisions",
    )
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--prompts", type=Path, help="a folder of the reference predictor's prompt files (*.prompts.json) to check"
    )
    parser.add_argument("--prompt-boxes", type=int, default=1000, help="random boxes timed in the prompts phase")
    parser.add_argument(
        "--prompts-per-image",
        type=int,
        default=10,
        help="random boxes on each of --images, timed against the reference predictor when --reference is given",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="no phase starts after this many seconds")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    results = Results(args.out)
    Session(args, results).measure()
    print(f"bench-gpu: {len(results.rows)} results in {args.out / 'results.jsonl'} and {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
