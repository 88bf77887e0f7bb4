"""A job: `JobSpec`, its sections validated, its redacted form and its fingerprint.

A job file is YAML (see SPEC.md, "Job file"), read by `jobs.job_file`. Every problem is a
`JobError` whose message is one line naming the field and what is allowed.

``storage_options`` carry credentials: they never appear in a repr, an error message or
:meth:`JobSpec.redacted_dict`, and they are not part of :meth:`JobSpec.fingerprint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from sam_batch.engines.registry import is_sam2, precision_refusal
from sam_batch.jobs.job_rules import field_error, name_rule
from sam_batch.jobs.job_sections import (
    DEFAULT_PRED_IOU_THRESH,
    SAM2_ONLY,
    SECTIONS,
    AmgSpec,
    EngineSpec,
    InputSpec,
    ModelSpec,
    OutputSpec,
    PromptsSpec,
    RasterSpec,
    RunSpec,
)
from sam_batch.pipeline.params import below_floor

REDACTED = "***"


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """A validated job. ``name``, ``input`` and ``output`` are required; the rest default."""

    name: str
    input: InputSpec
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    engine: EngineSpec = field(default_factory=EngineSpec)
    amg: AmgSpec = field(default_factory=AmgSpec)
    raster: RasterSpec = field(default_factory=RasterSpec)
    output: OutputSpec
    run: RunSpec = field(default_factory=RunSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", name_rule(self.name, "name"))
        for key, cls in SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                raise TypeError(f"JobSpec.{key} must be a {cls.__name__}")
        object.__setattr__(self, "amg", _resolved_amg(self.amg, self.model.type))
        refusal = precision_refusal(self.engine.backend, self.engine.precision)
        if refusal is not None:
            raise field_error("engine.precision", refusal)
        if self.prompts.uri is not None:
            if self.output.candidates:
                raise field_error(
                    "output.candidates", "keeps the automatic generator's candidates; a prompt job has none"
                )
            for key, generator_only in (("use_m2m", True), ("multimask_output", False)):
                if getattr(self.amg, key) is generator_only:
                    raise field_error(
                        f"amg.{key}",
                        "applies to SAM 2's automatic generator; a prompt job's masks are the predictor's "
                        "(one or three a prompt: prompts.multimask_output)",
                    )
        low = below_floor(self.amg) if self.output.candidates else []
        if low:
            raise field_error(
                "output.candidates",
                f"keeps candidates above a floor the job's thresholds must not be under ({'; '.join(low)})",
            )

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
            data[section]["storage_options"] = {key: REDACTED for key in options}
        return data

    def fingerprint(self) -> str:
        """SHA-256 hex of the canonical JSON of everything that determines the output.

        Excludes ``run.*``, every ``storage_options`` (credentials, no effect on results) and
        ``output.uri`` (the plan holding the fingerprint sits there); ``output.crs`` counts as
        written (``auto`` resolves in the plan, frozen with it); input URIs count as
        `normalise_uri` spells them (as the job was loaded), as a set; ``prompts`` only when it
        names a table (whose content the plan adds: `jobs.prompt_table`). Independent of key
        order in the job file.
        """
        data = self.to_dict()
        del data["run"]
        for section in ("input", "output"):
            del data[section]["storage_options"]
        del data["output"]["uri"]
        data["input"]["uris"] = sorted(set(self.input.uris))
        if self.prompts.uri is None:  # jobs without prompts keep the fingerprints they had
            del data["prompts"]
        for key in SAM2_ONLY:  # and jobs of SAM 1 models, without SAM 2's keys
            if data["amg"][key] is None:
                del data["amg"][key]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _resolved_amg(amg: AmgSpec, model_type: str) -> AmgSpec:
    """`amg` with what it left None set to the model's generator's defaults; a SAM 2 key set for
    another model is a one-line error."""
    if is_sam2(model_type):
        unset = {key: default for key, default in SAM2_ONLY.items() if getattr(amg, key) is None}
        generator = "sam2"
    else:
        for key in SAM2_ONLY:
            if getattr(amg, key) is not None:
                raise field_error(f"amg.{key}", f"applies to SAM 2.1 models only, not {model_type}")
        unset, generator = {}, "sam"
    if amg.pred_iou_thresh is None:
        unset["pred_iou_thresh"] = DEFAULT_PRED_IOU_THRESH[generator]
    return dataclasses.replace(amg, **unset) if unset else amg


def _plain(value: Any) -> Any:
    """Turn tuples into lists, recursively, so the result is plain JSON-able data."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
