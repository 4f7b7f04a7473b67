"""One bulk scoring run at a time per output table: a lock object beside the table's parts.

Creating the lock is atomic: an S3 `PutObject` with `If-None-Match: *` (the store refuses it when
the object exists), or locally a hard link of a fully written temporary file (`link` fails when the
name exists). The holder rewrites its lock every `bulk.lock_stale_s / 4` s (a heartbeat) and checks
it still owns it before each part commit. A lock is stale, and taken over with a warning, when its
heartbeat is older than `bulk.lock_stale_s`, or at once when it names a process of this host that
has ended (a killed driver). Taking over is read, delete, create: the create is atomic, so of two
runs that find the same stale lock at most one gets it.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from plantad.config import S3Config
from plantad.storage import Location, delete, read_bytes, write_atomic
from plantad.tracking.s3 import StorageError, endpoint_name, s3_client

log = logging.getLogger(__name__)
LOCK = "run.lock"
TAKE_TRIES = 3


class LockHeld(RuntimeError):
    """Another bulk scoring run holds (or took over) the output's lock."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    started_at: float  # time.time()
    heartbeat_at: float

    def text(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started_at, timezone.utc).isoformat(timespec="seconds")
        return (f"run {self.run_id} (pid {self.pid} on {self.host}, started {started}, last heartbeat "
                f"{max(0.0, now - self.heartbeat_at):.0f} s ago)")

    def body(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def _pid_ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    return False


def is_stale(holder: Holder, now: float, stale_s: float) -> bool:
    """The heartbeat is older than `stale_s`, or the holder is a process of this host that has ended."""
    if holder.host == socket.gethostname() and _pid_ended(holder.pid):
        return True
    return now - holder.heartbeat_at > stale_s


def _s3_bucket_key(out: Location, rel: str) -> tuple[str, str]:
    bucket, _, key = out.path(rel).partition("/")
    return bucket, key


def create_exclusive(out: Location, rel: str, data: bytes, s3: S3Config) -> bool:
    """Write `rel` only if it does not exist, atomically; False when it exists."""
    if out.is_s3:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _s3_bucket_key(out, rel)
        try:
            s3_client(s3).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            if code in ("NotImplemented", "501"):
                raise StorageError(f"the S3 endpoint {endpoint_name(s3)} does not support conditional writes "
                                   f"(If-None-Match), which the run lock {out.display(rel)} needs") from exc
            raise StorageError(f"cannot create {out.display(rel)} at {endpoint_name(s3)}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot create {out.display(rel)} at {endpoint_name(s3)}: {exc}") from exc
        return True
    target = out.path(rel)
    os.makedirs(posixpath.dirname(target), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(target), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, target)  # atomic, and fails when `target` exists: readers never see a partial lock
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def read_holder(out: Location) -> Holder | None:
    """The lock's holder; None when there is no lock. Every writer writes a lock whole, so one that
    does not parse was damaged by something else: it reads as a holder without a heartbeat (stale)."""
    try:
        raw = read_bytes(out, LOCK)
    except FileNotFoundError:
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return Holder("unreadable", "unknown", -1, 0.0, 0.0)


class RunLock:
    """The lock one run holds on `out`; `check()` raises once another run has taken it over."""

    def __init__(self, out: Location, holder: Holder) -> None:
        self.out, self.holder = out, holder
        self._lost: str | None = None

    def check(self) -> None:
        if self._lost:
            raise LockHeld(self._lost)

    def heartbeat(self) -> None:
        """Rewrite the lock with a new time, unless another run holds it now."""
        now = time.time()
        current = read_holder(self.out)
        if current is None or current.run_id != self.holder.run_id:
            self._lost = (f"the lock {self.out.display(LOCK)} of run {self.holder.run_id} was taken over by "
                          + (current.text(now) if current else "nobody (it was deleted)")
                          + "; this run stops before committing more parts: re-run when that run has finished")
            return
        self.holder = Holder(**{**asdict(self.holder), "heartbeat_at": now})
        write_atomic(self.out, LOCK, self.holder.body())

    def release(self) -> None:
        current = read_holder(self.out)
        if current is not None and current.run_id == self.holder.run_id:
            delete(self.out, LOCK)


def acquire(out: Location, s3: S3Config, stale_s: float) -> RunLock:
    """The output's lock for this run, or LockHeld naming the run that holds it."""
    for _ in range(TAKE_TRIES):
        now = time.time()
        mine = Holder(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), now, now)
        if create_exclusive(out, LOCK, mine.body(), s3):
            return RunLock(out, mine)
        holder = read_holder(out)
        if holder is None:  # released between our create and our read
            continue
        if not is_stale(holder, now, stale_s):
            raise LockHeld(
                f"{out.display(LOCK)} is held by {holder.text(now)}: another bulk scoring run is writing "
                f"{out.uri}. Wait for it to finish; a lock is stale (taken over) after bulk.lock_stale_s="
                f"{stale_s:g} s without a heartbeat, or at once when its process on this host has ended")
        log.warning("taking over the stale lock %s of %s", out.display(LOCK), holder.text(now))
        delete(out, LOCK)
    raise LockHeld(f"{out.display(LOCK)}: another run took the lock each of {TAKE_TRIES} times; try again")


@contextmanager
def held_lock(out: Location, s3: S3Config, stale_s: float) -> Iterator[RunLock]:
    """Hold the output's lock for the block, with a heartbeat thread; released on any exit."""
    lock = acquire(out, s3, stale_s)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(stale_s / 4):
            try:
                lock.heartbeat()
            except (OSError, StorageError) as exc:  # a storage hiccup: the next beat tries again
                log.warning("heartbeat of %s failed: %s", out.display(LOCK), exc)

    thread = threading.Thread(target=beat, name="bulk-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield lock
    finally:
        stop.set()
        thread.join(timeout=30)
        lock.release()

