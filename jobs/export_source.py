"""The committed rows of an output, read for an export: one shard at a time, filtered in DuckDB.

A shard's masks file is joined to its images file on `image_id` (both tables' columns, each
once), filtered by the user's SQL `--where` and a pixel-area range, and streamed as Arrow record
batches of `BATCH_ROWS` in mask order (image by image, mask_id ascending). Only shards with a
commit marker are read (`OutputDataset.data_files`), so an export never sees a shard in flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from sam_batch.jobs.dataset import DatasetError, OutputDataset

BATCH_ROWS = 4096  # rows per Arrow batch handed to a writer
IMAGE_COLUMNS = ("status", "error", "width", "height", "n_masks", "seconds", "crs", "transform")


class ExportError(ValueError):
    """An export that cannot be made as asked: one line, exit 2."""


@dataclass(frozen=True)
class ImageInfo:
    """An `ok` image of the output: what COCO's `images` and amg.py's folders need."""

    image_id: str
    image_uri: str
    width: int
    height: int
    crs: str | None


class CommittedMasks:
    """The committed shards of the output at `uri`, as SQL over their Parquet files.

    `ExportError` if `uri` is not a sam-batch output or has no committed shard yet.
    """

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        dataset = OutputDataset(uri, storage_options)
        try:
            plan = dataset.read_plan()
        except (DatasetError, OSError) as error:
            raise ExportError(f"{uri}: cannot be read as a sam-batch output ({' '.join(str(error).split())})") from None
        if plan is None:
            raise ExportError(f"{uri}: not a sam-batch output (no _sam_batch/plan.json)")
        masks, images = dataset.data_files("masks"), dataset.data_files("images")
        if not masks:
            raise ExportError(f"{uri}: no committed shard yet (no marker under _sam_batch/commits/)")
        self.uri = uri
        self.connection = duckdb.connect()
        local = is_local(dataset.fs)
        if not local:
            self.connection.register_filesystem(dataset.fs)
        name = (lambda path: path) if local else dataset.fs.unstrip_protocol
        self.shards = [(name(m), name(i)) for m, i in zip(masks, images)]

    def images(self) -> list[ImageInfo]:
        """Every `ok` image, in shard order (one row each: bounded by the number of images)."""
        files = ", ".join(_quote(images) for _, images in self.shards)
        rows = self.connection.execute(
            f"SELECT image_id, image_uri, width, height, crs FROM read_parquet([{files}], filename = true, "
            "file_row_number = true) WHERE status = 'ok' ORDER BY filename, file_row_number"
        )
        return [ImageInfo(*row) for row in rows.fetchall()]

    def check_where(self, where: str | None) -> None:
        """`ExportError` naming DuckDB's reason if `where` is not a valid condition over the
        masks and images columns (checked on the first shard, no row read)."""
        if where is None:
            return
        try:
            self.connection.execute(self._query(self.shards[0], ["mask_id"], where, None, None) + " LIMIT 0")
        except duckdb.Error as error:
            reason = " ".join(str(error).split())
            raise ExportError(f"--where {where!r}: {reason}") from None

    def count(self, where: str | None, min_area: float | None, max_area: float | None) -> int:
        """How many masks pass the filters (a pass over the area column and the filter's columns)."""
        total = 0
        for shard in self.shards:
            query = self._query(shard, ["mask_id"], where, min_area, max_area)
            total += self.connection.execute(f"SELECT count(*) FROM ({query})").fetchone()[0]
        return total

    def columns(self) -> list[str]:
        """The joined relation's column names (those of the first shard)."""
        query = self._query(self.shards[0], ["* EXCLUDE (_row)"], None, None, None) + " LIMIT 0"
        return [d[0] for d in self.connection.execute(query).description]

    def batches(
        self, columns: list[str], where: str | None, min_area: float | None, max_area: float | None
    ) -> Iterator[pa.RecordBatch]:
        """The masks that pass the filters, `columns` of them, in mask order, BATCH_ROWS at a time.

        min_area, max_area: bounds on the `area` column (pixels), inclusive; None: unbounded.
        """
        for shard in self.shards:
            query = self._query(shard, columns, where, min_area, max_area)
            reader = self.connection.sql(query).to_arrow_reader(BATCH_ROWS)
            yield from reader

    def _query(self, shard: tuple[str, str], columns: list[str], where, min_area, max_area) -> str:
        masks, images = shard
        image_columns = ", ".join(f"i.{c}" for c in IMAGE_COLUMNS)
        joined = (
            f"SELECT m.* EXCLUDE (file_row_number), {image_columns}, m.file_row_number AS _row "
            f"FROM read_parquet({_quote(masks)}, file_row_number = true) m "
            f"JOIN read_parquet({_quote(images)}) i USING (image_id)"
        )
        conditions = [f"({where})" if where else "true"]
        if min_area is not None:
            conditions.append(f"area >= {float(min_area)!r}")
        if max_area is not None:
            conditions.append(f"area <= {float(max_area)!r}")
        selected = ", ".join(columns)
        return f"SELECT {selected} FROM ({joined}) WHERE {' AND '.join(conditions)} ORDER BY _row"


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is the local disk."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def _quote(path: str) -> str:
    """`path` as an SQL string literal."""
    return "'" + path.replace("'", "''") + "'"
