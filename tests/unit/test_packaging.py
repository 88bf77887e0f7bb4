"""What `pip install .` ships: the product's packages and commands, no benchmark."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

import sam_batch
from sam_batch.cli import _parser
from shared_data import REPO

PRODUCT_COMMANDS = {"run", "validate", "render", "export", "refilter", "weights", "export-onnx"}
SOURCES = ("pyproject.toml", "README.md", "sam_batch", "engines", "pipeline", "jobs", "benchmarks")


def test_the_wheel_holds_the_product_and_no_benchmark(tmp_path: Path) -> None:
    """A wheel built from a copy of the sources (benchmarks/ included beside them)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copyfile
        copy(
            REPO / name,
            source / name,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("sam_batch-*.whl")
    modules = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")]
    assert {n.split("/")[1] for n in modules if n.count("/") > 1} == {"engines", "pipeline", "jobs"}
    assert "sam_batch/cli.py" in modules and "sam_batch/jobs/runner.py" in modules
    assert not [n for n in modules if "bench" in n or n.startswith("benchmarks/")], modules


def test_help_lists_only_the_product_commands() -> None:
    commands = _parser()._subparsers._group_actions[0].choices
    assert set(commands) == PRODUCT_COMMANDS
    usage = subprocess.run(
        [sys.executable, "-m", "sam_batch.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "bench" not in usage


def test_the_version_is_the_one_pyproject_gives() -> None:
    assert sam_batch.__version__ == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_without_the_shared_data_unit_tests_run_and_the_rest_say_why(tmp_path: Path) -> None:
    """A clean clone has no ../shared: the unit tests run, tests/integration is not collected,
    and the run says so in its header and summary."""
    env = {**os.environ, "SAM_BATCH_SHARED": str(tmp_path / "no-shared")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/unit/test_nms_reference.py",
            "tests/integration",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert "integration tests not run" in done.stdout and "no-shared" in done.stdout
    assert " passed" in done.stdout.splitlines()[-1] and "error" not in done.stdout.splitlines()[-1]
