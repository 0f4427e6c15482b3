"""Slab-decomposed Lorenz-96 on 1-4 gloo ranks against the single-process model."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from da_plugin.counter_rng import counter_normal
from da_plugin.filters import EnSF
from da_plugin.models import Lorenz96
from da_plugin.obs import ObservationOperator
from da_plugin.scale.slabs import Slab, exchange_halo, rk4_step, slab_analysis

DIM, STEPS, FORCING, DT = 23, 7, 8.0, 0.05  # 23 is divisible by none of 2, 3, 4


def observed(slab: Slab) -> tuple[torch.Tensor, ObservationOperator]:
    """The slab's share of y and of an arctan operator observing every third variable."""
    obs = ObservationOperator("arctan", 0.1, torch.arange(1, DIM, 3), DIM)
    local_obs, positions = obs.restrict(slab.start, slab.stop)
    return torch.linspace(-1, 1, obs.size, dtype=torch.float64)[positions], local_obs


def rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        slab = Slab(DIM, rank, world)
        state = 8.0 + counter_normal(0, 0, 3, slab.start, slab.stop, DIM, torch.float64)
        halo = exchange_halo(state)
        for _ in range(STEPS):
            state = rk4_step(state, FORCING, DT)
        analyses = {score: slab_analysis(EnSF(ensemble_size=3, steps=10, prior_score=score), state, *observed(slab),
                                         slab, seed=5, cycle=2)
                    for score in ("one_to_one", "mixture")}
        torch.save({"start": slab.start, "state": state, "halo": halo, **analyses}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_decomposed_forecast_equals_single_process(tmp_path, world):
    mp.spawn(rank_main, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    parts = sorted((torch.load(tmp_path / f"{r}.pt") for r in range(world)), key=lambda p: p["start"])
    initial = 8.0 + counter_normal(0, 0, 3, 0, DIM, DIM, torch.float64)
    full = torch.cat([p["state"] for p in parts], dim=-1)
    stepped = Lorenz96(dim=DIM, forcing=FORCING, dt=DT).step(initial, STEPS)
    torch.testing.assert_close(full, stepped, rtol=1e-12, atol=1e-12)
    whole = Slab(DIM, 0, 1)
    for score in ("one_to_one", "mixture"):
        single = slab_analysis(EnSF(ensemble_size=3, steps=10, prior_score=score), full, *observed(whole), whole, 5, 2)
        torch.testing.assert_close(torch.cat([p[score] for p in parts], dim=-1), single, rtol=1e-10, atol=1e-10)
    for part in parts:  # halos hold the periodic neighbours of each slab's edges
        size = part["state"].shape[-1]
        index = torch.arange(part["start"] - 2, part["start"] + size + 1) % DIM
        torch.testing.assert_close(part["halo"], initial[:, index], rtol=0, atol=0)


def test_slabs_partition_the_state():
    for dim, world in [(23, 4), (40, 3), (8, 4), (10**8, 8)]:
        slabs = [Slab(dim, r, world) for r in range(world)]
        assert slabs[0].start == 0 and slabs[-1].stop == dim
        assert all(a.stop == b.start for a, b in zip(slabs, slabs[1:], strict=False))
        assert max(s.size for s in slabs) - min(s.size for s in slabs) <= 1
    with pytest.raises(ValueError, match="fewer than 2 variables"):
        Slab(7, 0, 4)


def test_counter_normal_is_independent_of_the_split():
    full = counter_normal(3, 1, 5, 0, 1000, 1000)
    pieces = torch.cat([counter_normal(3, 1, 5, a, b, 1000) for a, b in [(0, 17), (17, 600), (600, 1000)]], dim=1)
    assert torch.equal(full, pieces)
    assert not torch.equal(full, counter_normal(4, 1, 5, 0, 1000, 1000))
    assert not torch.equal(full, counter_normal(3, 2, 5, 0, 1000, 1000))
    big = counter_normal(0, 0, 4, 0, 250_000, 250_000, torch.float64)
    assert abs(big.mean().item()) < 0.005 and abs(big.std().item() - 1) < 0.005
    assert abs((big[:, 1:] * big[:, :-1]).mean().item()) < 0.005  # neighbours uncorrelated
