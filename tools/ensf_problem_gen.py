"""Generate a Lorenz-96 twin-experiment problem (truth trajectory and observations) in shards.

    python tools/ensf_problem_gen.py --dim 1000000 --steps 10 --out problems/l96_1e6
    torchrun --nproc_per_node 8 tools/ensf_problem_gen.py --dim 100000000 --steps 100 --out problems/l96_1e8
    mpiexec -n 8 python tools/ensf_problem_gen.py --dim 100000000 --steps 100 --out problems/l96_1e8

Each rank integrates its slab of the truth (halo exchange per RK4 stage) and writes its own
shard: ``truth_NNNNN.npy`` ``[steps + 1, slab]`` (t0, then every analysis time) and
``obs_NNNNN.npy`` ``[steps, observed in slab]``, float32; ``meta.json`` lists the shard bounds
and the parameters. No process ever holds the whole state, and ``python -m da_plugin.scale
problem_dir=...`` reads only the columns of its own slab, whatever its rank count. The numbers
are the ones that run computes itself without a problem directory (same seed and settings).
Files are written under temporary names and renamed once every rank has finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from da_plugin.distributed import Slab, detect_launch, init_distributed
from da_plugin.models.lorenz96 import Lorenz96
from da_plugin.scale import ScaleConfig, ScaleObs, slab_operator, twin_truth


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, required=True, help="state variables d")
    parser.add_argument("--steps", type=int, required=True, help="analysis times (cycles) to generate")
    parser.add_argument("--obs-every", type=int, default=1, help="model steps between analysis times")
    parser.add_argument("--obs-sigma", type=float, default=0.05, help="observation error std")
    parser.add_argument("--obs-operator", choices=["arctan", "identity"], default="arctan")
    parser.add_argument("--obs-stride", type=int, default=1, help="observe every stride-th variable")
    parser.add_argument("--dt", type=float, default=0.005, help="model time step")
    parser.add_argument("--forcing", type=float, default=8.0)
    parser.add_argument("--spinup-steps", type=int, default=1000, help="truth steps before t0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="a silent rank stops the job after this")
    parser.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    launch = detect_launch()
    try:
        config = ScaleConfig(seed=args.seed, cycles=args.steps, spinup_steps=args.spinup_steps, device="cpu",
                             model=Lorenz96(dim=args.dim, forcing=args.forcing, dt=args.dt),
                             obs=ScaleObs(args.obs_operator, args.obs_sigma, args.obs_every, args.obs_stride))
        out = Path(args.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out} exists and is not empty; choose a new directory")
        init_distributed(launch, "gloo", args.timeout_s)
        slab = Slab(args.dim, launch.rank, launch.world)
        staging = out.parent / f".{out.name}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        write_shard(config, slab, staging, launch.rank)
        if dist.is_initialized():
            dist.barrier()
        if launch.rank == 0:
            meta = dict(config.problem(), shards=[[s.start, s.stop] for s in
                                                  (Slab(args.dim, r, launch.world) for r in range(launch.world))])
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
            print(f"wrote {launch.world} shards of d={args.dim:,} x {args.steps} analysis times to {out}")
    except (ValueError, OSError) as err:
        print(f"ensf_problem_gen: rank {launch.rank}: error: {err}", file=sys.stderr)
        return 1
    except (RuntimeError, dist.DistError) as err:  # gloo: a peer died or hung past --timeout-s
        print(f"ensf_problem_gen: rank {launch.rank}: lost contact with the other ranks: {str(err).splitlines()[0]}",
              file=sys.stderr)
        if launch.rank == 0:
            shutil.rmtree(Path(args.out).parent / f".{Path(args.out).name}.partial", ignore_errors=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def write_shard(config: ScaleConfig, slab: Slab, directory: Path, rank: int) -> None:
    """Integrate this rank's slab of the truth and stream it, with its observations, into .npy files."""
    obs = slab_operator(config, slab)
    truth_file = np.lib.format.open_memmap(directory / f"truth_{rank:05d}.npy", mode="w+", dtype=np.float32,
                                           shape=(config.cycles + 1, slab.size))
    obs_file = np.lib.format.open_memmap(directory / f"obs_{rank:05d}.npy", mode="w+", dtype=np.float32,
                                         shape=(config.cycles, obs.size))
    sequence = twin_truth(config, slab, obs, torch.device("cpu"), torch.float32)
    for time_index, (truth, y) in enumerate(tqdm(sequence, total=config.cycles + 1, disable=rank != 0,
                                                  desc="truth and observations", unit="time")):
        truth_file[time_index] = truth.numpy()
        if time_index:
            obs_file[time_index - 1] = y.numpy()
    truth_file.flush()
    obs_file.flush()
    del truth_file, obs_file


if __name__ == "__main__":
    sys.exit(main())
