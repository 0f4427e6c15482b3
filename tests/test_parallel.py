"""Topology, TP/SP mappings, parallel layers, TP RNG and the TP/SP ViT against one unsharded process (gloo, fp32).

Two gloo ranks are spawned once (module fixture); each runs every scenario and saves what it
saw; the tests compare that against hand-computed sums and against the model on one process.
"""

import datetime
import os
import re
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from megavit.model import ViT, load_vit_config, mse_loss
from megavit.parallel import (
    ColumnParallelLinear,
    DeepSpeedMPU,
    ParallelDims,
    ParallelDropout,
    RankCoord,
    RowParallelLinear,
    Topology,
    all_gather_to_tensor_parallel_region,
    copy_to_tensor_parallel_region,
    deepspeed_topology,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
    sequence_parallel_grad_hooks,
    shared_seed,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "vit" / "tiny.yaml"
WORLD = 2
TIMEOUT_S = 60  # a hung collective fails the test instead of the suite

MAPPINGS = {
    "copy": copy_to_tensor_parallel_region,
    "reduce": reduce_from_tensor_parallel_region,
    "scatter_features": scatter_to_tensor_parallel_region,
    "gather_features": gather_from_tensor_parallel_region,
    "scatter_tokens": scatter_to_sequence_parallel_region,
    "gather_tokens": gather_from_sequence_parallel_region,
    "all_gather_tokens": all_gather_to_tensor_parallel_region,
    "reduce_scatter_tokens": reduce_scatter_to_sequence_parallel_region,
}


# ---------------------------------------------------------------- what each rank runs

def mapping_input(rank: int) -> torch.Tensor:
    """Rank-dependent ``[B=1, T=4, D=4]`` activations."""
    return (rank + 1) * torch.arange(16.0).view(1, 4, 4)


def mapping_grad(rank: int, shape: torch.Size) -> torch.Tensor:
    """Rank-dependent upstream gradient for an output of ``shape``."""
    return 100.0 * (rank + 1) + torch.arange(float(shape.numel())).view(shape)


def run_mappings(rank: int, group: dist.ProcessGroup) -> dict:
    out = {}
    for name, fn in MAPPINGS.items():
        x = mapping_input(rank).requires_grad_()
        y = fn(x, group)
        y.backward(mapping_grad(rank, y.shape))
        out[name] = (y.detach(), x.grad)
    return out


def model_grads(overrides: list[str], group, sequence_parallel: bool, sum_grads: bool = True) -> dict:
    """Loss and per-parameter (grad, partition_dim) of the tiny ViT built from seed 0."""
    torch.manual_seed(0)
    model = ViT(load_vit_config(TINY, overrides), group=group, sequence_parallel=sequence_parallel)
    if sum_grads:
        sequence_parallel_grad_hooks(model, group)
    frames, lead_time, target = tiny_batch()
    torch.manual_seed(1)  # the dropout stream
    loss = mse_loss(model(frames, lead_time), target)
    loss.backward()
    grads = {name: (p.grad, getattr(p, "partition_dim", None), getattr(p, "sequence_parallel", False))
             for name, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads}


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    shape = (2, 2, *load_vit_config(TINY).image_size)
    frames, target = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    return frames, torch.rand(2, generator=generator), target


def dropout_masks(dims: ParallelDims, group: dist.ProcessGroup) -> dict:
    torch.manual_seed(shared_seed(0, dims, dist.get_rank()))
    ones = torch.ones(4096)
    outside, inside = ParallelDropout(0.5, group=group, split=False), ParallelDropout(0.5, group=group, split=True)
    return {"outside": outside(ones), "inside": inside(ones), "outside_after": outside(ones)}


def mpu_answers(topology: Topology) -> dict:
    mpu = DeepSpeedMPU(topology)
    answers = {}
    for name in dir(mpu):
        if name.startswith("get_"):
            value = getattr(mpu, name)()
            answers[name] = dist.get_process_group_ranks(value) if isinstance(value, dist.ProcessGroup) else value
    return answers


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        tp = Topology(ParallelDims(tp=2, world_size=2))
        dp = Topology(ParallelDims(dp=2, world_size=2))
        group = tp.tp_group
        torch.manual_seed(0)
        layers = {"column": ColumnParallelLinear(6, 8, group=group), "row": RowParallelLinear(8, 6, group=group)}
        dropout = ["model.dropout=0.2", "model.attention_dropout=0.2"]
        try:
            ViT(load_vit_config(TINY, ["model.num_heads=1"]), group=group)
            bad_heads = None
        except ValueError as err:
            bad_heads = str(err)
        results = {
            "mappings": run_mappings(rank, group),
            "layers": {name: (layer.weight.detach(), layer.bias.detach()) for name, layer in layers.items()},
            "tp": model_grads([], group, sequence_parallel=False),
            "tp_sp": model_grads([], group, sequence_parallel=True),
            "tp_sp_unsummed": model_grads([], group, sequence_parallel=True, sum_grads=False),
            "dropout": model_grads(dropout, group, sequence_parallel=True),
            "dropout_checkpointed": model_grads([*dropout, "model.checkpoint_every=1"], group, sequence_parallel=True),
            "masks_tp": dropout_masks(tp.dims, group),
            "masks_dp": dropout_masks(dp.dims, tp.tp_group),
            "mpu_tp": mpu_answers(tp),
            "mpu_dp": mpu_answers(dp),
            "bad_heads": bad_heads,
        }
        torch.save(results, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn the gloo ranks once; fail (not hang) after TIMEOUT_S."""
    out = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"gloo ranks still running after {2 * TIMEOUT_S} s")
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(WORLD)]


def full_grads(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Gradients of the whole model: TP shards concatenated along their partition dim."""
    full = {}
    for name, (grad, dim, _) in parts[0]["grads"].items():
        shards = [part["grads"][name][0] for part in parts]
        if dim is None:
            torch.testing.assert_close(shards[1], grad, rtol=0, atol=0, msg=f"replicated {name} differs across TP")
            full[name] = grad
        else:
            full[name] = torch.cat(shards, dim)
    return full


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------- tests of the spawned ranks

@pytest.mark.multiprocess
def test_mappings_forward_and_backward_match_hand_sums(ranks):
    x = [mapping_input(r) for r in range(WORLD)]

    def g(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
        return mapping_grad(rank, torch.Size(shape))

    expected = {  # name: (forward output of rank r, input gradient of rank r)
        "copy": lambda r: (x[r], g(0, (1, 4, 4)) + g(1, (1, 4, 4))),
        "reduce": lambda r: (x[0] + x[1], g(r, (1, 4, 4))),
        "scatter_features": lambda r: (x[r][..., 2 * r:2 * r + 2], torch.cat([g(0, (1, 4, 2)), g(1, (1, 4, 2))], -1)),
        "gather_features": lambda r: (torch.cat(x, -1), g(r, (1, 4, 8))[..., 4 * r:4 * r + 4]),
        "scatter_tokens": lambda r: (x[r][:, 2 * r:2 * r + 2], torch.cat([g(0, (1, 2, 4)), g(1, (1, 2, 4))], 1)),
        "gather_tokens": lambda r: (torch.cat(x, 1), g(r, (1, 8, 4))[:, 4 * r:4 * r + 4]),
        "all_gather_tokens": lambda r: (torch.cat(x, 1), (g(0, (1, 8, 4)) + g(1, (1, 8, 4)))[:, 4 * r:4 * r + 4]),
        "reduce_scatter_tokens": lambda r: ((x[0] + x[1])[:, 2 * r:2 * r + 2],
                                            torch.cat([g(0, (1, 2, 4)), g(1, (1, 2, 4))], 1)),
    }
    for name, want in expected.items():
        for rank in range(WORLD):
            output, grad = ranks[rank]["mappings"][name]
            out_want, grad_want = want(rank)
            torch.testing.assert_close(output, out_want, rtol=0, atol=0, msg=f"{name} forward, rank {rank}")
            torch.testing.assert_close(grad, grad_want, rtol=0, atol=0, msg=f"{name} backward, rank {rank}")


def test_mappings_are_identities_without_a_group():
    for name, fn in MAPPINGS.items():
        x = mapping_input(0).requires_grad_()
        y = fn(x, None)
        y.backward(mapping_grad(0, y.shape))
        assert torch.equal(y, x) and torch.equal(x.grad, mapping_grad(0, x.shape)), name


@pytest.mark.multiprocess
def test_parallel_linear_shards_are_slices_of_the_full_weight(ranks):
    torch.manual_seed(0)
    column, row = ColumnParallelLinear(6, 8), RowParallelLinear(8, 6)
    for rank in range(WORLD):
        (col_w, col_b), (row_w, row_b) = ranks[rank]["layers"]["column"], ranks[rank]["layers"]["row"]
        torch.testing.assert_close(col_w, column.weight.detach()[4 * rank:4 * rank + 4], rtol=0, atol=0)
        torch.testing.assert_close(col_b, column.bias.detach()[4 * rank:4 * rank + 4], rtol=0, atol=0)
        torch.testing.assert_close(row_w, row.weight.detach()[:, 4 * rank:4 * rank + 4], rtol=0, atol=0)
        torch.testing.assert_close(row_b, row.bias.detach(), rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("layout", ["tp", "tp_sp"])
def test_tensor_and_sequence_parallel_match_one_process(ranks, layout):
    reference = model_grads([], None, sequence_parallel=False)
    parts = [r[layout] for r in ranks]
    for part in parts:
        assert relative_error(part["loss"], reference["loss"]) < 1e-5
    grads = full_grads(parts)
    assert grads.keys() == reference["grads"].keys()
    for name, (want, _, _) in reference["grads"].items():
        assert grads[name].shape == want.shape, name
        assert relative_error(grads[name], want) < 1e-5, f"{layout}: gradient of {name}"


@pytest.mark.multiprocess
def test_sequence_parallel_needs_the_layernorm_grad_sum(ranks):
    reference = model_grads([], None, sequence_parallel=False)["grads"]
    parts = [r["tp_sp_unsummed"] for r in ranks]
    tagged = [name for name, (_, _, sp) in parts[0]["grads"].items() if sp]
    assert any(".norm1." in name for name in tagged) and any("fc2.bias" in name for name in tagged)
    for name in tagged:  # each rank saw half the tokens: a partial sum, different on each rank
        assert relative_error(parts[0]["grads"][name][0], reference[name][0]) > 1e-2, name
        assert not torch.allclose(parts[0]["grads"][name][0], parts[1]["grads"][name][0]), name


@pytest.mark.multiprocess
def test_tp_dropout_replays_under_activation_checkpointing(ranks):
    for rank in range(WORLD):
        plain, checkpointed = ranks[rank]["dropout"], ranks[rank]["dropout_checkpointed"]
        torch.testing.assert_close(checkpointed["loss"], plain["loss"], rtol=0, atol=0)
        for name, (grad, _, _) in plain["grads"].items():
            torch.testing.assert_close(checkpointed["grads"][name][0], grad, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.multiprocess
def test_dropout_masks_differ_inside_and_match_outside_the_tp_region(ranks):
    first, second = ranks[0]["masks_tp"], ranks[1]["masks_tp"]
    assert torch.equal(first["outside"], second["outside"])
    assert not torch.equal(first["inside"], second["inside"])
    assert torch.equal(first["outside_after"], second["outside_after"])  # forking leaves the shared stream in step
    assert not torch.equal(first["outside"], first["outside_after"])
    # data-parallel replicas (dp=2) get different shared streams
    assert not torch.equal(ranks[0]["masks_dp"]["outside"], ranks[1]["masks_dp"]["outside"])


@pytest.mark.multiprocess
def test_deepspeed_mpu_answers(ranks):
    tp0, tp1, dp1 = ranks[0]["mpu_tp"], ranks[1]["mpu_tp"], ranks[1]["mpu_dp"]
    assert tp1["get_tensor_model_parallel_rank"] == tp1["get_slice_parallel_rank"] == 1
    assert tp0["get_tensor_model_parallel_group"] == tp0["get_model_parallel_group"] == [0, 1]
    assert tp0["get_model_parallel_world_size"] == 2 and tp1["get_model_parallel_rank"] == 1
    assert tp0["get_data_parallel_group"] == [0] and tp0["get_data_parallel_world_size"] == 1
    assert dp1["get_data_parallel_rank"] == 1 and dp1["get_data_parallel_group_ranks"] == [0, 1]
    assert dp1["get_tensor_model_parallel_group"] == [1] and dp1["get_pipe_parallel_world_size"] == 1
    assert dp1["get_pipeline_model_parallel_group"] == dp1["get_pipe_parallel_group"] == [1]


@pytest.mark.multiprocess
def test_model_rejects_heads_not_divisible_by_tp(ranks):
    assert "num_heads=1 is not divisible by tp=2" in ranks[0]["bad_heads"]


# ---------------------------------------------------------------- topology, no process groups

def test_eight_rank_layout_tp2_dp2_pp2():
    dims = ParallelDims(tp=2, dp=2, pp=2, world_size=8)
    coords = [dims.coord(rank) for rank in range(8)]
    assert coords == [RankCoord(tp=r % 2, dp=r // 2 % 2, pp=r // 4) for r in range(8)]
    assert [dims.rank(c) for c in coords] == list(range(8))
    assert dims.group_ranks("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dims.group_ranks("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert dims.group_ranks("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert dims.group_ranks("tp", "pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert dims.tp_enabled and dims.dp_enabled and dims.pp_enabled and not dims.sp_enabled


def test_layout_equals_deepspeeds_pipe_model_data_topology():
    dims = ParallelDims(tp=2, dp=3, pp=2, world_size=12)
    topology = deepspeed_topology(dims)
    for ours, theirs in [("tp", "model"), ("dp", "data"), ("pp", "pipe")]:
        assert dims.group_ranks(ours) == sorted(topology.get_axis_comm_lists(theirs))
    for rank in range(12):
        coord = topology.get_coord(rank)
        assert dims.coord(rank) == RankCoord(tp=coord.model, dp=coord.data, pp=coord.pipe)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=2, dp=2, pp=2, world_size=6), r"tp \* dp \* pp = 2 \* 2 \* 2 = 8 does not equal world_size = 6"),
        (dict(tp=0, world_size=0), r"tp must be >= 1, got tp=0"),
        (dict(dp=-1, world_size=4), r"dp must be >= 1, got dp=-1"),
    ],
)
def test_bad_sizes_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


def test_model_size_checks_name_every_value():
    dims = ParallelDims(tp=4, pp=3, world_size=12, sequence_parallel=True)
    with pytest.raises(ValueError) as err:
        dims.check_model(num_heads=6, hidden_size=96, ffn_hidden_size=384, num_layers=8, num_tokens=30)
    assert str(err.value) == (
        "model does not fit the parallel layout: num_heads=6 is not divisible by tp=4; "
        "num_layers=8 cannot be split evenly into pp=3 pipeline stages; "
        "num_tokens=30 is not divisible by tp=4 (sequence parallelism)")
    ParallelDims(tp=4, pp=2, world_size=8).check_model(num_heads=16, hidden_size=1024, ffn_hidden_size=4096,
                                                       num_layers=8, num_tokens=30)  # no SP: tokens unsplit


def test_mpu_has_every_name_deepspeed_calls():
    import deepspeed

    source = Path(deepspeed.__file__).parent
    called = {name for path in source.rglob("*.py") for name in re.findall(r"mpu\.(get_\w+)\(", path.read_text())}
    missing = called - {name for name in dir(DeepSpeedMPU) if name.startswith("get_")}
    # Ulysses sequence parallelism (not ours, see megavit/parallel/mpu.py) and AutoTP's own groups module
    assert missing == {
        "get_sequence_parallel_group", "get_sequence_parallel_rank", "get_sequence_parallel_world_size",
        "get_sequence_data_parallel_group", "get_sequence_data_parallel_rank",
        "get_sequence_data_parallel_world_size", "get_tensor_model_parallel_src_rank",
    }
