"""`sam-batch refilter` against `sam-batch run`, both through the command line, on real photos.

One run keeps the candidates of dog.jpg and groceries.jpg (8x8 points, one crop layer: five
crops, so NMS across crops counts too; a shard each); each of three settings is then refiltered
from them and run afresh with the model, and the two outputs' tables must be equal: every column
of `masks`, every column of `images` but `seconds`. Refilter reads committed shards only and
resumes; on Ray it writes what it writes in process; on S3 (moto's server) what it writes on
disk; a tiled scene (groceries.jpg in 12 tiles) and a scene with nodata (Landsat) refilter to
what a run writes, seams merged and the nodata rule applied; so does a SAM 2.1 output with
mask-to-mask refinement and a mask threshold other than 0.
Bad arguments are one line, exit 2, and leave nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_run_end_to_end import sam_batch, write_job

from shared_data import IMAGES

pytestmark = pytest.mark.slow

PHOTOS = [str(IMAGES / "dog.jpg"), str(IMAGES / "groceries.jpg")]
AMG = {"points_per_side": 8, "crop_n_layers": 1}
SETTINGS = {
    "lower-thresholds": {"pred_iou_thresh": 0.7, "stability_score_thresh": 0.8},
    "box-nms": {"box_nms_thresh": 0.5, "crop_nms_thresh": 0.5},
    "min-area": {"min_mask_region_area": 300, "pred_iou_thresh": 0.8},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """The photos' output with their candidates kept, at the job's default thresholds."""
    tmp = tmp_path_factory.mktemp("source")
    out = tmp / "out"
    job = write_job(tmp, "source", PHOTOS, out, amg=AMG, output={"uri": str(out), "candidates": True})
    sam_batch("run", str(job), "--set", "run.shard_size=1")
    return out


def tables(out: Path) -> tuple[list[dict], list[dict]]:
    """The masks rows in (image, mask_id) order and the images rows without `seconds`."""
    masks = sorted(pq.read_table(out / "masks").to_pylist(), key=lambda r: (r["image_uri"], r["mask_id"]))
    images = sorted(pq.read_table(out / "images").drop(["seconds"]).to_pylist(), key=lambda r: r["image_uri"])
    return masks, images


@pytest.mark.parametrize("name", SETTINGS)
def test_refilter_writes_what_a_run_writes(source, tmp_path, name) -> None:
    settings = SETTINGS[name]
    fresh = tmp_path / "fresh"
    sam_batch("run", str(write_job(tmp_path, name, PHOTOS, fresh, amg={**AMG, **settings})))
    refiltered = tmp_path / "refiltered"
    sets = [arg for key, value in settings.items() for arg in ("--set", f"amg.{key}={value}")]
    result = sam_batch("refilter", str(source), *sets, "-o", str(refiltered))
    assert "shards: 2 committed" in result.stdout
    ours, theirs = tables(refiltered), tables(fresh)
    assert len(ours[0]) > 0 and {Path(r["image_uri"]).name for r in ours[0]} == {"dog.jpg", "groceries.jpg"}
    assert ours == theirs
    assert not (refiltered / "candidates").exists()
    again = sam_batch("refilter", str(source), *sets, "-o", str(refiltered))
    assert "shards: 0 committed, 2 already done" in again.stdout


def test_a_tiled_scene_refilters_to_what_a_run_writes(tmp_path) -> None:
    """groceries.jpg cut into 256-px tiles overlapping by 32 (`raster.tiling: always`; 12 tiles,
    seams merged), candidates kept; refiltered at other thresholds, it equals a fresh run."""
    raster = {"tiling": "always", "tile_size": 256, "tile_overlap": 32}
    amg = {"points_per_side": 8}
    source = tmp_path / "source"
    output = {"uri": str(source), "candidates": True}
    sam_batch("run", str(write_job(tmp_path, "tiled", PHOTOS[1:], source, amg=amg, raster=raster, output=output)))
    settings = {"pred_iou_thresh": 0.75, "box_nms_thresh": 0.5, "crop_nms_thresh": 0.5}
    fresh = tmp_path / "fresh"
    sam_batch("run", str(write_job(tmp_path, "tiled-fresh", PHOTOS[1:], fresh, amg={**amg, **settings}, raster=raster)))
    refiltered = tmp_path / "refiltered"
    sam_batch("refilter", str(source), *(f"--set=amg.{k}={v}" for k, v in settings.items()), "-o", str(refiltered))
    ours, theirs = tables(refiltered), tables(fresh)
    assert set(pq.read_table(source / "candidates", columns=["n_tiles"]).column("n_tiles").to_pylist()) == {12}
    assert len(ours[0]) > 0
    assert ours == theirs
    assert ours != tables(source)  # the settings changed something


def test_a_scene_with_nodata_refilters_to_what_a_run_writes(tmp_path) -> None:
    """The Landsat scene (nodata 0 around its footprint, EPSG:32618) in 256-px tiles: the
    candidates keep each nodata tile's valid pixels, so refilter applies the nodata rule as the
    run did; at other thresholds it equals a fresh run, geometry included."""
    landsat = [str(IMAGES / "RGB.byte.tif")]
    raster = {"tile_size": 256, "tile_overlap": 32}
    amg = {"points_per_side": 8}
    source = tmp_path / "source"
    output = {"uri": str(source), "candidates": True}
    sam_batch("run", str(write_job(tmp_path, "landsat", landsat, source, amg=amg, raster=raster, output=output)))
    assert any(pq.read_table(source / "candidates", columns=["nodata"]).column("nodata").to_pylist())
    settings = {"stability_score_thresh": 0.9, "min_mask_region_area": 50}
    fresh = tmp_path / "fresh"
    sam_batch("run", str(write_job(tmp_path, "landsat-fresh", landsat, fresh, amg={**amg, **settings}, raster=raster)))
    refiltered = tmp_path / "refiltered"
    sam_batch("refilter", str(source), *(f"--set=amg.{k}={v}" for k, v in settings.items()), "-o", str(refiltered))
    ours = tables(refiltered)
    assert len(ours[0]) > 0 and ours == tables(fresh)


def test_a_sam2_output_refilters_to_what_a_run_writes(tmp_path, sam2_checkpoint) -> None:
    """sam2.1_hiera_t (seeded weights with MobileSAM's decoder) with mask-to-mask refinement and
    a mask threshold of 0.3, candidates kept at SAM 2's pred_iou_thresh of 0.8 (which none of
    these weights' masks reach): refiltered lower, with a higher stability threshold and a lower
    box NMS threshold, it equals a fresh run; SAM 2's generator keys are refused in one line."""
    model = {"type": "sam2.1_hiera_t", "checkpoint": str(sam2_checkpoint)}
    # the seeded weights predict IoUs of about 0.6 and, at the default offset, stability scores under 0.5
    amg = {"points_per_side": 4, "use_m2m": True, "mask_threshold": 0.3, "stability_score_offset": 0.2}
    source = tmp_path / "source"
    output = {"uri": str(source), "candidates": True}
    sam_batch("run", str(write_job(tmp_path, "sam2", PHOTOS[:1], source, model=model, amg=amg, output=output)))
    settings = {"pred_iou_thresh": 0.615, "stability_score_thresh": 0.75, "box_nms_thresh": 0.5}
    fresh = tmp_path / "fresh"
    sam_batch("run", str(write_job(tmp_path, "sam2-fresh", PHOTOS[:1], fresh, model=model, amg={**amg, **settings})))
    refiltered = tmp_path / "refiltered"
    sam_batch("refilter", str(source), *(f"--set=amg.{k}={v}" for k, v in settings.items()), "-o", str(refiltered))
    ours = tables(refiltered)
    assert len(ours[0]) > 0 and ours == tables(fresh)
    assert not tables(source)[0]
    refused = sam_batch("refilter", str(source), "--set", "amg.use_m2m=false", "-o", str(tmp_path / "new"), check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "--set amg.use_m2m=false: needs the model" in lines[0]


def test_refilter_at_the_runs_own_thresholds_gives_its_masks(source, tmp_path) -> None:
    sam_batch("refilter", str(source), "-o", str(tmp_path / "same"))
    assert tables(tmp_path / "same") == tables(source)
    assert (source / "candidates" / "shard-00001.parquet").exists()


def test_refilter_from_and_to_s3_with_credentials_from_the_environment(source, s3_endpoint, tmp_path) -> None:
    """The source output copied into a bucket on moto's S3 server, refiltered there into the same
    bucket, the endpoint and keys given as `AWS_*` variables (as on a cluster's nodes): the new
    output's tables are the source's (same thresholds), and the secret reaches neither the
    command's output nor the new output's files."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_endpoint)
    fs.mkdir("refilter")
    fs.put(f"{source}/", "refilter/source", recursive=True)
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint["client_kwargs"]["endpoint_url"],
        "AWS_ACCESS_KEY_ID": s3_endpoint["key"],
        "AWS_SECRET_ACCESS_KEY": s3_endpoint["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = sam_batch("refilter", "s3://refilter/source", "-o", "s3://refilter/new", env=env)
    assert "shards: 2 committed" in result.stdout
    fs.get("refilter/new/", str(tmp_path / "new"), recursive=True)
    assert tables(tmp_path / "new") == tables(source)
    written = [path.read_bytes() for path in (tmp_path / "new").rglob("*") if path.is_file()]
    secret = s3_endpoint["secret"]
    assert secret not in result.stdout + result.stderr and not any(secret.encode() in data for data in written)


def test_only_committed_shards_are_read_and_a_later_refilter_resumes(source, tmp_path) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(source, partial)
    marker = partial / "_sam_batch" / "commits" / "shard-00001.json"
    kept = marker.read_bytes()
    marker.unlink()
    first = sam_batch("refilter", str(partial), "--set", "amg.box_nms_thresh=0.6", "-o", str(tmp_path / "new"))
    assert "shards: 1 committed, 0 already done" in first.stdout
    assert "1 shard(s) not committed" in first.stderr
    marker.write_bytes(kept)
    second = sam_batch("refilter", str(partial), "--set", "amg.box_nms_thresh=0.6", "-o", str(tmp_path / "new"))
    assert "shards: 1 committed, 1 already done" in second.stdout
    on_ray = tmp_path / "on-ray"
    sets = ["--set", "amg.box_nms_thresh=0.6", "--set", "run.executor=ray"]
    sam_batch("refilter", str(source), *sets, "-o", str(on_ray))
    assert tables(on_ray) == tables(tmp_path / "new")
    assert '"executor": "ray"' in (on_ray / "run.json").read_text()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--set", "amg.bogus=1"], "--set amg.bogus=1: unknown key"),
        (["--set", "amg.points_per_side=16"], "--set amg.points_per_side=16: needs the model"),
        (["--set", "model.type=vit_b"], "needs the model"),
        (["--set", "amg.pred_iou_thresh=0.4"], "below the floor"),
        (["--set", "amg.stability_score_thresh=0.3"], "amg.stability_score_thresh 0.3 < 0.5"),
    ],
)
def test_bad_settings_are_one_line_exit_2_and_leave_nothing(source, tmp_path, args, says) -> None:
    dest = tmp_path / "new"
    result = sam_batch("refilter", str(source), *args, "-o", str(dest), check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not dest.exists()


def test_outputs_that_cannot_be_refiltered_are_refused(source, tmp_path) -> None:
    plain = tmp_path / "plain"
    sam_batch("run", str(write_job(tmp_path, "plain", PHOTOS[:1], plain, amg={"points_per_side": 4})))
    cases = {
        str(plain): "was run without output.candidates: true",
        str(tmp_path / "nothing-here"): "is not a committed sam-batch output",
        str(IMAGES): "is not a committed sam-batch output",
    }
    for uri, says in cases.items():
        dest = tmp_path / "new"
        result = sam_batch("refilter", uri, "-o", str(dest), check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and says in lines[0], (uri, lines)
        assert not dest.exists()
