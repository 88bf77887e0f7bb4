"""Planning: list a job's inputs over fsspec and cut them into deterministic shards.

Inputs are the union of `input.uris` (paths or URLs, globs expanded) and the lines of
`input.manifest` (a text file of URIs, or a Parquet file with a `uri` column), sorted and
de-duplicated, then cut into shards of `run.shard_size` in that order. The plan also holds the
CRS the output's geometries are written in (`jobs.output_crs`). A local glob follows
symbolic links to files and to folders (fsspec's enters no linked folder), never round a cycle.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from fsspec.utils import glob_translate

from sam_batch.jobs.job_rules import normalise_uri
from sam_batch.jobs.output_crs import choose_output_crs
from sam_batch.jobs.schema import JobSpec
from sam_batch.pipeline.errors import one_line_reason

GLOB_CHARS = "*?["
log = logging.getLogger("sam_batch")


@dataclass(frozen=True)
class Shard:
    """A numbered, frozen list of input URIs: the unit of commit and resume."""

    shard_id: int
    uris: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.shard_id:05d}"


@dataclass(frozen=True)
class Plan:
    """What a job will do: the job's fingerprint, its shards and the CRS its geometries are
    written in ('EPSG:code' or WKT: `jobs.output_crs`), frozen at the output root."""

    fingerprint: str
    job: dict
    shards: tuple[Shard, ...]
    output_crs: str | None = None

    @property
    def uris(self) -> list[str]:
        """Every input, in plan order."""
        return [uri for shard in self.shards for uri in shard.uris]

    def to_json(self) -> str:
        return json.dumps(
            {
                "fingerprint": self.fingerprint,
                "job": self.job,
                "shards": [{"shard_id": s.shard_id, "uris": list(s.uris)} for s in self.shards],
                "output_crs": self.output_crs,
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        shards = tuple(Shard(s["shard_id"], tuple(s["uris"])) for s in data["shards"])
        return cls(data["fingerprint"], data["job"], shards, data.get("output_crs"))


class PlanError(RuntimeError):
    """The inputs cannot be listed (bad manifest, unreachable storage, nothing found)."""


def list_inputs(job: JobSpec) -> list[str]:
    """Every input URI of the job, sorted, each once. Listed URIs that do not exist stay in;
    files under `output.uri` never are inputs (a glob over the output's parent would otherwise
    list the output's own Parquet files), and a warning says how many were left out."""
    options = job.input.storage_options
    uris: set[str] = set()
    for pattern in job.input.uris:
        uris.update(_expand(pattern, options))
    if job.input.manifest:
        uris.update(_read_manifest(job.input.manifest, options))
    output = _real(job.output.uri).rstrip("/") + "/"
    inside = {uri for uri in uris if _real(uri).startswith(output)}
    if inside:
        log.warning(
            "input: %d listed file(s) lie under output.uri %s and are left out, first %s",
            len(inside),
            job.output.uri,
            sorted(inside)[0],
        )
        uris -= inside
    if not uris:
        manifest = f" and manifest {job.input.manifest!r}" if job.input.manifest else ""
        raise PlanError(f"input: no images found for {list(job.input.uris)}{manifest}")
    return sorted(uris)


def make_plan(job: JobSpec, uris: list[str], fingerprint: str | None = None) -> Plan:
    """Cut sorted URIs into shards of `run.shard_size`; the output's CRS chosen from their
    headers (`output_crs.choose_output_crs`). fingerprint: the job's unless given (a prompt
    job's includes its table: `prompt_table.plan_fingerprint`)."""
    size = job.run.shard_size
    shards = tuple(Shard(i, tuple(uris[start : start + size])) for i, start in enumerate(range(0, len(uris), size)))
    return Plan(fingerprint or job.fingerprint(), job.redacted_dict(), shards, choose_output_crs(job, uris))


def _expand(pattern: str, options: dict) -> list[str]:
    """A glob → the files it matches; a plain URI → itself (missing ones become error rows later).

    A URI with glob characters that names an existing file (`scan[1].png`) is that file.
    """
    if not any(c in pattern for c in GLOB_CHARS):
        return [pattern]
    fs, path = fsspec.core.url_to_fs(pattern, **options)
    try:
        if fs.isfile(path):
            return [pattern]
        files = _local_glob(path) if isinstance(fs, LocalFileSystem) else _glob(fs, path)
    except Exception as error:  # noqa: BLE001 - storage errors name the pattern, never options
        raise PlanError(f"input.uris: cannot list {pattern!r}: {type(error).__name__}") from None
    return [_as_uri(fs, p, pattern) for p in files]


def _glob(fs, path: str) -> list[str]:
    """The files a glob matches on storage without links (object stores), sorted."""
    found = fs.glob(path, detail=True)
    return sorted(p for p, info in found.items() if _is_file(fs, p, info))


def _local_glob(pattern: str) -> list[str]:
    """The local files a glob matches (as fsspec matches them: `*` within a folder, `**` across
    any number), sorted, entering linked folders as real ones; a link to a folder the path has
    already passed through (a cycle) is not entered, with a warning."""
    first_magic = min(i for i in (pattern.find(c) for c in GLOB_CHARS) if i >= 0)
    root = pattern[: pattern.rfind("/", 0, first_magic) + 1]
    depth = None if "**" in pattern else pattern[len(root) :].count("/") + 1
    matches = re.compile(glob_translate(pattern)).match
    cycles: list[str] = []
    files = sorted(path for path in _walk_files(root, depth, frozenset(), cycles) if matches(path))
    if cycles:
        log.warning(
            "input.uris: %s: %d linked folder(s) lead back to a folder on their own path (a cycle) "
            "and were not entered, first %s",
            pattern,
            len(cycles),
            cycles[0],
        )
    return files


def _walk_files(
    folder: str, depth: int | None, ancestors: frozenset[tuple[int, int]], cycles: list[str]
) -> Iterator[str]:
    """The files in `folder` and its folders, `depth` levels down (None: all), links followed.

    `ancestors` are the (device, inode) of the folders on the path to `folder`; a folder among
    them is a cycle, added to `cycles` and not entered. A folder that cannot be read is left
    out, as fsspec's listing leaves it.
    """
    try:
        status = os.stat(folder)
    except OSError:
        return
    identity = (status.st_dev, status.st_ino)
    if identity in ancestors:
        cycles.append(folder)
        return
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_file():  # links followed; a broken link is neither a file nor a folder
                yield entry.path
            elif entry.is_dir() and depth != 1:
                below = None if depth is None else depth - 1
                yield from _walk_files(entry.path, below, ancestors | {identity}, cycles)
        except OSError:  # gone meanwhile
            continue


def _real(uri: str) -> str:
    """A local path with its symbolic links resolved; a URL as it is."""
    return uri if "://" in uri else os.path.realpath(uri)


def _is_file(fs, path: str, info: dict) -> bool:
    """Whether a glob's match is a file, a symbolic link to a file included (a glob's details
    describe the link itself)."""
    if info.get("type") == "other" and info.get("islink"):
        try:
            info = fs.info(path)  # the link's target
        except OSError:  # a broken link
            return False
    return info.get("type") == "file"


def _read_manifest(uri: str, options: dict) -> list[str]:
    """The URIs a manifest lists, each normalised; any problem is a one-line `PlanError`.

    A Parquet file (told by its magic bytes) gives its `uri` column of strings; anything else
    is read as UTF-8 text, one URI a line, blank lines and lines starting with `#` skipped.
    """
    try:
        with fsspec.open(uri, "rb", **options) as f:
            data = f.read()
    except Exception as error:  # noqa: BLE001
        raise PlanError(f"input.manifest: cannot read {uri!r}: {type(error).__name__}") from None
    listed = _parquet_uris(uri, data) if data[:4] == b"PAR1" else _text_uris(uri, data)
    return [normalise_uri(u) for u in listed]


def _parquet_uris(uri: str, data: bytes) -> list[str]:
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        names = parquet.schema_arrow.names
        column = parquet.read(columns=["uri"]).column("uri") if "uri" in names else None
    except Exception as error:  # noqa: BLE001
        raise PlanError(f"input.manifest: {uri!r} is not a readable Parquet file ({one_line_reason(error)})") from None
    if column is None:
        raise PlanError(f"input.manifest: {uri!r} has no 'uri' column (columns: {names})")
    if pa.types.is_dictionary(column.type):  # categorical strings, as pandas writes them
        column = column.cast(column.type.value_type)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise PlanError(f"input.manifest: {uri!r}: the 'uri' column holds {column.type}, not strings")
    return [u.strip() for u in column.to_pylist() if u and u.strip()]


def _text_uris(uri: str, data: bytes) -> list[str]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PlanError(f"input.manifest: {uri!r} is neither Parquet nor UTF-8 text (one URI a line)") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _as_uri(fs, path: str, pattern: str) -> str:
    """A path a glob found, spelled like the pattern's listed files (`normalise_uri`)."""
    return normalise_uri(fs.unstrip_protocol(path) if "://" in pattern else path)
