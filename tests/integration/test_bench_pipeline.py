"""benchmarks/pipeline.py: its store, its stand-in engine and its smallest run, so it cannot rot.

No timing is asserted: the figures belong in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict

import duckdb
import numpy as np
import pytest

from sam_batch.pipeline.rasters import RasterScene
from sam_batch.pipeline.tiles import is_cut, plan_tiles
from shared_data import REPO

SCRIPT = REPO / "benchmarks" / "pipeline.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.register_latency_store()
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("georeferenced", [True, False])
def test_latency_store_reads_what_the_disk_holds(bench, tmp_path, georeferenced):
    [uri] = bench.write_scenes(tmp_path / "scenes", 1, 600, georeferenced)
    local = uri.removeprefix(f"{bench.PROTOCOL}://")
    requests = tmp_path / "requests"
    requests.mkdir()
    window = (100, 200, 356, 456)
    with RasterScene(uri, {"latency_s": 0.0, "requests_dir": str(requests)}) as remote, RasterScene(local) as disk:
        assert remote.crs == disk.crs and (remote.crs is not None) == georeferenced
        np.testing.assert_array_equal(remote.read(window)[0], disk.read(window)[0])
    [log] = requests.glob("requests-*.log")
    assert sum(int(line) for line in log.read_text().splitlines()) > 0


def test_stand_in_masks_lie_in_their_tile_and_some_are_cut(bench):
    tiles = plan_tiles(4096, 4096, 1024, 128)
    middle = 12  # a tile with four inner edges
    window = tiles[middle].window
    masks = bench.synthetic_masks(window, (4096, 4096), middle, 60)
    assert len(masks) == 60
    for mask in masks:
        x0, y0, x1, y1 = mask.box
        assert window[0] <= x0 <= x1 < window[2] and window[1] <= y0 <= y1 < window[3]
        assert mask.cut == is_cut(mask.box, window, (4096, 4096))
        assert mask.pixels[0].any() and mask.pixels[-1].any() and mask.pixels[:, 0].any() and mask.pixels[:, -1].any()
    assert 0 < sum(m.cut for m in masks) < 60
    again = bench.synthetic_masks(window, (4096, 4096), middle, 60)
    assert [m.box for m in again] == [m.box for m in masks]


@pytest.mark.slow
def test_smallest_run_segments_every_tile_and_commits_its_masks(bench, tmp_path):
    """One 2048² scene (9 tiles), one actor: what the report is made of, and the output it wrote."""
    uris = bench.write_scenes(tmp_path / "scenes", 1, 2048, georeferenced=True)
    config = bench.RunConfig(
        "smallest",
        str(tmp_path),
        uris,
        actors=1,
        cpus=4,
        tile_seconds=0.01,
        masks_per_tile=20,
        latency_s=0.01,
        shard_size=64,
        tuning={"READ_AHEAD": 3},
    )
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--one", json.dumps(asdict(config))],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["images"], result["errors"]) == (1, [])
    [actor] = result["tiles"].values()
    assert len(actor) == 9
    figures = bench.throughput(result)
    assert figures["tiles"] == 9 and 0 < figures["busy"][next(iter(result["tiles"]))] <= 1
    assert result["requests"] > 0
    assert 0 < len(result["tasks"]["read_tile"]) <= 9  # Ray's task events are best effort
    assert result["rss_peak"] >= result["rss_before"] > 0
    [(rows,)] = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path}/out/masks/*.parquet')").fetchall()
    assert rows == result["masks"] > 0
