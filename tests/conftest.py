"""Shared test fixtures: the real data in ../shared, a weights cache seeded from it, golden files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_BATCH_SHARED", REPO.parent / "shared"))
IMAGES = SHARED / "data" / "images"
GOLDEN = SHARED / "golden"
MOBILE_SAM = SHARED / "models" / "mobile_sam.pt"
PARITY_LINES: list[str] = []  # filled by the parity tests, printed at the end of the run


def pytest_configure(config: pytest.Config) -> None:
    """Seed a private weights cache from ../shared so no test downloads the checkpoint.

    Set before any test runs, so `sam-batch` subprocesses and Ray workers inherit it.
    """
    if not MOBILE_SAM.exists():
        raise pytest.UsageError(f"the test data is missing: {MOBILE_SAM} (../shared beside the checkout)")
    cache = Path(config.rootpath) / ".pytest_cache" / "weights"
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / "mobile_sam.pt"
    if not cached.exists() or cached.stat().st_size != MOBILE_SAM.stat().st_size:
        shutil.copyfile(MOBILE_SAM, cached)
    os.environ["SAM_BATCH_CACHE"] = str(cache)


def pytest_terminal_summary(terminalreporter) -> None:
    """The parity figures per golden file, so every CI log carries them."""
    if PARITY_LINES:
        terminalreporter.section("parity with the reference generator")
        for line in PARITY_LINES:
            terminalreporter.write_line(line)


def load_golden(name: str) -> dict:
    """A golden file with its `segmentation`, `bbox`, ... parsed into Python values."""
    from benchmarks.reference import read_golden

    return read_golden(GOLDEN / name)


def golden_files() -> list[str]:
    """Every golden file, named relative to GOLDEN (`extra/…` for those in its extra/)."""
    return sorted(str(p.relative_to(GOLDEN)) for p in [*GOLDEN.glob("*.json"), *GOLDEN.glob("extra/*.json")])


@pytest.fixture(scope="session")
def shared_images() -> Path:
    return IMAGES


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3 endpoint for the module: moto's server on 127.0.0.1 (a free port).

    Yields the `storage_options` that s3fs needs to reach it (fake key and secret).
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield {"key": "testing-key", "secret": "testing-secret", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
    finally:
        server.stop()
