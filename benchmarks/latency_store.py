"""`latency://`: local files served as an object store would serve them, one range request at a
time, each after a fixed latency (benchmarks/pipeline.py).

rasterio reads it as it reads any store but S3 and local disk (`pipeline.rasters.BlockReads`:
2 MiB blocks in fsspec's block cache), so each block is one request. It stands for an object
store's time to first byte on each GET, with unlimited bandwidth.

Its own module so that Ray's workers can import it (`register` is their setup hook): a
filesystem class cannot be pickled by value, fsspec's classes hold a lock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import fsspec
from fsspec.spec import AbstractBufferedFile

PROTOCOL = "latency"


class LatencyFile(AbstractBufferedFile):
    """A local file read through fsspec's caches; each range request sleeps the filesystem's
    latency first and is noted (its bytes, one line) under its `requests_dir`, if any."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        time.sleep(self.fs.latency_s)
        if self.fs.requests_dir:
            with open(Path(self.fs.requests_dir) / f"requests-{os.getpid()}.log", "a") as log:
                log.write(f"{end - start}\n")
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


class LatencyFileSystem(fsspec.AbstractFileSystem):
    """`latency:///abs/path`: local files, read only, `latency_s` s per range request; each
    request noted under `requests_dir` when given (`requests-<pid>.log`)."""

    protocol = PROTOCOL

    def __init__(self, latency_s: float = 0.0, requests_dir: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.latency_s = latency_s
        self.requests_dir = requests_dir

    def info(self, path: str, **kwargs) -> dict:
        path = self._strip_protocol(path)
        kind = "directory" if os.path.isdir(path) else "file"
        return {"name": path, "size": os.stat(path).st_size, "type": kind}

    def ls(self, path: str, detail: bool = True, **kwargs) -> list:
        """The folder's entries (GDAL lists a raster's folder for its side-car files)."""
        path = self._strip_protocol(path)
        entries = [self.info(entry.path) for entry in os.scandir(path)]
        return entries if detail else [entry["name"] for entry in entries]

    def _open(self, path: str, mode: str = "rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise PermissionError(f"{PROTOCOL}:// is read only")
        return LatencyFile(self, path, mode, block_size or "default", cache_options=cache_options, **kwargs)


def register() -> None:
    """Make `latency://` known to fsspec in this process."""
    fsspec.register_implementation(PROTOCOL, LatencyFileSystem, clobber=True)
