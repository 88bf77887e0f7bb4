"""Shared test set-up: a weights cache seeded from ../shared, the S3 endpoint, checkpoints of
HQ-SAM and SAM 2.1 made from MobileSAM's (`seeded_checkpoints`), and the rule that
tests/integration/ is not run, saying why, where ../shared is missing (tests/unit/ needs nothing
outside the checkout)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shared_data import HAS_SHARED_DATA, IMAGES, MOBILE_SAM, PARITY_LINES, SHARED

INTEGRATION = Path(__file__).resolve().parent / "integration"
MISSING_DATA = (
    f"needs the test data in {SHARED} (../shared beside the checkout: the checkpoint, "
    "photos and golden files), which is not there"
)


def pytest_configure(config: pytest.Config) -> None:
    """Seed a private weights cache from ../shared so no test downloads the checkpoint.

    Set before any test runs, so `sam-batch` subprocesses and Ray workers inherit it.
    """
    if not HAS_SHARED_DATA:
        return
    cache = Path(config.rootpath) / ".pytest_cache" / "weights"
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / "mobile_sam.pt"
    if not cached.exists() or cached.stat().st_size != MOBILE_SAM.stat().st_size:
        shutil.copyfile(MOBILE_SAM, cached)
    os.environ["SAM_BATCH_CACHE"] = str(cache)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Without ../shared, tests/integration is not collected (its modules read the data as they
    load); the header and the summary say so."""
    if not HAS_SHARED_DATA and (collection_path == INTEGRATION or INTEGRATION in collection_path.parents):
        return True
    return None


def pytest_report_header(config: pytest.Config) -> str:
    return f"test data: {SHARED}" if HAS_SHARED_DATA else f"tests/integration not run: {MISSING_DATA}"


def pytest_terminal_summary(terminalreporter) -> None:
    """The parity figures per golden file, so every CI log carries them; or why the integration
    tests did not run."""
    if not HAS_SHARED_DATA:
        terminalreporter.section("integration tests not run")
        terminalreporter.write_line(f"tests/integration: {MISSING_DATA}")
    if PARITY_LINES:
        terminalreporter.section("parity with the reference generator")
        for line in PARITY_LINES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def shared_images() -> Path:
    return IMAGES


@pytest.fixture(scope="session")
def hq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vit_t_hq weights: MobileSAM's for SAM's part, seeded noise for HQ-SAM's own
    (`seeded_checkpoints.write_hq_checkpoint`)."""
    from seeded_checkpoints import write_hq_checkpoint  # torch: not for the tests that need no model

    if not HAS_SHARED_DATA:
        pytest.skip(f"test data {MOBILE_SAM} not present")
    return write_hq_checkpoint(tmp_path_factory.mktemp("hq") / "vit_t_hq.pt", MOBILE_SAM)


@pytest.fixture(scope="session")
def sam2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sam2.1_hiera_t weights in the official checkpoint's form, seeded noise with MobileSAM's
    decoder (`seeded_checkpoints.write_sam2_checkpoint`)."""
    from seeded_checkpoints import write_sam2_checkpoint  # torch: not for the tests that need no model

    if not HAS_SHARED_DATA:
        pytest.skip(f"test data {MOBILE_SAM} not present")
    return write_sam2_checkpoint(tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt", MOBILE_SAM)


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
        yield {
            "key": "testing-key",
            "secret": "testing-secret",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        }
    finally:
        server.stop()
