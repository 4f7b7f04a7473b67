"""A bound on every wait for the cluster: a job that makes no progress for `ray.stall_timeout_s`
fails with a message that says what it waited for, instead of waiting forever.

Ray Train and Ray Data wait without a bound for resources, a worker or a dataset block (their
tasks stay pending, their warnings scroll by). Progress here is what the job itself sees: a
scored batch arriving at the driver (`watched_iter`), or a beat that a Ray Train worker sends at
its start, at each dataset batch and each step (`ProgressBoard`, read by `run_watched`).

The watched work runs in a thread. A job that gives up stops that thread before it raises
(`stop_thread`): left running, it goes on calling into Ray while the process exits and Ray
shuts down, so Ray reconnects from it, prints tracebacks after the job's error, and the process
can die of SIGSEGV instead of exiting with its own status.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


STOP_S = 15.0  # how long a job that gives up waits for its work thread to unwind


class StallError(TimeoutError):
    """A job made no progress for its bound; the message names what it waited for."""


class WorkStopped(BaseException):
    """Raised inside a work thread that its job gave up on. A BaseException, as Ctrl-C is: the
    library code the thread runs unwinds as it does on an interrupt (Ray Data's iterators shut
    their executor down on any BaseException)."""


def stop_thread(thread: threading.Thread, bound_s: float = STOP_S, drain: Callable[[], None] = lambda: None) -> bool:
    """Raise WorkStopped in `thread` and wait up to `bound_s` for it to end; whether it ended.

    The exception lands when the thread next runs Python code (Ray Data's waits poll every 10 ms);
    a thread blocked in one long C call is left running, with a warning. `drain` runs while waiting
    (it empties a queue the thread may be blocked on)."""
    if not thread.is_alive():
        return True
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(WorkStopped))
    deadline = time.monotonic() + bound_s
    while thread.is_alive() and time.monotonic() < deadline:
        drain()
        thread.join(0.05)
    if thread.is_alive():
        log.warning("the thread '%s' did not stop within %g s of its job giving up", thread.name, bound_s)
        return False
    return True


def work_thread(name: str, body: Callable[[], None], on_error: Callable[[BaseException], None]) -> threading.Thread:
    """A started daemon thread running body(); its exception goes to on_error, except WorkStopped:
    the job that stopped it reads nothing more from it."""

    def run() -> None:
        try:
            body()
        except WorkStopped:
            return
        except BaseException as exc:
            with suppress(WorkStopped):
                on_error(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def drain_queue(box: queue.Queue) -> None:
    try:
        while True:
            box.get_nowait()
    except queue.Empty:
        pass


def watched_iter(items: Callable[[], Iterable[T]], stall_s: float, waiting_for: Callable[[], str],
                 what: str) -> Iterator[T]:
    """The items of `items()`, called and iterated in a daemon thread (Ray Data's iterators block in
    the call already); StallError when none arrives for `stall_s` (the time the consumer spends on an
    item does not count). `what` names the items. Close the iterator when the consumer stops early
    (`contextlib.closing`): a stall, a consumer's error or a close stops the thread."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)

    def produce() -> None:
        for item in items():
            box.put(("item", item))
        box.put(("end", None))

    # an error is handed to the consumer, which raises it
    producer = work_thread(f"watched {what}", produce, lambda exc: box.put(("error", exc)))
    count, ended = 0, False
    try:
        while True:
            try:
                kind, value = box.get(timeout=stall_s)
            except queue.Empty:
                raise StallError(f"no {what} for {stall_s:g} s (ray.stall_timeout_s) after {count}: "
                                 f"{waiting_for()}") from None
            if kind in ("end", "error"):
                ended = True
            if kind == "end":
                return
            if kind == "error":
                raise value
            count += 1
            yield value
    finally:
        if ended:  # the producer is returning by itself
            producer.join(STOP_S)
        else:
            stop_thread(producer, drain=lambda: drain_queue(box))


class ProgressBoard:
    """The newest beat of each participant (a Ray actor of 0 CPUs: it must never wait for resources)."""

    def __init__(self) -> None:
        self.beats: dict[str, tuple[float, str]] = {}

    def beat(self, who: str, what: str) -> None:
        self.beats[who] = (time.time(), what)

    def clear(self) -> None:
        """Forget every beat (a restarted run counts its quiet time from its own start)."""
        self.beats = {}

    def read(self) -> tuple[float, dict[str, tuple[float, str]]]:
        """(now, {who: (time, what)}) on the board's clock."""
        return time.time(), dict(self.beats)


def start_board():
    """A ProgressBoard actor of this job (it ends with the job), on the driver's node: a 0-CPU actor
    may land on any node, and losing a worker node must not take the board (and the run) with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_concurrency=4)(ProgressBoard).options(scheduling_strategy=here).remote()


class Beat:
    """A worker's beats to the board, at most one per `every_s` unless forced; no board, no beats."""

    def __init__(self, board, who: str, every_s: float = 1.0) -> None:
        self.board, self.who, self.every_s, self.sent = board, who, every_s, 0.0

    def __call__(self, what: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.board is not None and (force or now - self.sent >= self.every_s):
            self.board.beat.remote(self.who, what)  # fire and forget: never waits on the board
            self.sent = now


def run_watched(work: Callable[[], T], board, stall_s: float, waiting_for: Callable[[dict], str],
                abort: Callable[[], None], poll_s: float = 1.0) -> T:
    """work() in a daemon thread; StallError when no participant beat the board for `stall_s`
    (counted from the start until the first beat). Before raising, `abort()` ends the work's Ray side
    and the thread is stopped.
    `waiting_for(beats)` says what was awaited, from the last beats {who: (age_s, what)}."""
    import ray

    done: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)

    worker = work_thread("watched work", lambda: done.put(("ok", work())), lambda exc: done.put(("error", exc)))
    started = time.time()
    while True:
        try:
            kind, value = done.get(timeout=poll_s)
        except queue.Empty:
            now, beats = ray.get(board.read.remote(), timeout=30)
            ages = {who: (now - at, what) for who, (at, what) in beats.items()}
            quiet = min([age for age, _ in ages.values()], default=time.time() - started)
            if quiet < stall_s:
                continue
            message = f"no progress for {quiet:.0f} s (ray.stall_timeout_s={stall_s:g}): {waiting_for(ages)}"
            try:
                abort()
            except Exception as exc:  # the stall is the error to report; the abort's is secondary
                log.warning("could not abort the stalled run: %s", exc)
            stop_thread(worker, drain=lambda: drain_queue(done))
            raise StallError(message)
        if kind == "error":
            raise value
        return value
