"""The output dataset on any fsspec filesystem: layout, frozen plan, shard commits.

Layout under the output root:

    masks/shard-00000.parquet      finished data only, one file per committed shard
    images/shard-00000.parquet
    candidates/shard-00000.parquet only where the job keeps candidates (`output.candidates`)
    run.json                       the run record of the latest run (summary, per-stage times)
    _sam_batch/plan.json           the frozen plan: job fingerprint, redacted job, shards
    _sam_batch/prompts.parquet     a prompt job's prompts, frozen with the plan
    _sam_batch/commits/shard-00000.json   commit markers: a shard is done iff its marker exists
    _sam_batch/claims/shard-00000.json    which run publishes the shard (its run id)
    _sam_batch/attempts/<run_id>/<shard>-<uuid>/   where a run's attempts write before they publish

A shard is published by writing its two (or three) files under a fresh attempt folder, claiming the shard
(its claim created only if absent: the first run to claim it publishes it; another run's
attempt then touches nothing, an attempt of the claiming run, retried after its worker died,
carries on), moving the files to their deterministic names, and then creating the marker only
if it is absent. Readers trust markers only. The plan and the run record are written the same way
(a temporary under `attempts/`, then moved), so a process killed while writing one leaves the
previous version or none, never half of one. Attempts sit in a folder of their run (the run id
of its lease, `jobs.lease`), so that a clean-up removes only its own run's and those of runs
that no longer hold the lease, never those of a commit in flight of the run holding it.
"""

from __future__ import annotations

import errno
import importlib.metadata
import io
import json
import posixpath
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from sam_batch.jobs.job_rules import JobError
from sam_batch.jobs.plan import Plan, Shard

BOOKKEEPING = "_sam_batch"
PROMPTS_FILE = "prompts.parquet"  # under BOOKKEEPING: a prompt job's prompts, frozen with its plan
LEASE_FILE = "lease.json"  # under BOOKKEEPING: the lease of the run writing the output (`jobs.lease`)
EXCLUSIVE_PROBE = ".sam-batch-exclusive-probe-"  # + a uuid: the file `check_exclusive_create` makes twice
ATTEMPTS = "attempts"  # under BOOKKEEPING: one folder per run, named by its run id
CLAIMS = "claims"  # under BOOKKEEPING: `shard-NNNNN.json`, the run id of the run publishing the shard
# the data folders, in the order a commit moves their files into place (candidates: only where kept)
TABLES = ("candidates", "masks", "images")
WRITE_PROBE = ".sam-batch-write-probe-"  # + a uuid: the empty file `check_writable` creates and removes
SHARD_FILE = re.compile(r"shard-(\d+)(\.\w+)")  # a shard's data file or marker: number, suffix


class DatasetError(RuntimeError):
    """The output dataset cannot be used as asked."""


class OutputNotWritable(JobError):
    """The output's storage refuses writes: the job cannot run as written."""


class OutputDataset:
    """One output root, as written by one run: its attempts go under `attempts/<run_id>/`
    (a fresh id unless given: the run id of the run's lease). All paths are built from shard
    numbers and run ids, never from input names. `crs`: the CRS its geometries are written in,
    the plan's `output_crs` (None until the plan is known); `candidates`: whether its shards
    have a candidates table (the plan's `output.candidates`)."""

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        run_id: str | None = None,
        crs: str | None = None,
        candidates: bool = False,
    ) -> None:
        self.uri = uri
        self.storage_options = storage_options or {}
        self.run_id = run_id or uuid.uuid4().hex
        self.crs = crs
        self.candidates = candidates
        self.fs, root = fsspec.core.url_to_fs(uri, **self.storage_options)
        self.root = root.rstrip("/")

    def for_run(self, run_id: str) -> OutputDataset:
        """The same output, written by the run `run_id`."""
        return OutputDataset(self.uri, self.storage_options, run_id, self.crs, self.candidates)

    def for_plan(self, plan: Plan) -> OutputDataset:
        """The same output, its geometries written in the CRS `plan` froze, its tables those of
        the plan's job."""
        candidates = bool(plan.job["output"].get("candidates", False))
        return OutputDataset(self.uri, self.storage_options, self.run_id, plan.output_crs, candidates)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- the plan -------------------------------------------------------------------------

    def check_root(self) -> None:
        """`DatasetError` if the output's root is a file."""
        if self.fs.isfile(self.root):
            raise DatasetError(f"output.uri {self.uri!r} is a file; it names the folder the tables go to")

    def check_writable(self) -> str:
        """The folder where a small file was created and removed: the output's root, or, while
        the root does not exist, the nearest folder above it that does (so that checking creates
        no folder); `OutputNotWritable` where the storage refuses: no permission, a read-only
        file system."""
        folder = self.root
        while True:
            probe = posixpath.join(folder, f"{WRITE_PROBE}{uuid.uuid4().hex}")
            try:
                self._write_bytes(probe, b"")
                self.fs.rm(probe)
                return folder
            except FileNotFoundError:  # no such folder (yet): try the one above
                if posixpath.dirname(folder) in ("", folder):
                    raise self._not_writable(folder, "no folder above it exists") from None
                folder = posixpath.dirname(folder)
            except OSError as error:
                if not isinstance(error, PermissionError) and error.errno != errno.EROFS:
                    raise  # not a refusal (a network error, say): the run fails as it would later
                raise self._not_writable(folder, error.strerror or " ".join(str(error).split())) from None

    def _not_writable(self, folder: str, reason: str) -> OutputNotWritable:
        message = f"output.uri {self.uri!r} cannot be written ({folder}: {reason})"
        return OutputNotWritable(message, field="output.uri")

    def read_plan(self) -> Plan | None:
        """The frozen plan, None if there is none; `DatasetError` if it cannot be read (or the
        output's root is a file)."""
        self.check_root()
        path = self.path(BOOKKEEPING, "plan.json")
        if not self.fs.exists(path):
            return None
        try:
            return Plan.from_json(self.fs.cat_file(path).decode("utf-8"))
        except (ValueError, KeyError, TypeError) as error:  # undecodable bytes, bad JSON, missing fields
            raise DatasetError(
                f"{self.uri}: {BOOKKEEPING}/plan.json cannot be read ({type(error).__name__}); "
                "pass --overwrite to start this output again"
            ) from None

    def write_plan(self, plan: Plan) -> None:
        self._publish(self.path(BOOKKEEPING, "plan.json"), plan.to_json().encode("utf-8"))

    def write_prompts(self, prompts: pa.Table) -> None:
        """Freeze a prompt job's prompts beside the plan (written before it)."""
        self._publish(self.path(BOOKKEEPING, PROMPTS_FILE), _parquet_bytes(prompts))

    def read_prompts(self) -> pa.Table:
        """The prompts frozen with the plan (`DatasetError` when they are missing)."""
        path = self.path(BOOKKEEPING, PROMPTS_FILE)
        if not self.fs.exists(path):
            raise DatasetError(f"{self.uri}: {BOOKKEEPING}/{PROMPTS_FILE} is missing; pass --overwrite to start again")
        return pq.read_table(io.BytesIO(self.fs.cat_file(path)))

    def clear(self) -> None:
        """Remove everything sam-batch wrote here (for --overwrite), but the lease of the run
        doing it (`jobs.lease`)."""
        for part in (*TABLES, "run.json"):
            self._remove(self.path(part))
        bookkeeping = self.path(BOOKKEEPING)
        if self.fs.exists(bookkeeping):
            for path in self.fs.ls(bookkeeping, detail=False):
                if path.rstrip("/").rsplit("/", 1)[-1] != LEASE_FILE:
                    self._remove(path)

    # -- commits --------------------------------------------------------------------------

    def committed_shards(self) -> set[int]:
        """Numbers of the shards whose commit marker exists."""
        return set(self._shard_files(self.path(BOOKKEEPING, "commits"), ".json"))

    def remove_unfinished(self) -> list[str]:
        """Remove the data files of shards that have no marker, and return their paths; then
        those shards' claims, so that this run may publish them.

        They are what a commit killed between its claim and its marker left (whole files, whose
        rows a run writes again). Only while holding the lease (`jobs.lease`), before any
        commit of the run: no other commit is then under way.
        """
        committed = self.committed_shards()
        removed: list[str] = []
        for table_name in TABLES:
            for shard_id, path in sorted(self._shard_files(self.path(table_name), ".parquet").items()):
                if shard_id not in committed:
                    self._remove(path)
                    removed.append(path)
        for shard_id, path in self._shard_files(self.path(BOOKKEEPING, CLAIMS), ".json").items():
            if shard_id not in committed:
                self._remove(path)
        return removed

    def _shard_files(self, folder: str, suffix: str) -> dict[int, str]:
        """The files `shard-NNNNN<suffix>` in `folder`, by shard number."""
        if not self.fs.exists(folder):
            return {}
        found: dict[int, str] = {}
        for path in self.fs.ls(folder, detail=False):
            match = SHARD_FILE.fullmatch(path.rstrip("/").rsplit("/", 1)[-1])
            if match and match.group(2) == suffix:
                found[int(match.group(1))] = path
        return found

    def commit_shard(
        self, shard: Shard, masks: pa.Table, images: pa.Table, stats: dict, candidates: pa.Table | None = None
    ) -> bool:
        """Publish a shard's tables (`candidates` too, unless None) and create its marker; False
        if it was already committed or another run claimed it (`_claim`), in which case nothing
        of this attempt is published.

        Every file is written in full before the claim and any move, in `TABLES` order
        (candidates, masks, images), then the marker: a process killed between the first move and
        the marker leaves some of the shard's files published without a marker, never an image
        row without its masks, nor masks without their candidates. The next run removes them at
        its start (`remove_unfinished`) and writes the same rows again under the same names.
        """
        if self.fs.exists(self._marker(shard)):
            return False
        attempt = self._attempt(f"{shard.name}-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(attempt, exist_ok=True)
            tables = {"candidates": candidates, "masks": masks, "images": images}
            tables = {name: table for name, table in tables.items() if table is not None}
            for table_name, table in tables.items():
                self._write_bytes(f"{attempt}/{table_name}.parquet", _parquet_bytes(table))
            if not self._claim(shard):
                self._remove(attempt)
                return False
            for table_name in tables:
                self.fs.makedirs(self.path(table_name), exist_ok=True)
                self.fs.mv(f"{attempt}/{table_name}.parquet", self.path(table_name, f"{shard.name}.parquet"))
            self._remove(attempt)  # empty by now; object stores have no folder left to remove
            return self._create_marker(shard, stats)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            what = "no space left on its device" if error.errno == errno.ENOSPC else "over its disk quota"
            raise DatasetError(
                f"{self.uri}: {what} while committing {shard.name}; free some and "
                "run the same command again: the shards committed so far stay, and the run resumes after them"
            ) from None

    def data_files(self, table_name: str) -> list[str]:
        """The committed data files of `masks`, `images` or `candidates`, as paths on `self.fs`."""
        committed = self.committed_shards()
        return [self.path(table_name, f"shard-{i:05d}.parquet") for i in sorted(committed)]

    def read_table(self, table_name: str, filters=None) -> pa.Table:
        """A committed table, read with pyarrow (empty with the right schema if nothing is committed)."""
        from sam_batch.pipeline.tables import CANDIDATES_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA

        schema = {"masks": MASKS_SCHEMA, "images": IMAGES_SCHEMA, "candidates": CANDIDATES_SCHEMA}[table_name]
        files = self.data_files(table_name)
        if not files:
            return schema.empty_table()
        return pq.ParquetDataset(files, filesystem=self.fs, schema=schema, filters=filters).read()

    def clean_attempts(self, lease_holder: str | None) -> None:
        """Remove the attempts of this run and those of every run but `lease_holder` (the run id
        in the output's lease now, None if there is no lease): a run that does not hold the
        lease has died or was taken over, so its attempts are stale; the holder's may be a
        commit in flight."""
        folder = self.path(BOOKKEEPING, ATTEMPTS)
        if not self.fs.exists(folder):
            return
        for path in self.fs.ls(folder, detail=False):
            run_id = path.rstrip("/").rsplit("/", 1)[-1]
            if run_id == self.run_id or run_id != lease_holder:
                self._remove(path)

    def _remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def write_run_record(self, record: dict) -> None:
        self._publish(self.path("run.json"), json.dumps(record, indent=1).encode("utf-8"))

    def _publish(self, path: str, data: bytes) -> None:
        """Put `data` at `path` whole: written under this run's attempts first, then moved over `path`."""
        staged = self._attempt(f"publish-{uuid.uuid4().hex}")
        self.fs.makedirs(staged.rsplit("/", 1)[0], exist_ok=True)
        self._write_bytes(staged, data)
        self.fs.mv(staged, path)

    def check_exclusive_create(self, folder: str) -> None:
        """`DatasetError` unless this store creates a file only if it is absent (`open(.., "xb")`),
        on which claims, commit markers and the lease rest. Probed with a file of its own in
        `folder` (one `check_writable` wrote in): created, created again (which must fail), removed."""
        probe = posixpath.join(folder, f"{EXCLUSIVE_PROBE}{uuid.uuid4().hex}")
        try:
            for _ in range(2):
                with self.fs.open(probe, "xb") as f:
                    f.write(b"create only if absent")
        except FileExistsError:
            return
        except (OSError, ValueError, NotImplementedError) as error:
            reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
            raise DatasetError(
                f"{self.uri}: cannot create a file only if it is absent here ({reason}), "
                f"which commits need; {_backend(self.fs)}"
            ) from None
        finally:
            self._remove(probe)
        raise DatasetError(
            f"{self.uri}: this store replaced a file it was asked to create only if absent, "
            f"so commits and the lease could not be exclusive; {_backend(self.fs)}"
        )

    def _attempt(self, name: str) -> str:
        """A path in this run's folder of attempts."""
        return self.path(BOOKKEEPING, ATTEMPTS, self.run_id, name)

    def _marker(self, shard: Shard) -> str:
        return self.path(BOOKKEEPING, "commits", f"{shard.name}.json")

    def _claim(self, shard: Shard) -> bool:
        """Whether this run publishes `shard`: it created the shard's claim (only if absent), or
        the claim is this run's (an attempt of this run that died committing, which Ray retried).
        A claim of another run, or one not yet readable, belongs to an attempt of another run."""
        claim = self.path(BOOKKEEPING, CLAIMS, f"{shard.name}.json")
        self.fs.makedirs(self.path(BOOKKEEPING, CLAIMS), exist_ok=True)
        try:
            with self.fs.open(claim, "xb") as f:
                f.write(json.dumps({"run_id": self.run_id}).encode("utf-8"))
            return True
        except FileExistsError:
            pass
        try:
            return json.loads(self.fs.cat_file(claim))["run_id"] == self.run_id
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False

    def _create_marker(self, shard: Shard, stats: dict) -> bool:
        marker = self._marker(shard)
        self.fs.makedirs(self.path(BOOKKEEPING, "commits"), exist_ok=True)
        body = json.dumps({"shard_id": shard.shard_id, **stats}).encode("utf-8")
        try:
            with self.fs.open(marker, "xb") as f:
                f.write(body)
        except FileExistsError:
            return False
        return True

    def _write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open(path, "wb") as f:
            f.write(data)


def _backend(fs: fsspec.AbstractFileSystem) -> str:
    """The fsspec back-end of `fs` and its version, for a message (s3fs needs >= 2025.7.0)."""
    package = type(fs).__module__.split(".", 1)[0]
    try:
        release = f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        release = package
    return (
        f"its fsspec back-end is {type(fs).__name__} of {release} "
        "(s3fs does this from 2025.7.0, gcsfs and adlfs from 2024.12.0)"
    )


def _parquet_bytes(table: pa.Table) -> bytes:
    """Serialise in memory, so a failure can never leave a partial file behind."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()
