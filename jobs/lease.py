"""One run at a time on an output: a lease at `<output.uri>/_sam_batch/lease.json`.

A run takes the lease before it touches the output (plan, `--overwrite`, the clean-up of
attempts and of data files a killed commit left without a marker) and gives it back at its end;
while it runs, a thread renews it every `LEASE_RENEW_S`. A second run on the same output is
refused with one line naming the holder. A lease is stale, and taken over, when it has not been
renewed for `LEASE_TTL_S` by the clocks of the holder and the reader (hosts whose clocks differ
by more than that misjudge it), or at once when its holder was a process of this machine (same
boot, same process namespace) that no longer exists (a killed driver); `--force` takes it
whatever its state, for a holder known to be dead elsewhere. A run whose lease another run took
fails at its next event.

The lease file is created only if absent (`open(..., "xb")`) and read back; a run first checks
that the output's store creates so (`OutputDataset.check_exclusive_create`) and refuses one
that does not (s3fs 0.4 on S3, whose "xb" overwrites).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

from sam_batch.jobs.dataset import BOOKKEEPING, LEASE_FILE, OutputDataset

LEASE_TTL_S = 60.0  # a lease not renewed for this long is a dead run's
LEASE_RENEW_S = 10.0  # how often a running job renews its lease
UNREADABLE = "unreadable"  # the run id of a lease file that is not (yet) valid JSON
UNREADABLE_GRACE_S = 1.0  # an unreadable lease is read once more after this, then taken over

log = logging.getLogger("sam_batch")


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a run id, its machine (host name, boot id and process namespace, so
    that containers sharing a host name are told apart), process id and the process's start
    (so a reused process id is not taken for the holder), and when it last renewed (seconds
    since the epoch)."""

    run_id: str
    host: str
    machine: str | None
    pid: int
    process_start: str | None
    renewed: float

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        """A holder from a lease file's bytes, unknown keys left out; `ValueError` if it is not one."""
        fields = json.loads(data)
        try:
            return cls(
                str(fields["run_id"]),
                str(fields["host"]),
                fields.get("machine"),
                int(fields["pid"]),
                fields.get("process_start"),
                float(fields["renewed"]),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a lease ({error})") from None

    def is_gone(self, now: float) -> bool:
        """Whether the holder is certainly not running: not renewed for `LEASE_TTL_S`, or a
        process of this machine that no longer exists."""
        if now - self.renewed > LEASE_TTL_S:
            return True
        same_machine = self.host == socket.gethostname() and self.machine is not None and self.machine == _machine()
        return same_machine and _process_start(self.pid) != self.process_start


class OutputLease:
    """The lease of one output for this run; a context manager (`acquire` ... `release`)."""

    def __init__(self, dataset: OutputDataset, force: bool = False) -> None:
        self.dataset = dataset
        self.force = force
        self.path = dataset.path(BOOKKEEPING, LEASE_FILE)
        self.me = Holder(
            uuid.uuid4().hex, socket.gethostname(), _machine(), os.getpid(), _process_start(os.getpid()), 0.0
        )
        self.lost = False  # set when another run took the lease while this one held it
        self._written: Holder | None = None  # the lease as this run last wrote it
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, over a stale one or with `force`; `LeaseHeld` while another run holds it."""
        fs = self.dataset.fs
        fs.makedirs(self.dataset.path(BOOKKEEPING), exist_ok=True)
        if not self._create():
            holder = self._read()
            if holder is not None and holder.run_id == UNREADABLE:  # perhaps being written this instant
                time.sleep(UNREADABLE_GRACE_S)
                holder = self._read()
            if holder is not None and not self.force and not holder.is_gone(time.time()):
                age = time.time() - holder.renewed
                raise LeaseHeld(
                    f"{self.dataset.uri} is being written by another run (process {holder.pid} on "
                    f"{holder.host}, lease renewed {age:.0f} s ago); wait for it to end, or pass --force "
                    "if that run is dead"
                )
            why = "--force" if self.force else "its holder is gone"
            log.warning("%s: taking over the lease of a previous run (%s)", self.dataset.uri, why)
            if self._read() == holder:  # not renewed or taken meanwhile
                self._remove()
            if not self._create():
                raise LeaseHeld(f"{self.dataset.uri}: another run took the lease at the same moment; try again")
        if self._read() != self._written:
            raise LeaseHeld(f"{self.dataset.uri}: another run took the lease at the same moment; try again")
        self._renewer = threading.Thread(target=self._renew_until_released, name="sam-batch-lease", daemon=True)
        self._renewer.start()

    @property
    def run_id(self) -> str:
        """This run's id, as its lease names it."""
        return self.me.run_id

    def holder_run_id(self) -> str | None:
        """The run id the output's lease names now (this run's while it holds it), None if there
        is no lease."""
        holder = self._read()
        return None if holder is None else holder.run_id

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still this run's. Never raises: a
        lease left behind is taken over later, and the run's own outcome stands."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()  # a renewal under way ends before the lease is removed
        try:
            holder = self._read()
            if holder is not None and holder.run_id == self.me.run_id:
                self._remove()
        except Exception as error:  # noqa: BLE001
            log.warning(
                "%s: the lease could not be removed (%s); the next run takes it over",
                self.dataset.uri,
                type(error).__name__,
            )

    def _renew_until_released(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                holder = self._read()
                if holder is not None and holder.run_id not in (self.me.run_id, UNREADABLE):
                    self.lost = True
                    log.error("%s: this run's lease was taken over by another run", self.dataset.uri)
                    return
                self._write("wb")
            except Exception as error:  # noqa: BLE001 - a failed renewal is tried again at the next tick
                log.warning("%s: the lease could not be renewed (%s)", self.dataset.uri, type(error).__name__)

    def _create(self) -> bool:
        try:
            self._write("xb")
        except FileExistsError:
            return False
        return True

    def _write(self, mode: str) -> None:
        """Write the lease, renewed now: created only if absent ("xb"), or replaced whole by a
        rename ("wb"), so that no reader sees it half-written."""
        self._written = replace(self.me, renewed=time.time())
        body = json.dumps(asdict(self._written)).encode("utf-8")
        target = self.path if mode == "xb" else f"{self.path}.{self.me.run_id}"
        with self.dataset.fs.open(target, mode) as f:
            f.write(body)
        if target != self.path:
            self.dataset.fs.mv(target, self.path)

    def _read(self) -> Holder | None:
        try:
            return Holder.from_json(self.dataset.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a half-written or foreign file: not a live holder
            return Holder(UNREADABLE, "", None, 0, None, 0.0)

    def _remove(self) -> None:
        try:
            self.dataset.fs.rm(self.path)
        except FileNotFoundError:
            pass


def _machine() -> str | None:
    """This boot of this machine and this process namespace (Linux), None where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (Linux: /proc/PID/stat's field 22, in clock ticks since
    boot), 'alive' where that cannot be read but the process exists, None if it does not."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it exists
        pass
    return "alive"
