"""`plantad score`: every image under a folder or S3 prefix scored by one pinned model version.

The driver checks everything that can fail fast (MLflow, S3, the input listing) before Ray starts,
resolves the model to one version, plans the parts, and streams the rows of the missing parts out
of Ray Data (read tasks, then the scoring actor pool), committing each part as soon as all its
rows are in. Killing the job at any point loses at most the parts not yet committed.
One run at a time writes a model's table: the run holds the table's lock (lock.py) from planning
to the manifest, and removes parts of other plans only after its manifest is committed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from contextlib import closing
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa

from plantad.cluster.capacity import Request, fit_request, holders_text, read_capacity
from plantad.cluster.watch import watched_iter
from plantad.config import BulkConfig, RayConfig, Settings
from plantad.serving.bulk.lock import RunLock, held_lock
from plantad.serving.bulk.plan import (
    PARTS, Entry, Part, commit_part, done_parts, finished_manifest, identity_digest, listing_entries, model_id,
    model_sha256, plan_parts, read_part, table_identity, write_manifest,
)
from plantad.serving.bulk.scorer import BulkScorer, read_batch
from plantad.storage import TMP_PREFIX, Location, delete, list_image_sizes, list_names, open_location
from plantad.tracking.model_source import ModelRef, resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BulkSummary:
    output: str  # the model's output folder
    model: str  # e.g. "plantad-anomaly v3 (@champion)"
    images: int  # rows in the table: one per input image
    parts: int
    skipped_parts: int  # already committed by an earlier run
    scored: int  # images scored by this run
    anomalous: int
    errors: int  # rows with `error` set (unreadable, undecodable or oversized images)
    seconds: float  # this run's scoring time (Ray Data start-up and actor loading included)
    images_per_s: float  # scored / seconds
    warm_images_per_s: float  # images/s after the first batch came back (the actors are up)
    # images, anomalous and errors per top-level folder of the input ("." for files at its root):
    # a plant that files its images by line gets one row per line
    by_folder: dict[str, dict[str, int]]

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        lines = [f"{self.images} images in {self.output} scored by {self.model}: {self.anomalous} anomalous, "
                 f"{self.errors} failed (error column); this run scored {self.scored} images in "
                 f"{self.seconds:.1f} s ({self.images_per_s:.1f} images/s), {self.skipped_parts} of {self.parts} "
                 "parts were already done"]
        if len(self.by_folder) > 1:
            width = max(len(name) for name in self.by_folder)
            lines += [f"  {name:<{width}}  {c['images']} images, {c['anomalous']} anomalous, {c['errors']} failed"
                      for name, c in self.by_folder.items()]
        return "\n".join(lines)


def folder_counts(tables: Iterable[pa.Table]) -> dict[str, dict[str, int]]:
    """Images, anomalous and failed rows per top-level folder of the parts' `relpath`, in folder order."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for table in tables:
        for rel, error, flag in zip(*(table.column(name).to_pylist() for name in ("relpath", "error", "is_anomalous"))):
            c = counts[rel.split("/", 1)[0] if "/" in rel else "."]
            c["images"] += 1
            c["errors"] += error is not None
            c["anomalous"] += flag is True
    return {name: {k: counts[name][k] for k in ("images", "anomalous", "errors")} for name in sorted(counts)}


def resolve_source(uri: str, settings: Settings) -> tuple[ModelRef, str | None]:
    """The model pinned to one version, and the tracking URI actors download it from."""
    if not uri.startswith("models:/"):
        return resolve_model(uri, None), None
    from mlflow import MlflowClient

    from plantad.tracking.store import check_tracking_server, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(settings.mlflow, Path.cwd())
    check_tracking_server(tracking_uri, wait_s=5.0)
    return resolve_model(uri, MlflowClient(tracking_uri, registry_uri=tracking_uri)), tracking_uri


def fit_bulk(bulk: BulkConfig, rcfg: RayConfig) -> BulkConfig:
    """`bulk` with the actors' CPUs fitted to what the connected cluster has free: read tasks need
    a share too, or they wait forever beside actors (and Serve replicas) that hold every CPU.
    Shrinks bulk.cpus_per_actor down to bulk.min_cpus_per_actor; below that DoesNotFit (a warning
    with ray.autoscaling, whose new nodes may come)."""
    floor = min(bulk.min_cpus_per_actor, bulk.cpus_per_actor)
    gpus = bulk.actors * bulk.gpus_per_actor
    need = (f"bulk.actors x bulk.cpus_per_actor + bulk.read_cpus = {bulk.actors} x {bulk.cpus_per_actor:g} + "
            f"{bulk.read_cpus:g} CPUs (at least {bulk.actors} x {floor:g} + {bulk.read_cpus:g} with "
            "bulk.min_cpus_per_actor)" + (f" and bulk.actors x bulk.gpus_per_actor = {gpus:g} GPUs" if gpus else ""))
    request = Request("this scoring job", "scoring actors", bulk.actors, bulk.cpus_per_actor, "bulk.cpus_per_actor",
                      floor, bulk.read_cpus, gpus, need,
                      "or lower bulk.actors or the per-actor resources (--set bulk.min_cpus_per_actor=...)")
    per, _ = fit_request(request, rcfg.autoscaling, rcfg.stall_timeout_s)
    return bulk.model_copy(update={"cpus_per_actor": per})


def start_ray(settings: Settings) -> BulkConfig:
    """Join or start the cluster; the bulk settings fitted to it."""
    from plantad.cluster import connect

    connect(settings.ray)  # before `import ray`: it sets the environment Ray reads on import
    return fit_bulk(settings.bulk, settings.ray)


def stall_reason(bulk: BulkConfig) -> str:
    """What a scoring job with no batch for ray.stall_timeout_s waited for."""
    return (f"waited for {bulk.actors} scoring actor(s) of {bulk.cpus_per_actor:g} CPU"
            + (f" + {bulk.gpus_per_actor:g} GPU" if bulk.gpus_per_actor else "")
            + f" and read tasks of {bulk.read_cpus:g} CPU; the Ray cluster has {read_capacity(samples=1).text()}, "
            f"held by: {holders_text()}")


def scored_batches(pending: list[Part], entries: dict[str, Entry], src: Location, ref: ModelRef, mid: str,
                   tracking_uri: str | None, bulk: BulkConfig, maps: Location | None) -> Iterable[pd.DataFrame]:
    """Rows of the pending parts, streamed from Ray Data: read tasks -> scoring actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver has its own bar
    items = [{"relpath": rel, "key": entries[rel].key, "size": entries[rel].size, "refused": entries[rel].refused,
              "part": p.index} for p in pending for rel in p.relpaths]
    # about one input block per batch (capped): a read task merges its batches into one output block,
    # so fewer blocks would starve all but one actor and hold rows back until a whole block is read
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(-(-len(items) // bulk.batch_size), 2000)))
    ds = ds.map_batches(read_batch, fn_kwargs={"src": src, "max_bytes": bulk.max_image_bytes},
                        batch_size=bulk.batch_size, batch_format="pandas",
                        num_cpus=bulk.read_cpus)
    gpu = {"num_gpus": bulk.gpus_per_actor} if bulk.gpus_per_actor > 0 else {}
    ds = ds.map_batches(
        BulkScorer, batch_size=bulk.batch_size, batch_format="pandas", num_cpus=bulk.cpus_per_actor,
        compute=ActorPoolStrategy(size=bulk.actors), **gpu,
        fn_constructor_kwargs={"ref": ref, "model_id": mid, "tracking_uri": tracking_uri, "bulk": bulk,
                               "src": src, "maps": maps},
    )
    return ds.iter_batches(batch_size=None, batch_format="pandas")


def commit_stream(batches: Iterable[pd.DataFrame], pending: list[Part], out: Location, mid: str,
                  progress: bool, lock: RunLock) -> float:
    """Commit each part once all its rows have arrived; returns images/s after the first batch."""
    from tqdm import tqdm

    by_index = {p.index: p for p in pending}
    buffers: dict[int, list[pd.DataFrame]] = defaultdict(list)
    counts: Counter[int] = Counter()
    total = sum(len(p.relpaths) for p in pending)
    first: tuple[float, int] | None = None  # (arrival time, rows) of the first batch
    with tqdm(total=total, unit="img", desc="scoring", disable=not progress) as bar:
        for batch in batches:
            if set(batch["model_id"]) != {mid}:
                raise RuntimeError(f"rows scored by {set(batch['model_id'])} in the run of {mid}")
            for index, rows in batch.groupby("part"):
                buffers[index].append(rows)
                counts[index] += len(rows)
                if counts[index] == len(by_index[index].relpaths):
                    lock.check()  # never commit into a table another run has taken over
                    commit_part(out, by_index[index], pd.concat(buffers.pop(index)))
                    log.info("committed %s", out.display(f"{PARTS}/{by_index[index].file}"))
            bar.update(len(batch))
            first = first or (time.perf_counter(), len(batch))
    short = [p.file for p in pending if counts[p.index] != len(p.relpaths)]
    if short:
        raise RuntimeError(f"Ray Data returned incomplete rows for parts {short[:5]} of {out.uri}; re-run to resume")
    warm_s = time.perf_counter() - first[0] if first else 0.0
    return (total - first[1]) / warm_s if first and warm_s > 0 and total > first[1] else 0.0


def tidy_parts(out: Location, parts: list[Part]) -> None:
    """Remove temporary files of killed writers and parts of an earlier plan (another input listing
    or other settings); called under the lock, after the manifest that lists `parts` is committed."""
    planned = {p.file for p in parts}
    for name in list_names(out, PARTS):
        if name.startswith(TMP_PREFIX) or (name.startswith("part-") and name not in planned):
            log.info("removing %s (not part of this run's plan)", out.display(f"{PARTS}/{name}"))
            delete(out, f"{PARTS}/{name}")


def refuse_other_input(out: Location, manifest: dict, src: Location) -> None:
    """A table holds one input's rows: re-planning it for another input would delete the rows of the
    first (a user scoring each line's folder into one --output), so that is refused."""
    finished = manifest.get("input")
    if finished is not None and finished != src.uri:
        raise ValueError(f"{out.uri} holds the finished table of {finished}, not of {src.uri}: scoring "
                         f"{src.uri} there would replace those rows. Give this input its own output (--output; "
                         f"bulk.stage.output for the score stage), or delete {out.uri} to replace the table")


def plan_table(manifest: dict, relpaths: list[str], part_size: int, identity: dict,
               done: set[str]) -> tuple[dict, list[Part]]:
    """The identity and parts this run writes: its own, or, for a run without heatmaps, those of the
    finished table (`manifest`) that differs only by having them, when that table already holds every part."""
    parts = plan_parts(relpaths, part_size, identity_digest(identity))
    finished = manifest.get("identity")
    if identity["maps"] is None and finished and finished.get("maps") and {**finished, "maps": None} == identity:
        with_maps = plan_parts(relpaths, part_size, identity_digest(finished))
        if all(p.file in done for p in with_maps):
            return finished, with_maps
    return identity, parts


def publish_table(out: Location, parts: list[Part], info: dict) -> None:
    """Commit the manifest of `parts`, then remove what it does not list: a crash in between leaves
    stray files (removed by the next run), never a manifest that names a deleted part."""
    write_manifest(out, parts, info)
    tidy_parts(out, parts)


def run_bulk(settings: Settings, input_uri: str, output_uri: str, model_uri: str, maps_uri: str | None = None,
             progress: bool = False) -> BulkSummary:
    """Score every image under `input_uri` into `output_uri/<model id>/`; resumes a killed run.
    `progress` shows a progress bar on stderr (the CLI asks for one when stderr is a terminal)."""
    bulk = settings.bulk
    src = open_location(input_uri, settings.s3)
    entries = listing_entries(list_image_sizes(src, bulk.extensions))
    out_root = open_location(output_uri, settings.s3)
    maps = None if maps_uri is None else open_location(maps_uri, settings.s3)
    ref, tracking_uri = resolve_source(model_uri, settings)
    sha256 = model_sha256(ref)
    mid = model_id(ref, sha256)
    out = out_root.child(mid)
    identity = table_identity(ref, sha256, bulk, None if maps is None else maps.child(mid).uri)
    with held_lock(out, settings.s3, bulk.lock_stale_s) as lock:
        manifest = finished_manifest(out)
        refuse_other_input(out, manifest, src)
        done = done_parts(out)
        identity, parts = plan_table(manifest, list(entries), bulk.part_size, identity, done)
        pending = [p for p in parts if p.file not in done]
        log.info("%d images under %s in %d parts, %d to score with %s into %s",
                 len(entries), src.uri, len(parts), len(pending), ref.describe(), out.uri)
        start = time.perf_counter()
        scored, warm = sum(len(p.relpaths) for p in pending), 0.0
        if pending:
            fitted = start_ray(settings)
            batches = watched_iter(
                lambda: scored_batches(pending, entries, src, ref, mid, tracking_uri, fitted, maps),
                settings.ray.stall_timeout_s, lambda: stall_reason(fitted), "scored batch")
            with closing(batches):  # a failed commit stops the stream too
                warm = commit_stream(batches, pending, out, mid, progress, lock)
        seconds = time.perf_counter() - start
        by_folder = folder_counts(read_part(out, p.file) for p in parts)
        errors = sum(c["errors"] for c in by_folder.values())
        anomalous = sum(c["anomalous"] for c in by_folder.values())
        summary = BulkSummary(out.uri, ref.describe(), len(entries), len(parts), len(parts) - len(pending), scored,
                              anomalous, errors, seconds, scored / seconds if scored and seconds > 0 else 0.0, warm,
                              by_folder)
        lock.check()
        publish_table(out, parts, {"model_uri": ref.version_uri, "model_id": mid, "input": src.uri,
                                   "identity": identity, "finished_at": datetime.now(timezone.utc).isoformat(),
                                   "summary": summary.as_dict()})
    return summary
