"""The job file's value checks: each rule takes (value, dotted field path) and returns the value
normalised or raises a `JobError` whose message is one line naming the field and what is allowed
("did you mean" where a word is close). Messages never show mappings or sequences, only
scalars, so a misplaced secret is not echoed."""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
CUDA_INDEX_PATTERN = re.compile(r"cuda:[0-9]+")
SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
EPSG_PATTERN = re.compile(r"EPSG:([0-9]+)", re.IGNORECASE)
DEVICES = ("auto", "cpu", "cuda")
ENUM_CUTOFF = 0.8  # stricter than for keys: 'tensorflow' should not suggest 'tensorrt'


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


Rule = Callable[[Any, str], Any]


def field_error(path: str, reason: str) -> JobError:
    return JobError(f"{path}: {reason}", field=path)


def shown(value: Any) -> str:
    """A short, one-line rendering of a scalar for messages; containers show only their kind."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 80 else value[:77] + "...")
    return kind_name(value)


def kind_name(value: Any) -> str:
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


def did_you_mean(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or an empty string."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def integer_rule(minimum: int, maximum: int | None = None) -> Rule:
    def rule(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise field_error(path, f"expected an integer, got {shown(value)}")
        if value < minimum:
            raise field_error(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise field_error(path, f"must be <= {maximum}, got {value}")
        return value

    return rule


def number_rule(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
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
            raise field_error(path, f"expected a number, got {shown(value)}{hint}")
        number = float(value)
        if not math.isfinite(number):
            raise field_error(path, f"expected a finite number, got {shown(number)}")
        if not (low <= number <= high) or (high_open and number == high) or (low_open and number == low):
            raise field_error(path, f"must be {allowed}, got {shown(number)}")
        return number

    return rule


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def choice_rule(allowed: tuple[str, ...]) -> Rule:
    def rule(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise not_one_of(path, value, allowed, allowed)
        return value

    return rule


def not_one_of(path: str, value: Any, allowed: Sequence[str], choices: Sequence[str]) -> JobError:
    """``path: 'x' is not one of a, b, c``, with a suggestion from ``choices`` when close."""
    listed = ", ".join(allowed)
    if not isinstance(value, str):
        return field_error(path, f"expected one of {listed}, got {shown(value)}")
    return field_error(path, f"{value!r} is not one of {listed}{did_you_mean(value, choices, ENUM_CUTOFF)}")


def string_rule(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise field_error(path, f"expected a non-empty string, got {shown(value)}")
    return value


def bool_rule(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise field_error(path, f"expected true or false, got {shown(value)}")
    return value


def optional_rule(rule: Rule) -> Rule:
    def optional_rule(value: Any, path: str) -> Any:
        return None if value is None else rule(value, path)

    return optional_rule


def name_rule(value: Any, path: str) -> str:
    text = string_rule(value, path)
    if not NAME_PATTERN.fullmatch(text) or text in (".", ".."):
        raise field_error(path, f"{shown(text)} must be letters, digits, '.', '_' or '-' only")
    return text


def uri_rule(value: Any, path: str) -> str:
    """A path or a URL whose protocols (each of a chain such as ``simplecache::s3://``) fsspec knows."""
    from fsspec.registry import known_implementations, registry

    uri = string_rule(value, path)
    for part in uri.split("::"):
        protocol = part.split("://", 1)[0] if "://" in part else None
        if protocol is not None and protocol not in known_implementations and protocol not in registry:
            raise field_error(path, f"unknown storage protocol {protocol!r} (fsspec has no such filesystem)")
    return uri


def normalise_uri(uri: str) -> str:
    """One spelling per file: local paths (and `file://` URLs, their percent-escapes decoded)
    absolute and normalised, so ids depend neither on the working directory nor on how a path
    was written; other URLs as given."""
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(uri[len("file://") :])  # a URL's %20 is a space in the path
    return uri if "://" in uri else os.path.abspath(uri)


def normalised_uri_rule(value: Any, path: str) -> str:
    """`uri_rule`, then `normalise_uri`: how the job's inputs and output are held once loaded."""
    return normalise_uri(uri_rule(value, path))


def normalised_uris_rule(value: Any, path: str) -> tuple[str, ...]:
    """`uris_rule`, each URI as `normalise_uri` spells it."""
    return tuple(normalise_uri(uri) for uri in uris_rule(value, path))


def uris_rule(value: Any, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (uri_rule(value, path),)
    if not isinstance(value, (list, tuple)):
        raise field_error(path, f"expected a URI or a list of URIs, got {kind_name(value)}")
    return tuple(uri_rule(item, f"{path}[{i}]") for i, item in enumerate(value))


def storage_options_rule(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise field_error(path, f"expected a mapping, got {kind_name(value)}")
    if not all(isinstance(key, str) for key in value):
        raise field_error(path, "keys must be strings")
    return copy.deepcopy(dict(value))


def sha256_rule(value: Any, path: str) -> str:
    if not isinstance(value, str) or not SHA256_PATTERN.fullmatch(value):
        raise field_error(path, f"expected 64 hex characters, got {shown(value)}")
    return value.lower()


def output_crs_rule(value: Any, path: str) -> str:
    """``auto`` or an EPSG code of a 2D CRS that PROJ's database holds, spelled ``EPSG:NNNN``."""
    if value == "auto":
        return value
    match = EPSG_PATTERN.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise field_error(path, f"expected auto or an EPSG code such as EPSG:4326, got {shown(value)}")
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    code = int(match.group(1))
    try:
        with rasterio.Env():  # GDAL's messages go to rasterio's log, not to stderr
            crs = CRS.from_epsg(code)
    except CRSError:
        raise field_error(path, f"EPSG:{code} is not a known EPSG code (PROJ's database has no such CRS)") from None
    if not (crs.is_geographic or crs.is_projected):
        raise field_error(path, f"EPSG:{code} is not a geographic or projected CRS (polygons need x and y)")
    return f"EPSG:{code}"


def device_rule(value: Any, path: str) -> str:
    if isinstance(value, str) and (value in DEVICES or CUDA_INDEX_PATTERN.fullmatch(value)):
        return value
    raise not_one_of(path, value, (*DEVICES, "cuda:N"), DEVICES)


def bands_rule(value: Any, path: str) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise field_error(path, f"expected a list of 3 band indexes (1-based) or null, got {shown(value)}")
    one_based = integer_rule(1)
    first, second, third = (one_based(item, f"{path}[{i}]") for i, item in enumerate(value))
    return (first, second, third)


def nodata_rule(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise field_error(path, f"expected a number or null, got {shown(value)}")
    return float(value)
