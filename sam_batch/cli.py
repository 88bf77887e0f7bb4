"""The `sam-batch` command line: run, validate, render, export, refilter, weights fetch, export-onnx.

Benchmarks are not commands of the product: they live in the checkout's `benchmarks/`."""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_OK, EXIT_JOB_FAILED, EXIT_INVALID_JOB = 0, 1, 2

log = logging.getLogger("sam_batch")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("ray", "fsspec", "s3fs", "botocore", "urllib3", "rasterio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sam_batch.jobs.job_rules import JobError

    try:
        return args.handler(args)
    except JobError as error:
        print(f"sam-batch: invalid job: {error}", file=sys.stderr)
        return EXIT_INVALID_JOB
    except KeyboardInterrupt:
        print("sam-batch: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_JOB_FAILED
    except Exception as error:  # noqa: BLE001 - a job-level failure: one line, exit 1
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"sam-batch: {type(error).__name__}: {message}", file=sys.stderr)
        return EXIT_JOB_FAILED


def _parser() -> argparse.ArgumentParser:
    from sam_batch.engines.registry import MODEL_TYPES

    parser = argparse.ArgumentParser(prog="sam-batch", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) a job")
    run.add_argument("job", help="the job file (YAML)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--overwrite", action="store_true", help="replace an output made by a different job")
    run.add_argument(
        "--force", action="store_true", help="take the output from another run that holds it (one known to be dead)"
    )
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="validate a job file and print the plan")
    validate.add_argument("job")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(handler=_validate)

    render = commands.add_parser("render", help="draw the masks of one image over it")
    render.add_argument("output_uri")
    render.add_argument("image_uri")
    render.add_argument(
        "-o", "--out", required=True, help="the picture to write, in the format its extension names (.png, .jpg, ...)"
    )
    render.set_defaults(handler=_render)

    exporting = commands.add_parser(
        "export",
        help="write an output's masks as GeoPackage, FlatGeobuf, GeoJSON, GeoParquet, COCO JSON or amg.py's folders",
        description="Write the committed masks of an output to one file (or amg.py's folder layout), streamed.",
    )
    exporting.add_argument("output_uri", help="the output of a sam-batch run")
    exporting.add_argument(
        "--to",
        dest="destination",
        required=True,
        metavar="FILE_OR_URI",
        help=".gpkg .fgb .geojson .geojsons/.geojsonl .parquet (GeoParquet) .json (COCO); "
        "no extension: amg.py's layout, a folder per image",
    )
    exporting.add_argument(
        "--format", help="gpkg, fgb, geojson, geojsonseq, geoparquet, coco or amg, whatever the extension"
    )
    exporting.add_argument(
        "--where",
        metavar="SQL",
        help="DuckDB condition over the masks and images columns, "
        "e.g. \"predicted_iou > 0.9 AND image_uri LIKE '%%.tif'\"",
    )
    for bound in ("min", "max"):
        exporting.add_argument(
            f"--{bound}-area",
            type=float,
            metavar="A",
            help=f"{bound}imum area (inclusive): pixels for coco and amg; map units squared of "
            "the output CRS for GIS formats, before simplifying",
        )
    exporting.add_argument(
        "--simplify",
        type=float,
        metavar="TOLERANCE",
        help="GIS formats: simplify polygons within TOLERANCE map units, each keeping its topology",
    )
    exporting.add_argument(
        "--crs", metavar="EPSG:CODE", help="GIS formats: reproject to this CRS (default: the scenes' own)"
    )
    exporting.add_argument(
        "--coco-polygons", action="store_true", help="coco: polygons instead of RLE (holes are filled)"
    )
    exporting.add_argument("--overwrite", action="store_true", help="replace the destination if it exists")
    exporting.set_defaults(handler=_export)

    refiltering = commands.add_parser(
        "refilter",
        help="make an output's masks again at new thresholds from its stored candidates, without the model",
        description="Write a new output whose masks and images are those `sam-batch run` would write with the "
        "source's job at new model-free parameters, from the candidates it kept (output.candidates: true).",
    )
    refiltering.add_argument("output_uri", help="the output of a sam-batch run with output.candidates: true")
    refiltering.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="amg.pred_iou_thresh, amg.stability_score_thresh, amg.box_nms_thresh, amg.crop_nms_thresh "
        "or amg.min_mask_region_area",
    )
    refiltering.add_argument("-o", "--out", required=True, metavar="NEW_URI", help="the new output")
    refiltering.add_argument("--overwrite", action="store_true", help="replace an output made by a different job")
    refiltering.add_argument(
        "--force", action="store_true", help="take the new output from another run that holds it (one known dead)"
    )
    refiltering.set_defaults(handler=_refilter)

    weights = commands.add_parser("weights", help="manage model weights")
    weights_commands = weights.add_subparsers(dest="weights_command", required=True)
    fetch = weights_commands.add_parser("fetch", help="provision a checkpoint into the cache")
    fetch.add_argument("model_type", choices=MODEL_TYPES)
    fetch.add_argument("--force", action="store_true", help="download again even if cached")
    fetch.set_defaults(handler=_weights_fetch)

    export = commands.add_parser("export-onnx", help="export a model's image encoder and prompt decoders to ONNX")
    export.add_argument("model_type", choices=MODEL_TYPES)
    export.add_argument("-o", "--out", required=True, help="folder for encoder.onnx, decoder.onnx and predictor.onnx")
    export.add_argument("--checkpoint", help="path or fsspec URL (default: the cached default weights)")
    export.add_argument("--sha256", help="verify the checkpoint against this sha256")
    export.add_argument("--opset", type=int, help="ONNX opset (default 17)")
    export.set_defaults(handler=_export_onnx)
    return parser


def _run(args: argparse.Namespace) -> int:
    from sam_batch.jobs.job_file import load_job
    from sam_batch.jobs.runner import run_job

    job = load_job(args.job, args.overrides)
    _print_summary(job.output.uri, run_job(job, overwrite=args.overwrite, force=args.force))
    return EXIT_OK


def _refilter(args: argparse.Namespace) -> int:
    from sam_batch.jobs.refilter import RefilterError, refilter

    try:
        summary = refilter(args.output_uri, args.overrides, args.out, overwrite=args.overwrite, force=args.force)
    except RefilterError as error:
        print(f"sam-batch: refilter: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_INVALID_JOB
    _print_summary(summary.output_uri, summary)
    return EXIT_OK


def _print_summary(uri: str, summary) -> None:
    """What `run` and `refilter` print at their end."""
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in summary.stage_seconds.items())
    print(f"output: {uri}/masks/*.parquet and {uri}/images/*.parquet")
    print(
        f"images: {summary.images_ok} ok, {summary.images_error} error; masks: {summary.masks}; "
        f"shards: {summary.shards_committed} committed, {summary.shards_skipped} already done; "
        f"{summary.seconds:.1f}s ({summary.images_per_second:.3f} images/s)"
    )
    print(f"time per stage (summed over workers): {stages}")


def _validate(args: argparse.Namespace) -> int:
    from sam_batch.jobs.dataset import OutputDataset
    from sam_batch.jobs.job_file import load_job
    from sam_batch.jobs.plan import list_inputs, make_plan
    from sam_batch.jobs.prompt_table import plan_fingerprint, planned_images, read_prompt_table

    job = load_job(args.job, args.overrides)
    table = read_prompt_table(job) if job.prompts.uri else None
    listed = list_inputs(job)
    output = OutputDataset(job.output.uri, job.output.storage_options)
    output.check_root()  # the lines `run` stops with, before any work
    output.check_exclusive_create(output.check_writable())
    existing = output.read_plan()
    fingerprint = plan_fingerprint(job, table)
    resumes = existing is not None and existing.fingerprint == fingerprint
    if table is not None:
        listed = planned_images(table, listed)
        n_bad = sum(p.error is not None for prompts in table.prompts.values() for p in prompts)
        print(
            f"prompts: {sum(map(len, table.prompts.values()))} in {job.prompts.uri}, {n_bad} with a reason not to run"
        )
    plan = existing if resumes else make_plan(job, listed, fingerprint)
    print(f"job {job.name!r}: valid ({job.model.type}, backend {job.engine.backend}, executor {job.run.executor})")
    frozen = " (frozen by the job's first run)" if resumes else f" of up to {job.run.shard_size}"
    print(f"inputs: {len(plan.uris)} images in {len(plan.shards)} shards{frozen}")
    for shard in plan.shards:
        print(f"  {shard.name}: {len(shard.uris)} images, first {shard.uris[0]}")
    if existing is None:
        print(f"output: {job.output.uri} (new)")
    elif resumes:
        print(f"output: {job.output.uri} (holds this job: a run resumes it)")
        added, gone = sorted(set(listed) - set(plan.uris)), sorted(set(plan.uris) - set(listed))
        for what, uris in (
            ("listed now, not in the frozen plan (a run skips them)", added),
            ("in the frozen plan, no longer listed (a run still does them)", gone),
        ):
            if uris:
                print(f"  {len(uris)} {what}: first {uris[0]}")
    else:
        print(f"output: {job.output.uri} (holds a different job: a run needs --overwrite)")
    return EXIT_OK


def _render(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from sam_batch.jobs.dataset import OutputDataset
    from sam_batch.jobs.job_rules import normalise_uri
    from sam_batch.pipeline.errors import one_line_reason
    from sam_batch.pipeline.images import load_image
    from sam_batch.pipeline.render import box_mask, overlay

    output = OutputDataset(args.output_uri)
    try:
        plan = output.read_plan()
    except Exception as error:  # noqa: BLE001 - a missing bucket, a file, an unreadable plan: one line
        raise LookupError(
            f"{args.output_uri}: cannot be read as a sam-batch output ({one_line_reason(error)})"
        ) from None
    if plan is None:
        raise LookupError(f"{args.output_uri}: no sam-batch output there (no _sam_batch/plan.json)")
    candidates = _string_array({args.image_uri, normalise_uri(args.image_uri)})
    images = output.read_table("images")
    listed = images.filter(pc.is_in(images["image_uri"], value_set=candidates)).to_pylist()
    if not listed:
        raise LookupError(f"{args.image_uri}: not in the images table of {args.output_uri}")
    masks = output.read_table("masks")
    rows = masks.filter(pc.is_in(masks["image_uri"], value_set=candidates)).to_pylist()
    image = load_image(args.image_uri)
    segmented = (listed[0]["height"], listed[0]["width"])
    if rows and image.shape[:2] != segmented:
        raise ValueError(
            f"{args.image_uri}: reads as {image.shape[1]}x{image.shape[0]} pixels, "
            f"segmented as {segmented[1]}x{segmented[0]}"
        )
    picture = overlay(image, [box_mask(row) for row in rows])
    try:
        picture.save(args.out)  # the format its extension names
    except ValueError as error:  # PIL: unknown file extension
        raise ValueError(f"{args.out}: {error}; use .png or .jpg") from None
    print(f"{args.out}: {len(rows)} masks over {args.image_uri}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    from sam_batch.jobs.export import ExportRequest, export
    from sam_batch.jobs.export_source import ExportError

    request = ExportRequest(
        args.output_uri,
        args.destination,
        args.format,
        args.where,
        args.min_area,
        args.max_area,
        args.simplify,
        args.crs,
        args.coco_polygons,
        args.overwrite,
    )
    try:
        format_, counts = export(request)
    except ExportError as error:
        print(f"sam-batch: export: {error}", file=sys.stderr)
        return EXIT_INVALID_JOB
    skipped = "".join(f"; {n} skipped: {reason}" for reason, n in counts.skipped.items())
    print(f"{args.destination}: {counts.written} masks ({format_}) of {counts.selected} selected{skipped}")
    return EXIT_OK


def _weights_fetch(args: argparse.Namespace) -> int:
    from sam_batch.engines.checkpoints import fetch_weights

    path = fetch_weights(args.model_type, force=args.force, log=lambda line: print(line, file=sys.stderr))
    print(path)
    return EXIT_OK


def _export_onnx(args: argparse.Namespace) -> int:
    from sam_batch.engines.onnx_export import DEFAULT_OPSET, export_onnx

    files = export_onnx(
        args.model_type, args.checkpoint, args.out, sha256=args.sha256, opset=args.opset or DEFAULT_OPSET
    )
    print(f"{files.encoder}\n{files.decoder}\n{files.predictor}")
    return EXIT_OK


def _string_array(values: set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())


if __name__ == "__main__":
    sys.exit(main())
