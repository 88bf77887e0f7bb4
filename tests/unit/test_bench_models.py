"""`benchmarks.models` without the reference environment: one line naming what to run, exit 1.
No timed assertions (the bench itself: `make bench-models`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.models import main


def test_a_missing_reference_environment_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--ref-venv", str(tmp_path / ".venv-ref")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make bench-env" in err and ".venv-ref" in err
