"""The training images as a Ray Data pipeline over the shard set, readable from any node.

Every task reserves `ray.data_cpus`, the share that the run's CPU budget keeps free beside its
workers (plantad.cluster.capacity): a task asking for a whole CPU would wait forever on a cluster
whose CPUs the workers and the endpoint's replicas hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from plantad.cluster.watch import watched_iter
from plantad.config import S3Config
from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.data.shards import IMAGE_COLUMN, ShardSet, shard_location, verified_image

DECODE_ROWS = 16  # rows per Ray Data decoding task: a shard is split so that decoding runs in parallel


def decode_batch(batch: dict[str, np.ndarray], image_size: int, folder: str) -> dict[str, np.ndarray]:
    """Ray Data map: shard rows (path, sha256, image bytes) -> normalised image arrays (B, 3, S, S)."""
    transform = ImageTransform(image_size)
    images = [transform(decode_image_bytes(verified_image(p, h, b, folder), p)).numpy()
              for p, h, b in zip(batch["path"], batch["sha256"], batch[IMAGE_COLUMN])]
    if not images:
        return {"image": np.zeros((0, 3, image_size, image_size), np.float32)}
    return {"image": np.stack(images).astype(np.float32)}


def image_dataset(shards: ShardSet, s3: S3Config, rows: pd.DataFrame, image_size: int, task_cpus: float,
                  cache: bool = True, stall_s: float = 300.0, waiting_for: Callable[[], str] = lambda: ""):
    """The images of `rows`, read from the shard set by Ray Data tasks of `task_cpus` CPUs on any node.

    Ray Train runs the whole pipeline again on every pass over the data; with `cache` the encoded
    bytes are read once into the object store (a read with no block for `stall_s` fails), so a pass
    only decodes.
    """
    import ray.data
    from ray.data.expressions import col

    # one bar per epoch per worker would bury the training log of a DVC stage
    ray.data.DataContext.get_current().enable_progress_bars = False
    loc = shard_location(shards, s3)
    ds = ray.data.read_parquet([loc.path(p.name) for p in shards.parts], filesystem=loc.fs,
                               columns=["path", "sha256", IMAGE_COLUMN], ray_remote_args={"num_cpus": task_cpus})
    ds = ds.filter(expr=col("path").is_in(sorted(rows["path"].astype(str))))
    ds = ds.repartition(target_num_rows_per_block=DECODE_ROWS)
    if cache:
        bundles = watched_iter(ds.iter_internal_ref_bundles(), stall_s, waiting_for, "block of the shards read")
        ds = ray.data.from_arrow_refs([ref for bundle in bundles for ref in bundle.block_refs])
    return ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size, "folder": shards.folder},
                          batch_size=DECODE_ROWS, num_cpus=task_cpus)


def endless_shard(shard, batch_size: int, seed: int, on_batch: Callable[[], None]) -> Iterator[torch.Tensor]:
    """This worker's shard, pass after pass, in batches of `batch_size` (the last partial one dropped)."""
    epoch = 0
    while True:
        seen = False
        for batch in shard.iter_torch_batches(
            batch_size=batch_size, drop_last=True, local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed + epoch
        ):
            seen = True
            on_batch()
            yield batch["image"]
        if not seen:
            raise ValueError(f"this worker's data shard has fewer than {batch_size} images: lower ray.num_workers or train.batch_size")
        epoch += 1
