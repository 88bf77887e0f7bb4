"""Every wait has a bound: a read that never returns and an image over its time budget are
error rows, and the rest of the shard commits, on both executors.

Photos come over HTTP (fsspec's http filesystem) from a server on 127.0.0.1 that never answers
for one of them; the scene is tiled, so the image budget's check runs between its tiles, while
a photo of one tile, one crop and one batch of prompts finishes whatever the budget. Without
the model: a scene's window read that never returns, and a Ray actor stuck past its budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from sam_batch.jobs import executors, ray_pipeline
from sam_batch.jobs.bounded import BoundedScene, ReadThread, ReadTimedOut
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.stages import Opened
from sam_batch.pipeline.rasters import ArrayScene
from sam_batch.pipeline.scenes import plan_scene
from shared_data import IMAGES

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
STALLED = "stalled.jpg"  # the server never answers for this name
PHOTOS = ["dog.jpg", "groceries.jpg"]  # served over HTTP
SCENE = "rgb1.tif"  # 400 x 400, georeferenced: tiled at 256 px, so the budget is checked
READ_TIMEOUT_S = 5
IMAGE_TIMEOUT_S = 0.001  # under any tile's segmenting: the scene is over it at its second tile


@pytest.fixture(scope="module")
def photo_server() -> Iterator[str]:
    """The base URL of an HTTP server on 127.0.0.1 serving IMAGES, silent for STALLED until
    the module's tests are done."""
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            name = self.path.lstrip("/")
            if name == STALLED:
                release.wait()  # no status line, no byte: a read that never returns
                return
            data = (IMAGES / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module", params=["local", "ray"])
def timed_run(request, photo_server: str, tmp_path_factory) -> tuple[str, Path, subprocess.CompletedProcess]:
    """One shard: two photos and a stalled one over HTTP, and a tiled scene, under both bounds."""
    tmp = tmp_path_factory.mktemp(f"timeouts-{request.param}")
    out = tmp / "out"
    job = {
        "name": "timeouts",
        "input": {
            "uris": [f"{photo_server}/{name}" for name in [*PHOTOS, STALLED]] + [str(IMAGES / SCENE)],
            "storage_options": {"block_size": 0},  # one plain GET per photo: the server has no ranges
        },
        "output": {"uri": str(out)},
        "amg": {"points_per_side": 4},
        "raster": {"tile_size": 256, "tile_overlap": 32},
        "run": {
            "executor": request.param,
            "shard_size": 4,
            "read_timeout_s": READ_TIMEOUT_S,
            "image_timeout_s": IMAGE_TIMEOUT_S,
        },
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=900)
    return request.param, out, result


def images_by_name(out: Path) -> dict[str, dict]:
    return {row["image_uri"].rsplit("/", 1)[-1]: row for row in pq.read_table(out / "images").to_pylist()}


@pytest.mark.slow
def test_the_run_ends_with_its_shard_committed(timed_run) -> None:
    executor, out, result = timed_run
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "run.json").read_text())
    assert (record["executor"], record["images_ok"], record["images_error"]) == (executor, 2, 2)
    assert [p.name for p in (out / "_sam_batch" / "commits").iterdir()] == ["shard-00000.json"]


@pytest.mark.slow
def test_a_read_that_never_returns_is_an_error_row(timed_run) -> None:
    _, out, _ = timed_run
    stalled = images_by_name(out)[STALLED]
    assert (stalled["status"], stalled["n_masks"]) == ("error", 0)
    assert stalled["error"] == f"read: not done after {READ_TIMEOUT_S} s (run.read_timeout_s)"


@pytest.mark.slow
def test_an_image_over_its_budget_is_an_error_row(timed_run) -> None:
    _, out, _ = timed_run
    scene = images_by_name(out)[SCENE]
    assert (scene["status"], scene["n_masks"]) == ("error", 0)
    assert scene["error"] == f"segment: over run.image_timeout_s ({IMAGE_TIMEOUT_S} s)"


@pytest.mark.slow
def test_the_other_images_are_whole(timed_run) -> None:
    _, out, _ = timed_run
    images = images_by_name(out)
    masks = pq.read_table(out / "masks").to_pylist()
    for name in PHOTOS:
        assert (images[name]["status"], images[name]["error"]) == ("ok", None)
        assert images[name]["n_masks"] > 0
        assert sum(m["image_uri"] == images[name]["image_uri"] for m in masks) == images[name]["n_masks"]
    assert len(masks) == sum(images[name]["n_masks"] for name in PHOTOS)


class StuckScene:
    """A scene whose window reads block until `release` is set; it records its closing."""

    width = height = 8
    crs = transform = None

    def __init__(self, release: threading.Event) -> None:
        self.release, self.closed = release, False

    def read(self, window):
        self.release.wait()

    def close(self) -> None:
        self.closed = True


def test_a_window_read_that_never_returns_times_out_and_the_close_waits_for_it() -> None:
    release = threading.Event()
    stuck = StuckScene(release)
    with ReadThread(0.01) as reads:
        with pytest.raises(ReadTimedOut, match=r"^read: not done after 0\.01 s \(run\.read_timeout_s\)$"):
            BoundedScene(stuck, reads).read((0, 0, 8, 8))
        closed = reads.post(stuck.close)
    assert not stuck.closed  # never while its read is running on the thread
    release.set()
    closed.result(timeout=60)
    assert stuck.closed


class HangingActor:
    """A segmenting actor stuck where no budget check runs: its tile never comes back."""

    def __init__(self, job, segmenter) -> None:
        self.job = job

    def placed(self) -> None:
        return None

    def load(self) -> None:
        return None

    def segment_tile(self, *args) -> None:
        threading.Event().wait()


@pytest.mark.slow
def test_an_actor_stuck_past_the_budget_is_killed_and_replaced(monkeypatch) -> None:
    import numpy as np
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import tests
    monkeypatch.setattr(ray_pipeline, "SegmenterActor", HangingActor)
    monkeypatch.setattr(ray_pipeline, "SEGMENT_GRACE_S", 0.0)
    job = parse_job(
        {
            "name": "stuck",
            "input": {"uris": ["x.jpg"]},
            "output": {"uri": "out"},
            "run": {"image_timeout_s": IMAGE_TIMEOUT_S},
        }
    )
    executor = executors.RayExecutor(job)
    assert executor._init_ray(ray), "a Ray was already running in this process"
    pool = ray_pipeline.ActorPool(ray, job, {"num_cpus": 0.5}, 1)
    try:
        pool.start()
        for _ in ("placed", "load"):
            [started], _ = ray.wait(pool.refs, num_returns=1)
            pool.take(started)
        photo = np.zeros((8, 8, 3), np.uint8)
        plan = plan_scene(ArrayScene(photo), 8, 0)
        opened = Opened(None, plan, raster=False, stretch=None, seconds=0.0, started=time.time())
        image = ray_pipeline._Image("x.jpg", opened, ray.put(photo), deadline=time.monotonic() + IMAGE_TIMEOUT_S)
        pool.feed(deque([ray_pipeline._Unit(image, 0)]))
        [stuck] = pool.refs
        while pool.busy:  # the driver's loop: wait up to the kill time, then expire
            done, _ = ray.wait(pool.refs, num_returns=1, timeout=pool.wait_timeout())
            assert done == []
            pool.expire()
        assert len(pool.placing) == 1 and not pool.loaded  # its replacement, placing
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(stuck)  # the stuck actor is gone
    finally:
        pool.stop()
        ray.shutdown()
