"""Data-parallel correctness on two real torch.distributed (gloo) processes: the ranks start from the
same weights and draw different dropout masks; a loss that is not finite on one rank stops both at
that step within seconds, naming the rank and the term; the driver refuses a per-worker batch that
SNL's inter-affinity cannot use."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plantad.config import settings_from_dict
from plantad.models.interface import LossTerms
from plantad.training.distributed import check_worker_batch, seed_rank, stop_if_not_finite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _masks_equal() -> bool:
    """Whether both ranks drew the same dropout mask now."""
    mask = (torch.nn.functional.dropout(torch.ones(4096), p=0.2, training=True) == 0).to(torch.int64)
    gathered = [torch.zeros_like(mask) for _ in range(2)]
    dist.all_gather(gathered, mask)
    return bool(torch.equal(gathered[0], gathered[1]))


def _worker(rank: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(7)  # seed_everything(train.seed), then the model is built
        weights = torch.nn.Linear(64, 64).weight.detach().clone()
        out[f"unseeded_masks_equal_{rank}"] = _masks_equal()  # what every rank drew before the fix
        seed_rank(7, rank)
        out[f"masks_equal_{rank}"] = _masks_equal()
        same_weights = [torch.zeros_like(weights) for _ in range(2)]
        dist.all_gather(same_weights, weights)
        out[f"weights_equal_{rank}"] = bool(torch.equal(same_weights[0], same_weights[1]))
        # step 3: rank 1's semantic loss is NaN, rank 0's losses are finite
        nan = torch.tensor(float("nan"))
        one = torch.tensor(1.0)
        terms = LossTerms(total=nan if rank == 1 else one, local=one, semantic=nan if rank == 1 else one,
                          weight_local=1.0, weight_semantic=1.0)
        started = time.monotonic()
        try:
            stop_if_not_finite(terms, 3)
            out[f"error_{rank}"] = None
        except FloatingPointError as exc:
            out[f"error_{rank}"] = str(exc)
        out[f"seconds_{rank}"] = time.monotonic() - started
    finally:
        dist.destroy_process_group()


def _run() -> dict:
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        return dict(out)


def test_two_ranks_draw_different_dropout_masks_and_a_nan_on_one_rank_stops_both():
    out = _run()
    assert out["weights_equal_0"] and out["weights_equal_1"]  # seeded after the model: one set of weights
    assert out["unseeded_masks_equal_0"]  # without seed_rank the ranks repeat one another's masks
    assert not out["masks_equal_0"]  # with it, each rank its own dropout
    for rank in (0, 1):
        assert out[f"error_{rank}"] is not None, f"rank {rank} went on past the NaN of rank 1"
        assert "step 3" in out[f"error_{rank}"] and "rank 1: semantic, total" in out[f"error_{rank}"]
        assert "rank 0" not in out[f"error_{rank}"]
        assert out[f"seconds_{rank}"] < 5.0


def test_a_per_worker_batch_that_snl_cannot_use_is_refused_on_the_driver():
    snl = settings_from_dict({"model": {"method": "snl_rd"}, "train": {"batch_size": 4}})
    check_worker_batch(snl, 2)  # two images each
    with pytest.raises(ValueError, match=r"train.batch_size=4 over 4 workers gives each 1 image.*snl_rd needs at least 2"):
        check_worker_batch(snl, 4)
    check_worker_batch(settings_from_dict({"train": {"batch_size": 4}}), 4)  # the dual model: one image is enough
