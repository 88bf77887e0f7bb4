"""`make demo`: segment real photographs shipped inside scikit-image, then show what came out.

Writes the photos to demo-data/images/, provisions the MobileSAM weights, runs the job of
examples/demo.yaml through the same code path as `sam-batch run`, and prints a summary.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image

DEMO_JOB = Path("examples/demo.yaml")
IMAGES_DIR = Path("demo-data/images")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins")


def export_photos() -> list[Path]:
    """Save scikit-image's bundled photographs (no download) as PNG files."""
    import skimage.data

    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = IMAGES_DIR / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


def main() -> int:
    from sam_batch.cli import main as cli_main

    photos = export_photos()
    print(f"demo: {len(photos)} photographs from scikit-image in {IMAGES_DIR}/")
    if cli_main(["weights", "fetch", "vit_t"]) != 0:
        return 1
    started = time.perf_counter()
    code = cli_main(["run", str(DEMO_JOB), "--overwrite"])
    if code != 0:
        return code
    print(f"demo: wall time {time.perf_counter() - started:.1f}s")
    _print_summary()
    return 0


def _print_summary() -> None:
    import duckdb

    root = "out/demo"
    query = f"""
        SELECT i.image_uri, i.width, i.height, i.status, count(m.mask_id) AS masks,
               round(avg(m.predicted_iou), 3) AS mean_iou, max(m.area) AS largest_area
        FROM read_parquet('{root}/images/*.parquet') i
        LEFT JOIN read_parquet('{root}/masks/*.parquet') m USING (image_id)
        GROUP BY ALL ORDER BY i.image_uri
    """
    print("demo: per image, from DuckDB over the output Parquet:")
    print(duckdb.sql(query))
    print(f"demo: draw one with: .venv/bin/sam-batch render {root} {IMAGES_DIR}/astronaut.png -o astronaut.png")


if __name__ == "__main__":
    sys.exit(main())
