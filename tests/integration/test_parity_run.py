"""`sam-batch run` gives the reference generator's masks for photos, large ones included.

A photo is segmented whole by default (`raster.tiling: auto`), resized to 1024 as the reference
does, however many pixels it has: truck.jpg (1800 x 1200) and app_assets_picture4.jpg
(2048 x 1365) through a real run on Ray's segmenting actors (`run.executor: ray`) are
strict-equal to their golden files. Held-out photos that
none of the rest of the project was tuned on (tests/data/held_out, from scikit-image, with the
reference's masks made by tests/data/make_held_out_reference.py) agree at recall and precision
of at least 0.99 at IoU 0.9, the 1120 x 1400 mosaic included, through the default executor
(`auto`: in process for so few images).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_run_end_to_end import sam_batch, write_job

from benchmarks.reference import agreement
from parity import KNOWN_PIXEL_DIFFERENCES, strict_differences
from shared_data import IMAGES, PARITY_LINES, TEST_DATA, load_golden

HELD_OUT = TEST_DATA / "held_out"
LARGE_PHOTOS = {
    "truck.jpg": "truck.jpg.pps32.crop0.minarea0.json",
    "app_assets_picture4.jpg": "app_assets_picture4.jpg.pps32.crop0.minarea0.json",
}
MIN_HELD_OUT_AGREEMENT = 0.99

pytestmark = pytest.mark.slow


def records_by_image(out: Path) -> dict[str, list[dict]]:
    """The masks table as reference-style records, per image file name, in mask_id order."""
    rows = sorted(pq.read_table(out / "masks").to_pylist(), key=lambda r: (r["image_uri"], r["mask_id"]))
    found: dict[str, list[dict]] = {}
    for row in rows:
        found.setdefault(Path(row["image_uri"]).name, []).append(
            {
                **row,
                "segmentation": {"size": list(row["segmentation"]["size"]), "counts": row["segmentation"]["counts"]},
            }
        )
    return found


def test_large_photos_are_segmented_whole_as_the_reference_does(tmp_path) -> None:
    out = tmp_path / "out"
    job = write_job(
        tmp_path, "large-photos", [str(IMAGES / name) for name in LARGE_PHOTOS], out, run={"executor": "ray"}
    )
    sam_batch("run", str(job))
    images = {Path(r["image_uri"]).name: r for r in pq.read_table(out / "images").to_pylist()}
    assert (images["truck.jpg"]["width"], images["truck.jpg"]["height"]) == (1800, 1200)
    ours = records_by_image(out)
    for name, golden_name in LARGE_PHOTOS.items():
        reference = load_golden(golden_name)["masks"]
        differences = strict_differences(ours[name], reference, KNOWN_PIXEL_DIFFERENCES.get(golden_name))
        PARITY_LINES.append(
            f"sam-batch run {golden_name}: ours {len(ours[name])} reference {len(reference)}, "
            f"{'strict-equal' if not differences else differences[:3]}"
        )
        assert not differences, (name, differences[:10])
        assert all(r["crop_box"] == [0, 0, images[name]["width"], images[name]["height"]] for r in ours[name])


def test_held_out_photos_agree_with_the_reference(tmp_path) -> None:
    references = {
        path.name.removesuffix(".json"): json.loads(path.read_text()) for path in sorted(HELD_OUT.glob("*.png.json"))
    }
    assert len(references) >= 4 and any(max(r["shape"][:2]) > 1024 for r in references.values())
    params = next(iter(references.values()))["params"]
    assert all(r["params"] == params for r in references.values())
    out = tmp_path / "out"
    job = write_job(tmp_path, "held-out", [str(HELD_OUT / name) for name in references], out, amg=params)
    sam_batch("run", str(job))
    ours = records_by_image(out)
    for name, reference in references.items():
        found = agreement(ours.get(name, []), reference["masks"])
        strict = not strict_differences(ours.get(name, []), reference["masks"])
        PARITY_LINES.append(
            f"held out {name} ({reference['shape'][1]}x{reference['shape'][0]}): ours {len(ours.get(name, []))} "
            f"reference {len(reference['masks'])}, recall {found.recall:.3f} precision {found.precision:.3f}"
            f"{', strict-equal' if strict else ''}"
        )
        assert found.recall >= MIN_HELD_OUT_AGREEMENT and found.precision >= MIN_HELD_OUT_AGREEMENT, name
