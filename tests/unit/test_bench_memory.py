"""`python -m benchmarks.ray_memory`'s process sampler on a real process tree (no Ray needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.ray_memory import DRIVER, TreeSampler


def test_sampler_finds_the_tree_and_names_processes_by_their_latest_command(tmp_path: Path) -> None:
    """A child seen before its exec would carry its parent's command line; sampling again names it."""
    raylet = tmp_path / "raylet"
    raylet.symlink_to(shutil.which("sleep"))
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, time; subprocess.Popen([{str(raylet)!r}, '30']); time.sleep(30)"]
    )
    try:
        sampler = TreeSampler(parent.pid, interval=0.05)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(sampler.peaks) < 2:
            sampler.sample()
            time.sleep(0.05)
        child = next(p for pid, p in sampler.peaks.items() if pid != parent.pid)
        child.command = sampler.peaks[parent.pid].command  # as if first seen between fork and exec
        sampler.sample()
        kinds = {p.kind for p in sampler.peaks.values()}
        assert kinds == {DRIVER, "raylet"}
        assert all(p.peak_rss > 0 for p in sampler.peaks.values())
    finally:
        for process in TreeSampler(parent.pid, 1).driver.children(recursive=True):
            process.kill()
        parent.kill()
