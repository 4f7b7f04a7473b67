"""Keep library chatter out of what a person reads: a stage's output, the CLI's, the main job's.

Ray and MLflow print INFO lines, progress bars and internal warnings that look like problems to
a newcomer (a C++ "E" line about an internal actor, deprecation notices raised inside Ray Data).
Every entry point calls `quiet_library_logs()` first; each setting is a default that an
environment variable set by the user overrides. Ray's own log files keep everything.
"""

from __future__ import annotations

import logging
import os

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
