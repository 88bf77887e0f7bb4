"""What reading windows of a GeoTIFF on S3 costs: requests, bytes and seconds per reader.

moto's S3 server on 127.0.0.1 holds two 4096² RGB uint8 scenes: a strip TIFF (48 MiB) and a
deflate COG with 512-pixel tiles and overviews. Four 1024² windows (the top row of tiles a
job would make) are read through a counting proxy that adds `LATENCY_S` to each request, a
stand-in for an object store's round trip, with three readers:

- `s3fs default`: rasterio over the job's s3fs filesystem as it comes (50 MiB read-ahead);
- `BlockReads`: what `RasterScene` uses (2 MiB range requests in a block cache);
- `GDAL /vsis3/`: GDAL's own S3 reader (credentials through rasterio's boto3 session).

    .venv/bin/python benchmarks/s3_rasters.py [LATENCY_S ...]
"""

from __future__ import annotations

import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import s3fs
from moto.server import ThreadedMotoServer
from rasterio.session import AWSSession
from rasterio.shutil import copy as copy_raster
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_counter import CountingProxy  # noqa: E402
from sam_batch.pipeline.rasters import BlockReads  # noqa: E402

SIDE = 4096  # pixels a side of each scene
WINDOW = 1024  # pixels a side of each window read
WINDOWS = [(x, 0) for x in range(0, SIDE, WINDOW)]
SECRET = "benchmark-secret"


def scenes(folder: Path) -> dict[str, Path]:
    """The strip TIFF and the COG, written under `folder`."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    pixels = np.stack([xx // 7 % 256, yy // 5 % 256, (xx + yy) // 11 % 256]).astype(np.uint8)
    profile = {
        "driver": "GTiff",
        "width": SIDE,
        "height": SIDE,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "transform": rasterio.transform.from_origin(300_000, 4_000_000, 1, 1),
    }
    with rasterio.open(folder / "strip.tif", "w", **profile) as out:
        out.write(pixels)
    with rasterio.open(
        folder / "tiled.tif", "w", tiled=True, blockxsize=512, blockysize=512, compress="deflate", **profile
    ) as out:
        out.write(pixels)
        out.build_overviews([2, 4, 8])
    copy_raster(folder / "tiled.tif", folder / "cog.tif", driver="COG", blocksize=512, compress="deflate")
    return {"strip.tif": folder / "strip.tif", "cog.tif": folder / "cog.tif"}


def read_windows(source) -> None:
    for x, y in WINDOWS:
        source.read([1, 2, 3], window=Window(x, y, WINDOW, WINDOW))


def measure(name: str, reader: str, proxy: CountingProxy) -> str:
    endpoint = f"http://127.0.0.1:{proxy.port}"
    proxy.reset()
    started = time.perf_counter()
    if reader == "GDAL /vsis3/":
        session = AWSSession(
            aws_access_key_id="bench", aws_secret_access_key=SECRET, endpoint_url=f"127.0.0.1:{proxy.port}"
        )
        with (
            rasterio.Env(
                session=session, AWS_HTTPS="NO", AWS_VIRTUAL_HOSTING="FALSE", GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR"
            ),
            rasterio.open(f"s3://bench/{name}") as source,
        ):
            read_windows(source)
    else:
        fs = s3fs.S3FileSystem(
            key="bench", secret=SECRET, client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True
        )
        opener = fs if reader == "s3fs default" else BlockReads(fs)
        with rasterio.open(f"bench/{name}", opener=opener) as source:
            read_windows(source)
    seconds = time.perf_counter() - started
    path = f"/bench/{name}"
    return f"| {name} | {reader} | {proxy.gets[path]} | {proxy.bytes[path] / 2**20:.2f} | {seconds:.2f} |"


def main(latencies: list[float]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = s3fs.S3FileSystem(key="bench", secret=SECRET, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
        fs.mkdir("bench")
        with tempfile.TemporaryDirectory() as folder:
            for name, path in scenes(Path(folder)).items():
                fs.put_file(str(path), f"bench/{name}")
                print(f"{name}: {path.stat().st_size / 2**20:.1f} MiB")
        for latency in latencies:
            print(f"\nlatency {latency * 1000:.0f} ms a request\n")
            print("| scene | reader | GET requests | MiB fetched | seconds |\n| --- | --- | ---: | ---: | ---: |")
            with CountingProxy(port, latency_s=latency) as proxy:
                for name in ("strip.tif", "cog.tif"):
                    for reader in ("s3fs default", "BlockReads", "GDAL /vsis3/"):
                        print(measure(name, reader, proxy))
    finally:
        server.stop()


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [0.0, 0.05])
