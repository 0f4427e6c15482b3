"""Generate a Lorenz-96 twin-experiment problem (truth trajectory and observations) in shards.

    python tools/ensf_problem_gen.py --dim 1000000 --steps 10 --out problems/l96_1e6
    torchrun --nproc_per_node 8 tools/ensf_problem_gen.py --dim 100000000 --steps 100 --out problems/l96_1e8
    mpiexec -n 8 python tools/ensf_problem_gen.py --dim 100000000 --steps 100 --out problems/l96_1e8

Each rank integrates its slab of the truth (halo exchange per RK4 stage) and writes its own
shard: ``truth_NNNNN.npy`` ``[steps + 1, slab]`` (t0, then every analysis time) and
``obs_NNNNN.npy`` ``[steps, observed in slab]``, float32; ``meta.json`` lists the shard bounds
and the parameters (da_plugin.scale.problem). No process ever holds the whole state, and
``python -m da_plugin.scale problem_dir=...`` reads only the columns of its own slab, whatever
its rank count. The numbers are the ones that run computes itself without a problem directory
(same seed and settings). The shards are written into a staging directory inside --out and
published once every rank has finished, meta.json last.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from da_plugin.models.lorenz96 import Lorenz96
from da_plugin.obs import ObsConfig, ObservationOperator
from da_plugin.scale.config import ScaleConfig
from da_plugin.scale.launch import Launch, detect_launch, init_distributed
from da_plugin.scale.problem import META, write_meta, write_shard
from da_plugin.scale.slabs import Slab
from megavit.atomic import Staging, clear_stale_stagings, stops_cleanly
from megavit.config import number

PROG = "ensf_problem_gen"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=number(int, ge=4), required=True, help="state variables d")
    parser.add_argument("--steps", type=number(int, ge=1), required=True, help="analysis times (cycles) to generate")
    parser.add_argument("--obs-every", type=number(int, ge=1), default=1, help="model steps between analysis times")
    parser.add_argument("--obs-sigma", type=number(float, gt=0), default=0.05, help="observation error std")
    parser.add_argument("--obs-operator", choices=["arctan", "identity"], default="arctan")
    parser.add_argument("--obs-stride", type=number(int, ge=1), default=1, help="observe every stride-th variable")
    parser.add_argument("--dt", type=number(float, gt=0), default=0.005, help="model time step")
    parser.add_argument("--forcing", type=number(float), default=8.0)
    parser.add_argument("--spinup-steps", type=number(int, ge=0), default=1000, help="truth steps before t0")
    parser.add_argument("--seed", type=number(int, ge=0), default=0)
    parser.add_argument("--timeout-s", type=number(float, gt=0), default=300.0,
                        help="a silent rank stops the job after this")
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    return parser.parse_args(argv)


@stops_cleanly(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    launch = detect_launch()
    staging = None
    try:
        config = ScaleConfig(seed=args.seed, cycles=args.steps, spinup_steps=args.spinup_steps, device="cpu",
                             model=Lorenz96(dim=args.dim, forcing=args.forcing, dt=args.dt),
                             obs=ObsConfig(operator=args.obs_operator, sigma=args.obs_sigma, every=args.obs_every,
                                           stride=args.obs_stride))
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if out.exists():  # a killed generation's staging is removed, a running one's kept (and refused below)
            clear_stale_stagings(out)
        if out.exists() and any(out.iterdir()):  # every rank checks before the rendezvous, so before rank 0 stages
            raise ValueError(f"--out {out} exists and is not empty; choose a new directory")
        init_distributed(launch, "gloo", args.timeout_s)
        slab = Slab(args.dim, launch.rank, launch.world)
        staging = shared_staging(out, launch)
        obs, _ = ObservationOperator.slab_from_config(config.obs, args.dim, slab.start, slab.stop)
        mine = write_shard(config, slab, obs, staging.path, progress=launch.rank == 0)
        digests = [mine]
        if dist.is_initialized():  # every rank's checksums, for meta.json (also the barrier before it)
            digests = [None] * launch.world
            dist.all_gather_object(digests, mine)
        if launch.rank == 0:
            write_meta(config, launch.world, {k: v for part in digests for k, v in part.items()}, staging.file(META))
            shards = sorted(path.name for path in staging.path.iterdir() if path.name != META)
            staging.publish(shards + [META])  # meta.json last: a reader finding it finds every shard
            print(f"wrote {launch.world} shards of d={args.dim:,} x {args.steps} analysis times to {out}")
    except (ValueError, OSError) as err:
        print(f"{PROG}: rank {launch.rank}: error: {err}", file=sys.stderr)
        return 1
    except (RuntimeError, dist.DistError) as err:  # gloo: a peer died or hung past --timeout-s
        print(f"{PROG}: rank {launch.rank}: lost contact with the other ranks: {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 1
    finally:
        if staging is not None and launch.rank == 0:  # what is still staged (all of it, after a failure)
            staging.discard()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def shared_staging(out: Path, launch: Launch) -> Staging:
    """One staging directory inside ``out`` for every rank's shards: rank 0 creates it and
    broadcasts its path, the others join it (only rank 0 publishes or discards it)."""
    staging, error = None, None
    if launch.rank == 0:
        try:
            staging = Staging.create(out)
        except OSError as err:
            error = err
    if not dist.is_initialized():
        if error is not None:
            raise error
        return staging
    shared = [str(staging.path) if staging is not None else None]
    dist.broadcast_object_list(shared, src=0)
    if error is not None:
        raise error
    if shared[0] is None:
        raise OSError(f"rank 0 could not create a staging directory in {out}")
    return staging if launch.rank == 0 else Staging(out, shared[0])
