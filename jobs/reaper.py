"""Ends what is left of a run's embedded Ray once the run's driver is gone, however it went.

    python -m sam_batch.jobs.reaper PID [PID ...]

The driver starts this right after Ray, with the pids of Ray's own processes (its children)
and a pipe on stdin whose write end only the driver holds: the pipe reads end-of-file when the
driver ends (SIGKILL included) or closes it after shutting Ray down. The reaper notes each
process descended from those pids (the raylet's agents and workers), says so on stdout
(`WATCHING`, which the driver waits for), and notes them again every `POLL_S` until then; then
it kills every process noted that still runs and waits for it to exit. It never
signals a process it did not see descend from the pids given (psutil checks that a pid was not
reused), nor one of those pids that was not a child of the driver when the reaper started.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections import defaultdict

import psutil

POLL_S = 2.0  # seconds between two looks for the processes Ray has started
EXIT_WAIT_S = 10.0  # seconds to wait for the processes killed to exit
EXIT_POLL_S = 0.05  # seconds between two looks at whether they have
READ_BYTES = 4096  # what one read of the pipe takes (the driver writes nothing: only its end counts)
WATCHING = "watching"  # the line written on stdout once the processes Ray has started so far are noted


def main(argv: list[str]) -> int:
    """Watch the processes `argv` names (pids) and their descendants until stdin ends; kill them."""
    roots = _children_of_driver(int(pid) for pid in argv)
    noted = set(roots) | set(_descendants(roots))
    print(WATCHING, flush=True)  # the driver waits for this line: from now on, a death here is seen
    while not _ended(sys.stdin.fileno(), POLL_S):
        noted.update(_descendants(roots))
    left = [process for process in noted if _running(process)]
    for process in left:
        try:
            process.kill()
        except psutil.Error:  # gone meanwhile (or reused, which psutil refuses to signal)
            continue
    deadline = time.monotonic() + EXIT_WAIT_S
    while any(_running(process) for process in left) and time.monotonic() < deadline:
        time.sleep(EXIT_POLL_S)
    return 0


def _children_of_driver(pids) -> list[psutil.Process]:
    """The processes of `pids` whose parent is the driver (this process's parent)."""
    driver = os.getppid()
    roots = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.ppid() == driver:
                roots.append(process)
        except psutil.Error:
            continue
    return roots


def _ended(fd: int, timeout_s: float) -> bool:
    """Whether the pipe `fd` reads end-of-file within `timeout_s` seconds."""
    readable, _, _ = select.select([fd], [], [], timeout_s)
    return bool(readable) and not os.read(fd, READ_BYTES)


def _descendants(roots: list[psutil.Process]) -> list[psutil.Process]:
    """Every running process descended from `roots` (one pass over the process table)."""
    children: defaultdict[int, list[psutil.Process]] = defaultdict(list)
    for process in psutil.process_iter(["ppid"]):
        children[process.info["ppid"]].append(process)
    found: list[psutil.Process] = []
    stack = [root.pid for root in roots if _running(root)]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child.pid)
    return found


def _running(process: psutil.Process) -> bool:
    """Still the same process and not a zombie (a zombie has exited: only its status is left)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
