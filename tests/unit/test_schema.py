"""Tests of the job file schema: defaults, validation messages, overrides, fingerprint, secrecy."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from sam_batch.jobs.job_file import load_job, parse_job
from sam_batch.jobs.job_rules import JobError, normalise_uri
from sam_batch.jobs.job_sections import (
    SECTIONS,
    AmgSpec,
    EngineSpec,
    InputSpec,
    ModelSpec,
    OutputSpec,
    RasterSpec,
    RunSpec,
)
from sam_batch.jobs.schema import JobSpec

CANARY = "CANARY-s3cr3t-4f9a1c"

MINIMAL_YAML = """\
name: demo
input:
  uris: scenes/a.tif
output:
  uri: ./out/demo
"""

# The example of SPEC.md's "Job file" section, verbatim apart from the comments.
SPEC_EXAMPLE_YAML = """\
name: demo
input:
  uris: ["s3://bucket/scenes/**/*.tif"]
  manifest: null
  storage_options: {}
model:
  type: vit_t
  checkpoint: null
  sha256: null
engine:
  backend: torch
  device: auto
  precision: fp32
amg:
  points_per_side: 32
  points_per_batch: 64
  pred_iou_thresh: 0.88
  stability_score_thresh: 0.95
  stability_score_offset: 1.0
  box_nms_thresh: 0.7
  crop_n_layers: 0
  crop_nms_thresh: 0.7
  crop_overlap_ratio: 0.3413333
  crop_n_points_downscale_factor: 1
  min_mask_region_area: 0
raster:
  tile_size: 1024
  tile_overlap: 128
  bands: null
  nodata: null
output:
  uri: ./out/demo
  storage_options: {}
run:
  ray_address: null
  shard_size: 64
"""


def minimal(**sections: Any) -> dict[str, Any]:
    """A minimal valid job dict, with ``sections`` merged over it."""
    data: dict[str, Any] = {"name": "demo", "input": {"uris": ["a.tif"]}, "output": {"uri": "out"}}
    data.update(sections)
    return data


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(data: Any) -> JobError:
    with pytest.raises(JobError) as info:
        parse_job(data)
    return info.value


def assert_one_line(error: JobError) -> None:
    assert "\n" not in str(error)


# --- defaults and accepted input -------------------------------------------------------------


def test_minimal_job_gets_spec_defaults(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, MINIMAL_YAML))
    assert job.name == "demo"
    assert job.input == InputSpec(uris=("scenes/a.tif",), manifest=None, storage_options={})
    assert job.model == ModelSpec(type="vit_t", checkpoint=None, sha256=None)
    assert job.engine == EngineSpec(backend="torch", device="auto", precision="fp32")
    assert job.amg == AmgSpec(
        points_per_side=32,
        points_per_batch=64,
        pred_iou_thresh=0.88,
        stability_score_thresh=0.95,
        stability_score_offset=1.0,
        box_nms_thresh=0.7,
        crop_n_layers=0,
        crop_nms_thresh=0.7,
        crop_overlap_ratio=512 / 1500,
        crop_n_points_downscale_factor=1,
        min_mask_region_area=0,
    )
    assert job.raster == RasterSpec(tiling="auto", tile_size=1024, tile_overlap=128, bands=None, nodata=None)
    assert job.output == OutputSpec(uri="./out/demo", storage_options={})
    assert job.run == RunSpec(
        ray_address=None,
        shard_size=64,
        executor="auto",
        max_actors=None,
        actor_start_timeout_s=600.0,
        read_timeout_s=300.0,
        image_timeout_s=None,
    )


def test_spec_example_parses(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, SPEC_EXAMPLE_YAML))
    assert job.input.uris == ("s3://bucket/scenes/**/*.tif",)
    assert job.amg.crop_overlap_ratio == pytest.approx(512 / 1500, abs=1e-7)


def test_empty_sections_and_manifest_only() -> None:
    job = parse_job(minimal(input={"manifest": "s3://b/list.txt"}, amg=None, run=None))
    assert job.input.uris == ()
    assert job.input.manifest == "s3://b/list.txt"
    assert job.amg == AmgSpec(pred_iou_thresh=0.88)  # SAM's default for an unset threshold


def test_ints_accepted_for_floats_and_normalised() -> None:
    job = parse_job(minimal(amg={"pred_iou_thresh": 1, "box_nms_thresh": 0}, raster={"nodata": 0}))
    assert job.amg.pred_iou_thresh == 1.0 and isinstance(job.amg.pred_iou_thresh, float)
    assert isinstance(job.amg.box_nms_thresh, float)
    assert isinstance(job.raster.nodata, float)


@pytest.mark.parametrize(
    ("section", "values"),
    [
        ("amg", {"pred_iou_thresh": 1.2, "stability_score_offset": 0, "crop_overlap_ratio": 0}),
        ("amg", {"points_per_side": 1, "crop_n_layers": 2, "min_mask_region_area": 100}),
        ("engine", {"device": "cuda:1", "precision": "bf16", "backend": "tensorrt"}),
        ("raster", {"tile_size": 64, "tile_overlap": 31, "bands": [4, 3, 2], "nodata": -9999}),
        ("raster", {"tiling": "never"}),
        ("engine", {"device": "cuda", "precision": "tf32"}),
        ("run", {"ray_address": "auto", "shard_size": 1, "executor": "local"}),
        ("run", {"executor": "auto"}),
        ("run", {"executor": "ray"}),
        ("run", {"max_actors": 1, "actor_start_timeout_s": 1}),
        ("run", {"max_actors": None, "actor_start_timeout_s": 3600.5}),
        ("run", {"read_timeout_s": 0.5, "image_timeout_s": 3600}),
        ("model", {"type": "vit_h", "checkpoint": "s3://w/sam.pt", "sha256": "AB" * 32}),
    ],
)
def test_valid_edge_values(section: str, values: dict[str, Any]) -> None:
    job = parse_job(minimal(**{section: values}))
    spec = getattr(job, section)
    for key, value in values.items():
        got = getattr(spec, key)
        if isinstance(value, list):
            value = tuple(value)
        elif key == "sha256":
            value = value.lower()
        assert got == value


def test_direct_construction_is_validated() -> None:
    with pytest.raises(JobError, match=r"^amg\.points_per_side: must be >= 1, got 0$"):
        AmgSpec(points_per_side=0)
    with pytest.raises(JobError, match=r"^name: "):
        JobSpec(name="", input=InputSpec(uris=("a",)), output=OutputSpec(uri="o"))
    uris: Any = "a.tif"  # one string is accepted in code as in the file
    job = JobSpec(name="x", input=InputSpec(uris=uris), output=OutputSpec(uri="o"))
    assert job.input.uris == (os.path.abspath("a.tif"),)
    assert dataclasses.replace(job.amg, points_per_side=8).points_per_side == 8
    with pytest.raises(JobError):
        dataclasses.replace(job.amg, points_per_side=-8)


def test_specs_are_frozen_and_hashable() -> None:
    job = parse_job(minimal(input={"uris": "a", "storage_options": {"anon": True}}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.amg.points_per_side = 8  # type: ignore[misc]
    assert hash(job) == hash(parse_job(minimal(input={"uris": "a"})))
    assert pickle.loads(pickle.dumps(job)) == job  # Ray ships specs to workers


def test_job_error_pickles_with_its_attributes() -> None:
    error = error_of(minimal(amg={"points_per_side": 0}))
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.message, copy.field, copy.source) == (
        str(error),
        error.message,
        error.field,
        error.source,
    )


# --- error messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "allowed"),
    [
        ("model", "type", ["vit_t", "vit_b", "vit_l", "vit_h"]),
        ("engine", "backend", ["torch", "onnx", "tensorrt"]),
        ("engine", "device", ["auto", "cpu", "cuda", "cuda:N"]),
        ("engine", "precision", ["fp32", "tf32", "fp16", "bf16"]),
        ("run", "executor", ["auto", "ray", "local"]),
    ],
)
@pytest.mark.parametrize("bad", ["tensorflow", 3, None])
def test_enum_errors_name_field_and_allowed_values(section: str, key: str, allowed: list[str], bad: Any) -> None:
    error = error_of(minimal(**{section: {key: bad}}))
    message = str(error)
    assert message.startswith(f"<job>: {section}.{key}: ")
    assert ", ".join(allowed) in message
    assert error.field == f"{section}.{key}"
    assert_one_line(error)


def test_enum_error_exact_message() -> None:
    error = error_of(minimal(engine={"backend": "tensorflow"}))
    assert error.message == "engine.backend: 'tensorflow' is not one of torch, onnx, tensorrt"


def test_enum_error_suggests_close_value() -> None:
    assert "(did you mean 'vit_b'?)" in str(error_of(minimal(model={"type": "vit-b"})))
    assert "(did you mean 'cuda'?)" in str(error_of(minimal(engine={"device": "CUDA"})))


def test_unknown_nested_key_with_suggestion() -> None:
    error = error_of(minimal(amg={"point_per_side": 16}))
    assert error.message == "unknown key 'amg.point_per_side' (did you mean 'points_per_side'?)"
    assert error.field == "amg.point_per_side"


def test_unknown_keys_top_level_and_without_suggestion() -> None:
    assert error_of(minimal(inputs={})).message == "unknown key 'inputs' (did you mean 'input'?)"
    raster_keys = "tiling, tile_size, tile_overlap, bands, nodata"
    assert error_of(minimal(raster={"zzz": 1})).message == f"unknown key 'raster.zzz' (raster has: {raster_keys})"
    assert error_of(minimal(run={True: 1})).message.startswith("unknown key 'run.True' (run has: ray_address, ")
    assert (
        error_of(minimal(zzz={})).message
        == "unknown key 'zzz' (the job file has: name, input, prompts, model, engine, amg, raster, output, run)"
    )


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("amg", {"pred_iou_thresh": "high"}, "amg.pred_iou_thresh: expected a number, got 'high'"),
        ("amg", {"points_per_side": True}, "amg.points_per_side: expected an integer, got true"),
        ("amg", {"points_per_side": 16.0}, "amg.points_per_side: expected an integer, got 16.0"),
        ("amg", {"points_per_side": 0}, "amg.points_per_side: must be >= 1, got 0"),
        ("amg", {"points_per_side": 100000}, "amg.points_per_side: must be <= 256, got 100000"),
        ("amg", {"crop_n_layers": 5}, "amg.crop_n_layers: must be <= 4, got 5"),
        ("amg", {"points_per_batch": 0}, "amg.points_per_batch: must be >= 1, got 0"),
        ("amg", {"pred_iou_thresh": -0.1}, "amg.pred_iou_thresh: must be >= 0, got -0.1"),
        ("amg", {"pred_iou_thresh": float("nan")}, "amg.pred_iou_thresh: expected a finite number"),
        ("amg", {"stability_score_thresh": 1.5}, "amg.stability_score_thresh: must be between 0"),
        ("amg", {"stability_score_offset": -1}, "amg.stability_score_offset: must be >= 0"),
        ("amg", {"box_nms_thresh": 2}, "amg.box_nms_thresh: must be between 0 and 1, got 2.0"),
        ("amg", {"crop_nms_thresh": -1}, "amg.crop_nms_thresh: must be between 0 and 1"),
        ("amg", {"crop_n_layers": -1}, "amg.crop_n_layers: must be >= 0, got -1"),
        ("amg", {"crop_overlap_ratio": 1}, "amg.crop_overlap_ratio: must be >= 0 and < 1, got 1.0"),
        ("amg", {"crop_n_points_downscale_factor": 0}, "amg.crop_n_points_downscale_factor: must"),
        ("amg", {"min_mask_region_area": -5}, "amg.min_mask_region_area: must be >= 0, got -5"),
        ("amg", [1], "amg: expected a mapping, got a list of 1"),
        ("raster", {"tile_size": 32}, "raster.tile_size: must be >= 64, got 32"),
        ("raster", {"tiling": "sometimes"}, "raster.tiling: 'sometimes' is not one of auto, always, never"),
        ("raster", {"tile_overlap": -1}, "raster.tile_overlap: must be >= 0, got -1"),
        (
            "raster",
            {"tile_size": 256, "tile_overlap": 128},
            "raster.tile_overlap: must be less than half of raster.tile_size (256), got 128",
        ),
        ("raster", {"bands": [1, 2]}, "raster.bands: expected a list of 3 band indexes"),
        ("raster", {"bands": [1, 0, 2]}, "raster.bands[1]: must be >= 1, got 0"),
        ("raster", {"bands": [1, "2", 3]}, "raster.bands[1]: expected an integer, got '2'"),
        ("raster", {"nodata": "none"}, "raster.nodata: expected a number or null, got 'none'"),
        ("run", {"shard_size": 0}, "run.shard_size: must be >= 1, got 0"),
        ("run", {"ray_address": ""}, "run.ray_address: expected a non-empty string, got ''"),
        ("run", {"max_actors": 0}, "run.max_actors: must be >= 1, got 0"),
        ("run", {"max_actors": 2.5}, "run.max_actors: expected an integer, got 2.5"),
        ("run", {"max_actors": "4"}, "run.max_actors: expected an integer, got '4'"),
        ("run", {"actor_start_timeout_s": 0}, "run.actor_start_timeout_s: must be >= 1.0, got 0.0"),
        ("run", {"actor_start_timeout_s": "10m"}, "run.actor_start_timeout_s: expected a number, got '10m'"),
        ("run", {"actor_start_timeout_s": None}, "run.actor_start_timeout_s: expected a number, got null"),
        ("run", {"read_timeout_s": 0}, "run.read_timeout_s: must be > 0, got 0.0"),
        ("run", {"read_timeout_s": None}, "run.read_timeout_s: expected a number, got null"),
        ("run", {"image_timeout_s": -1}, "run.image_timeout_s: must be > 0, got -1.0"),
        ("run", {"image_timeout_s": float("inf")}, "run.image_timeout_s: expected a finite number, got inf"),
        ("model", {"sha256": "abc"}, "model.sha256: expected 64 hex characters, got 'abc'"),
        ("model", {"sha256": "g" * 64}, "model.sha256: expected 64 hex characters"),
        ("input", {"uris": []}, "input.uris: required unless input.manifest is given"),
        ("input", {"uris": ["a", ""]}, "input.uris[1]: expected a non-empty string, got ''"),
        ("input", {"uris": 7}, "input.uris: expected a URI or a list of URIs, got an int"),
        ("output", {}, "output.uri: required"),
        ("output", {"uri": None}, "output.uri: expected a non-empty string, got null"),
        ("name", "my job", "name: 'my job' must be letters, digits"),
        ("name", "", "name: expected a non-empty string"),
    ],
)
def test_invalid_values(section: str, values: Any, expected: str) -> None:
    error = error_of(minimal(**{section: values}))
    assert error.message.startswith(expected)
    assert_one_line(error)


def test_required_name() -> None:
    data = minimal()
    del data["name"]
    assert error_of(data).message == "name: required"


def test_quoted_exponent_gets_a_hint() -> None:
    # PyYAML reads 1e-3 (no dot) as a string.
    assert "1.0e-3" in str(error_of(minimal(amg={"pred_iou_thresh": "1e-3"})))


def test_top_level_must_be_a_mapping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "- a\n- b\n")
    with pytest.raises(JobError, match=r"^job\.yaml: expected a mapping .* got a list of 2$"):
        load_job("job.yaml")
    write(tmp_path, "# nothing\n")
    with pytest.raises(JobError, match=r"^job\.yaml: the job file is empty$"):
        load_job("job.yaml")
    assert "at the top level, got null" in str(error_of(None))


def test_file_errors_are_prefixed_with_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "amg:\n  points_per_side: 0\n")
    with pytest.raises(JobError) as info:
        load_job(path)
    assert str(info.value) == f"{path}: amg.points_per_side: must be >= 1, got 0"
    assert info.value.source == str(path)
    with pytest.raises(JobError, match=r"missing\.yaml: cannot read job file: No such file"):
        load_job(tmp_path / "missing.yaml")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(JobError, match=r"latin1\.yaml: cannot read job file: not UTF-8"):
        load_job(latin1)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: demo\ninput:\n  uris: [a.tif\noutput:\n  uri: o\n")
    with pytest.raises(JobError) as info:
        load_job(path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line ")
    assert_one_line(info.value)


def test_yaml_error_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "name: demo\ninput: x: y\n")
    with pytest.raises(JobError, match=r"invalid YAML at line 2, column \d+: mapping values"):
        load_job(path)


def test_python_tags_are_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = write(
        tmp_path,
        f"name: !!python/object/apply:os.system ['touch {marker}']\ninput: {{uris: a}}\noutput: {{uri: o}}\n",
    )
    with pytest.raises(JobError, match=r"invalid YAML at line 1.*could not determine a construct"):
        load_job(path)
    assert not marker.exists()


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "amg:\n  points_per_side: 8\namg:\n  crop_n_layers: 1\n")
    with pytest.raises(JobError, match=r"invalid YAML at line 8, column 1: duplicate key 'amg'"):
        load_job(path)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = """\
name: demo
input: {uris: a, storage_options: &shared {region: eu, anon: true}}
output: {uri: o, storage_options: {<<: *shared, anon: false}}
"""
    job = load_job(write(tmp_path, text))
    assert job.output.storage_options == {"region": "eu", "anon": False}


def test_nested_and_numerous_aliases_are_refused(tmp_path: Path) -> None:
    """A billion laughs under storage_options: refused at its first alias of a node holding an
    alias, before anything is expanded; so are more than MAX_YAML_ALIASES uses of aliases, of
    one anchor or many. Aliases of nested mappings that hold none, as yaml.safe_dump writes a
    shared dict, load."""
    levels = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = "name: x\ninput: {uris: a, storage_options: {" + ", ".join(levels) + "}}\noutput: {uri: o}\n"
    with pytest.raises(
        JobError, match=r"invalid YAML at line 2, .*alias \*l1: a job file may use aliases up to 16 times"
    ):
        load_job(write(tmp_path, bomb))
    for anchors in (
        ", ".join(f"k{i}: &k{i} v" for i in range(17)) + ", " + ", ".join(f"c{i}: *k{i}" for i in range(17)),
        "k: &k [1, 2, 3], " + ", ".join(f"c{i}: *k" for i in range(17)),
    ):
        many = "name: x\ninput: {uris: a, storage_options: {" + anchors + "}}\noutput: {uri: o}\n"
        with pytest.raises(JobError, match=r"alias \*k1?6?: a job file may use aliases up to 16 times"):
            load_job(write(tmp_path, many))
    shared = {"key": "k", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    dumped = yaml.safe_dump(
        minimal(
            input={"uris": "s3://b/*.jpg", "storage_options": shared},
            output={"uri": "s3://b/out", "storage_options": shared},
        )
    )
    assert "*id001" in dumped
    assert load_job(write(tmp_path, dumped)).output.storage_options == shared


# --- overrides -------------------------------------------------------------------------------


def test_overrides_of_each_yaml_type(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "raster:\n  bands: [1, 2, 3]\n")
    job = load_job(
        path,
        [
            "amg.points_per_side=16",  # int
            "amg.pred_iou_thresh=0.5",  # float
            "input.storage_options.anon=true",  # bool, under a free-form mapping
            "input.uris=[b.tif, c.tif]",  # list
            "raster.bands=null",  # null
            "model.checkpoint = /w/sam.pt",  # spaces around '=' and the value
            "name=other",
            "run.executor=local",  # a section absent from the file
        ],
    )
    assert job.amg.points_per_side == 16
    assert job.amg.pred_iou_thresh == 0.5
    assert job.input.storage_options == {"anon": True}
    assert job.input.uris == (os.path.abspath("b.tif"), os.path.abspath("c.tif"))
    assert job.raster.bands is None
    assert job.model.checkpoint == "/w/sam.pt"
    assert job.name == "other"
    assert job.run.executor == "local"


def test_later_override_wins_and_file_is_untouched(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML)
    job = load_job(path, ["amg.points_per_side=16", "amg.points_per_side=8"])
    assert job.amg.points_per_side == 8
    assert path.read_text(encoding="utf-8") == MINIMAL_YAML


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "amg.point_per_side=16",
            "--set amg.point_per_side: unknown key (did you mean 'amg.points_per_side'?)",
        ),
        ("amg=16", "--set amg: a section, not a field; set one of its fields (amg.points_per_side, ...)"),
        ("amg.zzz=1", "--set amg.zzz: unknown key (amg has: points_per_side, points_per_batch, "),
        ("zzz.x=1", "--set zzz.x: unknown key (the job file has: name, input, "),
        ("amg.points_per_side.x=1", "--set amg.points_per_side.x: unknown key"),
        ("input.storage_options.=1", "--set input.storage_options.: unknown key"),
        ("amg.points_per_side", "--set expects key=value"),
        ("amg.points_per_side=[1", "--set amg.points_per_side: invalid YAML value at line 1"),
        ("amg.points_per_side=true", "--set amg.points_per_side: expected an integer, got true"),
        ("amg.points_per_side=0", "--set amg.points_per_side: must be >= 1, got 0"),
    ],
)
def test_override_errors(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, MINIMAL_YAML)
    with pytest.raises(JobError) as info:
        load_job(path, [override])
    assert str(info.value).startswith(f"{path}: {expected}")
    assert_one_line(info.value)


def test_override_into_a_non_mapping_section(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "amg: 5\n")
    with pytest.raises(JobError, match=r"--set amg.points_per_side: amg is an int, not a mapping"):
        load_job(path, ["amg.points_per_side=8"])


def test_file_error_is_not_blamed_on_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + "amg:\n  points_per_batch: 0\n")
    with pytest.raises(JobError) as info:
        load_job(path, ["amg.points_per_side=8"])
    assert str(info.value) == f"{path}: amg.points_per_batch: must be >= 1, got 0"


# --- to_dict, fingerprint --------------------------------------------------------------------


def test_to_dict_is_plain_and_round_trips() -> None:
    job = parse_job(minimal(raster={"bands": [3, 2, 1]}, input={"uris": "a", "storage_options": {"k": [1]}}))
    data = job.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["raster"]["bands"] == [3, 2, 1]
    assert data["input"]["storage_options"] == {"k": [1]}
    assert parse_job(data) == job
    data["input"]["storage_options"]["k"].append(2)  # a copy: the spec is not changed
    assert job.input.storage_options == {"k": [1]}


def test_fingerprint_is_stable_across_key_order(tmp_path: Path) -> None:
    reordered = """\
output: {uri: ./out/demo}
amg: {pred_iou_thresh: 0.88, points_per_side: 32}
input: {uris: [scenes/a.tif]}
name: demo
"""
    first = load_job(write(tmp_path, MINIMAL_YAML, "a.yaml"))
    second = load_job(write(tmp_path, reordered, "b.yaml"))
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 64
    assert first.fingerprint() == parse_job(first.to_dict()).fingerprint()


def test_fingerprint_tracks_what_changes_results() -> None:
    base = parse_job(minimal()).fingerprint()
    assert parse_job(minimal(amg={"points_per_side": 16})).fingerprint() != base
    assert parse_job(minimal(amg={"pred_iou_thresh": 0.5})).fingerprint() != base
    assert parse_job(minimal(model={"type": "vit_b"})).fingerprint() != base
    assert parse_job(minimal(name="other")).fingerprint() != base
    assert parse_job(minimal(amg={"pred_iou_thresh": 0.88})).fingerprint() == base
    assert parse_job(minimal(run={"shard_size": 8, "executor": "local"})).fingerprint() == base
    assert parse_job(minimal(run={"max_actors": 2, "actor_start_timeout_s": 60})).fingerprint() == base
    assert parse_job(minimal(run={"ray_address": "ray://head:10001"})).fingerprint() == base
    assert parse_job(minimal(run={"read_timeout_s": 5, "image_timeout_s": 60})).fingerprint() == base
    with_options = minimal(
        input={"uris": ["a.tif"], "storage_options": {"key": CANARY}},
        output={"uri": "out", "storage_options": {"secret": CANARY}},
    )
    assert parse_job(with_options).fingerprint() == base


def test_fingerprint_is_the_same_however_paths_are_spelled(tmp_path: Path, monkeypatch) -> None:
    """The output's place and the inputs' spelling and order do not make another job."""
    monkeypatch.chdir(tmp_path)
    base = parse_job(minimal(input={"uris": ["a.tif", "scenes/b.tif"]}, output={"uri": "out"})).fingerprint()
    for uris, output in [
        ([str(tmp_path / "scenes/b.tif"), "./a.tif"], str(tmp_path / "out") + "/"),
        ([f"file://{tmp_path}/a.tif", "scenes//b.tif", "a.tif"], f"file://{tmp_path}/elsewhere"),
    ]:
        assert parse_job(minimal(input={"uris": uris}, output={"uri": output})).fingerprint() == base
    assert parse_job(minimal(input={"uris": ["a.tif"]})).fingerprint() != base


def test_file_urls_are_paths_with_their_escapes_decoded() -> None:
    assert normalise_uri("file:///data/my%20dog.jpg") == "/data/my dog.jpg"
    assert normalise_uri("s3://b/my%20dog.jpg") == "s3://b/my%20dog.jpg"  # other URLs as given


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("input", {"uris": ["a.jpg", "bogus://x/*.jpg"]}, "input.uris[1]"),
        ("input", {"manifest": "nope://list.txt"}, "input.manifest"),
        ("output", {"uri": "bogus://out"}, "output.uri"),
        ("model", {"checkpoint": "simplecache::bogus://w.pt"}, "model.checkpoint"),
    ],
)
def test_unknown_storage_protocols_are_invalid_jobs(section: str, values: dict, field: str) -> None:
    error = error_of(minimal(**{section: values}))
    assert error.field == field and "unknown storage protocol" in error.message
    assert parse_job(minimal(input={"uris": ["s3://b/*.tif", "gs://b/x.tif", "memory://a.png"]}))


# --- secrets ---------------------------------------------------------------------------------


def secret_job() -> JobSpec:
    return parse_job(
        minimal(
            input={"uris": "s3://b/*.tif", "storage_options": {"key": "AKIA", "secret": CANARY}},
            output={
                "uri": "s3://b/out",
                "storage_options": {"client_kwargs": {"token": CANARY}, "anon": False},
            },
        )
    )


def test_secret_never_in_repr_str_or_redacted_dict() -> None:
    job = secret_job()
    shown = (repr(job), str(job), repr(job.input), str(job.output), json.dumps(job.redacted_dict()))
    for text in shown:
        assert CANARY not in text
    redacted = job.redacted_dict()
    assert redacted["input"]["storage_options"] == {"key": "***", "secret": "***"}
    assert redacted["output"]["storage_options"] == {"client_kwargs": "***", "anon": "***"}
    assert job.input.storage_options["secret"] == CANARY  # still usable by fsspec
    assert job.to_dict()["output"]["storage_options"]["client_kwargs"] == {"token": CANARY}


@pytest.mark.parametrize(
    "data",
    [
        minimal(input={"uris": "a", "storage_options": CANARY}),
        minimal(input={"uris": "a", "storage_options": [CANARY]}),
        minimal(input={"uris": "a", "storage_options": {1: CANARY}}),
        minimal(input={"uris": "a", "storage_option": {"secret": CANARY}}),
        minimal(input={"uris": "a", "manifest": {"secret": CANARY}}),
        minimal(input={"uris": "a", "storage_options": {"s": CANARY}}, amg={"points_per_side": 0}),
        minimal(output={"uri": "o", "storage_options": {"secret": CANARY}}, run={"executor": "x"}),
        {"name": "demo", "input": {"uris": "a", "storage_options": {"secret": CANARY}}},
    ],
)
def test_secret_never_in_validation_errors(data: dict[str, Any]) -> None:
    assert CANARY not in str(error_of(data))


@pytest.mark.parametrize(
    "overrides",
    [
        [f"input.storage_option.secret={CANARY}"],
        [f"input.storage_options.secret=[{CANARY}"],
        [f"input.storage_options.secret{CANARY}"],
        [f"={CANARY}"],
        [f"input.storage_options.secret={CANARY}", "amg.points_per_side=0"],
        [f"input.storage_options={CANARY}"],
    ],
)
def test_secret_never_in_override_errors(tmp_path: Path, overrides: list[str]) -> None:
    with pytest.raises(JobError) as info:
        load_job(write(tmp_path, MINIMAL_YAML), overrides)
    assert CANARY not in str(info.value)


def test_secret_never_in_yaml_errors(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL_YAML + f'  storage_options:\n    secret: "{CANARY}\n')
    with pytest.raises(JobError) as info:
        load_job(path)
    assert "invalid YAML" in str(info.value)
    assert CANARY not in str(info.value)


def test_every_section_field_has_exactly_one_rule() -> None:
    """A field added to a section (or to AmgParams, which `amg` extends) without a rule, or a
    rule left for a field that is gone, fails here rather than passing unchecked."""
    for key, section in SECTIONS.items():
        assert set(section._RULES) == {f.name for f in dataclasses.fields(section)}, key


def test_the_jobs_uris_are_spelled_once_when_it_is_loaded(tmp_path: Path, monkeypatch) -> None:
    """Input URIs, the manifest and output.uri are held as `normalise_uri` spells them: local
    paths absolute (relative to the directory the job is loaded from), `file://` URLs decoded,
    other URLs as given; the fingerprint does not depend on how a path was written."""
    monkeypatch.chdir(tmp_path)
    job = parse_job(
        minimal(
            input={"uris": ["photos/*.jpg", "file:///data/a%20b.tif", "s3://bucket/x.tif"], "manifest": "list.txt"},
            output={"uri": "out"},
        )
    )
    assert job.input.uris == (str(tmp_path / "photos" / "*.jpg"), "/data/a b.tif", "s3://bucket/x.tif")
    assert job.input.manifest == str(tmp_path / "list.txt") and job.output.uri == str(tmp_path / "out")
    same = parse_job(minimal(input={"uris": [str(tmp_path / "photos/./*.jpg")]}, output={"uri": "out"}))
    assert same.input.uris == (str(tmp_path / "photos" / "*.jpg"),)
    assert parse_job(job.to_dict()) == job


def test_prompts_section_rules() -> None:
    job = parse_job(minimal(prompts={"uri": "boxes.parquet", "carry": "label", "best_only": True}))
    assert job.prompts.carry == ("label",) and job.prompts.uri.endswith("/boxes.parquet")
    assert job.fingerprint() != parse_job(minimal()).fingerprint()
    assert error_of(minimal(prompts={"uri": "b.parquet", "best_only": "yes"})).field == "prompts.best_only"
    assert "writes or reads itself" in error_of(minimal(prompts={"uri": "b.parquet", "carry": ["area"]})).message
    for backend in ("onnx", "tensorrt"):
        assert parse_job(minimal(prompts={"uri": "b.parquet"}, engine={"backend": backend})).engine.backend == backend


@pytest.mark.parametrize("backend", ["torch", "onnx", "tensorrt"])
def test_hq_models_run_on_every_back_end(backend: str) -> None:
    job = parse_job(minimal(model={"type": "vit_t_hq"}, engine={"backend": backend}))
    assert (job.model.type, job.engine.backend) == ("vit_t_hq", backend)


def test_sam2_models_take_sam2_generator_defaults_and_keys() -> None:
    """SAM 2.1 jobs get SAM2AutomaticMaskGenerator's defaults where they differ (pred_iou_thresh
    0.8) and its three keys; the same keys for a SAM 1 model are one-line errors, and SAM 1 jobs
    keep the fingerprints they had (the keys are left out while unset)."""
    sam2 = parse_job(minimal(model={"type": "sam2.1_hiera_t"}))
    assert (sam2.amg.pred_iou_thresh, sam2.amg.multimask_output, sam2.amg.use_m2m, sam2.amg.mask_threshold) == (
        0.8,
        True,
        False,
        0.0,
    )
    chosen = parse_job(minimal(model={"type": "sam2.1_hiera_l"}, amg={"use_m2m": True, "pred_iou_thresh": 0.88}))
    assert (chosen.amg.use_m2m, chosen.amg.pred_iou_thresh) == (True, 0.88)
    assert chosen.fingerprint() != parse_job(minimal(model={"type": "sam2.1_hiera_l"})).fingerprint()
    sam1 = parse_job(minimal())
    assert (sam1.amg.pred_iou_thresh, sam1.amg.use_m2m) == (0.88, None)
    assert sam1.fingerprint() == parse_job(minimal(amg={"pred_iou_thresh": 0.88})).fingerprint()
    # the fingerprints the code before SAM 2.1 (commit 9c990d3) gave these two jobs
    job = {"name": "demo", "input": {"uris": ["/data/a.tif"]}, "output": {"uri": "/data/out"}}
    assert parse_job(job).fingerprint() == "165ba0fccf91c2874a2652921dfcc812ad9235e4e336f791320d4bbfb1b45b72"
    tuned = {**job, "model": {"type": "vit_b"}, "amg": {"points_per_side": 16, "pred_iou_thresh": 0.9}}
    assert parse_job(tuned).fingerprint() == "bd6f74c452601eea0bf9f22936cabeaf9671c4ef57f89ad14dfa5bb6faefa0ca"
    for key, value in (("use_m2m", True), ("multimask_output", False), ("mask_threshold", 0.5)):
        with pytest.raises(JobError) as error:
            parse_job(minimal(model={"type": "vit_b_hq"}, amg={key: value}))
        assert error.value.message == f"amg.{key}: applies to SAM 2.1 models only, not vit_b_hq"
    for backend in ("onnx", "tensorrt"):
        job = parse_job(minimal(model={"type": "sam2.1_hiera_s"}, engine={"backend": backend}))
        assert job.engine.backend == backend


def test_onnx_is_fp32_only() -> None:
    for precision in ("fp16", "bf16", "tf32"):
        with pytest.raises(JobError) as error:
            parse_job(minimal(engine={"backend": "onnx", "precision": precision}))
        assert (
            error.value.message == f"engine.precision: {precision} is not available with engine.backend onnx; use fp32"
        )


def test_sam2_prompt_jobs_refuse_the_generators_keys_and_keep_the_mask_threshold() -> None:
    sam2 = {"model": {"type": "sam2.1_hiera_t"}, "prompts": {"uri": "/data/prompts.parquet"}}
    for key, value in (("use_m2m", True), ("multimask_output", False)):
        with pytest.raises(JobError) as error:
            parse_job(minimal(**sam2, amg={key: value}))
        assert error.value.message == (
            f"amg.{key}: applies to SAM 2's automatic generator; a prompt job's masks are the predictor's "
            "(one or three a prompt: prompts.multimask_output)"
        )
    job = parse_job(minimal(**sam2, amg={"use_m2m": False, "multimask_output": True, "mask_threshold": 0.5}))
    assert job.amg.mask_threshold == 0.5
    assert parse_job(job.to_dict()) == job  # a plan's job, with the defaults written out, parses again


def test_sam2_jobs_keep_candidates_above_the_floor() -> None:
    """SAM 2.1's default pred_iou_thresh (0.8) lies above the candidates' floor (0.5); a job
    threshold under the floor is refused as for SAM."""
    sam2 = {"model": {"type": "sam2.1_hiera_s"}, "output": {"uri": "out", "candidates": True}}
    job = parse_job(minimal(**sam2))
    assert job.output.candidates and job.amg.pred_iou_thresh == 0.8
    with pytest.raises(JobError) as error:
        parse_job(minimal(**sam2, amg={"pred_iou_thresh": 0.45}))
    assert error.value.message == (
        "output.candidates: keeps candidates above a floor the job's thresholds must not be under "
        "(amg.pred_iou_thresh 0.45 < 0.5)"
    )
