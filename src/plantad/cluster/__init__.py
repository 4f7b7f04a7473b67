"""The Ray cluster a job runs on: how it is found or started (connect), what it has free and who
holds the rest (capacity), and the bound on every wait for it (watch)."""

from plantad.cluster.connect import (  # noqa: F401 (the package's API)
    LOOPBACK_ENV, SERVE_ENV, check_ray_address, cluster_address, connect, head_env, head_start_args, is_loopback,
    job_address, join, loopback_node, running_local_cluster, start_local, with_serve_env,
)
