"""Reading a job file: strict YAML (no duplicate keys, few aliases), `--set key=value`
overrides, and validation into a `JobSpec`, every problem one `JobError` line naming the file
and the field."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sam_batch.jobs.job_rules import JobError, did_you_mean, field_error, kind_name
from sam_batch.jobs.job_sections import FIELD_KEYS, SECTION_KEYS, SECTIONS, TOP_KEYS
from sam_batch.jobs.schema import JobSpec

MAX_YAML_ALIASES = 16  # alias uses: a job file shares a few settings (storage_options) at most


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
    return f"expected a mapping of {', '.join(TOP_KEYS)} at the top level, got {kind_name(data)}"


def _build(data: Any) -> JobSpec:
    if not isinstance(data, Mapping):
        raise JobError(_top_level_problem(data))
    _reject_unknown_keys(data, "", TOP_KEYS)
    if "name" not in data:
        raise field_error("name", "required")
    sections = {key: _build_section(data.get(key), key, cls) for key, cls in SECTIONS.items()}
    return JobSpec(name=data["name"], **sections)


def _build_section(raw: Any, key: str, cls: type[Any]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise field_error(key, f"expected a mapping, got {kind_name(raw)}")
    _reject_unknown_keys(raw, key, SECTION_KEYS[key])
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in raw:
            raise field_error(f"{key}.{f.name}", "required")
    return cls(**raw)


def _reject_unknown_keys(data: Mapping[Any, Any], section: str, known: Sequence[str]) -> None:
    for key in data:
        if key not in known:
            path = f"{section}.{key}" if section else str(key)
            hint = did_you_mean(key, known) if isinstance(key, str) else ""
            raise JobError(f"unknown key {path!r}{hint or _allowed(section, known)}", field=path)


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
                raise JobError(f"--set {key}: {where} is {kind_name(child)}, not a mapping")
            target[part] = child = dict(child)
            target = child
        target[parts[-1]] = value
        keys.append(key)
    return result, keys


def _check_override_key(key: str, parts: list[str]) -> None:
    """Accept a field (``amg.points_per_side``) or a key under a ``storage_options``."""
    under_options = (
        len(parts) > 2
        and parts[0] in SECTIONS
        and parts[1] == "storage_options"
        and ".".join(parts[:2]) in FIELD_KEYS
        and all(parts)
    )
    if key in FIELD_KEYS or under_options:
        return
    if key in SECTION_KEYS:
        first = SECTION_KEYS[key][0]
        raise JobError(f"--set {key}: a section, not a field; set one of its fields ({key}.{first}, ...)", field=key)
    section = parts[0] if parts[0] in SECTION_KEYS else ""
    hint = did_you_mean(key, FIELD_KEYS) or _allowed(section, SECTION_KEYS.get(section, TOP_KEYS))
    raise JobError(f"--set {key}: unknown key{hint}", field=key)


def _related(path: str, key: str) -> bool:
    """Whether an error at ``path`` concerns the field set by override ``key``."""
    return path == key or path.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{path}.")
