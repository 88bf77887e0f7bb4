"""Inputs from a manifest: a text file of URIs or a Parquet file with a `uri` column, local or on S3.

Listing is checked directly (`list_inputs`, no model); two runs (in process, 2×2 point grid,
small images) check that a listed file that is missing becomes an error row and the job goes on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from PIL import Image

from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.plan import PlanError, list_inputs
from shared_data import IMAGES

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
FAST_AMG = {"points_per_side": 2}


def job_for(
    manifest: str, out: str = "/tmp/unused", uris: list[str] | None = None, options: dict | None = None
) -> dict:
    """A job whose inputs come from `manifest` (plus `uris`), run in process on a tiny grid."""
    return {
        "name": "manifest",
        "input": {"uris": uris or [], "manifest": manifest, "storage_options": options or {}},
        "output": {"uri": out, "storage_options": options or {}},
        "amg": FAST_AMG,
        "run": {"executor": "local", "shard_size": 2},
    }


def listed(job: dict) -> list[str]:
    return list_inputs(parse_job(job))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two small JPEGs (96 px crops of real photos)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("dog.jpg", "truck.jpg"):
        path = folder / name
        Image.open(IMAGES / name).convert("RGB").crop((100, 100, 400, 400)).resize((96, 96)).save(path)
        paths.append(path)
    return paths


def run(job: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=600)


def test_text_manifest_skips_blank_lines_and_comments(tmp_path, photos) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(
        f"# photos to segment\n\n  {photos[1]}  \r\n{photos[0]}\n   \n  # indented comment\n{photos[1]}\n"
    )
    assert listed(job_for(str(manifest))) == sorted(str(p) for p in photos)


def test_parquet_manifest_gives_its_uri_column(tmp_path, photos) -> None:
    manifest = tmp_path / "list.parquet"
    table = pa.table({"id": [1, 2, 3], "uri": [str(photos[1]), None, str(photos[0])]})
    pq.write_table(table, manifest)
    assert listed(job_for(str(manifest))) == sorted(str(p) for p in photos)
    pq.write_table(table.set_column(1, "uri", table["uri"].dictionary_encode()), manifest)  # categorical
    assert listed(job_for(str(manifest))) == sorted(str(p) for p in photos)


def test_manifest_and_uris_are_united_without_duplicates(tmp_path, photos) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{photos[0]}\n{IMAGES / 'groceries.jpg'}\nfile://{photos[1]}\n")
    inputs = listed(
        job_for(
            str(manifest),
            uris=[f"file://{photos[0].parent}/*.jpg", str(photos[0].parent / ".." / photos[0].parent.name / "dog.jpg")],
        )
    )
    assert inputs == sorted({str(photos[0]), str(photos[1]), str(IMAGES / "groceries.jpg")})


def test_a_listed_file_with_glob_characters_in_its_name_is_that_file(tmp_path, photos) -> None:
    """`scan[1].jpg` names a file: it is listed as itself, not read as a pattern matching `scan1.jpg`."""
    bracketed = tmp_path / "scan[1].jpg"
    bracketed.write_bytes(photos[0].read_bytes())
    (tmp_path / "scan1.jpg").write_bytes(photos[1].read_bytes())

    def of(*uris: Path) -> dict:
        return {**job_for("unused"), "input": {"uris": [str(u) for u in uris]}}

    assert listed(of(bracketed, photos[1])) == sorted([str(bracketed), str(photos[1])])
    assert listed(of(tmp_path / "scan[0-9].jpg")) == [str(tmp_path / "scan1.jpg")]


def test_files_under_the_output_are_never_inputs(tmp_path, photos, caplog) -> None:
    """A glob over the output's parent (as after a first run of a job whose output sits among
    its inputs) lists the photos, never what the output holds."""
    (tmp_path / "a.jpg").write_bytes(photos[0].read_bytes())
    (tmp_path / "out" / "masks").mkdir(parents=True)
    (tmp_path / "out" / "masks" / "shard-00000.jpg").write_bytes(photos[1].read_bytes())
    job = {**job_for("unused", out=str(tmp_path / "out")), "input": {"uris": [f"{tmp_path}/**/*.jpg"]}}
    assert listed(job) == [str(tmp_path / "a.jpg")]
    assert "1 listed file(s) lie under output.uri" in caplog.text
    (tmp_path.parent / f"{tmp_path.name}-link").symlink_to(tmp_path)  # the output named through a link
    via_link = {**job, "output": {"uri": str(tmp_path.parent / f"{tmp_path.name}-link" / "out") + "/"}}
    assert listed(via_link) == [str(tmp_path / "a.jpg")]


def test_a_glob_lists_symbolic_links_to_files(tmp_path, photos) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "link.jpg").symlink_to(photos[0])
    (tmp_path / "in" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    job = {**job_for("unused"), "input": {"uris": [f"{tmp_path}/in/*.jpg"]}}
    assert listed(job) == [str(tmp_path / "in" / "link.jpg")]


def test_a_glob_enters_linked_folders_once_on_a_path_and_never_lists_the_output(tmp_path, photos, caplog) -> None:
    """`*` and `**` go through a link to a folder as through the folder; a link back to a
    folder on its own path (a cycle) is not entered, with a warning; the output reached through
    a link is still left out."""
    elsewhere, inputs, out = tmp_path / "elsewhere", tmp_path / "in", tmp_path / "out"
    (elsewhere / "deeper").mkdir(parents=True)
    (out / "masks").mkdir(parents=True)
    inputs.mkdir()
    (elsewhere / "b.jpg").write_bytes(photos[0].read_bytes())
    (elsewhere / "deeper" / "c.jpg").write_bytes(photos[1].read_bytes())
    (out / "masks" / "shard-00000.jpg").write_bytes(photos[1].read_bytes())
    (inputs / "link.jpg").symlink_to(photos[0])
    (inputs / "linked").symlink_to(elsewhere)
    (elsewhere / "deeper" / "back").symlink_to(inputs)  # in/linked/deeper/back is in/ again
    (inputs / "output").symlink_to(out)

    def of(pattern: str) -> list[str]:
        return listed({**job_for("unused", out=str(out)), "input": {"uris": [f"{inputs}/{pattern}"]}})

    assert of("**/*.jpg") == [
        str(inputs / "link.jpg"),
        str(inputs / "linked" / "b.jpg"),
        str(inputs / "linked" / "deeper" / "c.jpg"),
    ]
    cycle = "1 linked folder(s) lead back to a folder on their own path (a cycle) and were not entered"
    assert f"{cycle}, first {inputs}/linked/deeper/back" in caplog.text
    assert "1 listed file(s) lie under output.uri" in caplog.text
    assert of("*/*.jpg") == [str(inputs / "linked" / "b.jpg")]
    assert of("linked/*/*.jpg") == [str(inputs / "linked" / "deeper" / "c.jpg")]


def test_file_urls_with_percent_escapes_name_their_files(tmp_path, photos) -> None:
    spaced = tmp_path / "my dog.jpg"
    spaced.write_bytes(photos[0].read_bytes())
    url = f"file://{tmp_path}/my%20dog.jpg".replace(" ", "%20")
    for uri in (url, url.replace("my%20dog.jpg", "my%20*.jpg")):
        assert listed({**job_for("unused"), "input": {"uris": [uri]}}) == [str(spaced)]


def test_a_missing_file_in_the_manifest_is_an_error_row_and_the_job_goes_on(tmp_path, photos) -> None:
    missing = tmp_path / "not-there.jpg"
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(p) for p in [*photos, missing]) + "\n")
    out = tmp_path / "out"

    result = run(job_for(str(manifest), str(out)), tmp_path)

    assert result.returncode == 0, result.stderr
    rows = {Path(r["image_uri"]).name: r for r in pq.read_table(out / "images").to_pylist()}
    assert sorted(rows) == ["dog.jpg", "not-there.jpg", "truck.jpg"]
    assert rows["not-there.jpg"]["status"] == "error"
    assert rows["not-there.jpg"]["error"] == "read: file not found"
    assert rows["dog.jpg"]["status"] == rows["truck.jpg"]["status"] == "ok"
    record = json.loads((out / "run.json").read_text())
    assert (record["images_ok"], record["images_error"], record["shards_committed"]) == (2, 1, 2)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: pq.write_table(pa.table({"path": ["a.jpg"]}), p), r"has no 'uri' column \(columns: \['path'\]\)"),
        (lambda p: pq.write_table(pa.table({"uri": [1, 2]}), p), r"the 'uri' column holds int64, not strings"),
        (lambda p: p.write_bytes(b"PAR1" + b"\x00" * 20), r"is not a readable Parquet file"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00not text"), r"is neither Parquet nor UTF-8 text"),
        (lambda p: p.write_text("# nothing listed\n\n"), r"input: no images found for \[\] and manifest"),
        (lambda p: None, r"input\.manifest: cannot read .*: FileNotFoundError"),
    ],
    ids=["parquet-without-uri", "parquet-uri-not-strings", "truncated-parquet", "binary", "empty", "missing"],
)
def test_a_malformed_manifest_is_one_clear_line(tmp_path, write, message) -> None:
    manifest = tmp_path / "manifest"
    write(manifest)
    with pytest.raises(PlanError, match=message) as error:
        listed(job_for(str(manifest)))
    assert "\n" not in str(error.value) and str(manifest) in str(error.value)


def test_sam_batch_names_a_malformed_manifest_in_one_line(tmp_path) -> None:
    manifest = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"]}), manifest)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job_for(str(manifest))))

    result = subprocess.run([SAM_BATCH, "validate", str(path)], capture_output=True, text=True, timeout=120)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"sam-batch: PlanError: input.manifest: '{manifest}' has no 'uri' column (columns: ['path'])"
    ]


@pytest.fixture(scope="module")
def s3_photos(s3_endpoint, photos) -> tuple[s3fs.S3FileSystem, dict]:
    """A bucket holding the two photos under `in/`."""
    fs = s3fs.S3FileSystem(**s3_endpoint)
    fs.mkdir("manifests")
    for path in photos:
        fs.put_file(str(path), f"manifests/in/{path.name}")
    return fs, s3_endpoint


def test_text_and_parquet_manifests_on_s3(s3_photos) -> None:
    fs, options = s3_photos
    expected = ["s3://manifests/in/dog.jpg", "s3://manifests/in/truck.jpg"]
    fs.pipe_file("manifests/list.txt", ("# on S3\n" + "\n".join(reversed(expected)) + "\n").encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": expected}), sink)
    fs.pipe_file("manifests/list.parquet", sink.getvalue().to_pybytes())

    assert listed(job_for("s3://manifests/list.txt", options=options)) == expected
    assert listed(job_for("s3://manifests/list.parquet", options=options)) == expected


def test_a_run_from_a_manifest_on_s3_writes_to_s3(s3_photos, tmp_path) -> None:
    fs, options = s3_photos
    fs.pipe_file("manifests/run.txt", b"s3://manifests/in/dog.jpg\ns3://manifests/in/gone.jpg\n")

    result = run(job_for("s3://manifests/run.txt", "s3://manifests/out", options=options), tmp_path)

    assert result.returncode == 0, result.stderr
    rows = {r["image_uri"]: r for r in pq.read_table("manifests/out/images", filesystem=fs).to_pylist()}
    assert sorted(rows) == ["s3://manifests/in/dog.jpg", "s3://manifests/in/gone.jpg"]
    assert rows["s3://manifests/in/dog.jpg"]["status"] == "ok"
    assert rows["s3://manifests/in/gone.jpg"]["error"] == "read: file not found"
