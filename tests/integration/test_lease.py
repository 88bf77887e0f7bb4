"""One run at a time on an output (`jobs.lease`): unit cases, then two real `sam-batch run`
processes on one output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_run_end_to_end import SAM_BATCH, sam_batch, write_job

from sam_batch.jobs import lease as lease_module
from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.lease import LeaseHeld, OutputLease
from shared_data import IMAGES

NAMES = ["dog.jpg", "groceries.jpg", "picture1.jpg", "picture2.jpg", "truck.jpg", "dogs.jpg"]


def test_a_second_lease_is_refused_until_the_first_is_released(tmp_path) -> None:
    dataset = OutputDataset(str(tmp_path / "out"))
    with OutputLease(dataset):
        with pytest.raises(LeaseHeld, match=rf"out is being written by another run \(process {os.getpid()} on "):
            OutputLease(dataset).acquire()
        taken = OutputLease(dataset, force=True)
        taken.acquire()  # --force takes it
        taken.release()
    assert not (tmp_path / "out" / "_sam_batch" / "lease.json").exists()
    with OutputLease(dataset):  # free again
        pass


def test_a_lease_not_renewed_in_time_or_of_a_dead_process_is_taken_over(tmp_path, monkeypatch) -> None:
    dataset = OutputDataset(str(tmp_path / "out"))
    path = tmp_path / "out" / "_sam_batch" / "lease.json"
    path.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    holder = {
        "run_id": "r",
        "host": "elsewhere",
        "machine": "m",
        "pid": 1,
        "process_start": "x",
        "renewed": time.time(),
        "from_a_newer_version": True,
    }  # unknown keys are left out
    here = {**holder, "host": socket.gethostname(), "machine": lease_module._machine(), "pid": dead.pid}
    for stale in (
        {**holder, "renewed": time.time() - lease_module.LEASE_TTL_S - 1},  # another host, silent
        here,
    ):  # this machine, process gone
        path.write_text(json.dumps(stale))
        with OutputLease(dataset):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    for held in (
        holder,  # another host, renewed just now
        {**here, "machine": "another container with the same host name"},
    ):
        path.write_text(json.dumps(held))
        with pytest.raises(LeaseHeld, match=f"process {held['pid']} on {held['host']}"):
            OutputLease(dataset).acquire()


def test_a_run_whose_lease_is_taken_stops_at_its_next_event(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    dataset = OutputDataset(str(tmp_path / "out"))
    first, second = OutputLease(dataset), OutputLease(dataset, force=True)
    first.acquire()
    try:
        second.acquire()  # another run takes it
        deadline = time.time() + 10
        while not first.lost and time.time() < deadline:
            time.sleep(0.05)
        assert first.lost
        first.release()  # leaves the other run's lease alone
        assert json.loads((tmp_path / "out" / "_sam_batch" / "lease.json").read_text())["run_id"] == second.me.run_id
    finally:
        first.release()
        second.release()


def test_the_lease_is_renewed_while_the_run_holds_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lease_module, "LEASE_RENEW_S", 0.05)
    dataset = OutputDataset(str(tmp_path / "out"))
    path = tmp_path / "out" / "_sam_batch" / "lease.json"
    with OutputLease(dataset):
        first = json.loads(path.read_text())["renewed"]
        deadline = time.time() + 10
        while json.loads(path.read_text())["renewed"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["renewed"] > first


def test_overwrite_keeps_the_lease_of_the_run_doing_it(tmp_path) -> None:
    dataset = OutputDataset(str(tmp_path / "out"))
    with OutputLease(dataset):
        (tmp_path / "out" / "_sam_batch" / "commits").mkdir()
        (tmp_path / "out" / "masks").mkdir()
        dataset.clear()
        assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == ["_sam_batch", "lease.json"]


def committing_for(out: Path, pid: int, job_name: str) -> bool:
    """Whether the run of process `pid` holds `out`, has planned `job_name` and committed a shard."""
    try:
        holder = json.loads((out / "_sam_batch" / "lease.json").read_text())
        plan = json.loads((out / "_sam_batch" / "plan.json").read_text())
        return (
            holder["pid"] == pid and plan["job"]["name"] == job_name and any((out / "_sam_batch" / "commits").iterdir())
        )
    except (OSError, ValueError, KeyError):
        return False


@pytest.mark.slow
def test_two_runs_on_one_output_one_is_refused_and_nothing_is_lost(tmp_path) -> None:
    """Run A writes; run B of the same job, and run C of another job with --overwrite, are
    refused with one line while A holds the output; A's tables hold every input once. A driver
    killed with SIGKILL leaves its lease, and the next run takes it over at once (its process is
    gone) and finishes the job."""
    out = tmp_path / "out"
    uris = [str(IMAGES / n) for n in NAMES]
    job = write_job(
        tmp_path, "first", uris, out, amg={"points_per_side": 4}, run={"executor": "local", "shard_size": 1}
    )
    other = write_job(
        tmp_path, "other", uris, out, amg={"points_per_side": 2}, run={"executor": "local", "shard_size": 1}
    )
    first = subprocess.Popen([SAM_BATCH, "run", str(job)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lease_file = out / "_sam_batch" / "lease.json"
    deadline = time.time() + 120
    while not lease_file.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert lease_file.exists(), "run A never took the lease"
    second = sam_batch("run", str(job), check=False)
    third = sam_batch("run", str(other), "--overwrite", check=False)
    for refused in (second, third):
        assert refused.returncode == 1 and "is being written by another run" in refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("sam-batch: LeaseHeld: ")
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    rows = pq.read_table(out / "images").to_pylist()
    assert sorted(Path(r["image_uri"]).name for r in rows) == sorted(NAMES)
    keys = [(m["image_id"], m["mask_id"]) for m in pq.read_table(out / "masks").to_pylist()]
    assert len(keys) == len(set(keys)) == sum(r["n_masks"] for r in rows)
    assert not lease_file.exists()

    killed = subprocess.Popen(
        [SAM_BATCH, "run", str(other), "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not committing_for(out, killed.pid, "other"):
        assert killed.poll() is None and time.time() < deadline
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert lease_file.exists()
    resumed = sam_batch("run", str(other))
    assert "taking over the lease of a previous run (its holder is gone)" in resumed.stderr
    rows = pq.read_table(out / "images").to_pylist()
    assert sorted(Path(r["image_uri"]).name for r in rows) == sorted(NAMES)


def leave_an_attempt(dataset: OutputDataset) -> None:
    """A commit of `dataset`'s run that dies after writing its masks: an attempt left behind."""
    from sam_batch.jobs.plan import Shard
    from sam_batch.pipeline.tables import IMAGES_SCHEMA, MASKS_SCHEMA

    write_bytes = dataset._write_bytes

    def dies_on_images(path: str, data: bytes) -> None:
        if path.endswith("images.parquet"):
            raise OSError("killed")
        write_bytes(path, data)

    dataset._write_bytes = dies_on_images
    with pytest.raises(OSError, match="killed"):
        dataset.commit_shard(Shard(0, ("x.jpg",)), MASKS_SCHEMA.empty_table(), IMAGES_SCHEMA.empty_table(), {})


def test_clean_up_removes_this_runs_attempts_and_stale_ones_never_the_lease_holders(tmp_path) -> None:
    """A run whose lease another run took (--force) cleans up at its end: its own attempts and
    those of a run that holds no lease go; those of the run holding the lease, perhaps a
    commit in flight, stay. The holder's own clean-up then removes them all."""
    dataset = OutputDataset(str(tmp_path / "out"))
    ours, theirs = OutputLease(dataset), OutputLease(dataset, force=True)
    ours.acquire()
    try:
        theirs.acquire()
        for run_id in (ours.run_id, theirs.run_id, "a-run-that-died"):
            leave_an_attempt(dataset.for_run(run_id))
        attempts = tmp_path / "out" / "_sam_batch" / "attempts"
        assert len(list(attempts.glob("*/shard-00000-*/masks.parquet"))) == 3
        dataset.for_run(ours.run_id).clean_attempts(ours.holder_run_id())
        assert [p.name for p in attempts.iterdir()] == [theirs.run_id]
        assert len(list(attempts.glob(f"{theirs.run_id}/shard-00000-*/masks.parquet"))) == 1
        dataset.for_run(theirs.run_id).clean_attempts(theirs.holder_run_id())
        assert not list(attempts.iterdir())
    finally:
        ours.release()
        theirs.release()
