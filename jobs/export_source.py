"""The committed rows of an output, read for an export: a batch at a time, filtered in DuckDB.

Each committed shard's masks file is read in batches of `BATCH_ROWS` rows (pyarrow, in file
order: image by image, mask_id ascending); each batch is joined in DuckDB to its shard's images
rows on `image_id` (both tables' columns, each once) and filtered by the user's SQL `--where`
and a pixel-area range, keeping the batch's order. A `--where` is a condition on one row, so
filtering batch by batch is filtering the table. Memory is bounded by one batch and one shard's
images rows, however many masks. Only shards with a commit marker are read
(`OutputDataset.data_files`), so an export never sees a shard in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from sam_batch.jobs.dataset import DatasetError, OutputDataset

BATCH_ROWS = 2048  # mask rows per batch read, filtered and handed to a writer
ROW = "_row"  # the position of a row in its batch, which keeps the batch's order through the join
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
    """The committed shards of the output at `uri`.

    `ExportError` if `uri` is not a sam-batch output or has no committed shard yet.
    """

    def __init__(self, uri: str, storage_options: dict | None = None) -> None:
        self.dataset = OutputDataset(uri, storage_options)
        try:
            plan = self.dataset.read_plan()
        except (DatasetError, OSError) as error:
            raise ExportError(f"{uri}: cannot be read as a sam-batch output ({' '.join(str(error).split())})") from None
        if plan is None:
            raise ExportError(f"{uri}: not a sam-batch output (no _sam_batch/plan.json)")
        self.shards = list(zip(self.dataset.data_files("masks"), self.dataset.data_files("images")))
        if not self.shards:
            raise ExportError(f"{uri}: no committed shard yet (no marker under _sam_batch/commits/)")
        self.connection = duckdb.connect()

    def images(self) -> list[ImageInfo]:
        """Every `ok` image, in shard order (one row each: bounded by the number of images)."""
        found = []
        for _, images in self.shards:
            table = self._read(images, ["image_id", "image_uri", "status", "width", "height", "crs"])
            for row in table.to_pylist():
                if row.pop("status") == "ok":
                    found.append(ImageInfo(**row))
        return found

    def total_rows(self) -> int:
        """Mask rows in the committed files (from their footers), before any filter."""
        return sum(self._file(masks).metadata.num_rows for masks, _ in self.shards)

    def columns(self) -> list[str]:
        """The names a `--where` may use: the masks columns, then the images ones (first shard's)."""
        masks, _ = self.shards[0]
        return [*self._file(masks).schema_arrow.names, *IMAGE_COLUMNS]

    def check_where(self, where: str | None) -> None:
        """`ExportError` naming DuckDB's reason if `where` is not a valid condition over the
        masks and images columns (checked on the first shard's schemas, no row read)."""
        if where is None:
            return
        masks, images = self.shards[0]
        empty = self._file(masks).schema_arrow.empty_table()
        try:
            self._filter(empty, self._read(images).slice(0, 0), ["mask_id"], where, None, None).fetchall()
        except duckdb.Error as error:
            raise ExportError(f"--where {where!r}: {' '.join(str(error).split())}") from None

    def batches(
        self,
        columns: list[str],
        where: str | None,
        min_area: float | None,
        max_area: float | None,
        on_read: Callable[[int], None] = lambda rows: None,
    ) -> Iterator[pa.RecordBatch]:
        """The rows that pass the filters, their `columns`, in order: one batch (perhaps empty) per
        batch read from each committed masks file; `on_read` is told how many rows each read held.

        min_area, max_area: bounds on the `area` column (pixels), inclusive; None: unbounded.
        """
        for masks, images in self.shards:
            image_rows = self._read(images)
            with self.dataset.fs.open(masks, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS):
                    result = self._filter(
                        pa.Table.from_batches([batch]), image_rows, columns, where, min_area, max_area
                    )
                    selected = result.to_arrow_table().combine_chunks()
                    on_read(batch.num_rows)
                    yield (
                        selected.to_batches()[0]
                        if selected.num_rows
                        else pa.RecordBatch.from_pylist([], schema=selected.schema)
                    )

    def _filter(self, masks: pa.Table, images: pa.Table, columns: list[str], where, min_area, max_area):
        """A DuckDB relation: `masks` joined to `images`, filtered, its `columns`, in `masks` order."""
        conditions = [f"({where})" if where else "true"]
        if min_area is not None:
            conditions.append(f"area >= {float(min_area)!r}")
        if max_area is not None:
            conditions.append(f"area <= {float(max_area)!r}")
        numbered = masks.append_column(ROW, pa.array(range(masks.num_rows), pa.int64()))
        image_columns = ", ".join(f"i.{c}" for c in IMAGE_COLUMNS if c in images.column_names)
        self.connection.register("masks_batch", numbered)
        self.connection.register("images_shard", images)
        joined = f"SELECT m.*, {image_columns} FROM masks_batch m JOIN images_shard i USING (image_id)"
        return self.connection.sql(
            f"SELECT {', '.join(columns)} FROM ({joined}) WHERE {' AND '.join(conditions)} ORDER BY {ROW}"
        )

    def _file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(path, filesystem=self.dataset.fs)

    def _read(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(path, columns=columns, filesystem=self.dataset.fs)
