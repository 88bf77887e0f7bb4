"""The job file: frozen dataclasses for each section, strict validation, loading and overrides.

A job file is YAML (see SPEC.md, "Job file"). :func:`load_job` reads one, applies
``--set key=value`` overrides and validates it; :func:`parse_job` validates an in-memory mapping.
Every problem is a :class:`JobError` whose message is one line naming the field and what is
allowed. The specs validate themselves on construction, so a :class:`JobSpec` built in code is
checked exactly like one read from a file.

``storage_options`` carry credentials: they never appear in a repr, an error message or
:meth:`JobSpec.redacted_dict`, and they are not part of :meth:`JobSpec.fingerprint`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml

from sam_batch.engines.registry import Backend, ModelType, Precision
from sam_batch.pipeline.params import AmgParams

__all__ = [
    "AmgSpec",
    "EngineSpec",
    "InputSpec",
    "JobError",
    "JobSpec",
    "ModelSpec",
    "OutputSpec",
    "RasterSpec",
    "RunSpec",
    "load_job",
    "parse_job",
]

Executor = Literal["auto", "ray", "local"]
Tiling = Literal["auto", "always", "never"]

_REDACTED = "***"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_CUDA_INDEX_RE = re.compile(r"cuda:[0-9]+")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_EPSG_RE = re.compile(r"EPSG:([0-9]+)", re.IGNORECASE)
_DEVICES = ("auto", "cpu", "cuda")
_ENUM_CUTOFF = 0.8  # stricter than for keys: 'tensorflow' should not suggest 'tensorrt'
# a crop's grid is points_per_side^2 prompts: 256 gives 65,536 (the reference's default is 32)
MAX_POINTS_PER_SIDE = 256
MAX_CROP_N_LAYERS = 4  # 1 + 4 + 16 + 64 + 256 = 341 crops, each encoded and decoded
MAX_YAML_ALIASES = 16  # alias uses: a job file shares a few settings (storage_options) at most
# seconds a job waits for a segmenting actor to be placed (an autoscaler adding a GPU node
# takes minutes) before it fails; at least a second, so that a placement can happen at all
DEFAULT_ACTOR_START_TIMEOUT_S = 600.0
MIN_ACTOR_START_TIMEOUT_S = 1.0
# seconds one image read (a photo's bytes, a scene's opening, one window) may take by default:
# a read this long is taken to be stuck, not slow (a 30 MB photo at 1 MB/s takes 30 s)
DEFAULT_READ_TIMEOUT_S = 300.0


class JobError(ValueError):
    """An invalid job: the message is one line naming the field and what is wrong.

    Attributes:
        message: the message without the source prefix.
        field: the dotted path of the offending field (``amg.points_per_side``), if any.
        source: where the job came from (a file path or ``"<job>"``), if known.
    """

    def __init__(self, message: str, field: str | None = None, source: str | None = None) -> None:
        self.message = " ".join(message.split())
        self.field = field
        self.source = source
        super().__init__(f"{source}: {self.message}" if source else self.message)

    def with_source(self, source: str) -> JobError:
        """Return the same error prefixed with ``source``."""
        return JobError(self.message, field=self.field, source=source)

    def __reduce__(self) -> tuple[type[JobError], tuple[str, str | None, str | None]]:
        """Pickle with all attributes (the default would keep only the composed message)."""
        return (JobError, (self.message, self.field, self.source))


# --------------------------------------------------------------------------------------------
# Value checks. Each rule takes (value, dotted path) and returns the normalised value or raises.
# Messages never show mappings or sequences, only scalars, so a misplaced secret is not echoed.

_Rule = Callable[[Any, str], Any]


def _err(path: str, reason: str) -> JobError:
    return JobError(f"{path}: {reason}", field=path)


def _show(value: Any) -> str:
    """A short, one-line rendering of a scalar for messages; containers show only their kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return _kind(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, str):
        return "a string"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _suggest(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or an empty string."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _integer(minimum: int, maximum: int | None = None) -> _Rule:
    def rule(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(path, f"expected an integer, got {_show(value)}")
        if value < minimum:
            raise _err(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise _err(path, f"must be <= {maximum}, got {value}")
        return value

    return rule


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> _Rule:
    if high == math.inf:
        allowed = f"> {low}" if low_open else f">= {low}"
    elif high_open:
        allowed = f">= {low} and < {high}"
    else:
        allowed = f"between {low} and {high}"

    def rule(value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str) and _parses_as_float(value):
                hint = " (a string: write numbers unquoted, exponents as 1.0e-3)"
            raise _err(path, f"expected a number, got {_show(value)}{hint}")
        number = float(value)
        if not math.isfinite(number):
            raise _err(path, f"expected a finite number, got {_show(number)}")
        if not (low <= number <= high) or (high_open and number == high) or (low_open and number == low):
            raise _err(path, f"must be {allowed}, got {_show(number)}")
        return number

    return rule


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _choice(allowed: tuple[str, ...]) -> _Rule:
    def rule(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise _not_one_of(path, value, allowed, allowed)
        return value

    return rule


def _not_one_of(path: str, value: Any, allowed: Sequence[str], choices: Sequence[str]) -> JobError:
    """``path: 'x' is not one of a, b, c``, with a suggestion from ``choices`` when close."""
    listed = ", ".join(allowed)
    if not isinstance(value, str):
        return _err(path, f"expected one of {listed}, got {_show(value)}")
    return _err(path, f"{value!r} is not one of {listed}{_suggest(value, choices, _ENUM_CUTOFF)}")


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _err(path, f"expected a non-empty string, got {_show(value)}")
    return value


def _optional(rule: _Rule) -> _Rule:
    def optional_rule(value: Any, path: str) -> Any:
        return None if value is None else rule(value, path)

    return optional_rule


def _name(value: Any, path: str) -> str:
    text = _string(value, path)
    if not _NAME_RE.fullmatch(text) or text in (".", ".."):
        raise _err(path, f"{_show(text)} must be letters, digits, '.', '_' or '-' only")
    return text


def _uri(value: Any, path: str) -> str:
    """A path or a URL whose protocols (each of a chain such as ``simplecache::s3://``) fsspec knows."""
    from fsspec.registry import known_implementations, registry

    uri = _string(value, path)
    for part in uri.split("::"):
        protocol = part.split("://", 1)[0] if "://" in part else None
        if protocol is not None and protocol not in known_implementations and protocol not in registry:
            raise _err(path, f"unknown storage protocol {protocol!r} (fsspec has no such filesystem)")
    return uri


def _uris(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_uri(value, path),)
    if not isinstance(value, (list, tuple)):
        raise _err(path, f"expected a URI or a list of URIs, got {_kind(value)}")
    return tuple(_uri(item, f"{path}[{i}]") for i, item in enumerate(value))


def _storage_options(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _err(path, f"expected a mapping, got {_kind(value)}")
    if not all(isinstance(key, str) for key in value):
        raise _err(path, "keys must be strings")
    return copy.deepcopy(dict(value))


def _sha256(value: Any, path: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise _err(path, f"expected 64 hex characters, got {_show(value)}")
    return value.lower()


def _output_crs(value: Any, path: str) -> str:
    """``auto`` or an EPSG code of a 2D CRS that PROJ's database holds, spelled ``EPSG:NNNN``."""
    if value == "auto":
        return value
    match = _EPSG_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise _err(path, f"expected auto or an EPSG code such as EPSG:4326, got {_show(value)}")
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    code = int(match.group(1))
    try:
        with rasterio.Env():  # GDAL's messages go to rasterio's log, not to stderr
            crs = CRS.from_epsg(code)
    except CRSError:
        raise _err(path, f"EPSG:{code} is not a known EPSG code (PROJ's database has no such CRS)") from None
    if not (crs.is_geographic or crs.is_projected):
        raise _err(path, f"EPSG:{code} is not a geographic or projected CRS (polygons need x and y)")
    return f"EPSG:{code}"


def _device(value: Any, path: str) -> str:
    if isinstance(value, str) and (value in _DEVICES or _CUDA_INDEX_RE.fullmatch(value)):
        return value
    raise _not_one_of(path, value, (*_DEVICES, "cuda:N"), _DEVICES)


def _bands(value: Any, path: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise _err(path, f"expected a list of 3 band indexes (1-based) or null, got {_show(value)}")
    one_based = _integer(1)
    first, second, third = (one_based(item, f"{path}[{i}]") for i, item in enumerate(value))
    return (first, second, third)


def _nodata(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _err(path, f"expected a number or null, got {_show(value)}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The sections.


class _Section:
    """Validation shared by the section dataclasses.

    ``_SECTION`` is the section's key in the job file; ``_RULES`` maps each field to the rule
    that checks and normalises it. Cross-field checks go in :meth:`_check`.
    """

    _SECTION: ClassVar[str]
    _RULES: ClassVar[Mapping[str, _Rule]]

    def __post_init__(self) -> None:
        for name, rule in self._RULES.items():
            value = rule(getattr(self, name), f"{self._SECTION}.{name}")
            object.__setattr__(self, name, value)
        self._check()

    def _check(self) -> None:
        """Checks that involve more than one field; none by default."""


@dataclass(frozen=True)
class InputSpec(_Section):
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
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "uris": _uris,
        "manifest": _optional(_uri),
        "storage_options": _storage_options,
    }

    def _check(self) -> None:
        if not self.uris and self.manifest is None:
            raise _err("input.uris", "required unless input.manifest is given (give at least one)")


@dataclass(frozen=True)
class ModelSpec(_Section):
    """``model``: which SAM variant and checkpoint (null = the cached default for ``type``)."""

    type: ModelType = "vit_t"
    checkpoint: str | None = None
    sha256: str | None = None

    _SECTION: ClassVar[str] = "model"
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "type": _choice(get_args(ModelType)),
        "checkpoint": _optional(_uri),
        "sha256": _optional(_sha256),
    }


@dataclass(frozen=True)
class EngineSpec(_Section):
    """``engine``: how the model runs. ``device`` is auto, cpu, cuda or cuda:N."""

    backend: Backend = "torch"
    device: str = "auto"
    precision: Precision = "fp32"

    _SECTION: ClassVar[str] = "engine"
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "backend": _choice(get_args(Backend)),
        "device": _device,
        "precision": _choice(get_args(Precision)),
    }


@dataclass(frozen=True)
class AmgSpec(_Section, AmgParams):
    """``amg``: the parameters of SamAutomaticMaskGenerator, with its names and defaults
    (the fields of :class:`AmgParams`). ``pred_iou_thresh`` may exceed 1 (the model's IoU
    predictions can).
    """

    _SECTION: ClassVar[str] = "amg"
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "points_per_side": _integer(1, MAX_POINTS_PER_SIDE),
        "points_per_batch": _integer(1),
        "pred_iou_thresh": _number(0),
        "stability_score_thresh": _number(0, 1),
        "stability_score_offset": _number(0),
        "box_nms_thresh": _number(0, 1),
        "crop_n_layers": _integer(0, MAX_CROP_N_LAYERS),
        "crop_nms_thresh": _number(0, 1),
        "crop_overlap_ratio": _number(0, 1, high_open=True),
        "crop_n_points_downscale_factor": _integer(1),
        "min_mask_region_area": _integer(0),
    }


@dataclass(frozen=True)
class RasterSpec(_Section):
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
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "tiling": _choice(get_args(Tiling)),
        "tile_size": _integer(64),
        "tile_overlap": _integer(0),
        "bands": _bands,
        "nodata": _nodata,
    }

    def _check(self) -> None:
        if 2 * self.tile_overlap >= self.tile_size:
            raise _err(
                "raster.tile_overlap",
                f"must be less than half of raster.tile_size ({self.tile_size}), got {self.tile_overlap}",
            )


@dataclass(frozen=True)
class OutputSpec(_Section):
    """``output``: the dataset root (any fsspec URL), its never-shown storage options, and the
    CRS of its geometries: ``auto`` (the scenes' CRS when they all share one, else EPSG:4326,
    chosen once when the job is planned: `jobs.output_crs`) or ``EPSG:NNNN``."""

    uri: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False, hash=False)
    crs: str = "auto"

    _SECTION: ClassVar[str] = "output"
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "uri": _uri,
        "storage_options": _storage_options,
        "crs": _output_crs,
    }


@dataclass(frozen=True)
class RunSpec(_Section):
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
    _RULES: ClassVar[Mapping[str, _Rule]] = {
        "ray_address": _optional(_string),
        "shard_size": _integer(1),
        "executor": _choice(get_args(Executor)),
        "max_actors": _optional(_integer(1)),
        "actor_start_timeout_s": _number(MIN_ACTOR_START_TIMEOUT_S),
        "read_timeout_s": _number(0, low_open=True),
        "image_timeout_s": _optional(_number(0, low_open=True)),
    }


_SECTIONS: dict[str, type[Any]] = {
    "input": InputSpec,
    "model": ModelSpec,
    "engine": EngineSpec,
    "amg": AmgSpec,
    "raster": RasterSpec,
    "output": OutputSpec,
    "run": RunSpec,
}
_TOP_KEYS = ("name", *_SECTIONS)
_SECTION_KEYS = {key: tuple(f.name for f in dataclasses.fields(cls)) for key, cls in _SECTIONS.items()}
_FIELD_KEYS = ("name", *(f"{key}.{name}" for key, names in _SECTION_KEYS.items() for name in names))


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A validated job. ``name``, ``input`` and ``output`` are required; the rest default."""

    name: str
    input: InputSpec
    model: ModelSpec = field(default_factory=ModelSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    amg: AmgSpec = field(default_factory=AmgSpec)
    raster: RasterSpec = field(default_factory=RasterSpec)
    output: OutputSpec
    run: RunSpec = field(default_factory=RunSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", _name(self.name, "name"))
        for key, cls in _SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"JobSpec.{key} must be a {cls.__name__}")

    def to_dict(self) -> dict[str, Any]:
        """The job as plain dicts, lists and scalars, with the job file's keys (JSON-able).

        Includes ``storage_options`` in clear: use :meth:`redacted_dict` for anything logged.
        """
        data: dict[str, Any] = _plain(dataclasses.asdict(self))
        return data

    def redacted_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with every ``storage_options`` value replaced by ``"***"``."""
        data = self.to_dict()
        for section in ("input", "output"):
            options = data[section]["storage_options"]
            data[section]["storage_options"] = {key: _REDACTED for key in options}
        return data

    def fingerprint(self) -> str:
        """SHA-256 hex of the canonical JSON of everything that determines the output.

        Excludes ``run.*``, every ``storage_options`` (credentials, no effect on results) and
        ``output.uri`` (the plan holding the fingerprint sits there); ``output.crs`` counts as
        written (``auto`` resolves in the plan, frozen with it); input URIs count as
        `normalise_uri` spells them, as a set. Independent of key order in the job file.
        """
        data = self.to_dict()
        del data["run"]
        for section in ("input", "output"):
            del data[section]["storage_options"]
        del data["output"]["uri"]
        data["input"]["uris"] = sorted({normalise_uri(uri) for uri in self.input.uris})
        if self.input.manifest is not None:
            data["input"]["manifest"] = normalise_uri(self.input.manifest)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def normalise_uri(uri: str) -> str:
    """One spelling per file: local paths (and `file://` URLs, their percent-escapes decoded)
    absolute and normalised, so ids depend neither on the working directory nor on how a path
    was written; other URLs as given."""
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(uri[len("file://") :])  # a URL's %20 is a space in the path
    return uri if "://" in uri else os.path.abspath(uri)


def _plain(value: Any) -> Any:
    """Turn tuples into lists, recursively, so the result is plain JSON-able data."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------
# Building from data, YAML and overrides.


def parse_job(data: Mapping[str, Any], source: str = "<job>") -> JobSpec:
    """Validate an in-memory job (the parsed YAML) and return it as a :class:`JobSpec`.

    Raises:
        JobError: naming ``source`` and the offending field.
    """
    try:
        return _build(data)
    except JobError as error:
        raise error.with_source(source) from None


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read, override and validate the job file at ``path``.

    ``overrides`` are ``key=value`` strings as given to ``--set``: the key names a field
    (``amg.points_per_side``, ``name``, or a key under a ``storage_options``), the value is
    parsed as YAML so numbers, booleans, lists and null work.

    Raises:
        JobError: prefixed with ``path``; for an error in an override, the message starts with
            ``--set``.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise JobError(f"cannot read job file: {error.strerror or error}", source=source) from None
    except UnicodeDecodeError as error:
        raise JobError(f"cannot read job file: not UTF-8 ({error.reason})", source=source) from None
    try:
        data = _safe_load(text)
    except yaml.YAMLError as error:
        raise JobError(f"invalid YAML {_yaml_problem(error)}", source=source) from None
    if data is None:
        raise JobError("the job file is empty", source=source)
    if not isinstance(data, Mapping):
        raise JobError(_top_level_problem(data), source=source)
    try:
        data, overridden = _apply_overrides(data, overrides)
    except JobError as error:
        raise error.with_source(source) from None
    try:
        return _build(data)
    except JobError as error:
        if error.field is not None and any(_related(error.field, key) for key in overridden):
            error = JobError(f"--set {error.message}", field=error.field)
        raise error.with_source(source) from None


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also rejects a key given twice in one mapping, and bounds
    aliases (``*name``): at most `MAX_YAML_ALIASES` uses, each of a node that holds no alias, so
    no alias expands another (nested aliases grow exponentially: "billion laughs") and the data
    is at most that many times the document.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.aliased: set[int] = set()  # ids of the nodes aliases stand for
        self.alias_uses = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        """Compose a node as SafeLoader does, checking an alias first."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                self.alias_uses += 1
                known = id(target) in self.aliased  # checked at its first use already
                if self.alias_uses > MAX_YAML_ALIASES or (not known and self._holds_alias(target)):
                    raise yaml.composer.ComposerError(
                        None,
                        None,
                        f"alias *{event.anchor}: a job file may use aliases up to {MAX_YAML_ALIASES} times, "
                        "none of a node holding an alias",
                        event.start_mark,
                    )
                self.aliased.add(id(target))
        return super().compose_node(parent, index)

    def _holds_alias(self, node: yaml.Node) -> bool:
        """Whether an aliased node lies inside `node` (which is still being composed, when an
        alias refers back to its own anchor: that holds one too)."""
        seen: set[int] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            if id(current) in seen:
                return True  # reached twice: a node is shared within it
            seen.add(id(current))
            if current is not node and id(current) in self.aliased:
                return True
            if isinstance(current, yaml.SequenceNode):
                stack.extend(current.value)
            elif isinstance(current, yaml.MappingNode):
                stack.extend(item for pair in current.value for item in pair)
        return False

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Construct a mapping as SafeLoader does, after checking for duplicate keys."""
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # safe: a SafeLoader subclass


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Describe a YAML error as ``at line L, column C: problem`` (or ``: problem``)."""
    if isinstance(error, yaml.MarkedYAMLError):
        what = error.problem or error.context or "syntax error"
        if error.problem and error.context:
            what = f"{error.problem} ({error.context})"
        mark = error.problem_mark or error.context_mark
        if mark is not None:
            return f"at line {mark.line + 1}, column {mark.column + 1}: {what}"
        return f": {what}"
    return f": {error}"


def _top_level_problem(data: Any) -> str:
    return f"expected a mapping of {', '.join(_TOP_KEYS)} at the top level, got {_kind(data)}"


def _build(data: Any) -> JobSpec:
    if not isinstance(data, Mapping):
        raise JobError(_top_level_problem(data))
    _reject_unknown_keys(data, "", _TOP_KEYS)
    if "name" not in data:
        raise _err("name", "required")
    sections = {key: _build_section(data.get(key), key, cls) for key, cls in _SECTIONS.items()}
    return JobSpec(name=data["name"], **sections)


def _build_section(raw: Any, key: str, cls: type[Any]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _err(key, f"expected a mapping, got {_kind(raw)}")
    _reject_unknown_keys(raw, key, _SECTION_KEYS[key])
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in raw:
            raise _err(f"{key}.{f.name}", "required")
    return cls(**raw)


def _reject_unknown_keys(data: Mapping[Any, Any], section: str, known: Sequence[str]) -> None:
    for key in data:
        if key not in known:
            path = f"{section}.{key}" if section else str(key)
            suggestion = _suggest(key, known) if isinstance(key, str) else ""
            raise JobError(f"unknown key {path!r}{suggestion or _allowed(section, known)}", field=path)


def _allowed(section: str, known: Sequence[str]) -> str:
    """`` (amg has: a, b, ...)``: the keys one place of the job file takes."""
    return f" ({section or 'the job file'} has: {', '.join(known)})"


def _apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Return a copy of ``data`` with ``key=value`` overrides applied, and the keys set."""
    result = copy.deepcopy(dict(data))
    keys = []
    for override in overrides:
        key, equals, text = override.partition("=")
        key = key.strip()
        if not equals or not key:
            # The text may be a secret meant for storage_options: never echo it.
            raise JobError("--set expects key=value (a field such as amg.points_per_side=16)")
        parts = key.split(".")
        _check_override_key(key, parts)
        try:
            value = _safe_load(text)
        except yaml.YAMLError as error:
            raise JobError(f"--set {key}: invalid YAML value {_yaml_problem(error)}") from None
        target = result
        for depth, part in enumerate(parts[:-1]):
            child = target.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                where = ".".join(parts[: depth + 1])
                raise JobError(f"--set {key}: {where} is {_kind(child)}, not a mapping")
            target[part] = child = dict(child)
            target = child
        target[parts[-1]] = value
        keys.append(key)
    return result, keys


def _check_override_key(key: str, parts: list[str]) -> None:
    """Accept a field (``amg.points_per_side``) or a key under a ``storage_options``."""
    under_options = (
        len(parts) > 2
        and parts[0] in _SECTIONS
        and parts[1] == "storage_options"
        and ".".join(parts[:2]) in _FIELD_KEYS
        and all(parts)
    )
    if key in _FIELD_KEYS or under_options:
        return
    if key in _SECTION_KEYS:
        first = _SECTION_KEYS[key][0]
        raise JobError(f"--set {key}: a section, not a field; set one of its fields ({key}.{first}, ...)", field=key)
    section = parts[0] if parts[0] in _SECTION_KEYS else ""
    hint = _suggest(key, _FIELD_KEYS) or _allowed(section, _SECTION_KEYS.get(section, _TOP_KEYS))
    raise JobError(f"--set {key}: unknown key{hint}", field=key)


def _related(path: str, key: str) -> bool:
    """Whether an error at ``path`` concerns the field set by override ``key``."""
    return path == key or path.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{path}.")
