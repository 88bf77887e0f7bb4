"""The job file's sections (`input`, `prompts`, `model`, `engine`, `amg`, `raster`, `output`, `run`) as
frozen dataclasses that validate themselves on construction, each field by its rule
(`jobs.job_rules`), so a section built in code is checked exactly like one read from a file."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from sam_batch.engines.registry import Backend, ModelType, Precision
from sam_batch.jobs.job_rules import (
    Rule,
    bands_rule,
    boolean_rule,
    choice_rule,
    device_rule,
    field_error,
    integer_rule,
    names_rule,
    nodata_rule,
    normalised_uri_rule,
    normalised_uris_rule,
    number_rule,
    optional_rule,
    output_crs_rule,
    sha256_rule,
    storage_options_rule,
    string_rule,
    uri_rule,
)
from sam_batch.pipeline.params import AmgParams

# the `amg` keys of SAM 2's generator alone, and their defaults there
SAM2_ONLY: dict[str, bool | float] = {"multimask_output": True, "use_m2m": False, "mask_threshold": 0.0}
# the default `amg.pred_iou_thresh` of each generator
DEFAULT_PRED_IOU_THRESH = {"sam": 0.88, "sam2": 0.8}
Executor = Literal["auto", "ray", "local"]
Tiling = Literal["auto", "always", "never"]
# a crop's grid is points_per_side^2 prompts: 256 gives 65,536 (the reference's default is 32)
MAX_POINTS_PER_SIDE = 256
MAX_CROP_N_LAYERS = 4  # 1 + 4 + 16 + 64 + 256 = 341 crops, each encoded and decoded
# seconds a job waits for a segmenting actor to be placed (an autoscaler adding a GPU node
# takes minutes) before it fails; at least a second, so that a placement can happen at all
DEFAULT_ACTOR_START_TIMEOUT_S = 600.0
MIN_ACTOR_START_TIMEOUT_S = 1.0
# seconds one image read (a photo's bytes, a scene's opening, one window) may take by default:
# a read this long is taken to be stuck, not slow (a 30 MB photo at 1 MB/s takes 30 s)
DEFAULT_READ_TIMEOUT_S = 300.0


class Section:
    """Validation shared by the section dataclasses.

    ``_SECTION`` is the section's key in the job file; ``_RULES`` maps each field to the rule
    that checks and normalises it. Cross-field checks go in :meth:`_check`.
    """

    _SECTION: ClassVar[str]
    _RULES: ClassVar[Mapping[str, Rule]]

    def __post_init__(self) -> None:
        for name, rule in self._RULES.items():
            value = rule(getattr(self, name), f"{self._SECTION}.{name}")
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        """Checks that involve more than one field; none by default."""


@dataclass(frozen=True)
class InputSpec(Section):
    """``input``: which images to read. At least one of ``uris`` and ``manifest`` is given.

    ``uris`` are fsspec URLs or local paths, globs allowed (one string becomes a tuple of one);
    ``manifest`` is the URL of a text file (one URI a line) or of a Parquet file with a ``uri``
    column; ``storage_options`` are handed to fsspec as is and never shown.
    """

    uris: tuple[str, ...] = ()
    manifest: str | None = None
    # Credentials: kept out of repr; not hashed (a dict is unhashable).
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)

    _SECTION: ClassVar[str] = "input"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "uris": normalised_uris_rule,
        "manifest": optional_rule(normalised_uri_rule),
        "storage_options": storage_options_rule,
    }

    def _check(self) -> None:
        if not self.uris and self.manifest is None:
            raise field_error("input.uris", "required unless input.manifest is given (give at least one)")


# columns of a prompts table that sam-batch reads itself, so `prompts.carry` cannot name them
PROMPT_COLUMNS = ("image_uri", "prompt_id", "box", "points", "point_labels", "multimask_output", "geometry")
# the masks table's own columns, which a carried column may not shadow
MASK_COLUMNS = (
    "image_uri", "image_id", "mask_id", "segmentation", "box_segmentation", "box_origin", "bbox", "area",
    "predicted_iou", "stability_score", "point_coords", "crop_box", "geometry", "geometry_bbox", "prompt_id",
    "mask_index",
)  # fmt: skip


@dataclass(frozen=True)
class PromptsSpec(Section):
    """``prompts``: segment the boxes and points of a table (SAM's predictor) instead of the
    automatic grid. ``uri``: the table (Parquet, CSV, GeoParquet or GeoJSON; null: no prompts,
    the automatic generator runs); ``multimask_output``: three masks a prompt rather than one,
    for rows whose table has no ``multimask_output`` column (or null there); ``best_only``: of
    the three, keep the one with the highest predicted IoU; ``carry``: columns of the table
    copied to each of the prompt's masks; ``margin``: pixels around a prompt that its window
    holds in a tiled scene (`pipeline.prompts`)."""

    uri: str | None = None
    multimask_output: bool = False
    best_only: bool = False
    carry: tuple[str, ...] = ()
    margin: int = 64

    _SECTION: ClassVar[str] = "prompts"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "uri": optional_rule(normalised_uri_rule),
        "multimask_output": boolean_rule,
        "best_only": boolean_rule,
        "carry": names_rule,
        "margin": integer_rule(0),
    }

    def _check(self) -> None:
        for name in self.carry:
            if name in PROMPT_COLUMNS or name in MASK_COLUMNS:
                raise field_error("prompts.carry", f"{name!r} is a column sam-batch writes or reads itself")


@dataclass(frozen=True)
class ModelSpec(Section):
    """``model``: which SAM variant and checkpoint (null = the cached default for ``type``)."""

    type: ModelType = "vit_t"
    checkpoint: str | None = None
    sha256: str | None = None

    _SECTION: ClassVar[str] = "model"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "type": choice_rule(get_args(ModelType)),
        "checkpoint": optional_rule(uri_rule),
        "sha256": optional_rule(sha256_rule),
    }


@dataclass(frozen=True)
class EngineSpec(Section):
    """``engine``: how the model runs. ``device`` is auto, cpu, cuda or cuda:N."""

    backend: Backend = "torch"
    device: str = "auto"
    precision: Precision = "fp32"

    _SECTION: ClassVar[str] = "engine"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "backend": choice_rule(get_args(Backend)),
        "device": device_rule,
        "precision": choice_rule(get_args(Precision)),
    }


@dataclass(frozen=True)
class AmgSpec(Section, AmgParams):
    """``amg``: the parameters of SamAutomaticMaskGenerator, with its names and defaults
    (the fields of :class:`AmgParams`), and SAM 2's three more (`SAM2_ONLY`). ``pred_iou_thresh``
    may exceed 1 (the model's IoU predictions can). The job resolves what is left None to the
    model's generator's default (`JobSpec`): ``pred_iou_thresh`` 0.88 (SAM) or 0.8 (SAM 2.1);
    ``multimask_output`` true, ``use_m2m`` false, ``mask_threshold`` 0.0 for SAM 2.1, and they
    stay None for the other models.
    """

    pred_iou_thresh: float | None = None  # type: ignore[assignment]
    multimask_output: bool | None = None
    use_m2m: bool | None = None
    mask_threshold: float | None = None

    _SECTION: ClassVar[str] = "amg"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "points_per_side": integer_rule(1, MAX_POINTS_PER_SIDE),
        "points_per_batch": integer_rule(1),
        "pred_iou_thresh": optional_rule(number_rule(0)),
        "multimask_output": optional_rule(boolean_rule),
        "use_m2m": optional_rule(boolean_rule),
        "mask_threshold": optional_rule(number_rule(-math.inf)),
        "stability_score_thresh": number_rule(0, 1),
        "stability_score_offset": number_rule(0),
        "box_nms_thresh": number_rule(0, 1),
        "crop_n_layers": integer_rule(0, MAX_CROP_N_LAYERS),
        "crop_nms_thresh": number_rule(0, 1),
        "crop_overlap_ratio": number_rule(0, 1, high_open=True),
        "crop_n_points_downscale_factor": integer_rule(1),
        "min_mask_region_area": integer_rule(0),
    }


@dataclass(frozen=True)
class RasterSpec(Section):
    """``raster``: tiling of large images and band selection for geospatial ones.

    ``tiling`` says which images are cut into tiles (``pipeline.scenes.tile_size_for``: auto =
    georeferenced scenes and very large images, always, never); ``bands`` are 1-based band
    indexes used as RGB (null = the first three); ``nodata`` overrides the file's nodata value.
    """

    tiling: Tiling = "auto"
    tile_size: int = 1024
    tile_overlap: int = 128
    bands: tuple[int, int, int] | None = None
    nodata: float | None = None

    _SECTION: ClassVar[str] = "raster"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "tiling": choice_rule(get_args(Tiling)),
        "tile_size": integer_rule(64),
        "tile_overlap": integer_rule(0),
        "bands": bands_rule,
        "nodata": nodata_rule,
    }

    def _check(self) -> None:
        if 2 * self.tile_overlap >= self.tile_size:
            raise field_error(
                "raster.tile_overlap",
                f"must be less than half of raster.tile_size ({self.tile_size}), got {self.tile_overlap}",
            )


@dataclass(frozen=True)
class OutputSpec(Section):
    """``output``: the dataset root (any fsspec URL), its never-shown storage options, and the
    CRS of its geometries: ``auto`` (the scenes' CRS when they all share one, else EPSG:4326,
    chosen once when the job is planned: `jobs.output_crs`) or ``EPSG:NNNN``. ``candidates``
    keeps every crop's candidate masks above the floor of `pipeline.params` in a third table,
    for `sam-batch refilter` (`pipeline.candidates`)."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)
    crs: str = "auto"
    candidates: bool = False

    _SECTION: ClassVar[str] = "output"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "uri": normalised_uri_rule,
        "storage_options": storage_options_rule,
        "crs": output_crs_rule,
        "candidates": boolean_rule,
    }


@dataclass(frozen=True)
class RunSpec(Section):
    """``run``: how the job is executed; changes here never change the output.

    ``ray_address`` null starts an embedded local Ray, ``"auto"`` or ``ray://…`` attaches;
    ``shard_size`` is the number of images per shard (the unit of commit and resume);
    ``executor`` ``"auto"`` runs in this process unless the job or the cluster warrants Ray
    (`jobs.executors.choose_executor`), ``"ray"`` always on Ray, ``"local"`` always in process;
    ``max_actors`` caps the segmenting actors (null: as many as the cluster's GPUs or cores
    make); ``actor_start_timeout_s`` is how long (s) the job waits, with no segmenting actor
    placed, for the cluster to give one the resources it asks for before it fails.
    ``read_timeout_s`` bounds each image read in s (a photo's bytes, a scene's opening, each
    window): a read not done by then makes the image an error row; ``image_timeout_s`` is each
    image's budget in s for segmenting (null: none, since what an image needs grows with its
    size, the model and the grid), past which it is an error row.
    """

    ray_address: str | None = None
    shard_size: int = 64
    executor: Executor = "auto"
    max_actors: int | None = None
    actor_start_timeout_s: float = DEFAULT_ACTOR_START_TIMEOUT_S
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    image_timeout_s: float | None = None

    _SECTION: ClassVar[str] = "run"
    _RULES: ClassVar[Mapping[str, Rule]] = {
        "ray_address": optional_rule(string_rule),
        "shard_size": integer_rule(1),
        "executor": choice_rule(get_args(Executor)),
        "max_actors": optional_rule(integer_rule(1)),
        "actor_start_timeout_s": number_rule(MIN_ACTOR_START_TIMEOUT_S),
        "read_timeout_s": number_rule(0, low_open=True),
        "image_timeout_s": optional_rule(number_rule(0, low_open=True)),
    }


SECTIONS: dict[str, type[Any]] = {
    "input": InputSpec,
    "prompts": PromptsSpec,
    "model": ModelSpec,
    "engine": EngineSpec,
    "amg": AmgSpec,
    "raster": RasterSpec,
    "output": OutputSpec,
    "run": RunSpec,
}
TOP_KEYS = ("name", *SECTIONS)
SECTION_KEYS = {key: tuple(f.name for f in dataclasses.fields(cls)) for key, cls in SECTIONS.items()}
FIELD_KEYS = ("name", *(f"{key}.{name}" for key, names in SECTION_KEYS.items() for name in names))
