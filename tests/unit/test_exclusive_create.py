"""Stores that cannot create a file only if it is absent are refused before a run touches them."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import yaml
from fsspec.implementations.memory import MemoryFileSystem

from sam_batch.cli import EXIT_JOB_FAILED, main
from sam_batch.jobs.dataset import DatasetError, OutputDataset


class OverwritingFileSystem(MemoryFileSystem):
    """A store whose "create only if absent" replaces the file, as s3fs 0.4 does on S3."""

    protocol = "overwriting"
    store: dict = {}  # its own files, apart from memory://'s
    pseudo_dirs = [""]

    def _open(self, path, mode="rb", **kwargs):
        return super()._open(path, mode.replace("x", "w"), **kwargs)


class RefusingFileSystem(MemoryFileSystem):
    """A store that cannot create exclusively at all."""

    protocol = "refusing"
    store: dict = {}
    pseudo_dirs = [""]

    def _open(self, path, mode="rb", **kwargs):
        if "x" in mode:
            raise NotImplementedError("mode 'xb' is not supported")
        return super()._open(path, mode, **kwargs)


@pytest.fixture(autouse=True)
def stores():
    for cls in (OverwritingFileSystem, RefusingFileSystem):
        fsspec.register_implementation(cls.protocol, cls, clobber=True)
        cls.store.clear()
    yield


def test_a_store_that_creates_exclusively_passes_and_keeps_nothing(tmp_path: Path) -> None:
    dataset = OutputDataset(str(tmp_path / "out"))
    dataset.check_exclusive_create(dataset.check_writable())
    assert list(tmp_path.iterdir()) == []  # probed where the output would go, nothing made


def test_a_store_that_overwrites_is_refused_by_name() -> None:
    with pytest.raises(
        DatasetError,
        match=r"^overwriting://out: this store replaced a file it was asked to "
        r"create only if absent.*its fsspec back-end is OverwritingFileSystem of ",
    ):
        OutputDataset("overwriting://out").check_exclusive_create("out")
    assert not OverwritingFileSystem.store  # the probe is gone


def test_a_store_without_exclusive_create_is_refused_with_its_reason() -> None:
    with pytest.raises(
        DatasetError,
        match=r"cannot create a file only if it is absent here "
        r"\(NotImplementedError: mode 'xb' is not supported\)",
    ):
        OutputDataset("refusing://out").check_exclusive_create("out")


@pytest.mark.parametrize("command", ["run", "validate"])
def test_run_and_validate_refuse_such_a_store_before_touching_it(tmp_path: Path, capsys, command) -> None:
    (tmp_path / "in.jpg").write_bytes(b"")
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "lossy",
                "input": {"uris": [str(tmp_path / "in.jpg")]},
                "output": {"uri": "overwriting://out"},
                "run": {"executor": "local"},
            }
        )
    )
    assert main([command, str(job)]) == EXIT_JOB_FAILED
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("sam-batch: DatasetError: overwriting://out: this store replaced a file")
    assert not OverwritingFileSystem.store  # no plan, no lease, no probe


def test_a_shards_claim_belongs_to_its_run_until_a_new_run_takes_it_back(tmp_path: Path) -> None:
    """Another run's attempt at a claimed shard publishes nothing; the claiming run's retried
    attempt carries on; a claim left by a killed commit is taken back at the next run's start."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sam_batch.jobs.plan import Shard

    out = str(tmp_path / "out")
    claiming, other, next_run = (OutputDataset(out, run_id=run_id) for run_id in ("a", "b", "c"))
    shard, rows = Shard(0, ("x.jpg",)), pa.table({"image_id": ["x"]})
    assert claiming._claim(shard)  # an attempt of run a claimed the shard, then its worker died
    assert not other.commit_shard(shard, rows.append_column("by", [["b"]]), rows, {})
    assert not (tmp_path / "out" / "masks").exists() and other.committed_shards() == set()
    assert claiming.commit_shard(shard, rows.append_column("by", [["a"]]), rows, {})  # a's retry
    assert pq.read_table(tmp_path / "out" / "masks" / "shard-00000.parquet")["by"].to_pylist() == ["a"]

    killed = Shard(1, ("y.jpg",))
    assert other._claim(killed)  # run b was killed between this claim and the marker
    next_run.remove_unfinished()  # the next run's start, under the lease
    assert next_run.commit_shard(killed, rows, rows, {}) and next_run.committed_shards() == {0, 1}
