"""Keep library chatter out of what a person reads: a stage's output, the CLI's, the main job's.

Ray and MLflow print INFO lines, progress bars and internal warnings that look like problems to
a newcomer (a C++ "E" line about an internal actor, deprecation notices raised inside Ray Data).
Every entry point calls `quiet_library_logs()` first; each setting is a default that an
environment variable set by the user overrides. Ray's own log files keep everything.

One line escapes all of that: the driver's C++ core worker writes its error-level lines straight to
the process's stderr (no log file, no level below ERROR that would keep real errors), and Ray Data
makes it write one for every actor pool it starts (ray#53727: its actors' constructor arguments live
in the object store). The bulk scoring entry points run inside `skip_driver_lines()`, which drops
that line and nothing else.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

# lines the Ray driver would copy from the cluster's processes, none of them about the user's job:
# an internal Ray Train actor's restart caveat (ray#53727), Ray-internal deprecation warnings, Ray
# Data's hint about the progress bars we turned off, and Ray Train's echo of every report
RAY_LINES_TO_SKIP = "|".join([
    r"core_worker\.cc.*PreemptionWatcher",
    r"RayDeprecationWarning",
    r"self\.exclude_resources = exclude_resources",
    r"Progress bars disabled\. To enable",
    r"Reporting training result \d+: TrainingReport",
])

DEFAULTS = {
    "RAY_DEDUP_LOGS_SKIP_REGEX": RAY_LINES_TO_SKIP,  # read when ray is imported
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # read when mlflow is imported
    # the driver's own Ray Data lines (a dataset's start, plan and end when the train stage caches
    # the shards); read when ray.data configures its loggers
    "RAY_DATA_LOG_LEVEL": "WARNING",
}

# applied in every Ray worker of our jobs (runtime_env): Ray Data's per-epoch execution notices
RAY_WORKER_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING"}


def quiet_library_logs() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    # mlflow may be imported already, its level then set from the environment of that moment
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    # plantad turns Ray's token auth on itself (plantad.cluster) and the README documents it; Ray's
    # "set RAY_AUTH_MODE=disabled to opt out" notice at every ray.init reads like a problem
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # httpx logs every request at INFO: a CLI command's own answer would drown in them
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # we turn Ray Data's progress bars off on purpose; its warning saying so reads like a problem
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


# the driver's own C++ lines that are not about the user's job, matched whole: Ray Data's actor pools
# always pass their constructor arguments through the object store and always allow restarts
DRIVER_LINES_TO_SKIP = re.compile(
    rb"^\[[^\]]*\] core_worker\.cc:\d+: Actor with class name: 'MapWorker\(MapBatches\([A-Za-z_]\w*\)\)' and ID: "
    rb"'[0-9a-f]+' has constructor arguments in the object store and max_restarts > 0\..*ray-project/ray/issues/53727")


@contextmanager
def skip_driver_lines(pattern: re.Pattern[bytes] = DRIVER_LINES_TO_SKIP) -> Iterator[None]:
    """Route this process's stderr (fd 2) through a thread that drops the whole lines matching
    `pattern`; everything else goes out as it comes, in order. Unfinished text goes out at once
    (a progress bar's updates) unless it could begin a C++ log line (`[`)."""
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, real, pattern), name="stderr filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's only write end closes: the pump reads to its end
        pump.join(5.0)
        if not pump.is_alive():  # else it still writes to `real`: leave it open
            os.close(real)


def _pump(src: int, dst: int, pattern: re.Pattern[bytes]) -> None:
    pending = b""
    try:
        while chunk := os.read(src, 65536):
            pending += chunk
            cut = pending.rfind(b"\n") + 1
            lines, pending = pending[:cut], pending[cut:]
            out = b"".join(line for line in lines.splitlines(keepends=True) if not pattern.search(line))
            if pending and not pending.startswith(b"["):
                out, pending = out + pending, b""
            _write_all(dst, out)
        _write_all(dst, pending)
    except Exception:  # never lose what follows: copy the rest unfiltered
        with suppress(OSError):
            _write_all(dst, pending)
            while chunk := os.read(src, 65536):
                _write_all(dst, chunk)
    finally:
        os.close(src)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
