"""One thread per serving process runs every forward, with all of the process's intra-op threads;
every other thread of the process runs torch's CPU ops on one thread.

Why: torch's CPU ops run on an OpenMP team per calling thread (GNU OpenMP in the Linux wheels).
Once a second thread has run a parallel op, the process holds more OpenMP threads than the machine
has CPUs, and GNU OpenMP then lets a team's threads sleep between parallel regions instead of
spinning: every region of every later forward pays a wake-up. A replica ran forwards on whichever
thread `asyncio.to_thread` picked, and loaded, warmed up and pre-processed on others. Measured on a
2-core VM with the demo model: a single-image forward took 25 ms in such a process against 11 ms
with one team (the serving benchmark's notes have the figures).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from plantad.models.device import set_compute_threads

T = TypeVar("T")

_installed: ForwardThread | None = None
_lock = threading.Lock()


class ForwardThread:
    """The process's forward thread; build it with `install_forward_thread`."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="plantad-forward",
                                            initializer=self._initialise)
        self.ident = self._executor.submit(threading.get_ident).result()

    def _initialise(self) -> None:
        torch.set_num_threads(self.threads)
        # torch fixes a thread's own count at its first parallel op (or this query), from the
        # process-wide value; set here, before that value drops to 1 for every other thread
        torch.get_num_threads()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the forward thread, waited for (called directly when already on it)."""
        if threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        return self._executor.submit(fn, *args, **kwargs).result()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` on the forward thread, awaited from an event loop."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))


def install_forward_thread(threads: int) -> ForwardThread:
    """The process's forward thread with `threads` intra-op threads (the first call decides; later
    calls get the same thread). From then on torch runs one thread in every thread whose count is
    not yet fixed, the caller's included, and OpenVINO graphs compile for `threads`. Only for a
    serving process: a library call must not change its host's threads."""
    global _installed
    with _lock:
        if _installed is None:
            threads = max(1, int(threads))
            _installed = ForwardThread(threads)
            set_compute_threads(threads)
            torch.set_num_threads(1)
        return _installed
