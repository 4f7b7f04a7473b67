"""The training images as a Ray Data pipeline over the shard set, readable from any node.

Every task reserves `ray.data_cpus`, the share that the run's CPU budget keeps free beside its
workers (plantad.cluster.capacity): a task asking for a whole CPU would wait forever on a cluster
whose CPUs the workers and the endpoint's replicas hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from plantad.cluster.watch import run_watched
from plantad.config import S3Config
from plantad.data.images import ImageTransform, decode_image_bytes
from plantad.data.shards import IMAGE_COLUMN, ShardSet, read_shard_images

DECODE_ROWS = 16  # rows per Ray Data block: the dataset is cut so that reading and decoding run in parallel


def read_chunk(batch: dict[str, np.ndarray], shards: ShardSet, s3: S3Config, board=None) -> pa.Table:
    """Ray Data map: one chunk of manifest paths -> its rows (path, image bytes), hash-checked; a
    beat on the run's progress board per chunk."""
    paths = [str(p) for chunk in batch["paths"] for p in chunk]
    found = read_shard_images(shards, s3, paths)
    if board is not None:
        board.beat.remote("shard reader", f"{len(paths)} images read")
    return pa.table({"path": paths, IMAGE_COLUMN: [found[p] for p in paths]})


def decode_batch(batch: dict[str, np.ndarray], image_size: int) -> dict[str, np.ndarray]:
    """Ray Data map: rows (path, image bytes) -> normalised image arrays (B, 3, S, S)."""
    transform = ImageTransform(image_size)
    images = [transform(decode_image_bytes(b, p)).numpy() for p, b in zip(batch["path"], batch[IMAGE_COLUMN])]
    if not images:
        return {"image": np.zeros((0, 3, image_size, image_size), np.float32)}
    return {"image": np.stack(images).astype(np.float32)}


def image_dataset(shards: ShardSet, s3: S3Config, rows: pd.DataFrame, image_size: int, task_cpus: float,
                  cache: bool = True, board=None, stall_s: float = 300.0,
                  waiting_for: Callable[[dict], str] = lambda beats: ""):
    """The images of `rows`, read from the shard set by Ray Data tasks of `task_cpus` CPUs on any node.

    The driver cuts the paths into chunks (no task: Ray Data's own file listing, repartition and
    from_arrow_refs tasks each want a whole CPU). Ray Train runs the pipeline again on every pass
    over the data; with `cache` the encoded bytes are read once into the object store (a read with
    no chunk for `stall_s`, counted on `board`, fails), so a pass only decodes.
    """
    import ray.data

    # one bar per epoch per worker would bury the training log of a DVC stage
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not shards.location.startswith("s3://"):  # a task's working directory is not the driver's
        shards = dataclasses.replace(shards, location=str(Path(shards.location).resolve()))
    paths = sorted(rows["path"].astype(str))
    chunks = [{"paths": paths[i : i + DECODE_ROWS]} for i in range(0, len(paths), DECODE_ROWS)]
    ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
    ds = ds.map_batches(read_chunk, batch_size=1, num_cpus=task_cpus,
                        fn_kwargs={"shards": shards, "s3": s3, "board": board})
    if cache and board is not None:
        ds = run_watched(ds.materialize, board, stall_s, waiting_for, abort=lambda: None)
    elif cache:
        ds = ds.materialize()
    return ds.map_batches(decode_batch, fn_kwargs={"image_size": image_size}, batch_size=DECODE_ROWS,
                          num_cpus=task_cpus)


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
