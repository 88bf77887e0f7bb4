"""`python -m benchmarks.prompts` without the reference environment or the model: the seeded
boxes, the cases (photos cycled as links of their own), the table's rates and NOT VALID, and
the one-line refusal when `.venv-ref` is missing. No timed assertions."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.prompts import Case, CaseResult, format_table, main, make_cases, random_boxes


def test_boxes_are_seeded_whole_pixels_inside_the_image() -> None:
    boxes = random_boxes(np.random.default_rng(3), 800, 534, 200)
    assert boxes == random_boxes(np.random.default_rng(3), 800, 534, 200)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 800 and 0 <= y0 < y1 <= 534
        assert all(float(v).is_integer() for v in (x0, y0, x1, y1))


def test_many_images_cycle_the_photos_as_links_of_their_own(tmp_path: Path) -> None:
    photos = []
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 50))):
        Image.new("RGB", size).save(tmp_path / name)
        photos.append(str(tmp_path / name))
    (tmp_path / "links").mkdir()
    args = argparse.Namespace(seed=1, one_image=photos[0], boxes=7, photos=photos, n_images=5, per_image=3)
    one, many = make_cases(args, tmp_path / "links")
    assert (one.n_prompts, len(one.images)) == (7, 1)
    assert (many.n_prompts, len(many.images)) == (15, 5)
    links = [Path(path) for path, _ in many.images]
    assert len(set(links)) == 5 and [p.resolve().name for p in links] == ["a.png", "b.png"] * 2 + ["a.png"]
    assert all(box[2] <= 20 and box[3] <= 50 for _, boxes in many.images[1::2] for box in boxes)


def test_the_table_gives_prompts_per_second_and_flags_a_loaded_case() -> None:
    case = Case("one image", [("x.jpg", [[0.0, 0.0, 1.0, 1.0]] * 100)])
    quiet = CaseResult(case, 10.0, 12.0, 2.0, 4.0, 1.5, 2e-6)
    loaded = CaseResult(case, 10.0, 12.0, 2.0, 4.0, 3.5, 2e-6)
    table = format_table([quiet, loaded], threads=2)
    rows = table.splitlines()[2:]
    assert "| one image | 100 | 1 | 10.0 | 10.0 | 2.0 | 50.0 | 5.00× | 4.0 | 25.0 | 12.0 | 8.3 |" in rows[0]
    assert "NOT VALID" not in rows[0] and "5.00× NOT VALID" in rows[1]


def test_a_missing_reference_environment_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--ref-venv", str(tmp_path / "none")]) == 1
    assert "run `make bench-env` first" in capsys.readouterr().err
