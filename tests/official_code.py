"""Running official model code that lives in the reference environment (`.venv-ref`, `make
bench-env`) for the parity tests: whether it can run here, and a script of `tests/reference/`
run there. The scripts write what the tests compare against (`reference_cases`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from shared_data import REPO

REFERENCE_PYTHON = REPO / ".venv-ref" / "bin" / "python"
OFFICIAL_TIMEOUT_S = 1800  # one official script: two photos through a CPU model, generator included


def missing_reference(package: str) -> str | None:
    """Why `package` cannot run in the reference environment here, or None when it can."""
    if not REFERENCE_PYTHON.exists():
        return f"reference environment {REFERENCE_PYTHON.parent.parent} not present (make bench-env)"
    probe = subprocess.run([str(REFERENCE_PYTHON), "-c", f"import {package}"], capture_output=True, timeout=120)
    if probe.returncode != 0:
        return f"{package} is not installed in .venv-ref (make bench-env)"
    return None


def run_official(script: str, *args: str) -> None:
    """`tests/reference/<script>` with `args` in the reference environment, from the repository root."""
    command = [str(REFERENCE_PYTHON), str(REPO / "tests" / "reference" / script), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=OFFICIAL_TIMEOUT_S, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """|ours - theirs| / |theirs| over the whole tensor, in float64."""
    return float((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp(min=1e-30))


def as_batch(prompt: np.ndarray | None) -> np.ndarray | None:
    """One prompt's array as a batch of one."""
    return None if prompt is None else prompt[None]


def image_args(images: list[Path]) -> list[str]:
    """`--image PATH` for each image."""
    return [arg for path in images for arg in ("--image", str(path))]
