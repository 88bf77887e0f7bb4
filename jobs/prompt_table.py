"""A job's prompts table (`prompts.uri`): read once when the job is planned, checked row by row,
frozen beside the plan, and read back by the workers.

Formats, by the file's extension:
- Parquet (`.parquet`, `.geoparquet`): `box` a list of 4 numbers, `points` a list of [x, y],
  `point_labels` a list of 0/1, in image pixels; or, in a GeoParquet file, a `geometry`
  column in its `geo` metadata's CRS: a Point is a foreground point, any other geometry a box
  (its bounds); a `geometry` column in a Parquet file without `geo` metadata is in pixels.
- CSV (`.csv`): the same columns, lists written as JSON (`"[10, 20, 110, 220]"`).
- GeoJSON (`.geojson`, `.json`): a FeatureCollection whose properties are the columns and whose
  geometries are prompts as in GeoParquet, in WGS 84 (or the legacy `crs` member's).

Every row names its `image_uri`; a relative local path is taken from the table's folder.
`prompt_id` is the table's (text), else `p-` and the first 16 hex digits of sha256 over the
row's image, box, points and labels (stable across runs; a repeat gets `-2`, `-3`, …).
`multimask_output`, where the table has it and the row is not null, overrides the job's.
The plan's fingerprint holds a digest of the prompts as read, so a changed table is another job.
A row that cannot be segmented keeps its place with a reason (`Prompt.error`), as does a row
whose image is not one of the job's inputs; each reaches its image's `images` row. A file that
is not such a table is the job's error (`PromptTableError`), before any image is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.job_rules import JobError, normalise_uri
from sam_batch.jobs.schema import JobSpec
from sam_batch.pipeline.errors import one_line_reason
from sam_batch.pipeline.prompts import Prompt, check_prompt
from sam_batch.pipeline.tables import prompt_schemas

log = logging.getLogger("sam_batch")
WGS84 = "OGC:CRS84"  # GeoJSON's and GeoParquet's CRS when none is named (x = longitude)


class PromptTableError(JobError):
    """The prompts table cannot be read as one (one line, naming the file)."""


@dataclass
class PromptTable:
    """A read prompts table: `prompts` by normalised image URI, in table order, and the Arrow
    schema of the carried columns; `digest`: sha256 hex of its prompts (`_digest`)."""

    prompts: dict[str, list[Prompt]]
    carried: pa.Schema
    digest: str

    def mark_unlisted(self, inputs: set[str]) -> None:
        """Give every prompt whose image is not in `inputs` its reason."""
        for uri, prompts in self.prompts.items():
            if uri not in inputs:
                reason = "image_uri is not one of the job's inputs (input.uris, input.manifest)"
                self.prompts[uri] = [p if p.error else _with_error(p, reason) for p in prompts]

    def to_arrow(self) -> pa.Table:
        """The table as frozen beside the plan: one row per prompt, the carried columns last."""
        rows = [_frozen_row(uri, p, self.carried.names) for uri, ps in self.prompts.items() for p in ps]
        return pa.Table.from_pylist(rows, schema=_frozen_schema(self.carried))


def read_prompt_table(job: JobSpec) -> PromptTable:
    """The job's prompts table, read and checked row by row."""
    uri = job.prompts.uri
    options = job.input.storage_options
    try:
        with fsspec.open(uri, "rb", **options) as file:
            data = file.read()
    except Exception as error:  # noqa: BLE001 - any store's failure is this one line
        raise PromptTableError(f"prompts.uri {uri}: cannot be read: {one_line_reason(error)}") from None
    table, crs = _parse(uri, data)
    if not table.num_rows:
        raise PromptTableError(f"prompts.uri {uri}: has no rows")
    missing = [name for name in ("image_uri", *job.prompts.carry) if name not in table.column_names]
    if missing:
        raise PromptTableError(f"prompts.uri {uri}: has no column {missing[0]!r} (columns: {table.column_names})")
    if not ({"box", "points", "geometry"} & set(table.column_names)):
        raise PromptTableError(f"prompts.uri {uri}: has none of the columns box, points, geometry")
    carried = pa.schema([table.schema.field(name) for name in job.prompts.carry])
    folder = posixpath.dirname(uri)
    by_image: dict[str, list[Prompt]] = {}
    for row in table.to_pylist():
        image_uri, prompt = _prompt(row, job, crs, folder)
        by_image.setdefault(image_uri, []).append(prompt)
    for prompts in by_image.values():
        _number_repeats(prompts)
    return PromptTable(by_image, carried, _digest(by_image, carried))


def planned_images(table: PromptTable, listed: list[str]) -> list[str]:
    """The images a prompt job plans, sorted: every image its table names; those not among
    the job's inputs (`listed`) get their prompts' reasons, and inputs without a prompt are
    never read."""
    table.mark_unlisted(set(listed))
    unprompted = len(set(listed) - set(table.prompts))
    if unprompted:
        log.info("prompts: %d of the %d inputs have no prompt and are not read", unprompted, len(listed))
    return sorted(table.prompts)


def plan_fingerprint(job: JobSpec, table: PromptTable | None) -> str:
    """The plan's fingerprint: the job's, with the prompts table's content where there is one."""
    if table is None:
        return job.fingerprint()
    return hashlib.sha256(f"{job.fingerprint()}:{table.digest}".encode()).hexdigest()


def prompt_book(job: JobSpec, dataset: OutputDataset) -> tuple[dict[str, list[Prompt]] | None, tuple | None]:
    """A prompt job's prompts by image, as frozen with its plan, and its tables' schemas
    (`tables.prompt_schemas`); (None, None) for an automatic job."""
    if job.prompts.uri is None:
        return None, None
    frozen = dataset.read_prompts()
    carried = pa.schema([frozen.schema.field(name) for name in job.prompts.carry])
    return frozen_prompts(frozen, job.prompts.carry), prompt_schemas(carried)


def frozen_prompts(table: pa.Table, carry: tuple[str, ...]) -> dict[str, list[Prompt]]:
    """`PromptTable.to_arrow`'s table → prompts by image URI, as they were frozen."""
    by_image: dict[str, list[Prompt]] = {}
    for row in table.to_pylist():
        prompt = Prompt(
            prompt_id=row["prompt_id"],
            box=tuple(row["box"]) if row["box"] is not None else None,
            points=tuple(tuple(p) for p in row["points"]),
            labels=tuple(row["point_labels"]),
            multimask=row["multimask_output"],
            crs=row["crs"],
            carried=tuple(row[name] for name in carry),
            error=row["error"],
        )
        by_image.setdefault(row["image_uri"], []).append(prompt)
    return by_image


def _parse(uri: str, data: bytes) -> tuple[pa.Table, str | None]:
    """The file's rows as an Arrow table with `box`/`points`/`point_labels` as lists where the
    format writes them as text, and the CRS of its `geometry` column (None: none)."""
    suffix = posixpath.splitext(uri.lower())[1]
    try:
        if suffix in (".parquet", ".geoparquet"):
            table = pq.read_table(io.BytesIO(data))
            return table, _geoparquet_crs(table)
        if suffix == ".csv":
            from pyarrow import csv

            table = csv.read_csv(io.BytesIO(data))
            return _lists_from_json(table), None
        if suffix in (".geojson", ".json"):
            return _geojson(data)
    except PromptTableError:
        raise
    except Exception as error:  # noqa: BLE001 - a file that is not a table of its kind
        raise PromptTableError(
            f"prompts.uri {uri}: not a readable {suffix[1:]} table: {one_line_reason(error)}"
        ) from None
    raise PromptTableError(
        f"prompts.uri {uri}: unknown table format {suffix or '(no extension)'!r}; "
        "use .parquet, .geoparquet, .csv, .geojson or .json"
    )


def _geoparquet_crs(table: pa.Table) -> str | None:
    """The CRS of a GeoParquet file's `geometry` column, as WKT (OGC:CRS84 when unnamed)."""
    metadata = (table.schema.metadata or {}).get(b"geo")
    if metadata is None or "geometry" not in table.column_names:
        return None
    crs = json.loads(metadata).get("columns", {}).get("geometry", {}).get("crs", WGS84)
    if crs is None or isinstance(crs, str):
        return crs or WGS84
    from pyproj import CRS

    return CRS.from_json_dict(crs).to_wkt()


def _lists_from_json(table: pa.Table) -> pa.Table:
    """CSV's `box`, `points` and `point_labels` cells (JSON text) as lists."""
    for name in ("box", "points", "point_labels"):
        if name in table.column_names:
            values = [json.loads(v) if isinstance(v, str) and v.strip() else None for v in table[name].to_pylist()]
            table = table.set_column(table.column_names.index(name), name, pa.array(values))
    return table


def _geojson(data: bytes) -> tuple[pa.Table, str]:
    """A FeatureCollection → rows of its properties with `geometry` as WKB, and its CRS."""
    from shapely.geometry import shape

    collection = json.loads(data)
    if not isinstance(collection, dict) or collection.get("type") != "FeatureCollection":
        raise PromptTableError("prompts.uri: a GeoJSON prompts file must be a FeatureCollection")
    rows = [
        {**(f.get("properties") or {}), "geometry": shape(f["geometry"]).wkb if f.get("geometry") else None}
        for f in collection.get("features", [])
    ]
    crs = ((collection.get("crs") or {}).get("properties") or {}).get("name", WGS84)
    return pa.Table.from_pylist(rows), crs


def _prompt(row: dict, job: JobSpec, crs: str | None, folder: str) -> tuple[str, Prompt]:
    """One row → its normalised image URI and its prompt (with `error` where it is unusable)."""
    image_uri = row.get("image_uri")
    image_uri = _image_uri(image_uri, folder) if isinstance(image_uri, str) and image_uri else "(no image_uri)"
    multimask = row.get("multimask_output")
    prompt = Prompt(
        prompt_id="",
        box=None,
        points=(),
        labels=(),
        multimask=job.prompts.multimask_output if multimask is None else bool(multimask),
        carried=tuple(row[name] for name in job.prompts.carry),
    )
    try:
        prompt = _shape(prompt, row, crs)
    except Exception as error:  # noqa: BLE001 - any bad cell (a number as a box, an empty or broken geometry)
        prompt = _with_error(prompt, f"cannot be read: {one_line_reason(error)}")
    given = row.get("prompt_id")
    prompt_id = str(given) if given is not None else _derived_id(image_uri, prompt)
    error = prompt.error or (None if image_uri != "(no image_uri)" else "has no image_uri") or check_prompt(prompt)
    return image_uri, Prompt(
        prompt_id, prompt.box, prompt.points, prompt.labels, prompt.multimask, prompt.crs, prompt.carried, error
    )


def _shape(prompt: Prompt, row: dict, crs: str | None) -> Prompt:
    """The row's box and points: a `geometry` (map coordinates) when it has one, else its
    `box`, `points` and `point_labels` (pixels)."""
    from dataclasses import replace

    if row.get("geometry") is not None:
        from shapely import wkb

        geometry = wkb.loads(row["geometry"])
        if geometry.geom_type == "Point":
            return replace(prompt, points=((float(geometry.x), float(geometry.y)),), labels=(1,), crs=crs)
        return replace(prompt, box=tuple(float(v) for v in geometry.bounds), crs=crs)
    box = row.get("box")
    points = row.get("points") or ()
    labels = row.get("point_labels")
    return replace(
        prompt,
        box=tuple(float(v) for v in box) if box is not None else None,
        points=tuple(tuple(float(v) for v in p) for p in points),
        labels=tuple(int(v) if float(v) == int(v) else -1 for v in labels)
        if labels is not None
        else (1,) * len(points),
    )


def _digest(by_image: dict[str, list[Prompt]], carried: pa.Schema) -> str:
    """sha256 hex of the prompts as read (not the file's bytes, which a rewrite of the same
    rows may change), in table order per image, with the carried columns' types."""
    rows = [[uri, _frozen_row(uri, p, carried.names)] for uri, ps in sorted(by_image.items()) for p in ps]
    content = json.dumps([str(carried), rows], default=str, sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()


def _with_error(prompt: Prompt, reason: str) -> Prompt:
    from dataclasses import replace

    return replace(prompt, error=reason)


def _image_uri(uri: str, folder: str) -> str:
    """A row's image URI as the job's inputs are spelled: relative paths from the table's folder."""
    if "://" in uri or uri.startswith("/"):
        return normalise_uri(uri)
    folder = folder.removeprefix("file://")
    return f"{folder}/{uri}" if "://" in folder else normalise_uri(posixpath.join(folder, uri))


def _derived_id(image_uri: str, prompt: Prompt) -> str:
    content = json.dumps([image_uri, prompt.box, prompt.points, prompt.labels, prompt.crs])
    return "p-" + hashlib.sha256(content.encode()).hexdigest()[:16]


def _number_repeats(prompts: list[Prompt]) -> None:
    """Make an image's prompt ids distinct: a repeat of `x` becomes `x-2` (or `x-3`, … where
    that is taken, by the table or an earlier repeat)."""
    from dataclasses import replace

    taken = {p.prompt_id for p in prompts}
    seen: set[str] = set()
    for i, prompt in enumerate(prompts):
        if prompt.prompt_id in seen:
            n = 2
            while f"{prompt.prompt_id}-{n}" in taken:
                n += 1
            prompts[i] = replace(prompt, prompt_id=f"{prompt.prompt_id}-{n}")
            taken.add(prompts[i].prompt_id)
        seen.add(prompts[i].prompt_id)


def _frozen_schema(carried: pa.Schema) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_uri", pa.string()),
            pa.field("prompt_id", pa.string()),
            pa.field("box", pa.list_(pa.float64())),
            pa.field("points", pa.list_(pa.list_(pa.float64()))),
            pa.field("point_labels", pa.list_(pa.int64())),
            pa.field("multimask_output", pa.bool_()),
            pa.field("crs", pa.string()),
            pa.field("error", pa.string()),
            *carried,
        ]
    )


def _frozen_row(uri: str, prompt: Prompt, carry: list[str]) -> dict:
    return {
        "image_uri": uri,
        "prompt_id": prompt.prompt_id,
        "box": list(prompt.box) if prompt.box is not None else None,
        "points": [list(p) for p in prompt.points],
        "point_labels": list(prompt.labels),
        "multimask_output": prompt.multimask,
        "crs": prompt.crs,
        "error": prompt.error,
        **dict(zip(carry, prompt.carried)),
    }
