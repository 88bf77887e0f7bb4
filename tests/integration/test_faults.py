"""Faults injected for real: a segmenting actor killed mid-job, the driver SIGKILLed mid-job
or in the middle of a commit.

Each run must end with the same rows as a clean run, and a re-run must not redo committed shards.
A driver that is killed or fails leaves no process of its embedded Ray behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow.parquet as pq
import pytest
import yaml

from shared_data import IMAGES

pytestmark = pytest.mark.slow

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
# bound on the wait for a killed driver's Ray to be gone (s): its reaper ends it within a second
# or two; before it, Ray's dashboard and runtime-env agents lived on for a minute and more
GONE_WAIT_S = 30.0
NAMES = ["dog.jpg", "groceries.jpg", "picture1.jpg", "picture2.jpg", "rgb1.tif", "truck.jpg"]
# `sam-batch run` (argv[2:]) that SIGKILLs itself when a commit is about to move a data file into
# place after argv[1] such moves: the test's hook, in the child, not in the code under test
KILLED_AT_A_DATA_MOVE = """
import os, signal, sys
from fsspec.implementations.local import LocalFileSystem
from sam_batch.cli import main

moves_left = int(sys.argv[1])
move = LocalFileSystem.mv


def mv(self, source, destination, **kwargs):
    global moves_left
    if "/masks/" in destination or "/images/" in destination:
        if moves_left == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        moves_left -= 1
    return move(self, source, destination, **kwargs)


LocalFileSystem.mv = mv
sys.exit(main(sys.argv[2:]))
"""


def write_job(path: Path, out: Path, executor: str = "ray") -> Path:
    job = {
        "name": "faults",
        "input": {"uris": [str(IMAGES / n) for n in NAMES]},
        "output": {"uri": str(out)},
        "amg": {"points_per_side": 6},
        "run": {"shard_size": 2, "executor": executor},
    }
    path.write_text(yaml.safe_dump(job))
    return path


def rows(out: Path) -> tuple[list[tuple], list[tuple]]:
    """Masks and images rows, sorted, without the timing column."""
    masks = pq.read_table(out / "masks").to_pylist()
    images = pq.read_table(out / "images").drop_columns(["seconds"]).to_pylist()
    mask_key = [(m["image_uri"], m["mask_id"], m["segmentation"]["counts"], tuple(m["bbox"])) for m in masks]
    image_key = [tuple(sorted(i.items())) for i in images]
    return sorted(mask_key), sorted(image_key, key=repr)  # values may be None (e.g. a photo's crs)


def assert_same_rows(out: Path, clean: tuple[list, list]) -> None:
    masks, images = rows(out)
    assert images == clean[1]
    missing, extra = sorted(set(clean[0]) - set(masks)), sorted(set(masks) - set(clean[0]))
    assert len(masks) == len(clean[0]) and not missing and not extra, (
        len(masks),
        len(clean[0]),
        missing[:3],
        extra[:3],
    )


def committed(out: Path) -> int:
    folder = out / "_sam_batch" / "commits"
    return len(list(folder.glob("*.json"))) if folder.exists() else 0


def wait_for(condition, timeout: float = 600.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def session_processes(*drivers: subprocess.Popen) -> list[psutil.Process]:
    """Running processes in the sessions of `drivers`, each started with `start_new_session`:
    every process their embedded Ray starts stays in the session, adopted by init or not (and
    no process of another Ray on the machine is in it)."""
    sessions = {driver.pid for driver in drivers}
    found = []
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(process.pid) in sessions:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def described(processes: list[psutil.Process]) -> list[str]:
    out = []
    for process in processes:
        try:
            out.append(f"{process.pid}: {' '.join(' '.join(process.cmdline()).split())[:120]}")
        except psutil.Error:
            continue
    return out


def actor_pids(driver: psutil.Process) -> list[int]:
    """The segmenting actors of this driver's embedded Ray (not of other jobs on the machine)."""
    pids = []
    for process in driver.children(recursive=True):
        try:
            if any("SegmenterActor" in part for part in process.cmdline()):
                pids.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[list, list]:
    tmp = tmp_path_factory.mktemp("clean")
    job = write_job(tmp / "job.yaml", tmp / "out")
    subprocess.run([SAM_BATCH, "run", str(job)], check=True, capture_output=True, timeout=1200)
    return rows(tmp / "out")


def test_killed_actor_is_restarted_and_output_is_exactly_once(clean, tmp_path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", out)
    driver = subprocess.Popen([SAM_BATCH, "run", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: committed(out) >= 1 or driver.poll() is not None, what="the first commit")
    assert driver.poll() is None, "the job ended before the fault could be injected"
    victims = actor_pids(psutil.Process(driver.pid))
    assert victims, "no segmenting actor found"
    os.kill(victims[0], signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=1200)
    assert driver.returncode == 0, stderr
    assert_same_rows(out, clean)
    record = json.loads((out / "run.json").read_text())
    assert record["images_ok"] + record["images_error"] == len(NAMES)


def test_sigkilled_driver_resumes_without_redoing_committed_shards(clean, tmp_path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", out)
    driver = subprocess.Popen(
        [SAM_BATCH, "run", str(job)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    wait_for(lambda: committed(out) >= 1 or driver.poll() is not None, what="the first commit")
    assert driver.poll() is None, "the job ended before the fault could be injected"
    ray_processes = psutil.Process(driver.pid).children(recursive=True)  # its reaper too, in a session of its own
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    # a commit task may outlive the driver by a moment: count markers once its Ray is gone
    psutil.wait_procs([*ray_processes, *session_processes(driver)], timeout=GONE_WAIT_S)
    left = [p for p in ray_processes if running(p)] + session_processes(driver)
    assert not left, described(left)
    done_before = committed(out)
    assert 1 <= done_before < 3
    rerun = subprocess.Popen(
        [SAM_BATCH, "run", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _, stderr = rerun.communicate(timeout=1200)
    assert rerun.returncode == 0, stderr
    assert not session_processes(driver, rerun), described(session_processes(driver, rerun))
    record = json.loads((out / "run.json").read_text())
    assert record["shards_skipped"] == done_before
    assert record["images_ok"] + record["images_error"] == len(NAMES) - 2 * done_before
    assert_same_rows(out, clean)
    assert not list((out / "_sam_batch" / "attempts").rglob("*"))  # no run's attempts left


def test_a_driver_failing_after_starting_ray_leaves_no_process_behind(tmp_path) -> None:
    """A `cuda` job on this machine's embedded Ray, which has no GPU: the driver fails after
    starting Ray (one line, exit 1), and once it has exited none of Ray's processes is left."""
    job = write_job(tmp_path / "job.yaml", tmp_path / "out")
    driver = subprocess.Popen(
        [SAM_BATCH, "run", str(job), "--set", "engine.device=cuda"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 1
    assert stderr.strip().splitlines()[-1] == (
        "sam-batch: JobFailure: no segmenting actor can start: "
        "each asks for 1 GPU and 1 CPU and this machine has no GPU"
    )
    assert not session_processes(driver), described(session_processes(driver))


def test_losing_a_worker_node_mid_job_loses_nothing(clean, tmp_path) -> None:
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        worker_node = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        job = write_job(tmp_path / "job.yaml", out)
        spec = yaml.safe_load(job.read_text())
        spec["run"]["ray_address"] = cluster.address
        job.write_text(yaml.safe_dump(spec))
        # ray.init(address=...) swaps a loopback host for the machine's address unless told otherwise
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        driver = subprocess.Popen(
            [SAM_BATCH, "run", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        wait_for(lambda: committed(out) >= 1 or driver.poll() is not None, what="the first commit")
        assert driver.poll() is None, "the job ended before the node could be lost"
        cluster.remove_node(worker_node, allow_graceful=False)
        stdout, stderr = driver.communicate(timeout=1200)
        assert driver.returncode == 0, stderr
    finally:
        cluster.shutdown()
    assert_same_rows(out, clean)
    record = json.loads((out / "run.json").read_text())
    assert record["images_ok"] + record["images_error"] == len(NAMES)


def shards_in(folder: Path, suffix: str) -> list[int]:
    return sorted(int(p.name[len("shard-") : -len(suffix)]) for p in folder.glob(f"shard-*{suffix}"))


def raw_and_committed_keys(out: Path) -> tuple[list[tuple], list[tuple]]:
    """(image_id, mask_id) of every row DuckDB reads from masks/*.parquet as it is, and of the
    rows `OutputDataset.read_table` reads (committed shards only), sorted."""
    from sam_batch.jobs.dataset import OutputDataset

    raw = duckdb.sql(f"SELECT image_id, mask_id FROM read_parquet('{out}/masks/*.parquet')").fetchall()
    committed = OutputDataset(str(out)).read_table("masks").select(["image_id", "mask_id"]).to_pylist()
    return sorted(raw), sorted((m["image_id"], m["mask_id"]) for m in committed)


def test_a_commit_killed_before_its_marker_is_taken_back_by_the_next_run(tmp_path) -> None:
    """A run SIGKILLed after a shard's masks file moved into place, before its images file and
    marker: DuckDB over masks/*.parquet sees that shard's rows (whole) until the next run, which
    removes them at its start, before its first commit; a last run writes them again, and the
    tables hold every input once, the raw files agreeing with the reader that trusts markers."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    names = ["dog.jpg", "groceries.jpg", "truck.jpg"]
    for name in names:
        Image.open(IMAGES / name).convert("RGB").resize((128, 96)).save(folder / name)
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "killed-commit",
                "input": {"uris": [f"{folder}/*.jpg"]},
                "output": {"uri": str(out)},
                "amg": {"points_per_side": 4},
                "run": {"executor": "local", "shard_size": 1},
            }
        )
    )

    def killed_after(moves: int) -> str:
        child = subprocess.run(
            [sys.executable, "-c", KILLED_AT_A_DATA_MOVE, str(moves), "run", str(job)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert child.returncode == -signal.SIGKILL, child.stderr
        return child.stderr

    killed_after(3)  # shard 0's two files, then shard 1's masks
    assert shards_in(out / "_sam_batch" / "commits", ".json") == [0]
    assert shards_in(out / "masks", ".parquet") == [0, 1] and shards_in(out / "images", ".parquet") == [0]
    raw, committed = raw_and_committed_keys(out)
    assert set(committed) < set(raw) and len(raw) == len(set(raw))  # shard 1's masks, once each

    stderr = killed_after(0)  # the next run, killed as its first commit is about to publish
    assert "removed 1 data file(s) of shards published by a killed run but never committed" in stderr
    assert shards_in(out / "masks", ".parquet") == [0]
    raw, committed = raw_and_committed_keys(out)
    assert raw == committed

    last = subprocess.run([SAM_BATCH, "run", str(job)], capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr
    assert "never committed" not in last.stderr
    images = pq.read_table(out / "images").to_pylist()
    assert sorted(Path(i["image_uri"]).name for i in images) == names
    raw, committed = raw_and_committed_keys(out)
    assert raw == committed and len(set(raw)) == len(raw) == sum(i["n_masks"] for i in images) > 0


# `sam-batch run` (argv[1:]) that prints a line to stderr as each tile of a scene comes back to
# the driver: the test's hook, in the child, not in the code under test
TILES_WATCHED = """
import sys
from sam_batch.cli import main
from sam_batch.jobs import ray_pipeline

tile_back = ray_pipeline.RayPipeline._tile_back


def watched(self, image, masks):
    print("TILE BACK", file=sys.stderr, flush=True)
    return tile_back(self, image, masks)


ray_pipeline.RayPipeline._tile_back = watched
sys.exit(main(sys.argv[1:]))
"""
SCENE_JOB = {"amg": {"points_per_side": 4}, "raster": {"tile_size": 256, "tile_overlap": 32}}  # 16 tiles


def scene_job(path: Path, out: Path, **run: object) -> Path:
    job = {
        "name": "scene-faults",
        "input": {"uris": [str(IMAGES / "RGB.byte.tif")]},
        "output": {"uri": str(out)},
        "run": {"executor": "ray", **run},
        **SCENE_JOB,
    }
    path.write_text(yaml.safe_dump(job))
    return path


def test_an_actor_killed_mid_scene_costs_only_its_tiles(tmp_path) -> None:
    """One scene of 16 tiles on two actors; one is SIGKILLed once three tiles are back. The run
    redoes only the tiles that actor held (at most IN_FLIGHT_PER_ACTOR), and its masks are
    those of a run on one actor."""
    from sam_batch.jobs.ray_pipeline import IN_FLIGHT_PER_ACTOR

    one = tmp_path / "one"
    subprocess.run(
        [SAM_BATCH, "run", str(scene_job(tmp_path / "one.yaml", one, max_actors=1))],
        check=True,
        capture_output=True,
        timeout=1200,
    )
    clean = json.loads((one / "run.json").read_text())
    out = tmp_path / "out"
    job = scene_job(tmp_path / "job.yaml", out, max_actors=2)
    driver = subprocess.Popen(
        [sys.executable, "-c", TILES_WATCHED, "run", str(job)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    back = 0
    for line in driver.stderr:
        back += line.startswith("TILE BACK")
        if back == 3:
            break
    assert driver.poll() is None and back == 3, "the scene ended before the fault could be injected"
    victims = actor_pids(psutil.Process(driver.pid))
    assert len(victims) == 2, victims
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = driver.communicate(timeout=1200)
    assert driver.returncode == 0, stderr
    record = json.loads((out / "run.json").read_text())
    assert record["images_ok"] == 1 and clean["images_ok"] == 1
    assert 1 <= record["tiles_redone"] <= IN_FLIGHT_PER_ACTOR, record
    assert record["tiles_segmented"] == clean["tiles_segmented"]  # each tile once, and the redone again
    assert clean["tiles_redone"] == 0 and clean["tiles_segmented"] >= 12  # corners may hold only nodata
    assert_same_rows(out, rows(one))
