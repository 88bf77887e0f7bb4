"""Where the tests find their data: the checkout's tests/data, and ../shared beside the checkout
(the real checkpoint, photos and the reference's golden files), or $SAM_BATCH_SHARED."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SHARED = Path(os.environ.get("SAM_BATCH_SHARED", REPO.parent / "shared"))
IMAGES = SHARED / "data" / "images"
GOLDEN = SHARED / "golden"
MOBILE_SAM = SHARED / "models" / "mobile_sam.pt"
HAS_SHARED_DATA = MOBILE_SAM.exists()
PARITY_LINES: list[str] = []  # filled by the parity tests, printed at the end of the run


def load_golden(name: str) -> dict:
    """A golden file with its `segmentation`, `bbox`, ... parsed into Python values."""
    from benchmarks.reference import read_golden

    return read_golden(GOLDEN / name)


def golden_files() -> list[str]:
    """Every golden file, named relative to GOLDEN (`extra/…` for those in its extra/)."""
    return sorted(str(p.relative_to(GOLDEN)) for p in [*GOLDEN.glob("*.json"), *GOLDEN.glob("extra/*.json")])
